"""Box formats -> COCO json: Pascal VOC XML, YOLO txt (with a names file or an Ultralytics data.yaml) and
LabelMe json.

Category ids follow one rule for every format, so that jsons converted from one dataset agree:

1. ``categories_from`` (an existing COCO json): its categories, ids and names, all of them in its order;
   a label that is not one of them is an error naming the file and line.
2. else ``names`` (a text file with one class name per line, or an Ultralytics ``data.yaml``): id = the
   name's index + 1 (for YOLO the class index + 1); every listed name becomes a category, used or not;
   a label that is not listed is an error naming the file and line.
3. else (VOC and LabelMe only): the labels found, sorted in Python string order (case-sensitive, so
   ``Zebra`` before ``ant``), id = rank + 1. YOLO always needs names: its label files hold indices.

Boxes past the image edge are clipped and counted; a box wholly outside is an error. VOC ``difficult`` /
``truncated`` / ``occluded`` flags are kept as ``attributes`` of the annotation (``difficult="crowd"``
writes difficult objects as crowd regions instead). Malformed input stops with an error naming the file
and the line; the caller writes the json only after everything was read."""
from __future__ import annotations

import codecs
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from .coco import IMAGE_SUFFIXES, DatasetError, _has_rotation, _is_int, read_json

LABEL_KEY = '"label"'
VOC_FLAGS = ("difficult", "truncated", "occluded")
DATA_YAML_KEYS = {"path", "train", "val", "test", "nc", "names", "download"}
CLIP_TOLERANCE = 1e-3  # pixels: float noise, clipped without being counted


class ConvertError(DatasetError):
    """Malformed input to ``boxmask convert``; the message names the file and the line."""


@dataclass
class Conversion:
    """A converted dataset and what the conversion did on the way."""

    coco: dict
    notes: list[str] = field(default_factory=list)  # what was done (informational)
    warnings: list[str] = field(default_factory=list)  # what the user should look at


@dataclass
class Names:
    """Class names in class-index order, with the line of each in ``path``."""

    path: Path
    names: list[str]
    lines: list[int]
    data_yaml: dict | None = None  # the whole Ultralytics data.yaml, when the names came from one

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"


class CategoryTable:
    """Label name -> category id, and the ``categories`` list to write."""

    def __init__(self, categories: list[dict], source: str):
        self.categories = categories
        self.ids = {c["name"]: c["id"] for c in categories}
        self.source = source

    def id_of(self, name: str, where: str) -> int:
        if name not in self.ids:
            raise ConvertError(f"{where}: label {name!r} is not one of the {len(self.ids)} categories of {self.source}")
        return self.ids[name]


# ------------------------------------------------------------------ reading files


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


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None


def _decode(raw: bytes, encoding: str, path: Path) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConvertError(f"{path}:{line}: not valid {encoding} text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a UTF-8 BOM is dropped; UTF-16 with a BOM is read too). Binary files and
    other encodings are one-line errors naming the file."""
    raw = _read_bytes(path)
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _decode(raw, "utf-16", path)
    if b"\x00" in raw:
        raise ConvertError(f"{path}: a binary file, not text")
    return _decode(raw, "utf-8-sig", path)


def _read_xml_text(path: Path) -> str:
    """XML text decoded by its BOM or its declared encoding (UTF-8 when none is declared)."""
    raw = _read_bytes(path)
    if raw.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        m = re.match(rb"""\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._:-]+)["']""", raw)
        encoding = m.group(1).decode("ascii") if m else "utf-8"
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConvertError(f"{path}:1: unknown encoding {encoding!r} in the XML declaration") from None
    return _decode(raw, encoding, path)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as boxmask reads the image: after its EXIF rotation."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).size if _has_rotation(im) else im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ConvertError(f"{path}: cannot read image: {e}") from None


def _files(src: Path, suffixes: set[str], what: str, exclude: set[Path] = frozenset()) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise ConvertError(f"{src}: no such file or folder")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in suffixes and p.is_file() and p.resolve() not in exclude)
    if not files:
        raise ConvertError(f"{src}: no {what} files found")
    return files


# ------------------------------------------------------------------ names and category ids


