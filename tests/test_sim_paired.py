"""benchmarks/sim_paired.py: earlier scored runs are reused only where they measured the same thing."""
import argparse
import json

import pytest

from . import benchmark_scripts


def _args(**kw):
    base = dict(images_seen=4800, batch=8, num_train=600, num_val=200, size=192, data_seed=0, overrides=[],
                config="/elsewhere/configs/mobilenet_v2_192.yaml")
    return argparse.Namespace(**{**base, **kw})


def test_reuse_takes_matching_runs_and_never_overwrites(tmp_path):
    sp = benchmark_scripts.load("sim_paired")
    a = _args()
    meta = {k: getattr(a, k) for k in ("images_seen", "batch", "num_train", "num_val", "size", "data_seed", "overrides")}
    stored = {"meta": {**meta, "config": "/old/checkout/configs/mobilenet_v2_192.yaml"},
              "runs": {"boxinst": {"0": {"arm": "boxinst", "seed": 0, "splits": {}}, "1": {"arm": "boxinst", "seed": 1}}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(stored))
    work = tmp_path / "work"
    work.mkdir()
    (work / "boxinst_s1.json").write_text(json.dumps({"arm": "boxinst", "seed": 1, "own": True}))
    sp.reuse_scores(path, work, a)
    assert json.loads((work / "boxinst_s0.json").read_text())["reused_from"] == str(path)
    assert json.loads((work / "boxinst_s1.json").read_text()) == {"arm": "boxinst", "seed": 1, "own": True}
    # another budget (or data, or overrides) is refused, and nothing is written
    other = tmp_path / "work2"
    other.mkdir()
    with pytest.raises(SystemExit, match="not reused"):
        sp.reuse_scores(path, other, _args(images_seen=2400))
    assert not any(other.iterdir())
