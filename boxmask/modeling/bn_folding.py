"""Inference copies of modules with each BatchNorm folded into the convolution before it."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` in which every ``Conv2d`` directly followed by a norm
    (``FrozenBatchNorm2d``, or ``BatchNorm2d`` with its running statistics) among the children of one
    module is a single convolution with scaled weights and a bias, and the norm an ``Identity``.

    A norm costs two passes over its feature map (scale, shift); folded it costs none. Children are
    paired in registration order, which is the order in which torchvision's ResNets and MobileNetV2,
    and ``nn.Sequential`` blocks, run them. The copy shares no storage with ``module``."""
    folded = copy.deepcopy(module).eval().requires_grad_(False)
    for parent in folded.modules():
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, (FrozenBatchNorm2d, nn.BatchNorm2d))):
                continue
            if isinstance(norm, nn.BatchNorm2d) and not norm.track_running_stats:
                continue  # normalises with the batch's own statistics: nothing to fold
            if norm.weight is None:  # affine=False
                w, b = torch.ones_like(norm.running_var), torch.zeros_like(norm.running_mean)
            else:
                w, b = norm.weight, norm.bias
            scale = w * (norm.running_var + norm.eps).rsqrt()
            shift = b - norm.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            setattr(parent, norm_name, nn.Identity())
    return folded


class FoldedCache:
    """Folded copies of a model's modules, rebuilt whenever one of their weights changed (an optimiser
    step, a checkpoint loaded, a move to another device). A copy of the model (``deepcopy``, pickling)
    starts with an empty cache rather than duplicating it."""

    def __init__(self):
        self.key: tuple | None = None
        self.modules: tuple[nn.Module, ...] = ()

    def get(self, *modules: nn.Module) -> tuple[nn.Module, ...]:
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if key != self.key:
            self.modules = ()  # free the old copies before making new ones
            self.modules = tuple(fold_batchnorm(m) for m in modules)
            self.key = key
        return self.modules

    def __deepcopy__(self, memo) -> "FoldedCache":
        return FoldedCache()

    def __getstate__(self) -> dict:
        return {"key": None, "modules": ()}
