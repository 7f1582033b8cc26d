"""FCOS head (classification, box regression, centerness) with CondInst's controller, and its losses."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss


class Scale(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"))
        if norm == "gn":
            layers.append(nn.GroupNorm(min(32, channels // 4) if channels >= 8 else 1, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Shared across FPN levels. Outputs per level: class logits [B, C, h, w], ltrb distances in pixels
    [B, 4, h, w], centerness logits [B, 1, h, w] and dynamic mask-head parameters [B, P, h, w]."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_convs: int,
        norm: str,
        prior_prob: float,
        strides: list[int],
        controller_bias: torch.Tensor,
        shared_init: bool = True,
    ):
        super().__init__()
        self.strides = list(strides)
        self.cls_tower = _tower(channels, num_convs, norm)
        self.box_tower = _tower(channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(channels, 1, 3, padding=1)
        self.controller = nn.Conv2d(channels, controller_bias.numel(), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in strides])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        if shared_init:
            # Generated parameters = a shared, well-scaled MLP (the bias) + a small per-location part.
            with torch.no_grad():
                self.controller.weight.mul_(0.1)
                self.controller.bias.copy_(controller_bias)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {"cls": [], "reg": [], "ctr": [], "params": []}
        for level, x in enumerate(feats):
            c = self.cls_tower(x)
            b = self.box_tower(x)
            out["cls"].append(self.cls_logits(c))
            # Distances are predicted in units of the level's stride (FCOS's norm_reg_targets).
            out["reg"].append(F.relu(self.scales[level](self.bbox_pred(b))) * self.strides[level])
            out["ctr"].append(self.ctrness(b))
            out["params"].append(self.controller(b))
        return out


def ltrb_to_boxes(locations: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    x, y = locations[:, 0], locations[:, 1]
    return torch.stack([x - ltrb[:, 0], y - ltrb[:, 1], x + ltrb[:, 2], y + ltrb[:, 3]], dim=1)


def fcos_losses(
    cls_logits: torch.Tensor,
    reg_pred: torch.Tensor,
    ctr_logits: torch.Tensor,
    locations: torch.Tensor,
    labels: torch.Tensor,
    reg_targets: torch.Tensor,
    ctr_targets: torch.Tensor,
    num_pos_norm: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    ctr_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """FCOS losses over all locations of the batch, flattened: ``cls_logits`` [L, C]; ``labels`` [L]
    with -1 for background; regression and centerness on the positives only.

    ``num_pos_norm`` is the number of positives and ``ctr_norm`` the sum of their centerness targets
    (which normalises the box loss; default: this batch's), both averaged over the processes under DDP."""
    pos = labels >= 0
    onehot = torch.zeros_like(cls_logits)
    onehot[pos, labels[pos]] = 1.0
    loss_cls = sigmoid_focal_loss(cls_logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_pos_norm
    if pos.any():
        boxes_pred = ltrb_to_boxes(locations[pos], reg_pred[pos])
        boxes_tgt = ltrb_to_boxes(locations[pos], reg_targets[pos])
        ctr_t = ctr_targets[pos]
        giou = generalized_box_iou_loss(boxes_pred.float(), boxes_tgt.float(), reduction="none")
        norm = ctr_t.sum() if ctr_norm is None else torch.tensor(ctr_norm, device=ctr_t.device)
        loss_box = (giou * ctr_t).sum() / norm.clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits[pos].float(), ctr_t, reduction="sum") / num_pos_norm
    else:
        loss_box = reg_pred.sum() * 0.0
        loss_ctr = ctr_logits.sum() * 0.0
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}
