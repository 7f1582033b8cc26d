"""Drawing helpers for qualitative inspection of instance predictions, and the safe names of the
picture files.

Deliberately torch-free (tensors are accepted by duck typing) so that the
module can be used from plotting scripts without pulling the model code in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic_io import atomic_write_bytes

__all__ = ["PALETTE", "draw_instances", "display_order", "side_by_side", "save_png", "heatmap",
           "pseudo_label_picture", "sim_maps_picture", "grid", "safe_file_name", "picture_path"]

# Fixed, saturated palette (tab10 + a few extras): colour depends only on the
# instance index, so repeated renders of the same detections look identical.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (255, 215, 0),
    (0, 128, 128),
    (128, 0, 255),
)


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor or array-like -> numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate and normalise to HxWx3 uint8 (grayscale is expanded)."""
    image = _to_numpy(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # drop alpha: the drawing is opaque anyway
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be HxWx3 RGB, got shape {image.shape}")
    return image


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Inner 1-pixel contour: mask pixels with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    eroded = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return mask & ~eroded


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return int(r - l), int(b - t)


def _box_iou(boxes: np.ndarray) -> np.ndarray:
    """[N, N] IoU of xyxy boxes."""
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    return inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)


def display_order(scores: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, score_thresh: float,
                  dedupe_iou: float | None = 0.7) -> np.ndarray:
    """Indices of the detections to draw, most confident first: scores >= ``score_thresh``, and of
    detections whose boxes or masks overlap by IoU > ``dedupe_iou`` (any classes) only the most
    confident, so that one object shows one label. ``masks`` is [N, H, W] bool or None."""
    order = np.nonzero(scores >= score_thresh)[0]
    order = order[np.argsort(-scores[order], kind="stable")]
    if dedupe_iou is None or len(order) < 2:
        return order
    biou = _box_iou(boxes[order])
    flat = masks[order].reshape(len(order), -1) if masks is not None else None
    area = flat.sum(1) if flat is not None else None
    kept: list[int] = []
    for a in range(len(order)):
        dup = False
        for b in kept:
            if biou[a, b] > dedupe_iou:
                dup = True
            elif flat is not None and biou[a, b] > 0:  # masks can only overlap where boxes do
                inter = np.count_nonzero(flat[a] & flat[b])
                dup = inter / max(area[a] + area[b] - inter, 1) > dedupe_iou
            if dup:
                break
        if not dup:
            kept.append(a)
    return order[kept]


def _font(h: int, w: int) -> Any:
    """A scalable font sized for the picture (PIL's bitmap font when FreeType is missing)."""
    size = int(np.clip(min(h, w) / 36, 11, 22))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, AttributeError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _place_label(box: tuple[int, int, int, int], size: tuple[int, int], taken: list, h: int, w: int
                 ) -> tuple[int, int, int, int]:
    """The label rectangle for ``box``: above its top-left corner, else just inside it, else at its
    bottom; always inside the picture, and the candidate overlapping the labels already placed least."""
    x0, y0, x1, y1 = box
    tw, th = size
    candidates = [(x0, y0 - th), (x0, y0), (x0, y1 + 1), (x0, y1 - th), (x1 - tw, y0), (x1 - tw, y1 - th)]
    best, best_cost = None, None
    for k, (cx, cy) in enumerate(candidates):
        cx = int(np.clip(cx, 0, max(w - tw, 0)))
        cy = int(np.clip(cy, 0, max(h - th, 0)))
        rect = (cx, cy, cx + tw, cy + th)
        # overlap with placed labels first, then the preference order of the candidates
        cost = (sum(_overlap(rect, t) for t in taken), k)
        if best_cost is None or cost < best_cost:
            best, best_cost = rect, cost
    return best


