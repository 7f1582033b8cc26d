"""`boxmask export CKPT --onnx OUT.onnx`: the inference model as one ONNX graph.

Input: ``image`` uint8 [1, 3, H, W] (RGB, any H and W; multiples of 32 avoid padding inside the
model). Outputs: ``boxes`` [N, 4] (xyxy, input pixels), ``scores`` [N], ``labels`` [N] (0-based class
index), ``masks`` [N, H, W] mask probabilities at the input resolution (threshold at
``model.mask_thresh``, resize to the original image yourself). Backbone, FPN, FCOS head, score
threshold, NMS (ONNX NonMaxSuppression) and the dynamic mask head are all in the graph. Unlike
``boxmask predict`` there is no per-level pre-NMS top-k (ONNX has no cheap dynamic top-k over a
data-dependent count); with the default score threshold the detections are the same."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torchvision.ops import batched_nms

from .modeling.condinst import CondInst
from .modeling.dynamic_mask_head import aligned_bilinear
from .modeling.fcos import ltrb_to_boxes


class ExportModel(nn.Module):
    """CondInst inference for one image, written with tensor ops only (traceable with dynamic sizes)."""

    def __init__(self, model: CondInst):
        super().__init__()
        self.model = model.eval()
        m = model.cfg.model
        self.score_thresh, self.nms_thresh, self.max_det = m.score_thresh, m.nms_thresh, m.detections_per_image
        # The exporter restores the wrapper's training flag afterwards, and with it the model's: a wrapper
        # left in training mode would hand back a model whose BatchNorm layers use batch statistics.
        self.eval()

    def forward(self, image: torch.Tensor):
        model = self.model
        h, w = image.shape[-2:]
        # pad to a multiple of 32 inside the graph, as collate does
        ph = (32 - h % 32) % 32
        pw = (32 - w % 32) % 32
        image = nn.functional.pad(image.float(), (0, pw, 0, ph))
        x = (image - model.pixel_mean) / model.pixel_std
        feats = model.backbone(x)
        head = model.head(feats)
        locs, cls, reg, ctr, params, soi = [], [], [], [], [], []
        for lvl, (c, r, t, p) in enumerate(zip(head["cls"], head["reg"], head["ctr"], head["params"])):
            stride = model.strides[lvl]
            fh, fw = c.shape[-2:]
            xs = torch.arange(fw, dtype=torch.float32) * stride + stride // 2
            ys = torch.arange(fh, dtype=torch.float32) * stride + stride // 2
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            locs.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
            cls.append(c[0].flatten(1).t())
            reg.append(r[0].flatten(1).t())
            ctr.append(t[0].flatten(1).t()[:, 0])
            params.append(p[0].flatten(1).t())
            soi.append(torch.full_like(xx.reshape(-1), model.soi[lvl]))
        locs, cls, reg, ctr, params, soi = (torch.cat(v) for v in (locs, cls, reg, ctr, params, soi))
        scores = cls.sigmoid() * ctr.sigmoid()[:, None]
        keep = torch.nonzero(scores > self.score_thresh)
        loc_idx, labels = keep[:, 0], keep[:, 1]
        sc = scores[loc_idx, labels].sqrt()
        boxes = ltrb_to_boxes(locs[loc_idx], reg[loc_idx])
        wh = torch.stack([torch.zeros((), dtype=torch.float32) + w, torch.zeros((), dtype=torch.float32) + h])
        boxes = torch.max(torch.min(boxes, wh.repeat(2)[None]), torch.zeros(1, 4))
        order = batched_nms(boxes, sc, labels, self.nms_thresh)[: self.max_det]
        loc_idx, labels, sc, boxes = loc_idx[order], labels[order], sc[order], boxes[order]
        logits = model.mask_head(model.mask_branch(feats[:3]), model.strides[0], params[loc_idx],
                                 torch.zeros_like(loc_idx), locs[loc_idx], soi[loc_idx], model.cfg.model.mask_out_stride)
        masks = aligned_bilinear(logits.sigmoid(), model.cfg.model.mask_out_stride)[:, 0, :h, :w]
        return boxes, sc, labels, masks


def export_onnx(model: CondInst, path: str | Path, example_size: tuple[int, int] = (128, 160), opset: int = 17) -> Path:
    """Trace ``ExportModel`` on a random example and write ``path`` (via a temporary file)."""
    from .atomic_io import atomic_write_bytes

    wrapper = ExportModel(model)
    torch.manual_seed(0)
    example = torch.randint(0, 255, (1, 3, *example_size), dtype=torch.uint8)
    path = Path(path)

    def write(f) -> None:
        torch.onnx.export(
            wrapper, (example,), f, input_names=["image"], output_names=["boxes", "scores", "labels", "masks"],
            dynamic_axes={"image": {2: "height", 3: "width"}, "boxes": {0: "n"}, "scores": {0: "n"},
                          "labels": {0: "n"}, "masks": {0: "n", 1: "height", 2: "width"}},
            opset_version=opset, dynamo=False,
        )

    atomic_write_bytes(path, write)
    return path
