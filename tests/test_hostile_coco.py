"""Hostile COCO files: ``boxmask check`` and dataset loading (with masks, for training and evaluation) end
with a clean exit or a one-line DatasetError, never a traceback, a signal, a hang, or a write anywhere.

Each example runs in a long-lived worker process, so that a crash inside a C library (pycocotools,
Pillow) shows as the worker dying from a signal, under an address-space limit, rather than taking pytest
down; hypothesis then shrinks the file that did it. Run as ``python -m tests.test_hostile_coco`` it is
that worker."""
from __future__ import annotations

import hashlib
import json
import math
import os
import select
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

SIZE = 32  # every image on disk is SIZE x SIZE, so generated sizes and masks often fit
REPLY_TIMEOUT_S = 60

# ---------------------------------------------------------------- the files a hostile json can name
ON_DISK = ["a.png", "trunc.png", "float.tif", "int32.tif", "text.png", "deep16.png", "é 🙂.png", "fifo.png",
           "bomb.png", "sub", "sub/c.jpg", "loop.png"]
NAMES = ON_DISK + ["missing.png", "../outside/x.png", "../outside", "/etc/hostname", "sub/../a.png", "./a.png",
                   "a.png/", "", ".", "..", "a\0.png", "a.png\n", "x" * 300, "../" * 40 + "etc/passwd", "\\..\\a.png"]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height but holds almost no data (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _make_sandbox(root: Path) -> None:
    from PIL import Image

    images, outside = root / "images", root / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "a.png")
    Image.fromarray(rgb).save(images / "é 🙂.png")
    Image.fromarray(rgb).save(images / "sub" / "c.jpg")
    Image.fromarray(rgb).save(outside / "x.png")
    Image.fromarray(rgb).save(images / "trunc.png")
    data = (images / "trunc.png").read_bytes()
    (images / "trunc.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(rng.random((SIZE, SIZE)).astype(np.float32)).save(images / "float.tif")
    Image.fromarray((rng.integers(0, 2**31 - 1, (SIZE, SIZE))).astype(np.int32)).save(images / "int32.tif")
    Image.fromarray(rng.integers(0, 65535, (SIZE, SIZE)).astype(np.uint16)).save(images / "deep16.png")
    (images / "text.png").write_text("not an image")
    _png_header_only(images / "bomb.png", 100_000, 100_000)
    os.mkfifo(images / "fifo.png")  # reading it would block forever
    os.symlink("loop.png", images / "loop.png")
    (root / "cwd").mkdir()  # the worker's working directory: must stay empty


def _snapshot(root: Path, skip: Path) -> dict:
    """Every entry under ``root`` (not following links): type, size, mtime and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st_ = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if os.path.isfile(p) and not os.path.islink(p) else None
            out[str(p)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, digest)
    return out


# ---------------------------------------------------------------- strategies
WILD_NUMBERS = st.one_of(
    st.sampled_from([10**400, -10**400, 2**63, 2**64 + 1, -2**63, 1e308, -1e308, 1e30, 1e12, 1e8, 5e-324, -0.0,
                     math.nan, math.inf, -math.inf, 0, -1, SIZE, SIZE + 1, 2 * SIZE]),
    st.integers(-2**40, 2**40),
    st.floats(),
)
WILD = st.one_of(st.none(), st.booleans(), WILD_NUMBERS, st.text(max_size=6), st.just([]), st.just({}),
                 st.lists(st.integers(-3, 40), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
COORD = st.one_of(st.floats(-4, SIZE + 4), st.integers(-2, SIZE + 2), WILD_NUMBERS, WILD)
POLYGON = st.one_of(st.lists(COORD, max_size=12), st.lists(st.integers(0, SIZE), min_size=6, max_size=10),
                    st.lists(st.sampled_from([0, 5, 5.0, 1e12, 1e8, -1e8]), min_size=6, max_size=8), WILD)
RLE_CHARS = "".join(chr(c) for c in range(48, 112))


@st.composite
def _real_rle(draw):
    """A pycocotools RLE of a random mask, possibly of another size than the one it declares."""
    from pycocotools import mask as mask_utils

    h, w = draw(st.sampled_from([(SIZE, SIZE), (SIZE + 8, SIZE), (SIZE, 4), (1, 1)]))
    seed = draw(st.integers(0, 2**16))
    m = (np.random.default_rng(seed).random((h, w)) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))).astype(np.uint8)
    r = mask_utils.encode(np.asfortranarray(m))
    size = draw(st.one_of(st.just([h, w]), st.just([SIZE, SIZE]), st.lists(WILD_NUMBERS, max_size=3)))
    counts = r["counts"].decode("ascii")
    counts = draw(st.sampled_from([counts, counts + "P", counts[:-1], counts + "0", counts * 2]))
    return {"size": size, "counts": counts}


RLE = st.one_of(
    _real_rle(),
    st.fixed_dictionaries({"size": st.one_of(st.just([SIZE, SIZE]), WILD),
                           "counts": st.one_of(st.text(RLE_CHARS, max_size=24), st.text(max_size=8),
                                               st.lists(st.one_of(st.integers(-5, SIZE * SIZE + 5), WILD_NUMBERS), max_size=6),
                                               st.just([0, SIZE * SIZE]), st.just([SIZE * SIZE // 2] * 2), WILD)}),
)
SEGMENTATION = st.one_of(st.none(), st.lists(POLYGON, max_size=3), RLE, WILD)
IDS = st.one_of(st.integers(0, 4), st.sampled_from(["1", "a", "../x", "a\nb", ""]), WILD)


def _entry(required: dict, optional: dict):
    return st.fixed_dictionaries(required, optional=optional)


IMAGE = _entry({"id": IDS, "file_name": st.one_of(st.sampled_from(NAMES), st.text(max_size=12), WILD)},
               {"width": st.one_of(st.just(SIZE), st.integers(-1, 2 * SIZE), WILD),
                "height": st.one_of(st.just(SIZE), st.integers(-1, 2 * SIZE), WILD)})
BOX = st.one_of(st.lists(COORD, min_size=4, max_size=4), st.tuples(st.floats(0, SIZE), st.floats(0, SIZE),
                                                                   st.floats(0.5, SIZE), st.floats(0.5, SIZE)).map(list), WILD)
ANNOTATION = _entry({"id": IDS, "image_id": IDS, "category_id": st.one_of(st.sampled_from([1, 2, 99]), WILD), "bbox": BOX},
                    {"segmentation": SEGMENTATION, "iscrowd": st.one_of(st.sampled_from([0, 1]), WILD),
                     "area": st.one_of(st.floats(0, 100), WILD)})
CATEGORY = _entry({"id": st.one_of(st.sampled_from([1, 2, 1]), WILD)},
                  {"name": st.one_of(st.sampled_from(["x", "y", "x ", "\ufeffx", "../x"]), st.text(max_size=4), WILD)})
COCO = st.fixed_dictionaries(
    {"images": st.one_of(st.lists(IMAGE, min_size=1, max_size=4), WILD),
     "categories": st.one_of(st.lists(CATEGORY, min_size=1, max_size=3), WILD)},
    optional={"annotations": st.one_of(st.lists(ANNOTATION, max_size=6), WILD), "info": WILD},
)
RAW_JSON = st.sampled_from([
    b"", b"{", b"\xff\xfe{}", b"[]", b"null", b"\xef\xbb\xbf{}", b'{"images": [], "categories": [], "annotations": []}',
    b"[" * 100_000 + b"]" * 100_000, b'{"images": [{"id": ' + b"9" * 5000 + b"}]}",
    b'{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, '
    b'"category_id": 1, "bbox": [1e999, 0, 1, 1]}]}',
])


GOOD_FILES = ["a.png", "é 🙂.png", "sub/c.jpg"]
GOOD_SEGMENTATION = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(12, SIZE), st.integers(12, SIZE)).map(
        lambda b: [[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]]),
    st.just({"size": [SIZE, SIZE], "counts": [SIZE * 4, SIZE * 8, SIZE * SIZE - SIZE * 12]}),
)
FIELDS = {
    "images": {"id": IDS, "file_name": st.one_of(st.sampled_from(NAMES), st.text(max_size=12), WILD),
               "width": st.one_of(st.integers(-1, 2 * SIZE), WILD), "height": st.one_of(st.integers(-1, 2 * SIZE), WILD)},
    "annotations": {"id": IDS, "image_id": IDS, "category_id": st.one_of(st.sampled_from([1, 2, 99]), WILD), "bbox": BOX,
                    "segmentation": SEGMENTATION, "iscrowd": st.one_of(st.sampled_from([0, 1]), WILD),
                    "area": st.one_of(st.floats(0, 100), WILD)},
    "categories": {"id": st.one_of(st.sampled_from([1, 2]), WILD),
                   "name": st.one_of(st.sampled_from(["x", "y", "x ", "\ufeffx", "../x"]), st.text(max_size=4), WILD)},
}


@st.composite
def _valid_coco(draw) -> dict:
    n = draw(st.integers(1, 3))
    images = [{"id": i + 1, "file_name": GOOD_FILES[i], "width": SIZE, "height": SIZE} for i in range(n)]
    anns = []
    for k in range(draw(st.integers(0, 4))):
        x, y = draw(st.floats(0, SIZE - 9)), draw(st.floats(0, SIZE - 9))
        ann = {"id": k + 1, "image_id": draw(st.integers(1, n)), "category_id": draw(st.sampled_from([1, 2])),
               "bbox": [x, y, draw(st.floats(1, SIZE - x)), draw(st.floats(1, SIZE - y))]}
        seg = draw(GOOD_SEGMENTATION)
        if seg is not None:
            ann["segmentation"] = seg
        anns.append(ann)
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]}


@st.composite
def _mutated_coco(draw) -> dict:
    """A valid dataset with one to three hostile changes: a field's value, a duplicated entry, a dropped key."""
    data = draw(_valid_coco())
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(["images", "annotations", "annotations", "annotations", "categories"]))
        entries = data[section]
        if not entries:
            continue
        entry = entries[draw(st.integers(0, len(entries) - 1))]
        how = draw(st.sampled_from(["value"] * 6 + ["duplicate", "drop"]))
        key = draw(st.sampled_from(sorted(FIELDS[section])))
        if how == "value":
            entry[key] = draw(FIELDS[section][key])
        elif how == "duplicate":
            entries.append(json.loads(json.dumps(entry)))
        else:
            entry.pop(key, None)
    return data