def read_names(path: str | Path) -> Names:
    """Class names from a text file (one per line, class 0 first) or an Ultralytics data.yaml
    (``names`` as a list or as a ``{0: cat, 1: dog}`` mapping; ``nc`` checked when given)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: names file not found")
    text = _read_text(path)
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if is_yaml:
            mark = getattr(e, "problem_mark", None)
            raise ConvertError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML: {getattr(e, 'problem', e)}") from None
        data = None
    if isinstance(data, dict) and DATA_YAML_KEYS & {str(k) for k in data}:
        if "names" not in data:
            raise ConvertError(f"{path}:1: a data.yaml without 'names' (the class names, class 0 first)")
        return _yaml_names(path, text, data)
    if is_yaml:
        raise ConvertError(f"{path}:1: expected an Ultralytics data.yaml with a 'names' list or mapping")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names, numbers = [], []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise ConvertError(f"{path}:{number}: empty line among the class names (class indices follow the lines; remove it)")
        names.append(name)
        numbers.append(number)
    return _checked(Names(path, names, numbers))


def _yaml_names(path: Path, text: str, data: dict) -> Names:
    # The composed nodes give each name's line and its text as written: safe_load would turn a class
    # called ``no`` or ``1.0`` into False or 1.0.
    root = yaml.compose(text)
    node = next(v for k, v in root.value if k.value == "names")
    where = f"{path}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.SequenceNode):
        items = list(enumerate(node.value))
    elif isinstance(node, yaml.MappingNode):
        items = []
        for k, v in node.value:
            if not re.fullmatch(r"\d+", str(k.value)):
                raise ConvertError(f"{path}:{k.start_mark.line + 1}: 'names' keys must be class indices 0, 1, ..., got {k.value!r}")
            items.append((int(k.value), v))
        keys = sorted(i for i, _ in items)
        if keys != list(range(len(items))):
            raise ConvertError(f"{where}: 'names' keys must be the class indices 0..{len(items) - 1}, got {keys}")
        items.sort(key=lambda kv: kv[0])
    else:
        raise ConvertError(f"{where}: 'names' must be a list or a mapping {{0: name, ...}}")
    names, lines = [], []
    for i, v in items:
        if not isinstance(v, yaml.ScalarNode) or not str(v.value).strip():
            raise ConvertError(f"{path}:{v.start_mark.line + 1}: class {i} has no name")
        names.append(str(v.value).strip())
        lines.append(v.start_mark.line + 1)
    if not names:
        raise ConvertError(f"{where}: 'names' is empty")
    if "nc" in data and not (_is_int(data["nc"]) and data["nc"] == len(names)):
        nc_line = next(k.start_mark.line + 1 for k, _ in root.value if k.value == "nc")
        raise ConvertError(f"{path}:{nc_line}: nc is {data['nc']!r} but 'names' lists {len(names)} classes")
    return _checked(Names(path, names, lines, data))


def _checked(names: Names) -> Names:
    if not names.names:
        raise ConvertError(f"{names.path}: no class names")
    first: dict[str, int] = {}
    for i, n in enumerate(names.names):
        if n in first:
            raise ConvertError(f"{names.where(i)}: duplicate class name {n!r} (also on line {names.lines[first[n]]})")
        first[n] = i
    return names


def category_table(names: Names | None, categories_from: str | Path | None) -> CategoryTable | None:
    """The fixed category ids (rules 1 and 2 of the module docstring), or None for sorted labels."""
    if categories_from is None:
        if names is None:
            return None
        return CategoryTable([{"id": i + 1, "name": n} for i, n in enumerate(names.names)], str(names.path))
    path = Path(categories_from)
    data = read_json(path)
    text = path.read_text(encoding="utf-8")
    cats, seen_ids, seen_names = [], set(), set()
    for k, c in enumerate(data["categories"]):
        name = c.get("name") if isinstance(c, dict) else None
        line = (_line_of(text, json.dumps(name, ensure_ascii=False), 0) if isinstance(name, str) else 0) or \
            _line_of(text, '"categories"', 0)
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(name, str) or not name.strip():
            raise ConvertError(f"{path}:{line}: category {k} needs an integer 'id' and a non-empty 'name', got {str(c)[:80]}")
        if c["id"] in seen_ids or name in seen_names:
            raise ConvertError(f"{path}:{line}: duplicate category id {c['id']} or name {name!r}")
        seen_ids.add(c["id"])
        seen_names.add(name)
        cats.append({k2: v for k2, v in c.items() if k2 in ("id", "name", "supercategory")})
    if not cats:
        raise ConvertError(f"{path}: no categories")
    table = CategoryTable(cats, str(path))
    for i, n in enumerate(names.names if names else []):
        if n not in table.ids:
            raise ConvertError(f"{names.where(i)}: class {n!r} is not one of the {len(cats)} categories of {path}")
    return table


# ------------------------------------------------------------------ building the json


@dataclass
class _Object:
    image_id: int
    name: str
    box: list[float]  # x, y, w, h
    where: str
    poly: list[float] | None = None
    attributes: dict | None = None
    crowd: bool = False


def _clip_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int, where: str) -> tuple[list[float], bool]:
    """[x, y, w, h] inside the image, and whether it was clipped by more than float noise."""
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
    if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
        raise ConvertError(f"{where}: box x0 {x0:g} y0 {y0:g} x1 {x1:g} y1 {y1:g} lies outside the {w}x{h} image")
    clipped = max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1) > CLIP_TOLERANCE
    return [cx0, cy0, cx1 - cx0, cy1 - cy0], clipped


def _clip_polygon(xs: list[float], ys: list[float], w: int, h: int, where: str) -> tuple[list[float], list[float], bool]:
    """Polygon vertices clamped into the image (exact for the box; an approximation of the mask)."""
    cxs, cys = [min(max(x, 0.0), float(w)) for x in xs], [min(max(y, 0.0), float(h)) for y in ys]
    clipped = max(max(abs(a - b) for a, b in zip(xs, cxs)), max(abs(a - b) for a, b in zip(ys, cys))) > CLIP_TOLERANCE
    shoelace = sum(cxs[i - 1] * cys[i] - cxs[i] * cys[i - 1] for i in range(len(cxs)))
    if max(cxs) - min(cxs) <= 0 or max(cys) - min(cys) <= 0 or abs(shoelace) < 1e-9:
        raise ConvertError(f"{where}: the polygon has no area inside the {w}x{h} image (collinear or outside)")
    return cxs, cys, clipped


def _coco(images: list[dict], objects: list[_Object], table: CategoryTable) -> dict:
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    anns = []
    for k, o in enumerate(objects, start=1):
        area = o.box[2] * o.box[3]
        if o.poly is not None:
            area = float(mask_utils.area(mask_utils.frPyObjects([o.poly], *sizes[o.image_id]))[0])
        a = {"id": k, "image_id": o.image_id, "category_id": table.id_of(o.name, o.where), "bbox": o.box,
             "area": area, "iscrowd": int(o.crowd)}
        if o.poly is not None:
            a["segmentation"] = [o.poly]
        if o.attributes:
            a["attributes"] = o.attributes
        anns.append(a)
    return {"images": images, "annotations": anns, "categories": table.categories}


def _table_or_sorted(table: CategoryTable | None, objects: list[_Object], what: str) -> CategoryTable:
    if table is not None:
        return table
    labels = sorted({o.name for o in objects})
    return CategoryTable([{"id": i + 1, "name": n} for i, n in enumerate(labels)], f"the labels of {what}")


def _clip_warning(n: int, total: int) -> list[str]:
    return [f"{n} of {total} boxes extended past the image edge and were clipped to it"] if n else []


def _same_image(file_name: str, where: str, seen: dict[str, str], what: str) -> None:
    if file_name in seen:
        raise ConvertError(f"{where}: {what} {file_name!r} is also described by {seen[file_name]} "
                           "(two annotation files for one image: merge or remove one)")
    seen[file_name] = where


# ------------------------------------------------------------------ Pascal VOC


def _voc_flag(obj: ET.Element, tag: str, where: str) -> bool:
    value = (obj.findtext(tag) or "0").strip().lower()
    if value not in ("0", "1", "false", "true", ""):
        raise ConvertError(f"{where}: <{tag}> must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def _voc_image(xml: Path, root: ET.Element, fname: str, images: Path | None) -> Path | None:
    """The image an XML describes: in ``images``, at its ``<path>``, beside the XML, or in the VOC
    ``JPEGImages`` (or ``images``) folder beside the XML's folder."""
    candidates = [images / fname] if images is not None else []
    vpath = (root.findtext("path") or "").strip()
    if vpath:
        p = Path(vpath.replace("\\", "/"))
        candidates.append(p if p.is_absolute() else xml.parent / p)
    candidates += [xml.parent / fname, xml.parent.parent / "JPEGImages" / fname, xml.parent.parent / "images" / fname]
    return next((c for c in candidates if c.is_file()), None)


