import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from boxmask.data import synth


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


@contextlib.contextmanager
def one_thread():
    """CPU kernels on one thread reduce in a fixed order: two trainings (an original and a resumed one)
    are then equal; with several threads they differ in the last digits from iteration 3 on."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_dataset(root: Path, images: list[dict], annotations: list[dict], categories=None, name="data.json") -> Path:
    """Write ``images`` (each with an 'array' to save) and a COCO json; returns the json path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    out_images = []
    for im in images:
        im = dict(im)
        arr = im.pop("array", None)
        if arr is not None:
            Image.fromarray(arr).save(root / "images" / im["file_name"])
        out_images.append(im)
    data = {"images": out_images, "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    path = root / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny generated dataset shared by the end-to-end tests."""
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, num_train=12, num_val=4, size=64, seed=1, show_progress=False)
    return out