def draw_instances(
    image: np.ndarray,
    det: dict,
    class_names: list[str],
    score_thresh: float = 0.5,
    alpha: float = 0.45,
    dedupe_iou: float | None = 0.7,
) -> np.ndarray:
    """Render detections (or ground truth) on a copy of ``image`` (uint8 HxWx3 RGB).

    ``det`` holds ``boxes`` (xyxy, pixel-edge coords), optionally ``scores``, ``labels`` and ``masks``
    ([N,H,W] bool/uint8/probabilities, tensors or arrays, at the image size). With scores, only those
    ``>= score_thresh`` are drawn, and class-agnostic duplicates (box or mask IoU > ``dedupe_iou``;
    None keeps them) show only the most confident one; without scores (ground truth) every object is
    drawn. Masks are blended in one pass (``alpha``; where masks overlap the more confident one's
    colour shows, never a stack of blends) with a 1-pixel contour; boxes are thin; each object gets
    one ``"name score"`` label on a filled background, inside the picture, placed to avoid the labels
    of more confident objects. Colour ``PALETTE[i % len(PALETTE)]`` follows the detection index ``i``.
    When detections exist but none reaches ``score_thresh``, a note in the top-left corner says so
    (with the best score). The input is never modified.
    """
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    boxes = _to_numpy(det.get("boxes", np.zeros((0, 4)))).astype(np.float64).reshape(-1, 4)
    n = boxes.shape[0]
    has_scores = det.get("scores") is not None
    scores = _to_numpy(det["scores"]).astype(np.float64).reshape(-1) if has_scores else np.ones(n)
    labels = _to_numpy(det["labels"]).astype(np.int64).reshape(-1) if det.get("labels") is not None else np.zeros(n, np.int64)
    masks = det.get("masks")
    if masks is not None:
        masks = _to_numpy(masks)
        if masks.ndim == 4 and masks.shape[1] == 1:  # tolerate [N,1,H,W]
            masks = masks[:, 0]
        if masks.shape != (n, h, w):
            raise ValueError(f"masks must be [N,H,W]={(n, h, w)}, got {tuple(masks.shape)}")
        masks = masks >= 0.5 if np.issubdtype(masks.dtype, np.floating) else masks != 0
    if scores.shape[0] != n or labels.shape[0] != n:
        raise ValueError("boxes, scores and labels must have the same length")

    keep = display_order(scores, boxes, masks, score_thresh, dedupe_iou) if has_scores else np.arange(n)
    if len(keep) == 0:
        if not n:
            return img.copy()
        # detections exist, none is drawn: say so, or an empty picture reads as "nothing found"
        pil = Image.fromarray(img.copy())
        draw = ImageDraw.Draw(pil)
        text = f"no detection with score >= {score_thresh:.2f} (best {scores.max():.2f})"
        font = _font(h, w)
        tw, th = _text_size(draw, text, font)
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.rectangle((0, 0, min(tw + 3, w - 1), min(th + 3, h - 1)), fill=(0, 0, 0))
        draw.text((2 - left, 2 - top), text, fill=(255, 255, 255), font=font)
        return np.asarray(pil, dtype=np.uint8).copy()

    out = img.copy()
    if masks is not None:
        # One colour layer, the most confident object painted last (on top), blended once.
        layer = out.copy()
        covered = np.zeros((h, w), bool)
        for i in keep[::-1]:
            layer[masks[i]] = PALETTE[i % len(PALETTE)]
            covered |= masks[i]
        out[covered] = np.rint((1.0 - alpha) * out[covered] + alpha * layer[covered].astype(np.float32)).astype(np.uint8)
        for i in keep[::-1]:
            # an opaque contour keeps touching objects apart
            out[_boundary(masks[i])] = PALETTE[i % len(PALETTE)]
    pil = Image.fromarray(out)

    draw = ImageDraw.Draw(pil)
    font = _font(h, w)
    line_w = 1 if masks is not None else max(1, round(min(h, w) / 256))
    rects = []
    for i in keep:
        # Pixel-edge box [x1, x2) covers pixels x1..x2-1; PIL's rectangle is inclusive of both corners,
        # hence the -1. Clipped so that PIL never sees x1 < x0.
        x1, y1, x2, y2 = boxes[i]
        x0 = int(np.clip(np.floor(x1), 0, w - 1))
        y0 = int(np.clip(np.floor(y1), 0, h - 1))
        xe = int(np.clip(np.ceil(x2) - 1, x0, w - 1))
        ye = int(np.clip(np.ceil(y2) - 1, y0, h - 1))
        rects.append((x0, y0, xe, ye))
        draw.rectangle((x0, y0, xe, ye), outline=PALETTE[i % len(PALETTE)], width=line_w)
    taken: list = []
    for i, rect in zip(keep, rects):
        color = PALETTE[i % len(PALETTE)]
        lab = int(labels[i])
        name = class_names[lab] if 0 <= lab < len(class_names) else str(lab)
        text = f"{name} {scores[i]:.2f}" if has_scores else name
        tw, th = _text_size(draw, text, font)
        lx0, ly0, lx1, ly1 = _place_label(rect, (tw + 4, th + 4), taken, h, w)
        taken.append((lx0, ly0, lx1, ly1))
        draw.rectangle((lx0, ly0, lx1 - 1, ly1 - 1), fill=color)
        # black or white text, whichever contrasts with the label background
        lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((lx0 + 2 - left, ly0 + 2 - top), text, fill=(0, 0, 0) if lum > 140 else (255, 255, 255), font=font)
    return np.asarray(pil, dtype=np.uint8).copy()


# Characters that cannot be part of one file name on some system (path separators, Windows'
# reserved ones, control characters).
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]+')


def safe_file_name(text: Any, max_bytes: int = 200) -> str:
    """``text`` (an image id, a file name from a dataset) as one harmless file name component: no
    path separators or control characters, no leading dots (so never ``..``), at most ``max_bytes``
    bytes in UTF-8. Every file name built from data goes through here, so that a picture is never
    written outside its folder."""
    name = _UNSAFE.sub("_", str(text)).strip().lstrip(".")
    name = name.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
    return name or "_"


