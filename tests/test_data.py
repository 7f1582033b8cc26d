"""COCO reading (polygons, RLE, crowd, negatives, category mapping), transforms and collation."""
import numpy as np
import pytest
import torch

from boxmask.data.batch import TrainSampler, collate
from boxmask.data.coco import CocoDataset
from boxmask.data.transforms import apply_transforms, target_size

from .conftest import rle, write_dataset


def _img(h=40, w=60, value=100):
    return np.full((h, w, 3), value, np.uint8)


@pytest.fixture
def mixed(tmp_path):
    rect = np.zeros((40, 60), np.uint8)
    rect[10:20, 5:25] = 1
    images = [
        {"id": 1, "file_name": "a.png", "width": 60, "height": 40, "array": _img()},
        {"id": 2, "file_name": "b.png", "width": 60, "height": 40, "array": _img()},
        {"id": 5, "file_name": "neg.png", "width": 60, "height": 40, "array": _img()},
    ]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 10, 20, 10], "segmentation": rle(rect), "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30, 5, 20, 20],
         "segmentation": [[30, 5, 50, 5, 50, 25, 30, 25]], "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 30], "segmentation": rle(rect), "iscrowd": 1},
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [40, 20, 10, 10], "iscrowd": 0},
    ]
    return write_dataset(tmp_path, images, anns), tmp_path / "images"


def test_reads_polygons_rle_crowd_and_negatives(mixed):
    path, root = mixed
    ds = CocoDataset(path, root)
    assert len(ds) == 3  # the image without annotations is kept as a negative
    assert ds.cat_ids == [3, 7] and ds.class_names == ["a", "b"]
    s = ds.load(0, with_masks=True)
    assert s["labels"].tolist() == [1, 0]  # category 7 -> label 1, 3 -> label 0
    np.testing.assert_allclose(s["boxes"][0], [5, 10, 25, 20])
    assert s["masks"].shape == (2, 40, 60)
    assert s["masks"][0].sum() == 200 and s["masks"][0][10:20, 5:25].all()
    assert s["masks"][1][6:24, 31:49].all()  # polygon rasterised
    crowd = ds.load(1)
    assert crowd["boxes"].shape == (1, 4)  # crowd box never becomes a target
    neg = ds.load(2, with_masks=True)
    assert neg["boxes"].shape == (0, 4) and neg["masks"].shape == (0, 40, 60)


def test_transforms_keep_boxes_and_masks_aligned(mixed):
    path, root = mixed
    s = CocoDataset(path, root).load(0, with_masks=True)
    for flip in (False, True):
        out = apply_transforms(s, short=80, max_size=1000, flip=flip)
        assert out["image"].shape == (3, 80, 120) and out["image_size"] == (80, 120)
        for box, mask in zip(out["boxes"], out["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(box, tight, atol=1.0), (flip, box, tight)


def test_target_size_respects_max():
    assert target_size(100, 200, 50, 1000) == (50, 100)
    assert target_size(100, 400, 100, 200) == (50, 200)


def test_collate_pads_to_32_and_keeps_raw_colours(mixed):
    path, root = mixed
    ds = CocoDataset(path, root)
    a = apply_transforms(ds.load(0, True), 40, 100, False)
    b = apply_transforms(ds.load(1, True), 50, 100, False)
    batch = collate([a, b])
    assert batch["images"].shape == (2, 3, 64, 96) and batch["images"].dtype == torch.uint8
    assert batch["images"][0, :, :40, :60].eq(100).all() and batch["images"][0, :, 40:].eq(0).all()
    assert batch["image_sizes"] == [(40, 60), (50, 75)]
    assert batch["gt_masks_padded"][0].shape == (2, 64, 96)


def test_sampler_is_a_function_of_the_iteration():
    s = TrainSampler(10, 4, seed=3)
    full = [b for _, b in zip(range(6), iter(s))]
    resumed = [b for _, b in zip(range(3), iter(TrainSampler(10, 4, seed=3, start_iter=3)))]
    assert full[3:] == resumed
    seen = [i for b in full[:5] for i, _ in b][:20]
    assert sorted(seen[:10]) == list(range(10))  # each epoch is a permutation
    other_rank = TrainSampler(10, 2, seed=3, rank=1, world_size=2).batch_for(0)
    assert other_rank == s.batch_for(0)[2:]
