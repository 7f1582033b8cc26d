"""Property-based input validation: malformed annotation files give a clear boxmask error or a logged
skip, never a traceback from deep inside the code, and never a partially written output."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from boxmask.cli import main
from boxmask.data.coco import CocoDataset, DatasetError

from .conftest import rle

N_EXAMPLES = 300

WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**9), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.just([]), st.just({}), st.lists(st.integers(-5, 50), max_size=7),
    st.lists(st.floats(allow_nan=True), max_size=5), st.just([[1, 2, 3]]), st.just({"size": [1], "counts": 3}),
    st.just([["a", "b", "c", "d", "e", "f"]]), st.just({"size": [32, 32], "counts": [1, "x"]}),
    st.just({"size": [32, 32], "counts": "garbage!"}), st.just([1024]),
)
IMAGE_KEYS = ["id", "file_name", "width", "height"]
ANN_KEYS = ["id", "image_id", "category_id", "bbox", "segmentation", "iscrowd", "area"]


def _base() -> dict:
    m = np.zeros((32, 32), np.uint8)
    m[4:12, 4:12] = 1
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                   {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8], "segmentation": rle(m)},
                        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [1, 2, 20, 10],
                         "segmentation": [[1, 2, 21, 2, 21, 12, 1, 12]]}],
        "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
    }


mutation = st.tuples(
    st.sampled_from(["image", "annotation", "category", "top", "duplicate", "drop"]),
    st.integers(0, 1),
    st.sampled_from(IMAGE_KEYS + ANN_KEYS + ["name", "categories", "annotations", "images"]),
    WEIRD,
)


def _mutate(data: dict, muts) -> dict:
    data = copy.deepcopy(data)
    for where, idx, key, value in muts:
        if where == "top":
            data[key] = value
            continue
        section = {"image": "images", "annotation": "annotations", "category": "categories"}.get(where)
        if where in ("duplicate", "drop"):
            section = ["images", "annotations", "categories"][idx % 3]
        entries = data.get(section)
        if not isinstance(entries, list) or not entries:
            continue
        if where == "duplicate":
            entries.append(copy.deepcopy(entries[0]))
        elif where == "drop":
            entries[0].pop(key, None) if isinstance(entries[0], dict) else None
        else:
            target = entries[idx % len(entries)]
            if isinstance(target, dict):
                target[key] = value
    return data


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prop")
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(d / name)
    return d


def _write(d: Path, data: dict) -> Path:
    path = d / "data.json"
    # NaN/inf are not JSON: a user's file would carry them as strings or fail to parse; keep them as
    # JSON's non-standard tokens, which Python's reader accepts, to reach the validator with them.
    path.write_text(json.dumps(data, allow_nan=True))
    return path


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(mutation, min_size=1, max_size=4), lenient=st.booleans())
def test_malformed_annotations_give_a_clear_error_or_a_skip(image_dir, muts, lenient):
    path = _write(image_dir, _mutate(_base(), muts))
    try:
        ds = CocoDataset(path, image_dir, skip_invalid=lenient)
    except DatasetError as e:
        assert str(path) in str(e) or "annotation file" in str(e)
        return
    # what loaded must also be usable: every sample (with masks) reads without error
    for i in range(len(ds)):
        s = ds.load(i, with_masks=True)
        assert s["masks"].shape[0] == len(s["boxes"]) == len(s["labels"])
        assert all(math.isfinite(float(v)) for v in s["boxes"].reshape(-1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_cli_never_tracebacks_and_writes_nothing_on_bad_data(image_dir, muts, capsys):
    path = _write(image_dir, _mutate(_base(), muts))
    rc = main(["check", str(path), "--images", str(image_dir), "--no-progress"])
    assert rc in (0, 1, 2)
    out = tmp = image_dir / "run_should_not_exist"
    rc = main(["train", "-c", "configs/tiny.yaml", "--train-json", str(path), "--train-images", str(image_dir),
               "--out", str(out), "--max-iters", "0", "--no-progress"]) if rc == 2 else 2
    if rc == 2:
        assert not tmp.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
