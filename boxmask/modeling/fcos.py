"""FCOS head (classification, box regression, centerness) with CondInst's controller, and its losses."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


class Scale(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def conv3x3(channels: int, bias: bool, kind: str = "full") -> nn.Module:
    """A 3x3 convolution, channels to channels: ``full``, or ``separable`` (depthwise 3x3, then pointwise
    1x1: 9C + C^2 multiply-adds per location instead of 9C^2)."""
    if kind == "full":
        return nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                         nn.Conv2d(channels, channels, 1, bias=bias))


def _tower(channels: int, num_convs: int, norm: str, conv: str = "full") -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(conv3x3(channels, norm == "none", conv))
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
        conv: str = "full",
    ):
        super().__init__()
        self.strides = list(strides)
        self.cls_tower = _tower(channels, num_convs, norm, conv)
        self.box_tower = _tower(channels, num_convs, norm, conv)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(channels, 1, 3, padding=1)
        self.controller = nn.Conv2d(channels, controller_bias.numel(), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in strides])
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                # a depthwise filter sums 9 inputs, not 9C: at N(0, 0.01) the tower's signal would vanish
                nn.init.normal_(m.weight, std=1.0 / 3.0)
            elif isinstance(m, nn.Conv2d):
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
        """Every output at every location, the controller's parameters ``params`` included (the ONNX
        graph's form; training and inference use ``forward_dense``)."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("cls", "reg", "ctr", "params")}
        for level, x in enumerate(feats):
            b = self.box_tower(x)
            out["params"].append(self.controller(b))
            out["cls"].append(self.cls_logits(self.cls_tower(x)))
            # Distances are predicted in units of the level's stride (FCOS's norm_reg_targets).
            out["reg"].append(F.relu(self.scales[level](self.bbox_pred(b))) * self.strides[level])
            out["ctr"].append(self.ctrness(b))
        return out

    def forward_dense(self, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Class, box and centerness outputs per level as ``forward``, and the box tower's features
        ``box_feats`` in place of the controller's output, which ``patches_at`` and ``controller_on``
        evaluate at the few locations needed (at every location it costs about one more tower convolution)."""
        out: dict[str, list[torch.Tensor]] = {"cls": [], "reg": [], "ctr": [], "box_feats": []}
        for level, x in enumerate(feats):
            b = self.box_tower(x)
            out["box_feats"].append(b)
            out["cls"].append(self.cls_logits(self.cls_tower(x)))
            out["reg"].append(F.relu(self.scales[level](self.bbox_pred(b))) * self.strides[level])
            out["ctr"].append(self.ctrness(b))
        return out

    def patches_at(self, box_feats: torch.Tensor, image_idx: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor
                   ) -> torch.Tensor:
        """The controller's input at rows ``ys`` and columns ``xs`` of images ``image_idx`` of one level's
        box-tower features [B, C, h, w]: each location's zero-padded 3x3 neighbourhood, [N, 9 * C]."""
        padded = F.pad(box_feats, (1, 1, 1, 1))  # the convolution's zero padding
        dy, dx = torch.meshgrid(torch.arange(3, device=ys.device), torch.arange(3, device=ys.device), indexing="ij")
        # [N, 9, C]: the 3x3 neighbourhood of each location (advanced indices first, then the channels)
        return padded[image_idx[:, None], :, ys[:, None] + dy.reshape(1, -1), xs[:, None] + dx.reshape(1, -1)].flatten(1)

    def controller_on(self, patches: torch.Tensor) -> torch.Tensor:
        """The controller's 3x3 convolution on ``patches_at``'s neighbourhoods: parameters [N, P]."""
        w = self.controller.weight  # [P, C, 3, 3]
        return F.linear(patches, w.permute(0, 2, 3, 1).flatten(1), self.controller.bias)


def ltrb_to_boxes(locations: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    x, y = locations[:, 0], locations[:, 1]
    return torch.stack([x - ltrb[:, 0], y - ltrb[:, 1], x + ltrb[:, 2], y + ltrb[:, 3]], dim=1)


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-pair GIoU loss of xyxy boxes, as torchvision's ``generalized_box_iou_loss(reduction="none")``
    but with clamped overlaps instead of boolean-mask writes, which would force a host sync on a GPU."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    inter = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0) * (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (area_c - union) / (area_c + eps))


def fcos_losses(
    cls_logits: torch.Tensor,
    reg_pred: torch.Tensor,
    ctr_logits: torch.Tensor,
    locations: torch.Tensor,
    labels: torch.Tensor,
    reg_targets: torch.Tensor,
    ctr_targets: torch.Tensor,
    num_pos_norm: torch.Tensor | float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    ctr_norm: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """FCOS losses over all locations of the batch, flattened: ``cls_logits`` [L, C]; ``labels`` [L]
    with -1 for background; regression and centerness count on the positives only.

    ``num_pos_norm`` is the number of positives and ``ctr_norm`` the sum of their centerness targets
    (which normalises the box loss; default: this batch's), both averaged over the processes under DDP.
    Every term is computed on all locations and weighted to the positives: no data-dependent shapes,
    so no host sync."""
    pos = labels >= 0
    onehot = F.one_hot(labels.clamp(min=0), cls_logits.shape[1]).to(cls_logits.dtype) * pos[:, None]
    loss_cls = sigmoid_focal_loss(cls_logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_pos_norm
    # negatives get a valid unit box on both sides (weight 0), so GIoU stays finite there
    boxes_pred = ltrb_to_boxes(locations, torch.where(pos[:, None], reg_pred.float(), 1.0))
    boxes_tgt = ltrb_to_boxes(locations, torch.where(pos[:, None], reg_targets.float(), 1.0))
    ctr_t = torch.where(pos, ctr_targets.float(), 0.0)
    giou = giou_loss(boxes_pred, boxes_tgt)
    norm = ctr_t.sum() if ctr_norm is None else ctr_norm
    loss_box = (giou * ctr_t).sum() / torch.as_tensor(norm, device=ctr_t.device).clamp(min=1e-6)
    bce = F.binary_cross_entropy_with_logits(ctr_logits.float(), ctr_t, reduction="none")
    loss_ctr = (bce * pos).sum() / num_pos_norm
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}
