"""benchmarks/pairwise_probe.py: its counts on a hand-made case, and a run end to end on a tiny SIM model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from boxmask.cli import main

from . import benchmark_scripts
from .test_end_to_end import TINY

REPO = Path(__file__).resolve().parent.parent


def test_pair_counts_on_a_hand_made_case():
    """Four pairs: two cross the GT boundary (one of them cut, with dissimilar features), two lie inside
    one side (one of them wrongly cut); one more pair is not colour-linked and counts nowhere."""
    probe = benchmark_scripts.load("pairwise_probe")
    linked = torch.tensor([True, True, True, True, False])
    gt_split = torch.tensor([True, True, False, False, True])
    cut = torch.tensor([True, False, True, False, True])
    cos = torch.tensor([0.1, 0.9, 0.5, 0.95, 0.0])
    c = probe.pair_counts(linked, gt_split, cut, cos, thresholds=(0.3, 0.6))
    assert {k: c[k] for k in probe.COUNTS} == {"linked": 4, "gt_split": 2, "cut": 2, "cut_right": 1, "cut_wrong": 1}
    assert (c["cos<0.3:gt_split"], c["cos<0.3:same_side"]) == (1, 0)
    assert (c["cos<0.6:gt_split"], c["cos<0.6:same_side"]) == (1, 1)


def test_rim_and_deep_pairs_of_a_square():
    """A 6 x 6 object in a 10 x 10 map: with width 1, only its inner 4 x 4 cells are deep; a pair is deep when
    both its cells are, rim when both are inside and one is not deep; pairs leaving the object are neither."""
    probe = benchmark_scripts.load("pairwise_probe")
    gt = torch.zeros(1, 10, 10)
    gt[0, 2:8, 2:8] = 1.0
    rim, deep = probe.rim_and_deep(gt, 3, 1, width=1)
    assert not (rim & deep).any()
    k_right = 4  # neighbour (0, +1) of a 3 x 3 window with the centre left out
    assert deep[0, k_right, 3, 3] and deep[0, k_right, 4, 5]  # (4, 5)-(4, 6): both in the inner 4 x 4
    assert rim[0, k_right, 2, 3] and rim[0, k_right, 4, 6]  # one cell on the object's border row / column
    assert not rim[0, k_right, 4, 7] and not deep[0, k_right, 4, 7]  # (4, 7)-(4, 8) leaves the object


def test_pairwise_probe_runs_on_a_sim_run(synth_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--method", "sim", "--train-json",
                 str(synth_data / "train.json"), "--train-images", str(synth_data / "images"), "--out", str(run),
                 "--max-iters", "2", "--no-progress"]) == 0
    for features, name in (("mask", "pairwise_probe"), ("c3", "c3_probe"), ("c2", "c2_probe")):
        res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pairwise_probe.py"), "--runs", str(run),
                              "--data", str(synth_data), "--max-images", "2", "--results", str(tmp_path / "res"),
                              "--features", features, "--name", name],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        stored = json.loads((tmp_path / "res" / f"{name}.json").read_text())
        assert stored["features"] == features
        out = stored["results"]["run"]
        assert out["all"]["objects"] > 0
        for c in out.values():
            assert c["gt_split"] <= c["linked"] and c["cut_right"] + c["cut_wrong"] == c["cut"]
            assert c["cos<0.7:gt_split"] <= c["gt_split"] and c["cos<0.7:rim"] <= c["rim"]
            assert c["rim"] + c["deep"] <= c["linked"] - c["gt_split"]
        assert "| all |" in (tmp_path / "res" / f"{name}.md").read_text()
