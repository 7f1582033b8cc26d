"""benchmarks/capacity.py runs end to end at a tiny size (two capacities, two seeds), so it does not rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_capacity_benchmark_end_to_end(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "capacity.py"), "--capacities", "preset,deep", "--methods",
           "boxinst", "--seeds", "0,1", "--images-seen", "8", "--batch", "2", "--points", "2", "--config",
           "configs/tiny.yaml", "--num-train", "6", "--num-val", "3", "--size", "64", "--threads", "1",
           "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res"),
           "data.min_size_train=[64]", "data.min_size_test=64", "model.fpn_channels=32", "model.mask_branch_channels=32",
           "solver.warmup_iters=1", "solver.scale_to_batch=false", "log_period=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "res" / "capacity.json").read_text())
    assert set(out["curves"]) == {"preset", "deep"}
    for by_method in out["curves"].values():
        for curve in by_method["boxinst"].values():
            assert [p["iteration"] for p in curve] == [2, 4]
            assert curve[-1]["train_seconds"] >= curve[0]["train_seconds"] > 0
    deep = out["summary"]["deep"]["boxinst"]["box_AP"]
    assert deep["vs_preset"]["seeds"] == [0, 1] and len(deep["values"]) == 2
    assert (tmp_path / "res" / "capacity.png").stat().st_size > 1000
    assert "| deep | boxinst |" in (tmp_path / "res" / "capacity.md").read_text()
    # a second call trains nothing and writes the same tables
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and "== " not in again.stdout
    # a capacity at its own budget, beside the reference's finished runs taken from the first benchmark
    wall = list(cmd)
    wall[wall.index("--results") + 1] = str(tmp_path / "wall")
    wall += ["--name", "wall", "--budget", "deep=4", "--reuse", "capacity"]
    res = subprocess.run(wall, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "== deep_boxinst_s0" in res.stdout and "== preset" not in res.stdout
    out = json.loads((tmp_path / "wall" / "wall.json").read_text())
    assert out["meta"]["budgets"] == {"deep": 4}
    assert [p["iteration"] for p in out["curves"]["deep"]["boxinst"]["0"]] == [1, 2]
    assert [p["iteration"] for p in out["curves"]["preset"]["boxinst"]["0"]] == [2, 4]
    assert out["summary"]["deep"]["boxinst"]["mask_AP"]["vs_preset"]["seeds"] == [0, 1]
    assert "deep: 4" in (tmp_path / "wall" / "wall.md").read_text()
    # reusing the wall benchmark at the full budget links the preset but not deep's shorter run
    back = list(cmd)
    back[back.index("--results") + 1] = str(tmp_path / "back")
    back += ["--name", "back", "--reuse", "wall", "--summary-only"]
    res = subprocess.run(back, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(json.loads((tmp_path / "back" / "back.json").read_text())["curves"]) == {"preset"}


@pytest.mark.parametrize("preset, capacity", [("mobilenet_v2_192_large", "heavy"),
                                              ("mobilenet_v2_192_wide", "wide256sep")])
def test_capacity_presets_are_the_benchmarked_capacities(preset, capacity):
    """The shipped capacity presets are what capacity.py and sim_paired.py measured (heavy, wide256sep), so
    the numbers their comments and the README cite stay the presets'."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from capacity import CAPACITIES

    from boxmask.config import load_config

    shipped = load_config(preset)
    measured = load_config("mobilenet_v2_192", CAPACITIES[capacity])
    assert shipped.model == measured.model and shipped.solver == measured.solver and shipped.data == measured.data
    assert shipped.model.fpn_channels == 256