def from_voc(src: str | Path, images: str | Path | None = None, names: str | Path | None = None,
             categories_from: str | Path | None = None, difficult: str = "keep") -> Conversion:
    """Pascal VOC: a folder of XML files (or one). Boxes are 1-based inclusive pixel indices. A missing
    or zero ``<size>`` is read from the image (found in ``images``, at ``<path>``, beside the XML or in
    ``../JPEGImages``). ``difficult``: ``"keep"`` (an ordinary object with ``attributes.difficult``) or
    ``"crowd"`` (a crowd region: ignored by COCO evaluation, never a training positive)."""
    if difficult not in ("keep", "crowd"):
        raise ValueError(f"difficult must be 'keep' or 'crowd', got {difficult!r}")
    names_ = read_names(names) if names is not None else None
    table = category_table(names_, categories_from)
    images_dir = Path(images) if images is not None else None
    result = Conversion({})
    out_images, objects, seen = [], [], {}
    flags = dict.fromkeys(VOC_FLAGS, 0)
    clipped = from_image = 0
    for image_id, path in enumerate(_files(Path(src), {".xml"}, "VOC .xml"), start=1):
        text = _read_xml_text(path)
        try:
            root = ET.fromstring(text)
        except ET.ParseError as e:
            line, col = e.position
            raise ConvertError(f"{path}:{line}: malformed XML (column {col}): {e}") from None
        fname = (root.findtext("filename") or "").strip()
        if not fname:
            raise ConvertError(f"{path}:{max(_line_of(text, '<annotation', 0), 1)}: no <filename>")
        _same_image(fname, f"{path}:{_line_of(text, '<filename', 0)}", seen, "<filename>")
        size = root.find("size")
        size_line = _line_of(text, "<size", 0) or _line_of(text, "<annotation", 0) or 1

        def dimension(tag: str) -> float:
            value = size.findtext(tag) if size is not None else None
            if not (value or "").strip():
                return 0.0
            return _number(value, f"{path}:{_line_of(text, '<' + tag, 0)}: <{tag}>")

        w, h = dimension("width"), dimension("height")
        if w < 0 or h < 0:
            raise ConvertError(f"{path}:{size_line}: image size {w:g}x{h:g} is negative")
        if w == 0 or h == 0:  # common in exports: read the size from the image itself
            image = _voc_image(path, root, fname, images_dir)
            if image is None:
                raise ConvertError(f"{path}:{size_line}: image size {w:g}x{h:g} is missing or zero and the image "
                                   f"{fname!r} was not found (give --images DIR)")
            w, h = _image_size(image)
            from_image += 1
        w, h = int(w), int(h)
        out_images.append({"id": image_id, "file_name": fname, "width": w, "height": h})
        for k, obj in enumerate(root.findall("object")):
            where = f"{path}:{_line_of(text, '<object', k)}"
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if not name or bb is None:
                raise ConvertError(f"{where}: <object> needs a <name> and a <bndbox>")
            x0, y0, x1, y1 = (_number(bb.findtext(t), f"{where}: <{t}>") for t in ("xmin", "ymin", "xmax", "ymax"))
            if x1 < x0 or y1 < y0:
                raise ConvertError(f"{where}: box xmin {x0:g} ymin {y0:g} xmax {x1:g} ymax {y1:g} is inverted")
            box, was_clipped = _clip_box(x0 - 1, y0 - 1, x1, y1, w, h, where)
            clipped += was_clipped
            attributes = {t: True for t in VOC_FLAGS if _voc_flag(obj, t, where)}
            for t in attributes:
                flags[t] += 1
            if table is not None:
                table.id_of(name, where)  # fail at the first unknown label
            objects.append(_Object(image_id, name, box, where, attributes=attributes or None,
                                   crowd=difficult == "crowd" and "difficult" in attributes))
    result.coco = _coco(out_images, objects, _table_or_sorted(table, objects, str(src)))
    if from_image:
        result.notes.append(f"{from_image} images had no size (or 0) in their XML: read from the image files")
    if flags["difficult"]:
        result.notes.append(f"{flags['difficult']} difficult objects: " + (
            "written as crowd regions (iscrowd 1: ignored by evaluation, not trained on)" if difficult == "crowd"
            else "kept as objects, marked attributes.difficult (--difficult crowd makes them crowd regions)"))
    for t in ("truncated", "occluded"):
        if flags[t]:
            result.notes.append(f"{flags[t]} {t} objects: kept, marked attributes.{t}")
    result.warnings += _clip_warning(clipped, len(objects))
    return result


