"""torchvision backbones with an FPN (P3-P7), and their weights loading (never downloads)."""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..config import ModelConfig
from .fcos import conv3x3


class WeightsError(RuntimeError):
    """Requested backbone weights cannot be found or do not fit."""


_RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# MobileNetV2 ``features`` indices ending at stride 8, 16, 32, and their channels.
_MBV2_LAYERS = {"6": "0", "13": "1", "18": "2"}
_MBV2_CHANNELS = [32, 96, 1280]


def _enum_weights(name: str):
    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(f"unknown torchvision weights '{name}' (e.g. ResNet50_Weights.IMAGENET1K_V1)") from None


def torchvision_cache_file(name: str) -> Path:
    """Where torchvision looks for the file of a weights enum (its hub checkpoint cache)."""
    url = _enum_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_backbone_state(weights: str) -> dict[str, torch.Tensor] | None:
    """State dict for ``weights``: 'none', a local .pth file, or a torchvision enum whose file must
    already sit in torchvision's cache; a missing file is an error telling where to put it."""
    if not weights or weights.lower() == "none":
        return None
    if "_Weights." in weights and not Path(weights).exists():
        path = torchvision_cache_file(weights)
        if not path.is_file():
            from ..offline_weights import FILE_NAME

            fetch = "run `boxmask weights` (places this file offline), " if path.name == FILE_NAME else ""
            raise WeightsError(
                f"backbone weights {weights} are not on this machine and boxmask never downloads them: "
                f"{fetch}place the file at {path} (or set TORCH_HOME), or give model.weights=PATH/TO/FILE.pth"
            )
        return _read_state(path, _cached_file_bytes(path))
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    return _read_state(path, path)


def _cached_file_bytes(path: Path) -> io.BytesIO:
    """A torchvision cache file's bytes, after checking them against the sha256 prefix its name carries
    (``mobilenet_v2-b0353104.pth``): a foreign or damaged file in the cache is refused, not loaded."""
    data = path.read_bytes()
    m = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if m and not hashlib.sha256(data).hexdigest().startswith(m.group(1)):
        raise WeightsError(f"{path} is not torchvision's file (its sha256 does not start with {m.group(1)}); "
                           "delete it and place the right one (boxmask weights)")
    return io.BytesIO(data)


def _read_state(path: Path, source) -> dict:
    """A state dict read with weights_only=True: a weights file never runs code."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or code-carrying files
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        first = next((l for l in lines if "GLOBAL" in l), lines[0])[:200]
        raise WeightsError(f"cannot read backbone weights {path} (only tensors are accepted): {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def _body(cfg: ModelConfig) -> tuple[nn.Module, dict[str, str], list[int]]:
    norm = FrozenBatchNorm2d if cfg.norm == "frozen_bn" else nn.BatchNorm2d
    name = cfg.backbone
    if name in _RESNETS:
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
        c5 = _RESNETS[name]
        return net, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c5 // 4, c5 // 2, c5]
    if name == "mobilenet_v2":
        net = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm)
        return net, dict(_MBV2_LAYERS), list(_MBV2_CHANNELS)
    raise WeightsError(f"unknown backbone '{name}' (resnet18, resnet34, resnet50, resnet101, mobilenet_v2)")


def _freeze(net: nn.Module, cfg: ModelConfig) -> None:
    if cfg.backbone.startswith("resnet"):
        groups = [["conv1", "bn1"], ["layer1"]]
    else:
        groups = [["features.0", "features.1"], ["features.2", "features.3"]]
    frozen = [p for g in groups[: cfg.freeze_at] for p in g]
    for pname, param in net.named_parameters():
        if any(pname == f or pname.startswith(f + ".") for f in frozen):
            param.requires_grad_(False)


def _separable_output(channels: int) -> nn.Sequential:
    """An FPN output convolution as depthwise 3x3 + pointwise 1x1, initialised as torchvision's FPN
    initialises its own (Kaiming uniform, a=1; bias 0)."""
    block = conv3x3(channels, True, "separable")
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return block


class Backbone(nn.Module):
    """Body + FPN; returns the pyramid levels for ``cfg.fpn_strides`` (P3 = stride 8, ...)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        net, return_layers, in_channels = _body(cfg)
        state = load_backbone_state(cfg.weights)
        if state is not None:
            result = net.load_state_dict(state, strict=False)
            matched = len(net.state_dict()) - len(result.missing_keys)
            if matched == 0:
                raise WeightsError(f"no key of the weights file matches backbone {cfg.backbone}")
        _freeze(net, cfg)
        body = net.features if cfg.backbone == "mobilenet_v2" else net
        num_levels = len(cfg.fpn_strides)
        if cfg.fpn_strides[:3] != [8, 16, 32] or not 3 <= num_levels <= 5:
            raise WeightsError("model.fpn_strides must start 8, 16, 32 and have 3 to 5 levels")
        extra = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels) if num_levels > 3 else None
        self.fpn = BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)
        if cfg.head_conv == "separable":
            self.fpn.fpn.layer_blocks = nn.ModuleList(_separable_output(cfg.fpn_channels)
                                                      for _ in self.fpn.fpn.layer_blocks)
        self.num_levels = num_levels
        self.out_channels = cfg.fpn_channels
        # the body's last stride-4 block (C2), read on the way for SIM's texture gate
        self._c2_name = "layer1" if cfg.backbone in _RESNETS else "3"

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: OrderedDict = self.fpn(x)
        return list(feats.values())[: self.num_levels]

    def levels_and_low(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The pyramid levels and the body's stride-4 and stride-8 outputs (``c2``, ``c3``: low-level
        appearance, for SIM's texture map and texture gate), in one pass."""
        getter = self.fpn.body  # torchvision's IntermediateLayerGetter, walked as its forward does
        body: OrderedDict = OrderedDict()
        c2 = x
        for name, module in getter.items():
            x = module(x)
            if name == self._c2_name:
                c2 = x
            if name in getter.return_layers:
                body[getter.return_layers[name]] = x
        feats: OrderedDict = self.fpn.fpn(body)
        return list(feats.values())[: self.num_levels], {"c2": c2, "c3": next(iter(body.values()))}
