"""Deterministic procedural datasets for box-supervised instance segmentation.

Two kinds:

* ``flat``: a few flat-coloured shapes (the class is the shape) on a gradient background with large
  unannotated "stuff" patches;
* ``textured``: random blobs whose texture family is the class (stripes, dots, checker, speckle, see
  ``boxmask.data.textures``; colour varies per instance within overlapping hue ranges), on
  backgrounds drawn from a disjoint texture pool, so that class features have something to learn.

Two situations in which a colour-affinity pairwise loss is known to fail are injected on purpose and
flagged per object, in each annotation's ``"cases"`` list (values from ``HARD_CASES``; empty = plain):

* ``near_colour``: an object borders a region that is not it but shares its colour (flat: a stuff
  patch or an object of another class a few RGB units away; textured: a background-textured region
  hugging the object inside its box, in the object's palette and mean colour);
* ``same_class_overlap``: two instances of the same class overlap, the later one occluding the earlier one.

Three COCO files are written: ``train.json`` (boxes only, no ``segmentation``
key, as a box-supervised learner must see it), ``train_full.json`` (the same
images and annotation ids plus RLE masks, for oracle baselines and analysis)
and ``val.json`` (separate images with masks).  Each image entry carries a
``hard_cases`` list, the union of its objects' cases.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ..atomic_io import atomic_write_bytes, atomic_write_text
from .textures import BACKGROUND_FAMILIES, OBJECT_FAMILIES, band_noise

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

HARD_NEAR_COLOUR = "near_colour"
HARD_SAME_CLASS_OVERLAP = "same_class_overlap"
HARD_CASES = (HARD_NEAR_COLOUR, HARD_SAME_CLASS_OVERLAP)  # the values of each annotation's "cases"

MIN_VISIBLE_AREA = 30  # px; smaller remnants are not meaningful instances
MIN_VISIBLE_FRACTION = 0.25  # heavily occluded objects are dropped
NEAR_COLOUR_MAX_DELTA = 10.0  # L2 distance in RGB that counts as "nearly the same colour"

# Probabilities of injecting each hard case into an image.  Some injected
# cases are lost to occlusion or dropping, so these are set above the target
# frequency (>= 30 % of images each).
_P_SAME_CLASS = 0.55
_P_NEAR_COLOUR = 0.6
_SPLIT_KEYS = {"train": 0, "val": 1}  # child-seed namespace per split
_SHIFT = 4  # cv2 sub-pixel bits, so small shapes keep their exact geometry
_SCALE = 1 << _SHIFT


@dataclass
class _Obj:
    """One object instance before rasterisation order is applied."""

    cls: int  # index into CLASS_NAMES
    cx: float
    cy: float
    s: float  # nominal extent (diameter) in px
    angle: float  # radians
    colour: np.ndarray  # float RGB, shape (3,)
    mask: np.ndarray  # full (unoccluded) bool mask, shape (H, W)


# --------------------------------------------------------------------------- rasterisation


def _fill_poly(canvas: np.ndarray, pts: np.ndarray) -> None:
    """Fill a float polygon with sub-pixel precision (value 1)."""
    ipts = np.round(pts * _SCALE).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [ipts], 1, lineType=cv2.LINE_8, shift=_SHIFT)


def _rotate(pts: np.ndarray, angle: float, cx: float, cy: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _shape_mask(cls: int, cx: float, cy: float, s: float, angle: float, h: int, w: int) -> np.ndarray:
    """Full mask of a shape of class ``cls`` with extent ``s`` centred at (cx, cy)."""
    canvas = np.zeros((h, w), np.uint8)
    name = CLASS_NAMES[cls]
    r = s / 2.0
    if name == "circle":
        cv2.circle(canvas, (int(round(cx * _SCALE)), int(round(cy * _SCALE))), int(round(r * _SCALE)), 1, -1,
                   lineType=cv2.LINE_8, shift=_SHIFT)
    elif name == "square":
        a = 0.8 * r  # half side; keeps the area comparable to the circle of the same extent
        pts = np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
        _fill_poly(canvas, _rotate(pts, angle, cx, cy))
    elif name == "triangle":
        rr = 1.1 * r  # circumradius; triangles look small otherwise
        t = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        pts = np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)
        _fill_poly(canvas, _rotate(pts, angle, cx, cy))
    elif name == "cross":
        a, e = 0.36 * r, r  # arm half-width, arm half-length
        pts = np.array([[-a, -e], [a, -e], [a, -a], [e, -a], [e, a], [a, a],
                        [a, e], [-a, e], [-a, a], [-e, a], [-e, -a], [-a, -a]])
        _fill_poly(canvas, _rotate(pts, angle, cx, cy))
    else:  # pragma: no cover - guarded by CLASS_NAMES
        raise ValueError(f"unknown class {name!r}")
    return canvas.astype(bool)


def _patch_mask(rng: np.random.Generator, cx: float, cy: float, half_long: float, h: int, w: int) -> np.ndarray:
    """An unannotated stuff region: elongated rotated rectangle or ellipse.

    The aspect ratio is at least 1.8 so a patch never looks like an unlabelled
    square or circle, which would teach the model to ignore real objects.
    """
    canvas = np.zeros((h, w), np.uint8)
    hx, hy = half_long, half_long / rng.uniform(1.8, 3.0)
    angle = float(rng.uniform(0, np.pi))
    if rng.random() < 0.5:
        pts = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
        _fill_poly(canvas, _rotate(pts, angle, cx, cy))
    else:
        cv2.ellipse(canvas, (int(round(cx * _SCALE)), int(round(cy * _SCALE))),
                    (int(round(hx * _SCALE)), int(round(hy * _SCALE))), float(np.degrees(angle)), 0, 360, 1, -1,
                    lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas.astype(bool)


# --------------------------------------------------------------------------- colours


def _random_colour(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float = 45.0) -> np.ndarray:
    """A colour at least ``min_dist`` from every colour in ``avoid`` (best effort).

    The range [20, 235] leaves room for the small near-colour offsets without clipping.
    """
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(20, 235, size=3)
        d = min((float(np.linalg.norm(c - a)) for a in avoid), default=np.inf)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best  # type: ignore[return-value]


def _near_colour(rng: np.random.Generator, c: np.ndarray) -> np.ndarray:
    """A colour a few RGB units away from ``c`` (L2 distance in [3, 6])."""
    v = rng.normal(size=3)
    v /= np.linalg.norm(v) + 1e-9
    return np.clip(c + v * rng.uniform(3.0, 6.0), 0, 255)


# --------------------------------------------------------------------------- one image


def _camera_finish(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The rendered float image as a photo: a slight blur gives soft, camera-like edges; mild noise breaks
    flat regions."""
    img = cv2.GaussianBlur(clean, (3, 3), 0.6)
    img += rng.normal(0.0, rng.uniform(1.0, 2.5), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _overlapping_pair(rng: np.random.Generator, smin: float, smax: float, w: int, h: int):
    """Sizes and centres of two instances that overlap: (s1, s2, (cx1, cy1), (cx2, cy2)); the second
    centre lies 0.35-0.7 mean sizes from the first, in a random direction."""
    s1 = float(rng.uniform(smin, smax))
    s2 = float(np.clip(s1 * rng.uniform(0.8, 1.2), smin, smax))
    cx, cy = float(rng.uniform(0.25 * w, 0.75 * w)), float(rng.uniform(0.25 * h, 0.75 * h))
    d = rng.uniform(0.35, 0.7) * (s1 + s2) / 2
    phi = rng.uniform(0, 2 * np.pi)
    return s1, s2, (cx, cy), (cx + d * np.cos(phi), cy + d * np.sin(phi))


def _size_range(size: int) -> tuple[float, float]:
    # Objects span roughly 12-45 % of the image side; at least 8 px so they
    # survive the minimum-area filter on tiny images.
    return max(0.12 * size, 8.0), max(0.45 * size, 10.0)


def _resolve_visibility(masks: list[np.ndarray], order: list[int]) -> tuple[list[int], np.ndarray]:
    """Paint ``masks`` in ``order`` and drop objects that end up too small or too occluded.

    Returns the kept indices (in paint order) and the owner map: each pixel's visible object, or -1.
    Removing an object only uncovers the ones painted before it, so dropping the topmost failing
    object first and re-checking never removes more than necessary.
    """
    h, w = masks[0].shape if masks else (0, 0)
    keep = set(order)
    while True:
        owner = np.full((h, w), -1, np.int32)
        for k in order:
            if k in keep:
                owner[masks[k]] = k
        failing = []
        for k in order:
            if k not in keep:
                continue
            full = int(masks[k].sum())
            vis = int((owner == k).sum())
            if vis < MIN_VISIBLE_AREA or vis < MIN_VISIBLE_FRACTION * full:
                failing.append(k)
        if not failing:
            return [k for k in order if k in keep], owner
        keep.discard(failing[-1])


Rendered = tuple[np.ndarray, list[tuple[int, np.ndarray, list[str]]]]


def _render(rng: np.random.Generator, h: int, w: int) -> Rendered:
    """Render one flat-colour image; returns (RGB uint8 image, [(class, visible mask, cases)])."""
    smin, smax = _size_range(h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Background: linear gradient between two colours.
    c0 = rng.uniform(20, 235, 3)
    c1 = np.clip(c0 + rng.normal(0, 40, 3), 0, 255)
    th = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(th) + yy * np.sin(th)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    clean = (c0[None, None] + (c1 - c0)[None, None] * t[..., None]).astype(np.float32)
    bg_colours = [c0, c1]

    # A couple of large flat unannotated stuff patches.
    for _ in range(int(rng.integers(0, 3))):
        pm = _patch_mask(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.3, 0.7) * h, h, w)
        pc = _random_colour(rng, bg_colours, 30.0)
        clean[pm] = pc
        bg_colours.append(pc)

    objs: list[_Obj] = []
    groups: list[list[int]] = []  # indices into objs; paint order is decided per group

    def centre(margin: float = 0.15) -> tuple[float, float]:
        return float(rng.uniform(margin * w, (1 - margin) * w)), float(rng.uniform(margin * h, (1 - margin) * h))

    def add(cls: int, cx: float, cy: float, s: float, colour: np.ndarray) -> int:
        angle = 0.0 if CLASS_NAMES[cls] == "circle" else float(rng.uniform(0, 2 * np.pi))
        objs.append(_Obj(cls, cx, cy, s, angle, colour, _shape_mask(cls, cx, cy, s, angle, h, w)))
        return len(objs) - 1

    def fresh_colour() -> np.ndarray:
        return _random_colour(rng, bg_colours + [o.colour for o in objs])

    n_total = int(rng.integers(1, 6))

    # Hard case 2: two overlapping instances of the same class.
    if rng.random() < _P_SAME_CLASS:
        cls = int(rng.integers(len(CLASS_NAMES)))
        s1, s2, (cx, cy), (cx2, cy2) = _overlapping_pair(rng, smin, smax, w, h)
        col1 = fresh_colour()
        # Half the time the two instances also share (nearly) the same colour,
        # so nothing but shape separates them.
        col2 = _near_colour(rng, col1) if rng.random() < 0.5 else fresh_colour()
        a = add(cls, cx, cy, s1, col1)
        b = add(cls, cx2, cy2, s2, col2)
        groups.append([a, b])

    # Hard case 1: an object bordering a nearly same-coloured region that is not it.
    if rng.random() < _P_NEAR_COLOUR:
        cls = int(rng.integers(len(CLASS_NAMES)))
        s = float(rng.uniform(smin, smax))
        cx, cy = centre(0.25)
        col = fresh_colour()
        phi = rng.uniform(0, 2 * np.pi)
        if rng.random() < 0.6:
            # Stuff patch overlapping the object's side and extending beyond it;
            # painted in the background layer, so the object sits on top of it.
            d = rng.uniform(0.45, 0.7) * s
            pm = _patch_mask(rng, cx + d * np.cos(phi), cy + d * np.sin(phi), rng.uniform(0.7, 1.3) * s, h, w)
            clean[pm] = _near_colour(rng, col)
            groups.append([add(cls, cx, cy, s, col)])
        else:
            # A touching object of another class with nearly the same colour.
            other = int((cls + rng.integers(1, len(CLASS_NAMES))) % len(CLASS_NAMES))
            s2 = float(rng.uniform(smin, smax))
            d = rng.uniform(0.38, 0.48) * (s + s2)
            a = add(cls, cx, cy, s, col)
            b = add(other, cx + d * np.cos(phi), cy + d * np.sin(phi), s2, _near_colour(rng, col))
            groups.append([a, b])

    # Fillers: random objects placed where they overlap the others least.
    used = sum(len(g) for g in groups)
    for _ in range(max(0, n_total - used)):
        cls = int(rng.integers(len(CLASS_NAMES)))
        s = float(rng.uniform(smin, smax))
        occupied = np.zeros((h, w), bool)
        for o in objs:
            occupied |= o.mask
        best = None
        for _ in range(6):
            cx, cy = centre(0.1)
            angle = 0.0 if CLASS_NAMES[cls] == "circle" else float(rng.uniform(0, 2 * np.pi))
            m = _shape_mask(cls, cx, cy, s, angle, h, w)
            overlap = int((m & occupied).sum())
            if best is None or overlap < best[0]:
                best = (overlap, cx, cy, angle, m)
            if overlap == 0:
                break
        assert best is not None
        objs.append(_Obj(cls, best[1], best[2], s, best[3], fresh_colour(), best[4]))
        groups.append([len(objs) - 1])

    # Paint order: groups shuffled (so hard cases are not always on top),
    # order inside a group kept (the later one occludes the earlier one).
    order = [k for gi in rng.permutation(len(groups)) for k in groups[int(gi)]]

    kept, owner = _resolve_visibility([o.mask for o in objs], order)
    for k in kept:
        clean[objs[k].mask] = objs[k].colour
    # Object mask pixels were painted in order, so `clean` now equals the final
    # noiseless image and `owner` holds each pixel's visible object.

    cases: dict[int, list[str]] = {k: [] for k in kept}
    kernel = np.ones((3, 3), np.uint8)
    for k in kept:
        vis = owner == k
        ring = cv2.dilate(vis.astype(np.uint8), kernel, iterations=2).astype(bool) & ~vis
        dist = np.linalg.norm(clean[ring] - objs[k].colour[None], axis=1)
        if int((dist < NEAR_COLOUR_MAX_DELTA).sum()) >= 3:
            cases[k].append(HARD_NEAR_COLOUR)
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            if objs[a].cls == objs[b].cls and bool((objs[a].mask & objs[b].mask).any()):
                for k in (a, b):
                    if HARD_SAME_CLASS_OVERLAP not in cases[k]:
                        cases[k].append(HARD_SAME_CLASS_OVERLAP)

    return _camera_finish(clean, rng), [(objs[k].cls, owner == k, cases[k]) for k in kept]


# --------------------------------------------------------------------------- textured images

TEXTURED_CLASS_NAMES: tuple[str, ...] = tuple(OBJECT_FAMILIES)

# Each class's hues lie within +-75 degrees of its centre, so neighbouring classes share hues: colour
# alone does not tell the class, texture with colour statistics does.
_CLASS_HUE_CENTRE = {"stripes": 0.0, "dots": 90.0, "checker": 180.0, "speckle": 270.0}
_CLASS_HUE_HALF_WIDTH = 75.0
_P_TEX_SAME_CLASS = 0.5  # per image
_P_TEX_NEAR_COLOUR = 0.45  # per object; some attempts find no free room in the box and are dropped
SAME_CLASS_MIN_CONTACT = 3  # px of one visible mask within 1 px (8-neighbourhood) of the other's
HUG_WIDTH_PX = 3.0  # a near-colour region must come this close to its object's visible mask


def _hsv(hue_deg: float, s: float, v: float) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, float(np.clip(s, 0, 1)),
                                                float(np.clip(v, 0, 1))))


