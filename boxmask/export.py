"""`boxmask export CKPT --onnx OUT.onnx`: the inference model as one ONNX graph, checked against
PyTorch in onnxruntime before it is written.

Contract (also stored in the file's metadata, ``onnx.load(f).metadata_props``):

- Input ``image``: uint8 RGB [1, 3, H, W], one image (the batch is fixed at 1), already resized the
  way the model was tested: scale ``s = min(min_size_test / min(h, w), max_size / max(h, w))``, size
  ``round(h * s), round(w * s)``, bilinear with antialiasing (``torch.nn.functional.interpolate(...,
  antialias=True)``, as ``boxmask predict`` does). Other sizes run, but the scores then differ. Padding to a multiple of 32 and pixel normalisation are in the graph.
- Optional input ``score_thresh`` (float32 scalar, default the model's, stored as ``score_thresh``):
  detections with a lower score are dropped.
- Outputs: ``boxes`` [N, 4] (xyxy, input pixels: divide by ``s`` for the original image), ``scores``
  [N], ``labels`` [N] int64 **category ids** of the training json (``category_ids`` in the metadata, in
  the order of ``class_names``), ``masks`` [N, H, W] mask probabilities at the input size (threshold at
  ``mask_thresh``).

Backbone, FPN, FCOS head, score threshold, NMS (ONNX NonMaxSuppression) and the dynamic mask head are
all in the graph. Unlike ``boxmask predict`` there is no per-level pre-NMS top-k (ONNX has no cheap
dynamic top-k over a data-dependent count); with the default score threshold the detections are the
same."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torchvision.ops import batched_nms

from .config import ConfigError
from .modeling.condinst import CondInst
from .modeling.dynamic_mask_head import aligned_bilinear
from .modeling.fcos import ltrb_to_boxes


class ExportError(ConfigError):
    """The exported graph does not reproduce the PyTorch model."""


class ExportModel(nn.Module):
    """CondInst inference for one image, written with tensor ops only (traceable with dynamic sizes)."""

    def __init__(self, model: CondInst, cat_ids: list[int]):
        super().__init__()
        self.model = model.eval()
        m = model.cfg.model
        self.nms_thresh, self.max_det = m.nms_thresh, m.detections_per_image
        self.register_buffer("cat_ids", torch.tensor(cat_ids, dtype=torch.long), persistent=False)
        # The exporter restores the wrapper's training flag afterwards, and with it the model's: a wrapper
        # left in training mode would hand back a model whose BatchNorm layers use batch statistics.
        self.eval()

    def forward(self, image: torch.Tensor, score_thresh: torch.Tensor):
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
        # the score is sqrt(cls * ctr), as in CondInst.inference
        keep = torch.nonzero(scores > score_thresh * score_thresh)
        loc_idx, labels = keep[:, 0], keep[:, 1]
        sc = scores[loc_idx, labels].sqrt()
        boxes = ltrb_to_boxes(locs[loc_idx], reg[loc_idx])
        wh = torch.stack([torch.zeros((), dtype=torch.float32) + w, torch.zeros((), dtype=torch.float32) + h])
        boxes = torch.max(torch.min(boxes, wh.repeat(2)[None]), torch.zeros(1, 4))
        order = batched_nms(boxes, sc, labels, self.nms_thresh)[: self.max_det]
        loc_idx, labels, sc, boxes = loc_idx[order], labels[order], sc[order], boxes[order]
        # one extra (dropped) instance: the mask head's reshapes fail on zero instances in onnxruntime
        idx = torch.cat([loc_idx, torch.zeros(1, dtype=loc_idx.dtype)])
        logits = model.mask_head(model.mask_branch(feats[:3]), model.strides[0], params[idx],
                                 torch.zeros_like(idx), locs[idx], soi[idx], model.cfg.model.mask_out_stride)
        masks = aligned_bilinear(logits.sigmoid(), model.cfg.model.mask_out_stride)[:-1, 0, :h, :w]
        return boxes, sc, self.cat_ids[labels], masks


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("boxmask")
    except PackageNotFoundError:
        return "unknown"


def onnx_metadata(model: CondInst, class_names: list[str], cat_ids: list[int]) -> dict[str, str]:
    """The contract of the exported graph as string key/values (ONNX ``metadata_props``)."""
    d, m = model.cfg.data, model.cfg.model
    return {
        "boxmask_version": _version(),
        "class_names": json.dumps(list(class_names)),
        "category_ids": json.dumps([int(c) for c in cat_ids]),
        "labels": "the 'labels' output holds category ids (category_ids), not 0-based indices",
        "input": "image: uint8 RGB [1, 3, H, W], batch of exactly 1, resized as 'resize' says",
        "min_size_test": str(d.min_size_test),
        "max_size": str(d.max_size),
        "resize": "s = min(min_size_test / min(h, w), max_size / max(h, w)); resize to (round(h*s), round(w*s)) "
                  "bilinear with antialias; divide output boxes by s for the original image",
        "score_thresh": str(math.sqrt(m.score_thresh)),
        "mask_thresh": str(m.mask_thresh),
        "outputs": "boxes [N,4] xyxy input pixels; scores [N]; labels [N] category ids; masks [N,H,W] probabilities",
    }


def _matched(boxes_a, labels_a, boxes_b, labels_b, tol: float = 0.5) -> list[tuple[int, int]]:
    """Pairs (i, j) of detections with the same label and boxes within ``tol`` pixels (greedy, one-to-one)."""
    pairs, used = [], set()
    for i in range(len(boxes_a)):
        d = np.abs(boxes_b - boxes_a[i]).max(axis=1) if len(boxes_b) else np.zeros(0)
        for j in np.argsort(d):
            if d[j] > tol:
                break
            if j not in used and labels_b[j] == labels_a[i]:
                pairs.append((i, int(j)))
                used.add(int(j))
                break
    return pairs


@torch.no_grad()
def parity_check(model: CondInst, onnx_bytes: bytes, images: list[np.ndarray], cat_ids: list[int],
                 low_thresh: float = 0.05) -> list[str]:
    """Run the graph in onnxruntime and the model in PyTorch on each image (already at the test size, HxWx3
    uint8), at the model's score threshold and at ``low_thresh`` (many detections to compare); raise
    ``ExportError`` unless at least 98% of the detections match (same category, boxes within 0.5 px) with
    scores within 1e-3 and 99% of the mask pixels equal. Returns one summary line per image and threshold."""
    import onnxruntime as ort

    from .data.batch import collate

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # not the note that the optional score_thresh input blocks constant folding
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    m = model.cfg.model
    default = math.sqrt(m.score_thresh)
    lines = []
    saved = m.score_thresh, m.pre_nms_topk
    try:
        for k, arr in enumerate(images):
            image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
            h, w = image.shape[-2:]
            for thresh in sorted({default, min(low_thresh, default)}, reverse=True):
                # the graph has no pre-NMS top-k: compare with the model without it
                m.score_thresh, m.pre_nms_topk = thresh * thresh, 10 ** 9
                boxes, scores, labels, masks = sess.run(
                    None, {"image": image[None].numpy(), "score_thresh": np.array(thresh, np.float32)})
                batch = collate([{"image": image, "image_size": (h, w), "orig_size": (h, w), "image_id": 1,
                                  "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
                ref = model.inference(batch)[0]
                ref_labels = np.asarray(cat_ids)[ref["labels"].numpy()]
                pairs = _matched(boxes, labels, ref["boxes"].numpy(), ref_labels)
                n = max(len(boxes), len(ref["boxes"]))
                line = f"image {k + 1} ({h}x{w}), score >= {thresh:.3g}: {len(pairs)} of {n} detections match"
                ok = len(pairs) >= 0.98 * n
                if pairs:
                    a, b = (np.array(v) for v in zip(*pairs))
                    dbox = float(np.abs(boxes[a] - ref["boxes"].numpy()[b]).max())
                    dscore = float(np.abs(scores[a] - ref["scores"].numpy()[b]).max())
                    agree = float(((masks[a] > m.mask_thresh) == ref["masks"].numpy()[b]).mean())
                    line += f", max |box diff| {dbox:.2g} px, max |score diff| {dscore:.2g}, mask pixels agree {agree:.2%}"
                    ok = ok and dscore < 1e-3 and agree >= 0.99
                lines.append(line)
                if not ok:
                    raise ExportError(f"the ONNX graph does not reproduce the PyTorch model: {line}")
    finally:
        m.score_thresh, m.pre_nms_topk = saved
    return lines


def check_images(model: CondInst, paths: list[str | Path] | None, seed: int = 0) -> list[np.ndarray]:
    """Images for the parity check at the model's test size: the given files (resized as ``predict``
    does), or, without any, a deterministic picture of coloured rectangles on noise."""
    from .data.coco import load_image
    from .data.transforms import apply_transforms

    d = model.cfg.data
    if paths:
        arrays = [load_image(p) for p in paths]
    else:
        rng = np.random.default_rng(seed)
        size = d.min_size_test
        arr = rng.integers(0, 255, (size, size * 4 // 3, 3), dtype=np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, size * 3 // 4, 2)
            hh, ww = rng.integers(size // 8, size // 3, 2)
            arr[y : y + hh, x : x + ww] = rng.integers(0, 255, 3)
        arrays = [arr]
    out = []
    for arr in arrays:
        s = apply_transforms({"image": arr, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                              "image_id": 0, "orig_size": arr.shape[:2]}, d.min_size_test, d.max_size, False)
        out.append(s["image"].permute(1, 2, 0).numpy())
    return out


def export_onnx(model: CondInst, path: str | Path, example_size: tuple[int, int] = (128, 160), opset: int = 17,
                class_names: list[str] | None = None, cat_ids: list[int] | None = None,
                check: list[np.ndarray] | None = None) -> tuple[Path, list[str]]:
    """Trace ``ExportModel`` on a random example, add the metadata, check parity on the ``check`` images
    (default: ``check_images(model, None)``) and only then write ``path`` (atomically). Returns the path
    and the parity lines. ``cat_ids`` default to 1..C, ``class_names`` to their strings."""
    import onnx

    from .atomic_io import atomic_write_bytes

    cat_ids = list(cat_ids) if cat_ids is not None else list(range(1, model.head.cls_logits.out_channels + 1))
    class_names = list(class_names) if class_names is not None else [str(c) for c in cat_ids]
    wrapper = ExportModel(model, cat_ids)
    torch.manual_seed(0)
    example = torch.randint(0, 255, (1, 3, *example_size), dtype=torch.uint8)
    default_thresh = math.sqrt(model.cfg.model.score_thresh)
    buf = io.BytesIO()
    torch.onnx.export(
        wrapper, (example, torch.tensor(default_thresh, dtype=torch.float32)), buf,
        input_names=["image", "score_thresh"], output_names=["boxes", "scores", "labels", "masks"],
        dynamic_axes={"image": {2: "height", 3: "width"}, "boxes": {0: "n"}, "scores": {0: "n"},
                      "labels": {0: "n"}, "masks": {0: "n", 1: "height", 2: "width"}},
        opset_version=opset, dynamo=False,
    )
    graph = onnx.load_from_string(buf.getvalue())
    # an initializer with the input's name makes the input optional, with this default
    graph.graph.initializer.append(onnx.numpy_helper.from_array(np.array(default_thresh, np.float32), "score_thresh"))
    onnx.helper.set_model_props(graph, onnx_metadata(model, class_names, cat_ids))
    data = graph.SerializeToString()
    lines = parity_check(model, data, check if check is not None else check_images(model, None), cat_ids)
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write(data))
    return path, lines