@st.composite
def hostile_json(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(RAW_JSON)
    data = draw(COCO) if kind == 1 else draw(_mutated_coco())  # mostly valid structure, to reach the deep checks
    # NaN/inf as JSON's non-standard tokens, which Python's reader accepts
    return json.dumps(data, allow_nan=True).encode()


# ---------------------------------------------------------------- the worker process
def _worker() -> None:
    import contextlib
    import faulthandler
    import io
    import logging
    import resource
    import traceback

    import boxmask.engine.checkpoint, boxmask.engine.trainer, boxmask.modeling.backbone  # noqa: F401 (what main imports)
    from boxmask.cli import main
    from boxmask.data.coco import CocoDataset, DatasetError

    faulthandler.enable()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with open("/proc/self/statm") as f:  # a memory blow-up fails fast instead of swapping the machine
        limit = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + (3 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for line in sys.stdin:
        req = json.loads(line)
        out, err, res = io.StringIO(), io.StringIO(), {}
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                res["rc"] = main(["check", req["json"], "--images", req["images"], "--no-progress"])
            try:
                ds = CocoDataset(req["json"], req["images"], skip_invalid=req["lenient"])
                for i in range(len(ds)):
                    for for_eval in (False, True):
                        s = ds.load(i, with_masks=True, for_eval=for_eval)
                        h, w = s["image"].shape[:2]
                        assert s["image"].dtype == np.uint8 and s["image"].shape == (h, w, 3)
                        assert s["masks"].shape == (len(s["boxes"]), h, w) == (len(s["labels"]), h, w)
                        b = s["boxes"]
                        assert np.isfinite(b).all() and (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
                        assert (b[:, 2:] > b[:, :2]).all()
                res["loaded"] = len(ds)
            except DatasetError as e:
                res["load_error"] = str(e)
        except Exception:
            res["traceback"] = traceback.format_exc()
        res["out"], res["err"] = out.getvalue(), err.getvalue()
        print(json.dumps(res), flush=True)


class Worker:
    """The worker process; restarted after it dies."""

    def __init__(self, cwd: Path, log_path: Path):
        self.cwd, self.log_path, self.proc = cwd, log_path, None

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.test_hostile_coco"], cwd=self.cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def ask(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if ready:
                self.proc.wait(10)
            else:
                self.proc.kill()
                self.proc.wait()
            rc = self.proc.returncode
            self.proc = None
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(("hung" if not ready else f"worker died (return code {rc}: a signal if negative)") + f":\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    _make_sandbox(root)
    worker = Worker(root / "cwd", tmp_path_factory.mktemp("hostile_log") / "worker.log")
    yield root, worker
    worker.close()


@settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(content=hostile_json(), lenient=st.booleans())
def test_hostile_coco_check_and_loading(sandbox, content, lenient):
    root, worker = sandbox
    path = root / "data.json"
    path.write_bytes(content)
    before = _snapshot(root, skip=path)
    res = worker.ask({"json": str(path), "images": str(root / "images"), "lenient": lenient})
    assert "traceback" not in res, res["traceback"]
    assert res["rc"] in (0, 1, 2)
    event(f"check exit {res['rc']}; loading {'gave ' + str(res['loaded']) + ' images' if 'loaded' in res else 'refused'}")
    # one line per problem, each naming the file; an error is one line too
    for line in res["out"].splitlines():
        assert line.startswith(f"{path}: ") or line.endswith("boxes only"), line
    err = res["err"].splitlines()
    assert (res["rc"] == 2) == bool(err), res
    if err:
        assert len(err) == 1 and err[0].startswith(f"boxmask: error: {path}: "), err
    assert "load_error" not in res or "\n" not in res["load_error"]
    assert _snapshot(root, skip=path) == before  # nothing written, changed or removed
    assert not any((root / "cwd").iterdir())


def test_known_crashers_are_refused_cleanly(sandbox):
    """The cases that crashed or were read as garbage before: each gives a one-line error, no signal."""
    from pycocotools import mask as mask_utils

    root, worker = sandbox
    long_rle = mask_utils.encode(np.asfortranarray(np.ones((SIZE + 8, SIZE), np.uint8)))["counts"].decode()
    for seg in ([[0, 0, 1e12, 0, 1e12, 1e12]], [[0, 0, 1e8, 0, 1e8, 1e8]], {"size": [SIZE, SIZE], "counts": long_rle},
                {"size": [SIZE, SIZE], "counts": "0000000"}, {"size": [SIZE, SIZE], "counts": "1" * 99}):
        data = {"images": [{"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE}],
                "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "segmentation": seg}],
                "categories": [{"id": 1, "name": "x"}]}
        path = root / "data.json"
        path.write_text(json.dumps(data))
        for lenient in (False, True):
            res = worker.ask({"json": str(path), "images": str(root / "images"), "lenient": lenient})
            assert "traceback" not in res, res["traceback"]
            assert res["rc"] == 1 and "annotation id 7 (image id 1): segmentation" in res["out"], res
            if lenient:
                assert res["loaded"] == 1  # the image stays, as a negative
            else:
                assert "annotation id 7 (image id 1): segmentation" in res["load_error"]


if __name__ == "__main__":
    _worker()
