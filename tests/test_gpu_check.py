"""benchmarks/gpu_check.py runs end to end on the CPU at a tiny size (so the GPU check does not rot)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.backbone=resnet18", "model.fpn_channels=16", "model.fpn_strides=[8,16,32]", "model.sizes_of_interest=[32,64]",
        "model.head_convs=1", "model.mask_branch_channels=16", "model.mask_branch_convs=1", "model.norm=bn"]


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size", "64", "--steps", "2",
           "--warmup", "1", "--batch", "2", "--methods", "boxinst,sim", "--amp", "on,off", "--out", str(tmp_path), *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    runs = {(r["method"], r["amp"]): r for r in result["runs"]}
    assert set(runs) == {("boxinst", "on"), ("boxinst", "off"), ("sim", "on"), ("sim", "off")}
    for r in runs.values():
        assert r["steps"] == 2 and r["images_per_step"] == 2 and r["sec_per_step"] > 0 and r["peak_mb"] > 0
        assert r["images_per_sec"] == 2 / r["sec_per_step"]
    assert runs[("boxinst", "on")]["amp_dtype"] == "bfloat16" and runs[("boxinst", "off")]["amp_dtype"] == "float32"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| sim | on | bfloat16 | 2 | 2 |" in md


def test_gpu_check_refuses_bad_flags(tmp_path):
    script = str(REPO / "benchmarks" / "gpu_check.py")
    for flags in (["--methods", "mask_rcnn"], ["--amp", "maybe"]):
        res = subprocess.run([sys.executable, script, "--device", "cpu", "--out", str(tmp_path), *flags],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert res.returncode == 2 and "gpu_check.py: error:" in res.stderr
    assert not (tmp_path / "gpu_check.json").exists()
