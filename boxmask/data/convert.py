"""Box formats -> COCO json: Pascal VOC XML, YOLO txt (with a names file) and LabelMe json.

Malformed input stops with an error naming the file and the line. Category ids are 1..C: in the names
file's order for YOLO, in sorted label order for VOC and LabelMe."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .coco import DatasetError

LABEL_KEY = '"label"'
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class ConvertError(DatasetError):
    """Malformed input to ``boxmask convert``; the message names the file and the line."""


def _line_of(text: str, needle: str, occurrence: int) -> int:
    """1-based line of the ``occurrence``-th (0-based) ``needle`` in ``text`` (0 when not found)."""
    pos = -1
    for _ in range(occurrence + 1):
        pos = text.find(needle, pos + 1)
        if pos < 0:
            return 0
    return text.count("\n", 0, pos) + 1


def _number(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConvertError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConvertError(f"{where}: expected a finite number, got {value!r}")
    return v


def _coco(images: list[dict], objects: list[tuple[int, str, list[float], list | None]], names: list[str]) -> dict:
    cat = {n: i + 1 for i, n in enumerate(names)}
    anns = []
    for k, (image_id, name, box, poly) in enumerate(objects, start=1):
        a = {"id": k, "image_id": image_id, "category_id": cat[name], "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        if poly is not None:
            a["segmentation"] = [poly]
        anns.append(a)
    return {"images": images, "annotations": anns, "categories": [{"id": cat[n], "name": n} for n in names]}


def _files(src: Path, suffixes: set[str], what: str) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise ConvertError(f"{src}: no such file or folder")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise ConvertError(f"{src}: no {what} files found")
    return files


def from_voc(src: str | Path) -> dict:
    """Pascal VOC: a folder of XML files (or one). Boxes are 1-based inclusive pixel indices."""
    images, objects, labels = [], [], set()
    for image_id, path in enumerate(_files(Path(src), {".xml"}, "VOC .xml"), start=1):
        text = path.read_text(errors="replace")
        try:
            root = ET.fromstring(text)
        except ET.ParseError as e:
            line, col = e.position
            raise ConvertError(f"{path}:{line}: malformed XML (column {col}): {e}") from None
        fname = root.findtext("filename")
        if not fname:
            raise ConvertError(f"{path}:{_line_of(text, '<annotation', 0)}: no <filename>")
        size = root.find("size")
        if size is None:
            raise ConvertError(f"{path}:{_line_of(text, '<annotation', 0)}: no <size>")
        w = _number(size.findtext("width"), f"{path}:{_line_of(text, '<width', 0)}: <width>")
        h = _number(size.findtext("height"), f"{path}:{_line_of(text, '<height', 0)}: <height>")
        if w <= 0 or h <= 0:
            raise ConvertError(f"{path}:{_line_of(text, '<size', 0)}: image size {w}x{h} must be positive")
        images.append({"id": image_id, "file_name": fname, "width": int(w), "height": int(h)})
        for k, obj in enumerate(root.findall("object")):
            line = _line_of(text, "<object", k)
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if not name or bb is None:
                raise ConvertError(f"{path}:{line}: <object> needs a <name> and a <bndbox>")
            x0, y0, x1, y1 = (_number(bb.findtext(t), f"{path}:{line}: <{t}>") for t in ("xmin", "ymin", "xmax", "ymax"))
            if x1 < x0 or y1 < y0:
                raise ConvertError(f"{path}:{line}: box xmin {x0} ymin {y0} xmax {x1} ymax {y1} is inverted")
            labels.add(name)
            objects.append((image_id, name, [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1], None))
    return _coco(images, objects, sorted(labels))


def from_yolo(labels_dir: str | Path, images_dir: str | Path, names_file: str | Path) -> dict:
    """YOLO: ``images_dir`` holds the images, ``labels_dir`` one ``<stem>.txt`` per image with lines
    ``class cx cy w h`` (normalised; ``class x1 y1 x2 y2 ...`` polygons of YOLO-seg become masks too);
    ``names_file`` holds one class name per line (class 0 first). An image without a txt has no objects."""
    labels_dir, images_dir, names_file = Path(labels_dir), Path(images_dir), Path(names_file)
    if not names_file.is_file():
        raise ConvertError(f"{names_file}: names file not found")
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
    if not names:
        raise ConvertError(f"{names_file}: no class names")
    if len(set(names)) != len(names):
        raise ConvertError(f"{names_file}: duplicate class names")
    if not labels_dir.is_dir():
        raise ConvertError(f"{labels_dir}: labels folder not found")
    images, objects = [], []
    for image_id, img in enumerate(_files(images_dir, IMAGE_SUFFIXES, "image"), start=1):
        try:
            with Image.open(img) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise ConvertError(f"{img}: cannot read image: {e}") from None
        images.append({"id": image_id, "file_name": str(img.relative_to(images_dir)) if images_dir.is_dir() else img.name,
                       "width": w, "height": h})
        txt = labels_dir / (img.stem + ".txt")
        if not txt.is_file():
            continue
        for line_no, line in enumerate(txt.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{txt}:{line_no}"
            if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
                raise ConvertError(f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', got {line!r}")
            if not fields[0].isdigit() or int(fields[0]) >= len(names):
                raise ConvertError(f"{where}: class {fields[0]!r} is not an index into the {len(names)} names of {names_file}")
            vals = [_number(v, where) for v in fields[1:]]
            if any(v < 0 or v > 1 for v in vals):
                raise ConvertError(f"{where}: coordinates must be normalised to [0, 1], got {line!r}")
            name = names[int(fields[0])]
            if len(vals) == 4:
                cx, cy, bw, bh = vals
                if bw <= 0 or bh <= 0:
                    raise ConvertError(f"{where}: box width and height must be positive")
                objects.append((image_id, name, [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], None))
            else:
                xs, ys = [v * w for v in vals[0::2]], [v * h for v in vals[1::2]]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                if box[2] <= 0 or box[3] <= 0:
                    raise ConvertError(f"{where}: the polygon has no area")
                objects.append((image_id, name, box, [c for xy in zip(xs, ys) for c in xy]))
    return _coco(images, objects, names)


def from_labelme(src: str | Path) -> dict:
    """LabelMe: a folder of json files (or one); ``rectangle`` shapes become boxes, ``polygon`` shapes
    boxes with a polygon mask. Other shape types are an error (named with file and line)."""
    images, objects, labels = [], [], set()
    for image_id, path in enumerate(_files(Path(src), {".json"}, "LabelMe .json"), start=1):
        text = path.read_text(errors="replace")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}:{e.lineno}: invalid JSON (column {e.colno}): {e.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            raise ConvertError(f"{path}:1: not a LabelMe file (no 'shapes' list)")
        w = _number(data.get("imageWidth"), f"{path}:{_line_of(text, 'imageWidth', 0)}: imageWidth")
        h = _number(data.get("imageHeight"), f"{path}:{_line_of(text, 'imageHeight', 0)}: imageHeight")
        fname = data.get("imagePath")
        if not isinstance(fname, str) or not fname:
            raise ConvertError(f"{path}:{_line_of(text, 'imagePath', 0)}: 'imagePath' must name the image")
        images.append({"id": image_id, "file_name": fname.replace("\\", "/"), "width": int(w), "height": int(h)})
        for k, shape in enumerate(data["shapes"]):
            where = f"{path}:{_line_of(text, LABEL_KEY, k)}"
            if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"]:
                raise ConvertError(f"{where}: shape {k} has no label")
            pts = shape.get("points")
            if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
                raise ConvertError(f"{where}: shape {k} ('{shape['label']}'): 'points' must be a list of [x, y]")
            pts = [[_number(x, where), _number(y, where)] for x, y in pts]
            kind = shape.get("shape_type") or "polygon"
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if kind == "rectangle" and len(pts) == 2:
                poly = None
            elif kind == "polygon" and len(pts) >= 3:
                poly = [c for p in pts for c in p]
            else:
                raise ConvertError(f"{where}: shape {k} ('{shape['label']}'): a {kind!r} with {len(pts)} points is "
                                   "not supported (rectangles need 2 points, polygons 3 or more)")
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            if box[2] <= 0 or box[3] <= 0:
                raise ConvertError(f"{where}: shape {k} ('{shape['label']}') has no area")
            labels.add(shape["label"])
            objects.append((image_id, shape["label"], box, poly))
    return _coco(images, objects, sorted(labels))