def picture_path(folder: str | os.PathLike, *parts: Any) -> Path:
    """``folder / "<part>_<part>....png"``, each part (often an id from a dataset) through ``safe_file_name``."""
    return Path(folder) / ("_".join(safe_file_name(p, 64) for p in parts) + ".png")


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate two images horizontally with a white ``gap``-pixel strip.

    Heights may differ: the shorter image is padded at the bottom with white.
    """
    left = _as_rgb_uint8(left, "left")
    right = _as_rgb_uint8(right, "right")
    h = max(left.shape[0], right.shape[0])
    gap = max(0, int(gap))
    out = np.full((h, left.shape[1] + gap + right.shape[1], 3), 255, dtype=np.uint8)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] + gap :] = right
    return out


# Pseudo-label colours: confident foreground, confident background, ignore band inside the box,
# outside the box (no pseudo supervision).
PSEUDO_FG = (255, 255, 255)
PSEUDO_BG = (0, 0, 0)
PSEUDO_IGNORED = (255, 140, 0)
PSEUDO_OUTSIDE = (70, 70, 90)


def heatmap(prob: Any) -> np.ndarray:
    """A [0, 1] map [h, w] as an RGB picture (dark blue -> green -> yellow, viridis-like)."""
    p = np.clip(_to_numpy(prob).astype(np.float32), 0.0, 1.0)
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)
    x = p * (len(stops) - 1)
    i = np.minimum(x.astype(np.int64), len(stops) - 2)
    t = (x - i)[..., None]
    return np.rint(stops[i] * (1 - t) + stops[i + 1] * t).astype(np.uint8)


def pseudo_label_picture(target: Any, weight: Any, box: Any) -> np.ndarray:
    """A thresholded pseudo label: foreground white, background black, the ignore band (inside the box,
    weight 0) orange, outside the box grey."""
    t, wt, b = (_to_numpy(v) > 0.5 for v in (target, weight, box))
    out = np.empty(t.shape + (3,), np.uint8)
    out[:] = PSEUDO_OUTSIDE
    out[b & ~wt] = PSEUDO_IGNORED
    out[b & wt & ~t] = PSEUDO_BG
    out[b & wt & t] = PSEUDO_FG
    return out


def _upscale(img: np.ndarray, min_side: int) -> np.ndarray:
    s = max(1, -(-min_side // max(1, min(img.shape[:2]))))
    return np.repeat(np.repeat(img, s, axis=0), s, axis=1) if s > 1 else img


def _titled(img: np.ndarray, title: str) -> np.ndarray:
    pil = Image.new("RGB", (img.shape[1], img.shape[0] + 14), (255, 255, 255))
    pil.paste(Image.fromarray(img), (0, 14))
    ImageDraw.Draw(pil).text((2, 1), title, fill=(0, 0, 0), font=ImageFont.load_default())
    return np.asarray(pil, np.uint8).copy()


def sim_maps_picture(image: np.ndarray, m_s: Any, m_i: Any, fused: Any, target: Any, weight: Any, box: Any,
                     min_side: int = 96) -> np.ndarray:
    """One object's SIM maps side by side: the image (at the maps' resolution) with the box, the semantic
    map M_S, the instance map M_I, the fused map, and the thresholded pseudo label with its ignore band.
    ``m_s`` may be None (semantic map switched off)."""
    img = _as_rgb_uint8(image).copy()
    b = _to_numpy(box) > 0.5
    img[_boundary(b)] = (255, 0, 0)
    panels = [("image", img)]
    if m_s is not None:
        panels.append(("M_S", heatmap(m_s)))
    panels += [("M_I", heatmap(m_i)), ("fused", heatmap(fused)), ("pseudo", pseudo_label_picture(target, weight, box))]
    out = None
    for title, p in panels:
        p = _titled(_upscale(p, min_side), title)
        out = p if out is None else side_by_side(out, p)
    return out


def grid(pictures: list[np.ndarray], columns: int = 2, gap: int = 4) -> np.ndarray:
    """Pictures in rows of ``columns`` (white gaps; sizes may differ)."""
    if not pictures:
        return np.full((8, 8, 3), 255, np.uint8)
    rows = []
    for k in range(0, len(pictures), columns):
        row = pictures[k]
        for p in pictures[k + 1 : k + columns]:
            row = side_by_side(row, p, gap)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    out = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        out[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return out


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write ``image`` (uint8 HxW or HxWx3/4) as PNG atomically.

    The PNG is written to a temp file in the destination folder and moved into
    place with ``os.replace`` so readers never see a half-written file. The
    parent folder is created if needed.
    """
    path = Path(path)
    arr = _to_numpy(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    atomic_write_bytes(path, lambda fh: Image.fromarray(arr).save(fh, format="PNG"))