def _palette(rng: np.random.Generator, hue: float, s: float, v: float) -> tuple[np.ndarray, np.ndarray]:
    """Two colours of close hue and different brightness: a texture's dark and light phase."""
    dv = float(rng.uniform(0.18, 0.32))
    v2 = v + dv if (v + dv <= 0.95 and rng.random() < 0.5) or v - dv < 0.1 else v - dv
    return _hsv(hue, s, v), _hsv(hue + rng.uniform(-15, 15), s + rng.uniform(-0.15, 0.15), v2)


def _object_palette(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    hue = _CLASS_HUE_CENTRE[TEXTURED_CLASS_NAMES[cls]] + rng.uniform(-_CLASS_HUE_HALF_WIDTH, _CLASS_HUE_HALF_WIDTH)
    return _palette(rng, hue, float(rng.uniform(0.35, 0.85)), float(rng.uniform(0.35, 0.8)))


def _background_palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _palette(rng, float(rng.uniform(0, 360)), float(rng.uniform(0.05, 0.55)), float(rng.uniform(0.3, 0.85)))


def _near_palette(rng: np.random.Generator, pal: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A palette a few RGB units from ``pal``: same-class neighbours that only texture phase separates."""
    shift = rng.normal(0, 3.0, 3)
    return np.clip(pal[0] + shift, 0, 255), np.clip(pal[1] + shift, 0, 255)


def _blob_mask(rng: np.random.Generator, cx: float, cy: float, s: float, h: int, w: int) -> np.ndarray:
    """A random smooth blob of extent about ``s`` (a few low harmonics on a circle); the same for every
    class, so shape does not give the class away."""
    k = int(rng.integers(10, 16))
    t = np.sort((np.arange(k) + rng.uniform(-0.3, 0.3, k)) * 2 * np.pi / k)
    r = np.ones(k)
    for order in (2, 3, 4):
        r += rng.uniform(0, 0.2) * np.cos(order * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.55, 1.45) * s / 2
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    canvas = np.zeros((h, w), np.uint8)
    _fill_poly(canvas, pts)
    return canvas.astype(bool)


def _texture_scale(h: int) -> float:
    # Textures are defined at 192 px; below ~144 px the finest ones would blur away, so they stop shrinking.
    return float(np.clip(h / 192.0, 0.75, 2.0))


def _box_slices(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)


def _render_textured(rng: np.random.Generator, h: int, w: int) -> Rendered:
    """Render one textured image; returns (RGB uint8 image, [(class, visible mask, cases)]).

    The background is 1-3 regions, each a texture from the background pool.  Objects are random blobs
    whose texture family is their class.  Hard cases, each verified on the final layout before it is
    flagged on its objects:

    * ``near_colour``: a background region that hugs the object inside its tight box (outside every
      mask), in the object's palette with its mean colour matched to the object's, but a background
      texture: colour links it to the object, semantics do not;
    * ``same_class_overlap``: two instances of one class overlap, the later one occluding the earlier
      (half of the pairs have nearly the same palette, so only texture phase separates them); any two
      same-class objects whose visible masks touch are flagged.
    """
    scale = _texture_scale(h)
    smin, smax = _size_range(h)
    bg_families = list(BACKGROUND_FAMILIES.values())

    # Background: 1-3 regions with wavy borders (nearest seed, distances warped by low-frequency noise).
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n_regions = int(rng.integers(1, 4))
    dists = [np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h)) + 0.2 * h * band_noise(rng, h, w, h / 2, 4 * h)
             for _ in range(n_regions)]
    region = np.argmin(np.stack(dists), axis=0)
    clean = np.zeros((h, w, 3), np.float32)
    for r in range(n_regions):
        c1, c2 = _background_palette(rng)
        p = bg_families[int(rng.integers(len(bg_families)))](rng, h, w, scale)
        sel = region == r
        clean[sel] = c1 + (c2 - c1) * p[sel][:, None]

    masks: list[np.ndarray] = []
    classes: list[int] = []
    palettes: list[tuple[np.ndarray, np.ndarray]] = []
    groups: list[list[int]] = []

    def centre(margin: float) -> tuple[float, float]:
        return float(rng.uniform(margin * w, (1 - margin) * w)), float(rng.uniform(margin * h, (1 - margin) * h))

    def add(cls: int, mask: np.ndarray, pal: tuple[np.ndarray, np.ndarray]) -> int:
        masks.append(mask)
        classes.append(cls)
        palettes.append(pal)
        return len(masks) - 1

    n_total = int(rng.integers(1, 6))
    if rng.random() < _P_TEX_SAME_CLASS:
        cls = int(rng.integers(len(TEXTURED_CLASS_NAMES)))
        s1, s2, (cx, cy), (cx2, cy2) = _overlapping_pair(rng, smin, smax, w, h)
        pal1 = _object_palette(rng, cls)
        pal2 = _near_palette(rng, pal1) if rng.random() < 0.5 else _object_palette(rng, cls)
        a = add(cls, _blob_mask(rng, cx, cy, s1, h, w), pal1)
        b = add(cls, _blob_mask(rng, cx2, cy2, s2, h, w), pal2)
        groups.append([a, b])

    # Fillers where they overlap the others least.
    for _ in range(max(0, n_total - len(masks))):
        cls = int(rng.integers(len(TEXTURED_CLASS_NAMES)))
        s = float(rng.uniform(smin, smax))
        occupied = np.any(np.stack(masks), axis=0) if masks else np.zeros((h, w), bool)
        best: tuple[int, np.ndarray] | None = None
        for _ in range(6):
            m = _blob_mask(rng, *centre(0.1), s, h, w)
            overlap = int((m & occupied).sum())
            if best is None or overlap < best[0]:
                best = (overlap, m)
            if overlap == 0:
                break
        assert best is not None
        groups.append([add(cls, best[1], _object_palette(rng, cls))])

    order = [k for gi in rng.permutation(len(groups)) for k in groups[int(gi)]]
    kept, owner = _resolve_visibility(masks, order)
    free = owner == -1
    cases: dict[int, list[str]] = {k: [] for k in kept}

    # Object colours, rendered over each object's full-mask box only.
    colours: dict[int, tuple[tuple[slice, slice], np.ndarray, np.ndarray]] = {}
    families = list(OBJECT_FAMILIES.values())
    for k in kept:
        sl = _box_slices(masks[k])
        bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        p = families[classes[k]](rng, bh, bw, scale)
        c1, c2 = palettes[k]
        colours[k] = (sl, p, c1 + (c2 - c1) * p[..., None])

    def object_mean(k: int) -> tuple[np.ndarray, float]:
        sl, p, col = colours[k]
        vis = (owner == k)[sl]
        return col[vis].mean(axis=0), float(p[vis].mean())

    # Near-colour distractors, painted in the background layer (objects are painted over them after).
    claimed = np.zeros((h, w), bool)
    for k in kept:
        if rng.random() >= _P_TEX_NEAR_COLOUR:
            continue
        vis_full = owner == k
        sl = _box_slices(vis_full)
        vis = vis_full[sl]
        bh, bw = vis.shape
        # Distance to the visible mask inside its tight box (the nearest mask pixel is always in the box).
        dist = cv2.distanceTransform((~vis).astype(np.uint8), cv2.DIST_L2, 5)
        ys, xs = np.nonzero(vis)
        cy, cx = float(ys.mean()), float(xs.mean())
        corner = [(0, 0), (0, bw - 1), (bh - 1, 0), (bh - 1, bw - 1)][int(rng.integers(4))]
        phi = np.arctan2(corner[0] - cy, corner[1] - cx) + rng.uniform(-0.3, 0.3)
        gy, gx = np.mgrid[0:bh, 0:bw]
        dphi = np.angle(np.exp(1j * (np.arctan2(gy - cy, gx - cx) - phi)))
        width = max(3.0, float(rng.uniform(0.12, 0.25)) * max(bh, bw))
        hug = (dist > 0) & (dist <= width) & (np.abs(dphi) <= rng.uniform(0.8, 1.6)) & free[sl] & ~claimed[sl]
        if int(hug.sum()) < max(20, 0.1 * vis.sum()) or int((hug & (dist <= HUG_WIDTH_PX)).sum()) < 5:
            continue
        mean_col, mean_p = object_mean(k)
        p = bg_families[int(rng.integers(len(bg_families)))](rng, bh, bw, scale)
        p = np.clip(p - float(p[hug].mean()) + mean_p, 0, 1)  # the object's mean, the background's texture
        c1, c2 = palettes[k]
        col = c1 + (c2 - c1) * p[..., None]
        if float(np.linalg.norm(col[hug].mean(axis=0) - mean_col)) >= NEAR_COLOUR_MAX_DELTA:
            continue  # clipping moved the mean too far: not a near-colour region after all
        clean[sl][hug] = col[hug]
        claimed[sl] |= hug
        cases[k].append(HARD_NEAR_COLOUR)

    # Near-colour neighbourhoods that arose by chance are flagged too, so "plain" objects stay plain.
    for k in kept:
        if HARD_NEAR_COLOUR in cases[k]:
            continue
        vis_full = owner == k
        sl = _box_slices(vis_full)
        dist = cv2.distanceTransform((~vis_full[sl]).astype(np.uint8), cv2.DIST_L2, 5)
        ring = (dist > 0) & (dist <= HUG_WIDTH_PX) & free[sl]
        if int(ring.sum()) >= 20 and float(np.linalg.norm(clean[sl][ring].mean(axis=0) - object_mean(k)[0])) \
                < NEAR_COLOUR_MAX_DELTA:
            cases[k].append(HARD_NEAR_COLOUR)

    for k in kept:
        sl, _, col = colours[k]
        vis = (owner == k)[sl]
        clean[sl][vis] = col[vis]

    # Same-class neighbours: their visible masks touch (an overlap, or a contact that looks like one).
    kernel = np.ones((3, 3), np.uint8)
    grown = {k: cv2.dilate((owner == k).astype(np.uint8), kernel).astype(bool) for k in kept}
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            contact = max(int((grown[a] & (owner == b)).sum()), int((grown[b] & (owner == a)).sum()))
            if classes[a] == classes[b] and contact >= SAME_CLASS_MIN_CONTACT:
                for k in (a, b):
                    if HARD_SAME_CLASS_OVERLAP not in cases[k]:
                        cases[k].append(HARD_SAME_CLASS_OVERLAP)

    return _camera_finish(clean, rng), [(classes[k], owner == k, sorted(cases[k], key=HARD_CASES.index)) for k in kept]


# --------------------------------------------------------------------------- I/O


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj) + "\n")


def _encode_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _tight_box(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] in pixel-edge coordinates: a 1-px object has w = h = 1."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Child seed keyed by (split, index): train image i is the same whatever
    # num_train / num_val are.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_KEYS[split], index)))


KINDS = ("flat", "textured")
_RENDERERS = {"flat": _render, "textured": _render_textured}
_KIND_CLASSES = {"flat": CLASS_NAMES, "textured": TEXTURED_CLASS_NAMES}
_KIND_SUPERCATEGORY = {"flat": "shape", "textured": "texture"}


def _categories(kind: str) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": n, "supercategory": _KIND_SUPERCATEGORY[kind]}
            for i, n in enumerate(_KIND_CLASSES[kind])]


def partial_masks(full: dict[str, Any], fraction: float, seed: int = 0) -> dict[str, Any]:
    """A copy of a COCO dict in which only ``fraction`` of the non-crowd annotations keep their
    ``segmentation`` (chosen by a seeded permutation: deterministic); the others become box-only, with
    ``area`` = box area."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mask fraction must be in [0, 1], got {fraction}")
    anns = full["annotations"]
    order = np.random.default_rng([int(seed), 9]).permutation(len(anns))
    keep = {anns[k]["id"] for k in order[: int(round(fraction * len(anns)))]}
    out = []
    for a in anns:
        if a["id"] in keep or "segmentation" not in a:
            out.append(dict(a))
        else:
            out.append({k: v for k, v in a.items() if k != "segmentation"} | {"area": a["bbox"][2] * a["bbox"][3]})
    return {**full, "info": {**full.get("info", {}), "mask_fraction": fraction}, "annotations": out}


def generate(out_dir: str | Path, num_train: int = 64, num_val: int = 16, size: int = 128, seed: int = 0,
             show_progress: bool = True, mask_fraction: float | None = None, kind: str = "flat") -> dict[str, Path]:
    """Write OUT/images/*.png, OUT/train.json, OUT/train_full.json and OUT/val.json.

    ``kind`` "flat": flat-coloured shapes (the class is the shape); "textured": random blobs whose
    texture family is the class, on backgrounds from a disjoint texture pool (see ``_render_textured``).
    Every annotation has ``"cases"``: the hard cases it shows, a sublist of ``HARD_CASES`` (empty for a
    plain object); each image has ``"hard_cases"``, the union over its objects.
    Images are ``size`` px high and between ``size`` and 1.25 * ``size`` px wide.
    ``train.json`` has boxes only (its ``area`` is the box area, since a
    box-supervised learner knows no mask); ``train_full.json`` and ``val.json``
    carry RLE masks with ``area`` = mask area.  The output is byte-identical for
    the same arguments.  ``val_near_colour.json`` and ``val_same_class_overlap.json``
    hold the val images that show each hard case.  With ``mask_fraction`` F,
    ``train_partial.json`` keeps the masks of a fraction F of the train objects (mixed supervision).
    Returns the paths keyed "train", "train_full", "val", "val_near_colour",
    "val_same_class_overlap", ("train_partial",) "images".
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if mask_fraction is not None and not 0.0 <= mask_fraction <= 1.0:
        raise ValueError(f"mask_fraction must be in [0, 1], got {mask_fraction}")
    for name, value in (("num_train", num_train), ("num_val", num_val), ("size", size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if num_val < 0:
        raise ValueError(f"num_val must be >= 0, got {num_val}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    info = {"description": f"boxmask synthetic {'shapes' if kind == 'flat' else 'textures'}", "version": "1",
            "kind": kind, "seed": int(seed), "size": int(size), "classes": list(_KIND_CLASSES[kind])}
    datasets: dict[str, dict[str, Any]] = {
        key: {"info": {**info, "split": key}, "images": [], "annotations": [], "categories": _categories(kind)}
        for key in ("train", "train_full", "val")
    }

    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    ann_ids = {"train": 0, "val": 0}
    for split, i in tqdm(jobs, desc="synth", unit="img", disable=not show_progress):
        rng = _image_rng(int(seed), split, i)
        w = int(size + rng.integers(0, size // 4 + 1))  # mild aspect variation
        img, objects = _RENDERERS[kind](rng, int(size), w)
        hard = [case for case in HARD_CASES if any(case in cases for _, _, cases in objects)]

        file_name = f"{split}_{i:06d}.png"
        ok, buf = cv2.imencode(".png", img[..., ::-1])  # cv2 expects BGR
        if not ok:  # pragma: no cover - encoding a valid uint8 image does not fail
            raise RuntimeError(f"PNG encoding failed for {file_name}")
        atomic_write_bytes(img_dir / file_name, lambda f: f.write(buf.tobytes()))

        image = {"id": i + 1, "file_name": file_name, "width": w, "height": int(size), "hard_cases": hard}
        full_key = "train_full" if split == "train" else "val"
        datasets[full_key]["images"].append(image)
        if split == "train":
            datasets["train"]["images"].append(dict(image))

        for cls, mask, cases in objects:
            ann_ids[split] += 1
            box = _tight_box(mask)
            ann = {"id": ann_ids[split], "image_id": i + 1, "category_id": cls + 1, "bbox": box, "iscrowd": 0,
                   "cases": list(cases)}
            datasets[full_key]["annotations"].append(
                {**ann, "area": float(mask.sum()), "segmentation": _encode_rle(mask)})
            if split == "train":
                datasets["train"]["annotations"].append({**ann, "area": box[2] * box[3]})

    # The val images showing each hard case, as separate val sets (same ids, same annotations).
    for case in HARD_CASES:
        keep = {im["id"] for im in datasets["val"]["images"] if case in im["hard_cases"]}
        datasets[f"val_{case}"] = {
            **datasets["val"], "info": {**info, "split": f"val_{case}"},
            "images": [im for im in datasets["val"]["images"] if im["id"] in keep],
            "annotations": [a for a in datasets["val"]["annotations"] if a["image_id"] in keep],
        }
    if mask_fraction is not None:
        datasets["train_partial"] = partial_masks(datasets["train_full"], mask_fraction, int(seed))
    paths = {key: out / f"{key}.json" for key in datasets}
    for key, path in paths.items():
        _write_json(path, datasets[key])
    return {**paths, "images": img_dir}
