"""benchmarks/semantic_probe.py: its AUCs on a hand-made case, and a run end to end on a tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from boxmask.cli import main

from . import benchmark_scripts
from .test_end_to_end import TINY

REPO = Path(__file__).resolve().parent.parent


def test_oracle_prototypes_on_a_hand_made_case():
    """Foreground features point one way, the box's background (and the outside) another: M_S ranks
    perfectly (AUC 1); M_I is a blurred copy of the GT mask with one background pixel above every
    foreground pixel."""
    probe = benchmark_scripts.load("semantic_probe")
    fg_dir, bg_dir = F.normalize(torch.tensor([1.0, 0.2, 0.0]), dim=0), F.normalize(torch.tensor([0.0, 0.3, 1.0]), dim=0)
    images, objects = [], []
    for k in range(4):  # images 0-1 fit the prototypes, 2-3 are measured
        gt = torch.zeros(8, 8, dtype=torch.bool)
        gt[2:6, 2:5] = True
        box = torch.zeros(8, 8, dtype=torch.bool)
        box[1:7, 1:7] = True
        feats = torch.where(gt[None], fg_dir[:, None, None], bg_dir[:, None, None])
        images.append({"bg": ~box, "mask": feats})
        m_i = gt.float() * 0.8 + 0.1
        m_i[1, 1] = 0.95  # one background pixel above all 12 foreground ones
        objects.append({"splits": ["all", "plain"], "cls": 0, "image": k, "box": box, "gt": gt, "m_i": m_i})
    res = probe.probe(objects, images, 1, "mask", 1)
    n_fg, n_bg = 12, 36 - 12
    assert res["plain"]["num_objects"] == 2
    assert res["plain"]["m_s"] == pytest.approx(1.0)
    assert res["plain"]["m_i"] == pytest.approx(1.0 - n_fg / (n_fg * n_bg))
    assert res["all"]["product"] == pytest.approx(1.0)
    c = probe.spherical_kmeans(torch.stack([fg_dir, fg_dir, bg_dir, bg_dir]), 2)
    assert sorted(round(float(v), 4) for v in (c @ fg_dir)) == sorted([1.0, round(float(bg_dir @ fg_dir), 4)])


def test_semantic_probe_runs_on_a_trained_run(synth_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(run), "--max-iters", "2", "--no-progress"]) == 0
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "semantic_probe.py"), "--runs", str(run),
                          "--data", str(synth_data), "--protos", "1,2", "--results", str(tmp_path / "res")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "res" / "semantic_probe.json").read_text())["results"]
    assert set(out) == {f"{s}/{n}" for s in ("mask", "backbone_s4", "backbone_s8", "fpn_s8") for n in (1, 2)}
    for by_run in out.values():
        for split, row in by_run["run"].items():
            for m in ("m_s", "m_i", "linear", "product"):
                assert row[m] != row[m] or 0.0 <= row[m] <= 1.0, (split, m)
    assert "| all |" in (tmp_path / "res" / "semantic_probe.md").read_text()