# ------------------------------------------------------------------ YOLO


def _swap_dir(folder: Path, old: str, new: str) -> Path | None:
    """``folder`` with its last ``old`` component replaced by ``new`` (Ultralytics: images/ <-> labels/)."""
    parts = list(folder.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == old:
            parts[i] = new
            return Path(*parts)
    return None


def yolo_images_dir(labels_dir: str | Path, names: Names | None) -> Path | None:
    """The images folder of a YOLO labels folder: the data.yaml's train/val/test folder whose labels
    folder it is, else the labels folder with its last ``labels`` component renamed ``images``."""
    labels_dir = Path(labels_dir).resolve()
    data = names.data_yaml if names is not None else None
    if data:
        base = names.path.parent
        root = Path(str(data["path"])) if data.get("path") else base
        if not root.is_absolute():
            root = base / root if (base / root).is_dir() else Path.cwd() / root
        for split in ("train", "val", "test"):
            entries = data.get(split)
            for entry in entries if isinstance(entries, list) else [entries]:
                if isinstance(entry, str) and entry:
                    folder = Path(entry) if Path(entry).is_absolute() else root / entry
                    if not folder.is_dir() and entry.startswith("../"):
                        folder = root / entry[3:]  # as Ultralytics reads Roboflow's "train: ../train/images"
                    if folder.is_dir() and _swap_dir(folder.resolve(), "images", "labels") == labels_dir:
                        return folder
    guess = _swap_dir(labels_dir, "labels", "images")
    return guess if guess is not None and guess.is_dir() else None


def _yolo_class(field_: str, names: Names, where: str) -> str:
    if not re.fullmatch(r"\d+(\.0*)?", field_) or int(float(field_)) >= len(names.names):
        raise ConvertError(f"{where}: class {field_!r} is not an index into the {len(names.names)} names of {names.path}")
    return names.names[int(float(field_))]


def from_yolo(labels_dir: str | Path, images_dir: str | Path | None, names_file: str | Path,
              categories_from: str | Path | None = None) -> Conversion:
    """YOLO: ``images_dir`` holds the images (found from a data.yaml or the labels folder's name when
    None), ``labels_dir`` one ``<stem>.txt`` per image (same subfolders) with lines ``class cx cy w h``
    (normalised; ``class x1 y1 x2 y2 ...`` polygons of YOLO-seg become masks too); ``names_file`` a
    names file or data.yaml (class 0 first). An image without a txt has no objects; a txt without an
    image is reported."""
    names = read_names(names_file)
    table = category_table(names, categories_from)
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise ConvertError(f"{labels_dir}: labels folder not found")
    if images_dir is None:
        images_dir = yolo_images_dir(labels_dir, names)
        if images_dir is None:
            raise ConvertError(f"{labels_dir}: cannot tell where its images are (no data.yaml train/val/test folder "
                               "for these labels, no images/ folder beside labels/): give --images DIR")
    images_dir = Path(images_dir)
    result = Conversion({})
    if images_dir.is_dir():
        result.notes.append(f"images from {images_dir}")
    out_images, objects, claimed = [], [], {}
    clipped = unlabelled = 0
    for image_id, img in enumerate(_files(images_dir, IMAGE_SUFFIXES, "image"), start=1):
        w, h = _image_size(img)
        rel = img.relative_to(images_dir) if images_dir.is_dir() else Path(img.name)
        out_images.append({"id": image_id, "file_name": rel.as_posix(), "width": w, "height": h})
        txt = labels_dir / rel.with_suffix(".txt")
        if not txt.is_file():
            txt = labels_dir / (img.stem + ".txt")
        if not txt.is_file():
            unlabelled += 1
            continue
        key = txt.resolve()
        if key in claimed:
            raise ConvertError(f"{txt}: the label file of two images, {claimed[key]} and {img} (rename one)")
        claimed[key] = img
        for line_no, line in enumerate(_read_text(txt).splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{txt}:{line_no}"
            if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
                raise ConvertError(f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', got {line!r}")
            name = _yolo_class(fields[0], names, where)
            vals = [_number(v, where) for v in fields[1:]]
            if any(v < 0 or v > 1 for v in vals):
                raise ConvertError(f"{where}: coordinates must be normalised to [0, 1], got {line!r}")
            if len(vals) == 4:
                cx, cy, bw, bh = vals
                if bw <= 0 or bh <= 0:
                    raise ConvertError(f"{where}: box width and height must be positive")
                box, was_clipped = _clip_box((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h,
                                             w, h, where)
                objects.append(_Object(image_id, name, box, where))
            else:
                xs, ys = [v * w for v in vals[0::2]], [v * h for v in vals[1::2]]
                if max(xs) - min(xs) <= 0 or max(ys) - min(ys) <= 0:
                    raise ConvertError(f"{where}: the polygon has no area")
                xs, ys, was_clipped = _clip_polygon(xs, ys, w, h, where)
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                objects.append(_Object(image_id, name, box, where, poly=[c for xy in zip(xs, ys) for c in xy]))
            clipped += was_clipped
    skip = {names.path.resolve()}
    orphans = sorted(p for p in labels_dir.rglob("*.txt")
                     if p.resolve() not in claimed and p.resolve() not in skip and p.name != "classes.txt")
    result.coco = _coco(out_images, objects, table)
    if unlabelled:
        result.notes.append(f"{unlabelled} images have no label file: kept as images without objects")
    if orphans:
        shown = ", ".join(str(p) for p in orphans[:3]) + (", ..." if len(orphans) > 3 else "")
        result.warnings.append(f"{len(orphans)} label files have no image in {images_dir} and were not converted: {shown}")
    result.warnings += _clip_warning(clipped, len(objects))
    return result


# ------------------------------------------------------------------ LabelMe


def from_labelme(src: str | Path, names: str | Path | None = None, categories_from: str | Path | None = None,
                 exclude: tuple[str | Path, ...] = ()) -> Conversion:
    """LabelMe: a folder of json files (or one); ``rectangle`` shapes become boxes, ``polygon`` shapes
    boxes with a polygon mask. Other shape types are an error (named with file and line). Files in
    ``exclude`` (e.g. the output json) are not read."""
    names_ = read_names(names) if names is not None else None
    table = category_table(names_, categories_from)
    skip = {Path(p).resolve() for p in exclude}
    result = Conversion({})
    out_images, objects, seen = [], [], {}
    clipped = 0
    for image_id, path in enumerate(_files(Path(src), {".json"}, "LabelMe .json", skip), start=1):
        text = _read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}:{e.lineno}: invalid JSON (column {e.colno}): {e.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            raise ConvertError(f"{path}:1: not a LabelMe file (no 'shapes' list)")
        w = _number(data.get("imageWidth"), f"{path}:{_line_of(text, 'imageWidth', 0)}: imageWidth")
        h = _number(data.get("imageHeight"), f"{path}:{_line_of(text, 'imageHeight', 0)}: imageHeight")
        if w < 1 or h < 1:
            raise ConvertError(f"{path}:{_line_of(text, 'imageWidth', 0)}: image size {w:g}x{h:g} must be positive")
        w, h = int(w), int(h)
        fname = data.get("imagePath")
        if not isinstance(fname, str) or not fname:
            raise ConvertError(f"{path}:{_line_of(text, 'imagePath', 0)}: 'imagePath' must name the image")
        fname = fname.replace("\\", "/")
        _same_image(fname, f"{path}:{_line_of(text, 'imagePath', 0)}", seen, "imagePath")
        out_images.append({"id": image_id, "file_name": fname, "width": w, "height": h})
        for k, shape in enumerate(data["shapes"]):
            where = f"{path}:{_line_of(text, LABEL_KEY, k)}"
            if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"].strip():
                raise ConvertError(f"{where}: shape {k} has no label")
            label = shape["label"].strip()
            pts = shape.get("points")
            if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
                raise ConvertError(f"{where}: shape {k} ('{label}'): 'points' must be a list of [x, y]")
            pts = [[_number(x, where), _number(y, where)] for x, y in pts]
            kind = shape.get("shape_type") or "polygon"
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if not ((kind == "rectangle" and len(pts) == 2) or (kind == "polygon" and len(pts) >= 3)):
                raise ConvertError(f"{where}: shape {k} ('{label}'): a {kind!r} with {len(pts)} points is "
                                   "not supported (rectangles need 2 points, polygons 3 or more)")
            if max(xs) - min(xs) <= 0 or max(ys) - min(ys) <= 0:
                raise ConvertError(f"{where}: shape {k} ('{label}') has no area")
            if table is not None:
                table.id_of(label, where)
            if kind == "rectangle":
                box, was_clipped = _clip_box(min(xs), min(ys), max(xs), max(ys), w, h, where)
                poly = None
            else:
                xs, ys, was_clipped = _clip_polygon(xs, ys, w, h, where)
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                poly = [c for xy in zip(xs, ys) for c in xy]
            clipped += was_clipped
            objects.append(_Object(image_id, label, box, where, poly=poly))
    result.coco = _coco(out_images, objects, _table_or_sorted(table, objects, str(src)))
    result.warnings += _clip_warning(clipped, len(objects))
    return result
