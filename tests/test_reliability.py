"""Reliability: a killed run resumes exactly, bad checkpoints fall back, non-finite losses follow the
policy, `boxmask check` lists problems."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import boxmask.engine.trainer as trainer_mod
from boxmask.cli import main
from boxmask.engine.checkpoint import load_checkpoint

from .test_end_to_end import TINY

ROOT = Path(__file__).resolve().parent.parent
# SIM with a 2-entry bank that fills from iteration 2 and pastes every step after: the teacher, the
# prototypes and the memory bank all change during the run.
SIM_ARGS = [*TINY, "sim.warmup_frac=0.2", "sim.bank_length=2", "sim.paste_prob=1.0", "sim.fg_thresh=0.01",
            "checkpoint_period=3", "keep_checkpoints=3", "--method", "sim"]
ITERS = 10


def _cmd(synth_data, out, resume=False):
    return [sys.executable, "-m", "boxmask", "train", "-c", str(ROOT / "configs" / "tiny.yaml"), *SIM_ARGS,
            "--train-json", str(synth_data / "train.json"), "--train-images", str(synth_data / "images"),
            "--out", str(out), "--max-iters", str(ITERS), "--no-progress"] + (["--resume"] if resume else [])


def _env():
    # one thread: CPU kernels then reduce in a fixed order, so two runs are bitwise equal
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _logged_iteration(run) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["iteration"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _records(run):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("sec_per_iter", None)  # wall time differs
        out.append(rec)
    return out


def _assert_same_state(a: dict, b: dict):
    for key in ("model", "optimizer"):
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), (key, k)
    bank_a, bank_b = a["sim"].pop("bank._extra_state"), b["sim"].pop("bank._extra_state")
    for k, v in a["sim"].items():  # teacher.* (its update count too) and prototypes.*
        assert torch.equal(v, b["sim"][k]) if torch.is_tensor(v) else v == b["sim"][k], k
    assert len(bank_a["entries"]) == len(bank_b["entries"]) == 2
    for ea, eb in zip(bank_a["entries"], bank_b["entries"]):
        for k in ("image", "boxes", "labels", "offsets", "scores"):
            assert torch.equal(ea[k], eb[k]), k
        assert all(torch.equal(x, y) for x, y in zip(ea["masks"], eb["masks"]))


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(synth_data, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(synth_data, ref), env=_env(), check=True, capture_output=True, timeout=600)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(synth_data, run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.Random().randint(4, ITERS - 2)  # a random step after the first checkpoint (at 3)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and _logged_iteration(run) < target:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed (target step {target})"
    killed_at = load_checkpoint(run)["iteration"]
    assert 3 <= killed_at < ITERS
    subprocess.run(_cmd(synth_data, run, resume=True), env=_env(), check=True, capture_output=True, timeout=600)
    a, b = load_checkpoint(ref), load_checkpoint(run)
    assert a["iteration"] == b["iteration"] == ITERS
    _assert_same_state(a, b)
    assert _records(ref) == _records(run)


def _train_inprocess(synth_data, out, extra=(), resume=False, iters=4):
    return main(["train", "-c", "configs/tiny.yaml", *TINY, *extra, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", str(iters),
                 "--no-progress"] + (["--resume"] if resume else []))


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(synth_data, tmp_path, caplog):
    run = tmp_path / "run"
    assert _train_inprocess(synth_data, run, ["keep_checkpoints=3"]) == 0
    last = run / (run / "last_checkpoint").read_text().strip()
    assert last.name == "model_0000004.pth"
    last.write_bytes(last.read_bytes()[:1000])  # torn write on a full disk
    assert _train_inprocess(synth_data, run, ["keep_checkpoints=3"], resume=True, iters=6) == 0
    assert any("cannot read checkpoint" in r.getMessage() and "model_0000002.pth" in r.getMessage()
               for r in caplog.records)
    assert load_checkpoint(run)["iteration"] == 6


def test_nonfinite_losses_are_skipped_then_stop_with_a_checkpoint(synth_data, tmp_path, monkeypatch, caplog, capsys):
    real = trainer_mod.total_loss

    def poisoned(losses, cfg, iteration):
        loss = real(losses, cfg, iteration)
        return loss * float("nan") if iteration in (1, 2) else loss

    monkeypatch.setattr(trainer_mod, "total_loss", poisoned)
    ok = tmp_path / "ok"
    assert _train_inprocess(synth_data, ok, ["solver.nonfinite_skips=2"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 2 and "images [" in skipped[0]
    assert load_checkpoint(ok)["iteration"] == 4
    stop = tmp_path / "stop"
    assert _train_inprocess(synth_data, stop, ["solver.nonfinite_skips=1"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 2" in err and "nonfinite_skips=1" in err
    assert load_checkpoint(stop)["iteration"] == 2  # saved before stopping


def test_check_lists_every_problem(tmp_path, capsys):
    import numpy as np

    from .conftest import write_dataset

    imgs = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32, "array": np.zeros((32, 32, 3), np.uint8)}
            for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, -4, 5]},
            {"id": 2, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5]},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 2, 2]]},
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [2, 2, 8, 8], "iscrowd": 1}]
    path = write_dataset(tmp_path, imgs, anns)
    assert main(["check", str(path), "--images", str(tmp_path / "images")]) == 1
    out = capsys.readouterr().out
    for words in ("annotation id 1", "annotation id 2", "annotation id 3", "3 skipped", "1 crowd-only"):
        assert words in out, words
    good = write_dataset(tmp_path, imgs, [anns[3], {**anns[1], "category_id": 3}], name="good.json")
    assert main(["check", str(good), "--images", str(tmp_path / "images")]) == 0


def _odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Grayscale, RGBA, 16-bit and EXIF-rotated inputs; returns name -> expected (h, w) after loading."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 60), 128, np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(np.full((40, 60, 4), 200, np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((40, 60), 40000, np.uint16)).save(folder / "deep.png")
    im = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(folder / "rotated.jpg", exif=exif)
    return {"gray": (40, 60), "rgba": (40, 60), "deep": (40, 60), "rotated": (60, 40)}


def test_odd_image_formats_load_as_rgb_with_orientation(tmp_path):
    from boxmask.data.coco import load_image

    expected = _odd_images(tmp_path)
    for f in tmp_path.iterdir():
        arr = load_image(f)
        assert arr.dtype.name == "uint8" and arr.shape == (*expected[f.stem], 3), f.name
    assert int(load_image(tmp_path / "deep.png").max()) == round(40000 / 65535 * 255)


HUGE_PREDICT = """
import resource, sys
import numpy as np
import torch
from PIL import Image
from boxmask.engine.trainer import model_from_checkpoint
from boxmask.predict import predict_images
model, state = model_from_checkpoint(sys.argv[1], "cpu")
model.cfg.model.score_thresh = 0.0  # an untrained model: force many detections
model.cfg.model.detections_per_image = 10
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
predict_images(model, state, [sys.argv[2]], sys.argv[3], torch.device("cpu"), score_thresh=0.0, progress=False)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_predict_on_a_huge_image_and_odd_formats_with_bounded_memory(synth_data, tmp_path):
    """8000x6000: 10 masks pasted at full size would take 10 x 192 MB as floats; they are pasted and
    RLE-encoded one at a time instead, and the overlay is drawn downscaled."""
    import numpy as np
    from PIL import Image

    run = tmp_path / "run"
    assert _train_inprocess(synth_data, run, iters=1) == 0
    huge = tmp_path / "huge.png"
    Image.fromarray(np.full((6000, 8000, 3), 120, np.uint8)).save(huge)
    out = tmp_path / "pred"
    res = subprocess.run([sys.executable, "-c", HUGE_PREDICT, str(run), str(huge), str(out)], env=_env(),
                         capture_output=True, text=True, timeout=600, check=True)
    before_kb, peak_kb = (int(v) for v in res.stdout.split())
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 10 and all(r["segmentation"]["size"] == [6000, 8000] for r in results)
    assert max(Image.open(out / "huge.png").size) == 2048
    # image (144 MB) + its float copy for resizing (576 MB) + one mask at a time (~250 MB)
    assert (peak_kb - before_kb) / 1024 < 1400, f"predict grew the process by {(peak_kb - before_kb) / 1024:.0f} MB"
    # the odd formats go through the command line
    odd = tmp_path / "odd"
    _odd_images(odd)
    assert main(["predict", str(run), str(odd), "--out", str(tmp_path / "odd_pred"), "--device", "cpu", "--no-progress"]) == 0
    assert len(list((tmp_path / "odd_pred").glob("*.png"))) == 4
