"""COCO-format datasets with boxes (masks optional): reading, validation, category mapping."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and the image/annotation id."""


@dataclass
class ValidationReport:
    num_images: int = 0
    num_boxes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)  # one per skipped entry, naming it
    crowd_only: int = 0  # images whose every annotation is a crowd region (kept, as negatives)

    def skip(self, reason: str, message: str | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if message:
            self.messages.append(message)

    def summary(self) -> str:
        k = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        text = f"{self.num_images} images, {self.num_boxes} boxes, {k} skipped" + (f": {reasons}" if k else "")
        if self.crowd_only:
            text += f"; {self.crowd_only} crowd-only images (kept as negatives)"
        return text


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or invalid '{key}' list")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{path}: 'annotations' must be a list")
    data.setdefault("annotations", [])
    return data


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO object built from an already-read dict (without its console prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 HxWx3; EXIF orientation applied; grayscale/RGBA/16-bit converted."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray((arr / top * 255.0).round().astype(np.uint8))
        return np.asarray(im.convert("RGB"))


class CocoDataset:
    """Validated COCO annotations. Crowd boxes are kept aside (never positives); images without
    annotations stay as negatives. Category ids are mapped to labels 0..C-1 in sorted id order."""

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        skip_invalid: bool = False,
        clip_boxes: bool = True,
        check_images: bool = True,
        require_masks: bool = False,
    ):
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        data = read_json(self.json_path)
        self.report = ValidationReport()
        self._skip_invalid = skip_invalid
        cats = data["categories"]
        for c in cats:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int):
                raise DatasetError(f"{self.json_path}: category without an integer 'id': {c!r}")
        ids = [c["id"] for c in cats]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{self.json_path}: duplicate category ids")
        if not cats:
            raise DatasetError(f"{self.json_path}: no categories")
        self.cat_ids = sorted(ids)
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        names = {c["id"]: str(c.get("name", c["id"])) for c in cats}
        self.class_names = [names[c] for c in self.cat_ids]
        self.images, self.annotations = self._validate(data, clip_boxes, check_images, require_masks)
        self.image_ids = [im["id"] for im in self.images]
        if not self.images:
            raise DatasetError(f"{self.json_path}: the dataset is empty (no usable images)")
        clean = dict(data)
        clean["images"] = self.images
        clean["annotations"] = [a for anns in self.annotations.values() for a in anns]
        self.coco = coco_from_dict(clean)
        if self.report.skipped:
            log.warning("%s: %s", self.json_path.name, self.report.summary())

    # -------------------------------------------------------------- validation
    def _fail(self, reason: str, msg: str) -> bool:
        """Raise, or (lenient mode) count and log a skip. Returns True when skipping."""
        if not self._skip_invalid:
            raise DatasetError(f"{self.json_path}: {msg} (set data.skip_invalid=true to skip such entries)")
        self.report.skip(reason, f"{self.json_path}: {msg}")
        log.warning("%s: skipped: %s", self.json_path.name, msg)
        return True

    def _validate(self, data: dict, clip: bool, check_images: bool, require_masks: bool):
        images: list[dict] = []
        seen: set = set()
        for im in data["images"]:
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise DatasetError(f"{self.json_path}: image entry without 'id' or 'file_name': {str(im)[:120]}")
            if not _is_id(im["id"]):
                raise DatasetError(f"{self.json_path}: image id must be an integer or a string, got {im['id']!r}")
            if not isinstance(im["file_name"], str) or not im["file_name"]:
                self._fail("bad image entry", f"image id {im['id']}: 'file_name' must be a non-empty string, got {im['file_name']!r}")
                continue
            if any(k in im and not (_is_int(im[k]) and im[k] > 0) for k in ("width", "height")):
                self._fail("bad image entry", f"image id {im['id']}: 'width'/'height' must be positive integers, got "
                                              f"{im.get('width')!r}x{im.get('height')!r}")
                continue
            if im["id"] in seen:
                raise DatasetError(f"{self.json_path}: duplicate image id {im['id']}")
            seen.add(im["id"])
            path = self.image_root / im["file_name"]
            if not path.is_file():
                self._fail("missing image", f"image id {im['id']}: file not found: {path}")
                continue
            if check_images or "width" not in im or "height" not in im:
                try:
                    with Image.open(path) as pim:
                        w, h = ImageOps.exif_transpose(pim).size if _has_rotation(pim) else pim.size
                except (UnidentifiedImageError, OSError) as e:
                    self._fail("unreadable image", f"image id {im['id']}: cannot read {path}: {e}")
                    continue
                if "width" in im and "height" in im and (im["width"], im["height"]) != (w, h):
                    self._fail("size mismatch", f"image id {im['id']}: {path} is {w}x{h} but the json says {im['width']}x{im['height']}")
                    continue
                im = dict(im, width=w, height=h)
            images.append(im)
        valid_ids = {im["id"] for im in images}
        sizes = {im["id"]: (im["width"], im["height"]) for im in images}
        anns: dict = {i: [] for i in valid_ids}
        ann_ids: set = set()
        for a in data["annotations"]:
            if not isinstance(a, dict) or "id" not in a:
                raise DatasetError(f"{self.json_path}: annotation without an 'id': {str(a)[:120]}")
            aid = a["id"]
            if not _is_id(aid):
                raise DatasetError(f"{self.json_path}: annotation id must be an integer or a string, got {aid!r}")
            if aid in ann_ids:
                raise DatasetError(f"{self.json_path}: duplicate annotation id {aid}")
            ann_ids.add(aid)
            iid = a.get("image_id")
            if not _is_id(iid) or iid not in seen:
                self._fail("unknown image id", f"annotation id {aid}: unknown image_id {iid!r}")
                continue
            if iid not in valid_ids:
                self.report.skip("annotation of a skipped image")
                continue
            if not _is_id(a.get("category_id")) or a.get("category_id") not in self.cat_to_label:
                self._fail("unknown category", f"annotation id {aid} (image id {iid}): unknown category_id {a.get('category_id')!r}")
                continue
            box = a.get("bbox")
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                self._fail("bad box", f"annotation id {aid} (image id {iid}): 'bbox' must be [x, y, w, h], got {box!r}")
                continue
            if a.get("iscrowd", 0) not in (0, 1):
                self._fail("bad annotation", f"annotation id {aid} (image id {iid}): 'iscrowd' must be 0 or 1, got {a.get('iscrowd')!r}")
                continue
            if "area" in a and not (isinstance(a["area"], (int, float)) and math.isfinite(a["area"]) and a["area"] >= 0):
                self._fail("bad annotation", f"annotation id {aid} (image id {iid}): 'area' must be a number >= 0, got {a['area']!r}")
                continue
            x, y, w, h = (float(v) for v in box)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                self._fail("bad box", f"annotation id {aid} (image id {iid}): box {box} has non-positive or non-finite size")
                continue
            W, H = sizes[iid]
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            outside = x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1
            if x1 - x0 <= 0 or y1 - y0 <= 0 or (outside and not clip):
                self._fail("box outside image", f"annotation id {aid} (image id {iid}): box {box} lies outside the {W}x{H} image")
                continue
            seg = a.get("segmentation")
            if "segmentation" in a and seg is None:
                a = {k: v for k, v in a.items() if k != "segmentation"}  # null = box only
            if seg is not None and not _valid_segmentation(seg, W, H):
                self._fail("bad segmentation", f"annotation id {aid} (image id {iid}): invalid 'segmentation' (polygons need >= 3 points; RLE must be {H}x{W})")
                continue
            if require_masks and not a.get("iscrowd", 0) and seg is None:
                raise DatasetError(
                    f"{self.json_path}: annotation id {aid} (image id {iid}) has no 'segmentation'; method 'full' needs masks for every object"
                )
            a = dict(a, bbox=[x0, y0, x1 - x0, y1 - y0])
            a.setdefault("area", (x1 - x0) * (y1 - y0))
            a.setdefault("iscrowd", 0)
            anns[iid].append(a)
            self.report.num_boxes += 1
        self.report.num_images = len(images)
        self.report.crowd_only = sum(1 for v in anns.values() if v and all(a.get("iscrowd", 0) for a in v))
        return images, anns

    # -------------------------------------------------------------- access
    def _mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        # A box-only annotation (allowed unless masks are required) is represented by its filled box.
        if "segmentation" not in ann:
            return _box_mask(ann["bbox"], h, w)
        return self.coco.annToMask(ann).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def mask_counts(self) -> tuple[int, int]:
        """(objects with a mask, objects with a box only), crowd regions excluded."""
        anns = [a for v in self.annotations.values() for a in v if not a.get("iscrowd", 0)]
        with_mask = sum("segmentation" in a for a in anns)
        return with_mask, len(anns) - with_mask

    @property
    def has_masks(self) -> bool:
        return any("segmentation" in a for anns in self.annotations.values() for a in anns if not a.get("iscrowd", 0))

    def load(self, index: int, with_masks: bool = False) -> dict:
        """One sample: RGB image, xyxy boxes, labels, optional masks [N, H, W] uint8 (non-crowd only; a
        box-only object gets its filled box and ``has_mask`` False)."""
        info = self.images[index]
        path = self.image_root / info["file_name"]
        try:
            image = load_image(path)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{self.json_path}: image id {info['id']}: cannot read {path}: {e}") from None
        anns = [a for a in self.annotations[info["id"]] if not a.get("iscrowd", 0)]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        sample = {
            "image": image,
            "boxes": boxes,
            "labels": labels,
            "image_id": info["id"],
            "file_name": info["file_name"],
            "orig_size": image.shape[:2],
        }
        if with_masks:
            h, w = image.shape[:2]
            sample["masks"] = np.stack([self._mask(a, h, w) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            sample["has_mask"] = np.array(["segmentation" in a for a in anns], dtype=bool)
        return sample


def _box_mask(bbox: list[float], h: int, w: int) -> np.ndarray:
    x, y, bw, bh = bbox
    m = np.zeros((h, w), np.uint8)
    m[int(np.floor(y)) : int(np.ceil(y + bh)), int(np.floor(x)) : int(np.ceil(x + bw))] = 1
    return m


def _has_rotation(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v) -> bool:
    """COCO ids: integers (or strings, which some exporters write)."""
    return _is_int(v) or isinstance(v, str)


def _valid_segmentation(seg, width: int, height: int) -> bool:
    if isinstance(seg, list):
        return len(seg) > 0 and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
            for p in seg)
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and list(size) == [height, width]) or "counts" not in seg:
            return False
        if isinstance(seg["counts"], list):
            return all(_is_int(c) and c >= 0 for c in seg["counts"]) and sum(seg["counts"]) == height * width
        try:
            mask_utils.area(seg if isinstance(seg["counts"], bytes) else dict(seg, counts=seg["counts"].encode()))
        except Exception:
            return False
        return True
    return False
