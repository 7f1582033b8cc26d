"""torchrun with 2 CPU processes (gloo): ranks stay in sync, only rank 0 writes, and DDP on a global
batch equals one process on the same batch where that is mathematically expected."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from boxmask.engine.checkpoint import load_checkpoint

from .conftest import write_dataset

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["data.min_size_train=[64]", "data.min_size_test=64", "data.hflip=0.0", "model.fpn_channels=32",
          "model.mask_branch_channels=32", "solver.warmup_iters=1", "solver.scale_to_batch=false", "log_period=1",
          "checkpoint_period=2", "keep_checkpoints=5", "tb_image_period=0", "device=cpu"]  # gloo, whatever the machine


@pytest.fixture(scope="module")
def same_size_data(tmp_path_factory) -> Path:
    """Images of one size, so a padded batch of two equals two batches of one."""
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 9):
        arr = np.full((64, 64, 3), rng.integers(0, 80), np.uint8)
        for k in range(2):
            x, y = (int(v) for v in rng.integers(2, 36, size=2))
            s = int(rng.integers(12, 26))
            arr[y:y + s, x:x + s] = rng.integers(120, 255, size=3)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 3 if k else 7, "bbox": [x, y, s, s]})
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64, "array": arr})
    write_dataset(root, images, anns, name="train.json")
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train_args(data: Path, out: Path, extra: list[str]) -> list[str]:
    return ["-m", "boxmask", "train", "-c", str(ROOT / "configs" / "tiny.yaml"), *COMMON, *extra,
            "--train-json", str(data / "train.json"), "--train-images", str(data / "images"),
            "--out", str(out), "--no-progress"]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)


def test_two_ranks_stay_in_sync_and_only_rank0_writes(same_size_data, tmp_path):
    run = tmp_path / "sim"
    res = _torchrun(_train_args(same_size_data, run, [
        "solver.ims_per_batch=1", "--method", "sim", "--max-iters", "4", "sim.warmup_frac=0.25",
        "sim.bank_length=2", "sim.paste_prob=1.0", "sim.fg_thresh=0.01"]))
    assert res.returncode == 0, res.stderr[-3000:]
    log = (run / "log.txt").read_text()
    # the in-sync check ran at the checkpoints (it raises when weights, teacher or prototypes differ)
    assert log.count("all 2 ranks hold the same weights, teacher and prototypes") == 2
    assert "2 processes x 1 images" in log
    assert sorted(p.name for p in run.glob("model_*.pth")) == ["model_0000002.pth", "model_0000004.pth"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]  # one record per step, not one per rank
    assert recs[-1]["images_seen"] == 8 and "loss_paste" in recs[-1]


def test_ddp_equals_one_process_on_the_same_global_batch(same_size_data, tmp_path):
    """Box losses only (FCOS terms are normalised over all ranks), frozen BatchNorm (no per-rank batch
    statistics), same images, SGD (Adam's per-weight normalisation would magnify float rounding in
    weights whose gradients are ~0): 2 processes x 1 image must match 1 process x 2 images."""
    extra = ["--method", "boxinst", "--max-iters", "3", "loss.mask_weight=0", "model.norm=frozen_bn",
             "model.freeze_at=0", "model.weights=none", "solver.optimizer=sgd", "solver.lr=0.01"]
    ddp_run, single = tmp_path / "ddp", tmp_path / "single"
    res = _torchrun(_train_args(same_size_data, ddp_run, extra + ["solver.ims_per_batch=1"]))
    assert res.returncode == 0, res.stderr[-3000:]
    subprocess.run([sys.executable, *_train_args(same_size_data, single, extra + ["solver.ims_per_batch=2"])],
                   env=_env(), check=True, capture_output=True, timeout=600)
    a, b = load_checkpoint(ddp_run)["model"], load_checkpoint(single)["model"]
    moved = 0
    for k, v in a.items():
        # parameters; BatchNorm running statistics are per rank under DDP (the mask branch has BN)
        if v.is_floating_point() and "running_" not in k:
            assert torch.allclose(v, b[k], atol=2e-5, rtol=1e-4), k
            moved += 1
    assert moved > 10
    la = [json.loads(l)["loss_cls"] for l in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss_cls"] for l in (single / "metrics.jsonl").read_text().splitlines()]
    assert np.allclose(la, lb, rtol=1e-4)
