"""COCO-format datasets with boxes (masks optional): reading, validation, category mapping."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import operator
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools.coco import COCO

# the image files boxmask reads from a folder (predict, convert) and refuses to write a run among
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

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
    clipped: list = field(default_factory=list)  # ids of annotations clipped to their image
    warnings: list[str] = field(default_factory=list)  # about the dataset as a whole (no entry skipped)

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
        if self.clipped:
            ids = ", ".join(_show(i) for i in self.clipped[:5]) + (", ..." if len(self.clipped) > 5 else "")
            text += f"; {len(self.clipped)} boxes or polygons partly outside their image clipped (annotation ids {ids})"
        return text


class EmptyDatasetError(DatasetError):
    """No usable image is left; ``report`` holds what was skipped and why."""

    def __init__(self, message: str, report: ValidationReport):
        super().__init__(message)
        self.report = report


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as some Windows tools write, is skipped
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from None
    except (ValueError, RecursionError) as e:  # integers of thousands of digits, arrays nested thousands deep
        raise DatasetError(f"{path}: cannot read the JSON: {' '.join(str(e).split())}") from None
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


# Pixel formats Pillow converts to RGB faithfully; 16/32-bit integer greys are scaled in load_image.
# Float images (mode F) have no agreed range (0..1, 0..255, metres...): refused rather than read as garbage.
_RGB_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_INT_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _mode_problem(mode: str) -> str | None:
    if mode == "F":
        return "32-bit float pixels (mode F) have no known range; save the image as 8-bit or 16-bit integer"
    if mode not in _RGB_MODES and mode not in _INT_GREY_MODES:
        return f"unsupported pixel format (mode {mode}); save the image as 8-bit RGB or greyscale"
    return None


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 HxWx3; EXIF orientation applied; grayscale/RGBA/16-bit converted.

    Raises OSError saying why for a file that is not a fully decodable image in a supported pixel format
    (truncated files, float or out-of-range 32-bit pixels, decompression bombs...)."""
    try:
        with Image.open(path) as im:
            problem = _mode_problem(im.mode)
            if problem:
                raise OSError(problem)
            im = ImageOps.exif_transpose(im)
            if im.mode in _INT_GREY_MODES:
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
                if lo < 0 or hi > 65535:
                    raise OSError(f"32-bit integer pixels outside 0..65535 ({lo:.0f}..{hi:.0f}); save the image as 8-bit or 16-bit")
                top = 65535.0 if hi > 255 else 255.0
                im = Image.fromarray((arr / top * 255.0).round().astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except OSError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt data (ValueError, SyntaxError, struct.error, ...)
        raise OSError(f"{type(e).__name__}: {e}") from None


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the header only; OSError as load_image."""
    try:
        with Image.open(path) as im:
            problem = _mode_problem(im.mode)
            if problem:
                raise OSError(problem)
            w, h = im.size
            return (h, w) if _has_rotation(im) else (w, h)  # orientations 5-8 swap the axes
    except OSError:
        raise
    except Exception as e:
        raise OSError(f"{type(e).__name__}: {e}") from None


class CocoDataset:
    """Validated COCO annotations. Crowd boxes are kept aside (never positives); images without
    annotations stay as negatives. Category ids are mapped to labels 0..C-1 in sorted id order.

    Images are checked from their headers (size, pixel format); ``decode_images`` decodes every one
    fully (``boxmask check``), which also finds truncated files."""

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        skip_invalid: bool = False,
        clip_boxes: bool = True,
        check_images: bool = True,
        require_masks: bool = False,
        decode_images: bool = False,
    ):
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        data = read_json(self.json_path)
        self.report = ValidationReport()
        self._skip_invalid = skip_invalid
        self._unreadable: set[int] = set()  # indices found undecodable while loading (skip_invalid)
        self.cat_ids, self.class_names = self._categories(data["categories"])
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        self.images, self.annotations = self._validate(data, clip_boxes, check_images or decode_images, decode_images, require_masks)
        self.image_ids = [im["id"] for im in self.images]
        if not self.images:
            detail = f"; {self.report.summary()}" if self.report.skipped else ""
            raise EmptyDatasetError(f"{self.json_path}: the dataset is empty (no usable images{detail})", self.report)
        clean = dict(data)
        clean["images"] = self.images
        clean["annotations"] = [a for anns in self.annotations.values() for a in anns]
        self.coco = coco_from_dict(clean)
        if self.report.skipped or self.report.clipped:
            log.warning("%s: %s", self.json_path.name, self.report.summary())
        for w in self.report.warnings:
            log.warning("%s: %s", self.json_path.name, w)

    # -------------------------------------------------------------- validation
    def _fail(self, reason: str, msg: str) -> bool:
        """Raise, or (lenient mode) count and log a skip. Returns True when skipping."""
        if not self._skip_invalid:
            raise DatasetError(f"{self.json_path}: {msg} (set data.skip_invalid=true to skip such entries)")
        self.report.skip(reason, f"{self.json_path}: {msg}")
        log.warning("%s: skipped: %s", self.json_path.name, msg)
        return True

    def _categories(self, cats: list) -> tuple[list[int], list[str]]:
        """Sorted category ids and their names; ids and (whitespace-trimmed) names must be unique."""
        if not cats:
            raise DatasetError(f"{self.json_path}: no categories")
        names: dict[int, str] = {}
        by_name: dict[str, int] = {}
        for c in cats:
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise DatasetError(f"{self.json_path}: category without an integer 'id': {_short(c)}")
            cid, name = c["id"], c.get("name", c["id"])
            if cid in names:
                raise DatasetError(f"{self.json_path}: duplicate category id {cid}")
            if not (isinstance(name, str) or _is_int(name)) or not str(name).strip():
                raise DatasetError(f"{self.json_path}: category id {cid}: 'name' must be a non-empty string, got {_short(name)}")
            key = str(name).strip()
            if key in by_name:
                raise DatasetError(f"{self.json_path}: categories id {by_name[key]} and id {cid} have the same name {_show(key)}")
            names[cid], by_name[key] = str(name), cid
        ids = sorted(names)
        return ids, [names[c] for c in ids]

    def _new_id(self, entry, kind: str, seen: set):
        """The ``id`` of an image or annotation entry, which must be a new integer or string (added to ``seen``)."""
        if not isinstance(entry, dict) or "id" not in entry:
            what = "image entry without 'id' or 'file_name'" if kind == "image" else "annotation without an 'id'"
            raise DatasetError(f"{self.json_path}: {what}: {_short(entry)}")
        i = entry["id"]
        if not _is_id(i):
            raise DatasetError(f"{self.json_path}: {kind} id must be an integer or a string, got {_short(i)}")
        if i in seen:
            raise DatasetError(f"{self.json_path}: duplicate {kind} id {_show(i)}")
        seen.add(i)
        return i

    def _validate(self, data: dict, clip: bool, check_images: bool, decode: bool, require_masks: bool):
        images: list[dict] = []
        seen: set = set()
        files: dict[str, object] = {}  # normalised file name -> image id
        for im in data["images"]:
            if not isinstance(im, dict) or "file_name" not in im:
                raise DatasetError(f"{self.json_path}: image entry without 'id' or 'file_name': {_short(im)}")
            iid = self._new_id(im, "image", seen)
            name = im["file_name"]
            if not isinstance(name, str) or not name or "\0" in name:
                self._fail("bad image entry", f"image id {_show(iid)}: 'file_name' must be a non-empty string, got {_short(name)}")
                continue
            where = f"image id {_show(iid)} ({_show(name)})"
            if any(k in im and not (_is_int(im[k]) and im[k] > 0) for k in ("width", "height")):
                self._fail("bad image entry", f"{where}: 'width'/'height' must be positive integers, got "
                                              f"{_short(im.get('width'))}x{_short(im.get('height'))}")
                continue
            key = os.path.normpath(name)
            if key in files:
                # two entries for one picture: each would train with only its own objects, the others as background
                self._fail("duplicate file", f"{where}: the same file as image id {_show(files[key])}")
                continue
            files[key] = iid
            path = self.image_root / name
            problem = _file_problem(path)
            if problem:
                self._fail("missing image", f"{where}: {problem}: {_show(str(path))}")
                continue
            if check_images or "width" not in im or "height" not in im:
                try:
                    if decode:
                        h, w = load_image(path).shape[:2]
                    else:
                        w, h = _image_size(path)
                except OSError as e:
                    self._fail("unreadable image", f"{where}: cannot read {_show(str(path))}: {_reason(e)}")
                    continue
                if "width" in im and "height" in im and (im["width"], im["height"]) != (w, h):
                    self._fail("size mismatch", f"{where}: {_show(str(path))} is {w}x{h} but the json says {im['width']}x{im['height']}")
                    continue
                im = dict(im, width=w, height=h)
            images.append(im)
        valid_ids = {im["id"] for im in images}
        sizes = {im["id"]: (im["width"], im["height"]) for im in images}
        anns: dict = {i: [] for i in valid_ids}
        ann_ids: set = set()
        for a in data["annotations"]:
            aid = self._new_id(a, "annotation", ann_ids)
            iid = a.get("image_id")
            if not _is_id(iid) or iid not in seen:
                self._fail("unknown image id", f"annotation id {_show(aid)}: unknown image_id {_short(iid)}")
                continue
            if iid not in valid_ids:
                self.report.skip("annotation of a skipped image")
                continue
            where = f"annotation id {_show(aid)} (image id {_show(iid)})"
            if not _is_id(a.get("category_id")) or a.get("category_id") not in self.cat_to_label:
                self._fail("unknown category", f"{where}: unknown category_id {_short(a.get('category_id'))}")
                continue
            box = a.get("bbox")
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
                self._fail("bad box", f"{where}: 'bbox' must be [x, y, w, h] numbers, got {_short(box)}")
                continue
            if a.get("iscrowd", 0) not in (0, 1):
                self._fail("bad annotation", f"{where}: 'iscrowd' must be 0 or 1, got {_short(a.get('iscrowd'))}")
                continue
            if "area" in a and not (_is_number(a["area"]) and math.isfinite(_as_float(a["area"])) and a["area"] >= 0):
                self._fail("bad annotation", f"{where}: 'area' must be a number >= 0, got {_short(a['area'])}")
                continue
            x, y, w, h = (_as_float(v) for v in box)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                self._fail("bad box", f"{where}: box {_short(box)} has non-positive or non-finite size")
                continue
            W, H = sizes[iid]
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                self._fail("box outside image", f"{where}: box {_short(box)} lies outside the {W}x{H} image")
                continue
            if x < -W or y < -H or x + w > 2 * W or y + h > 2 * H:
                # not a slightly loose box: clipping would keep an arbitrary part of it
                self._fail("box outside image", f"{where}: box {_short(box)} reaches far outside the {W}x{H} image "
                                                 "(more than the image size past its edge)")
                continue
            partly = x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1
            if partly and not clip:
                self._fail("box outside image", f"{where}: box {_short(box)} lies partly outside the {W}x{H} image (clipping is off)")
                continue
            seg = a.get("segmentation")
            if "segmentation" in a and (seg is None or seg == []):
                # null, or the empty list several exporters write for an object without a mask: box only
                a = {k: v for k, v in a.items() if k != "segmentation"}
                seg = None
            seg_clipped = False
            if seg is not None:
                problem, seg_clipped = _segmentation_problem(seg, W, H, clip)
                if problem:
                    self._fail("bad segmentation", f"{where}: segmentation {problem}")
                    continue
            if require_masks and not a.get("iscrowd", 0) and seg is None:
                raise DatasetError(
                    f"{self.json_path}: {where} has no 'segmentation'; method 'full' needs masks for every object"
                )
            if partly or seg_clipped:
                self.report.clipped.append(aid)
            a = dict(a, bbox=[x0, y0, x1 - x0, y1 - y0], iscrowd=int(a.get("iscrowd", 0)))
            a.setdefault("area", (x1 - x0) * (y1 - y0))
            anns[iid].append(a)
            self.report.num_boxes += 1
        self.report.num_images = len(images)
        self.report.crowd_only = sum(1 for v in anns.values() if v and all(a["iscrowd"] for a in v))
        if images and not any(not a["iscrowd"] for v in anns.values() for a in v):
            if not data["annotations"]:
                self.report.warnings.append("no annotations: every image is a negative (there is no object to learn)")
            else:
                self.report.warnings.append(f"no usable object annotation (of {len(data['annotations'])} in the file, none "
                                            "kept besides crowd regions): every image is a negative")
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

    def read_image(self, index: int) -> np.ndarray:
        """The decoded RGB image of entry ``index``; DatasetError naming the file and id if it cannot be read."""
        info = self.images[index]
        path = self.image_root / info["file_name"]
        try:
            return load_image(path)
        except OSError as e:
            raise DatasetError(f"{self.json_path}: image id {_show(info['id'])} ({_show(info['file_name'])}): cannot read "
                               f"{_show(str(path))}: {_reason(e)}") from None

    def load(self, index: int, with_masks: bool = False, for_eval: bool = False) -> dict:
        """One sample: RGB image, xyxy boxes, labels, optional masks [N, H, W] uint8 (non-crowd only; a
        box-only object gets its filled box and ``has_mask`` False).

        An image that cannot be decoded raises DatasetError; with ``skip_invalid`` it is logged and, in
        training, replaced by the next readable image, or, for evaluation (``for_eval``), read as black so
        that its objects count as missed rather than as another image's."""
        n = len(self.images)
        for k in range(n):
            i = (index + k) % n
            image = None
            if i not in self._unreadable:
                try:
                    image = self.read_image(i)
                except DatasetError as e:
                    if not self._skip_invalid:
                        raise DatasetError(f"{e} (set data.skip_invalid=true to skip such images)") from None
                    self._unreadable.add(i)
                    log.warning("skipped: %s", e)
            if image is None and for_eval:
                info = self.images[i]
                image = np.zeros((info["height"], info["width"], 3), np.uint8)
            if image is not None:
                return self._sample(i, image, with_masks)
        raise DatasetError(f"{self.json_path}: none of the {n} images can be read")

    def _sample(self, index: int, image: np.ndarray, with_masks: bool) -> dict:
        info = self.images[index]
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


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file (None if it is)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "file not found"
    except (OSError, ValueError) as e:
        return "cannot access the file" + (f" ({e.strerror})" if getattr(e, "strerror", None) else "")
    # a FIFO or device would block or never end when read
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(v) -> float:
    """float(v), with integers too large for a float as infinity (so they fail the finiteness checks)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _is_id(v) -> bool:
    """COCO ids: integers (or strings, which some exporters write)."""
    return _is_int(v) or isinstance(v, str)


def _show(v) -> str:
    """A name or id from the json as one printable line."""
    text = v if isinstance(v, str) else str(v)
    if len(text) > 200:
        text = text[:200] + "..."
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def _short(v) -> str:
    """A json value for an error message: one line, at most about 120 characters."""
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def _reason(e: OSError) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _segmentation_problem(seg, width: int, height: int, clip: bool) -> tuple[str | None, bool]:
    """Why ``seg`` cannot be used on a ``width`` x ``height`` image (None if it can), and whether it reaches
    past the image (then clipped when rasterised). Everything pycocotools would crash on, read out of
    bounds with or silently decode to garbage is refused here, before it ever sees it."""
    if isinstance(seg, list):
        if not seg:
            return "is an empty list", False
        clipped = False
        for k, poly in enumerate(seg):
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0):
                return f"polygon {k} must be a list of x, y coordinates with at least 3 points, got {_short(poly)}", False
            if not all(map(_is_number, poly)):
                return f"polygon {k} holds a value that is not a number", False
            # plain Python on lists: numpy's per-call overhead dominates for polygons of tens of points
            try:
                xs, ys = list(map(float, poly[0::2])), list(map(float, poly[1::2]))
            except OverflowError:  # an integer too large for a float
                xs = ys = [math.inf]
            if not (all(map(math.isfinite, xs)) and all(map(math.isfinite, ys))):
                return f"polygon {k} has a non-finite coordinate", False
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            # pycocotools rasterises the whole outline: far-away points cost memory until it crashes
            if x0 < -width or x1 > 2 * width or y0 < -height or y1 > 2 * height:
                return f"polygon {k} reaches far outside the {width}x{height} image (more than the image size past its edge)", False
            if x1 <= 0 or x0 >= width or y1 <= 0 or y0 >= height:
                return f"polygon {k} lies outside the {width}x{height} image", False
            twice_area = sum(map(operator.mul, xs, ys[1:] + ys[:1])) - sum(map(operator.mul, xs[1:] + xs[:1], ys))
            if abs(twice_area) < 1e-6:
                return f"polygon {k} has zero area (its points are collinear or repeated)", False
            if x0 < -1 or x1 > width + 1 or y0 < -1 or y1 > height + 1:
                if not clip:
                    return f"polygon {k} lies partly outside the {width}x{height} image (clipping is off)", False
                clipped = True
        return None, clipped
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"RLE 'size' must be [height, width], got {_short(size)}", False
        if size != [height, width]:
            return f"RLE size {size} (height, width) differs from the image's [{height}, {width}]", False
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                return "RLE 'counts' must hold integers >= 0", False
        elif isinstance(counts, (str, bytes)):
            counts = _rle_string_counts(counts)
            if counts is None:
                return "RLE 'counts' is not a valid compressed RLE string", False
        else:
            return f"RLE 'counts' must be a string or a list of integers, got {_short(counts)}", False
        if sum(counts) != height * width:
            return f"RLE counts cover {sum(counts)} pixels, not {height}x{width} = {height * width}", False
        return None, False
    return f"must be polygons (a list of lists of numbers) or an RLE object, got {_short(seg)}", False


def _rle_string_counts(s: str | bytes) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string, or None when it is malformed.

    The same decoding as pycocotools' rleFrString, which checks nothing: a string ending inside a number
    is read past its end, and counts not covering the image exactly decode to uninitialised pixels.
    Each count is 5-bit groups, low first, 0x20 marking that more follow, 0x10 of the last the sign; from
    the fourth on a count is stored as the difference to the one two before."""
    if isinstance(s, str):
        try:
            s = s.encode("ascii")
        except UnicodeEncodeError:
            return None
    c = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    if not c.size:
        return []
    if c.min() < 0 or c.max() >= 64 or c[-1] & 0x20:  # a character out of range, or the string ends inside a number
        return None
    last = (c & 0x20) == 0  # the last group of each number
    number = np.concatenate([[0], np.cumsum(last[:-1])])  # which number each character belongs to
    starts = np.concatenate([[0], np.flatnonzero(last)[:-1] + 1])
    k = np.arange(c.size) - starts[number]  # position of the group within its number
    if k.max() >= 6:  # 30 bits hold any run of an image Pillow opens (and keep pycocotools' int shifts defined)
        return None
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x -= np.where(c[last] & 0x10, 1 << (5 * (k[last] + 1)), 0)  # sign-extend
    x[1::2] = np.cumsum(x[1::2])  # undo the differences: counts 3, 5, ... add to count 1; 4, 6, ... to count 2
    x[2::2] = np.cumsum(x[2::2])
    return None if (x < 0).any() else x.tolist()
