"""Files a user is given never run code, and a run folder is never destroyed: checkpoints load with
weights_only, the pointer stays inside its run, damaged pointers fall back to scanning, a fresh run never
starts over an old one, one process per run folder, Ctrl-C saves, and resume keeps the run's config."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from boxmask.cli import main
from boxmask.engine.checkpoint import last_checkpoint, load_checkpoint, load_latest_good
from boxmask.engine.run_folder import RunLock

from .test_end_to_end import TINY

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path, real: dict | None = None) -> Path:
    state = dict(real or {"model": {}, "config": {}, "class_names": ["a"], "cat_ids": [1]})
    state["payload"] = _Payload(marker)
    torch.save(state, path)
    return path


def _train(synth_data, out, iters=4, extra=(), resume=False, config="configs/tiny.yaml"):
    return main(["train", "-c", config, *TINY, *extra, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", str(iters),
                 "--no-progress"] + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def good_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    assert _train(synth_data, out, extra=["keep_checkpoints=3"]) == 0
    return out


def _copy_run(src: Path, dst: Path) -> None:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def test_a_payload_checkpoint_is_refused_everywhere_and_runs_nothing(good_run, synth_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    real = load_checkpoint(good_run)
    evil = _evil_checkpoint(tmp_path / "evil.pth", marker, real)
    images = str(synth_data / "images")
    commands = [
        ["predict", str(evil), str(synth_data / "images" / "val_000000.png"), "--out", str(tmp_path / "p"), "--no-progress"],
        ["eval", str(evil), "--json", str(synth_data / "val.json"), "--images", images, "--no-progress"],
        ["export", str(evil), "--onnx", str(tmp_path / "m.onnx")],
        ["pseudo-label", str(evil), "--json", str(synth_data / "train.json"), "--images", images,
         "--out", str(tmp_path / "pl.json"), "--no-progress"],
    ]
    for cmd in commands:
        assert main(cmd) == 2, cmd[0]
        err = capsys.readouterr().err
        assert "refusing to load" in err and "never run code" in err, (cmd[0], err)
        assert "Traceback" not in err
    # through a run folder, --resume and model.init_from
    run = tmp_path / "evil_run"
    run.mkdir()
    (run / "config.yaml").write_text((good_run / "config.yaml").read_text())
    _evil_checkpoint(run / "model_0000004.pth", marker, real)
    (run / "last_checkpoint").write_text("model_0000004.pth\n")
    assert main(["eval", str(run), "--json", str(synth_data / "val.json"), "--images", images, "--no-progress"]) == 2
    assert _train(synth_data, run, iters=6, resume=True) == 2
    assert _train(synth_data, tmp_path / "ft", extra=[f"model.init_from={evil}"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "p").exists() and not (tmp_path / "m.onnx").exists() and not (tmp_path / "pl.json").exists()


def test_the_pointer_never_leaves_its_run_folder(good_run, tmp_path):
    marker = tmp_path / "pwned"
    outside = _evil_checkpoint(tmp_path / "model_0000009.pth", marker)
    run = tmp_path / "copy"
    run.mkdir()
    for p in good_run.glob("model_*.pth"):
        (run / p.name).write_bytes(p.read_bytes())
    for bad in (str(outside), "../model_0000009.pth", "model_0000009.pth/../../x", "\x00\xff\xfe binary"):
        (run / "last_checkpoint").write_bytes(bad.encode("utf-8", "surrogateescape") if isinstance(bad, str) else bad)
        assert last_checkpoint(run) == run / "model_0000004.pth", bad  # the newest of its own, by scanning
        path, state, problems = load_latest_good(run)
        assert path == run / "model_0000004.pth" and state["iteration"] == 4
        assert problems and "last_checkpoint" in problems[0]
    assert not marker.exists()


def test_damaged_or_missing_pointer_resume_scans_and_plain_train_refuses(good_run, synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    _copy_run(good_run, run)
    (run / "last_checkpoint").write_bytes(b"\x89PNG\x00\x00garbage")
    before = _snapshot(run)
    # a plain train into the folder refuses and changes nothing (no config, metrics or checkpoint touched)
    assert _train(synth_data, run) == 2
    assert "already holds a run" in capsys.readouterr().err
    (run / "last_checkpoint").unlink()
    assert _train(synth_data, run) == 2
    capsys.readouterr()
    assert _snapshot(run) == {k: v for k, v in before.items() if k != "last_checkpoint"}
    # --resume finds the checkpoints by scanning
    assert _train(synth_data, run, iters=6, resume=True, extra=["keep_checkpoints=3"]) == 0
    assert load_checkpoint(run)["iteration"] == 6
    iters = [json.loads(l)["iteration"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert iters == sorted(set(iters)), "no record written twice"


def test_one_process_per_run_folder(synth_data, tmp_path, capsys):
    run = tmp_path / "busy"
    run.mkdir()
    with RunLock(run):
        assert _train(synth_data, run) == 2
        err = capsys.readouterr().err
        assert "in use by another boxmask run" in err and f"pid {os.getpid()}" in err
    assert not (run / "config.yaml").exists()
    assert _train(synth_data, run) == 0  # the lock went with its holder


def test_a_new_run_never_writes_into_its_data_or_a_folder_of_images(synth_data, tmp_path, capsys):
    images = synth_data / "images"
    before = sorted(p.name for p in images.iterdir())
    for out in (images, images / "run"):
        assert _train(synth_data, out) == 2
        err = capsys.readouterr().err
        assert "inside the image folder" in err and len(err.strip().splitlines()) == 1
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.JPG").write_bytes(b"not really")
    assert _train(synth_data, photos) == 2
    assert "holds images (cat.JPG)" in capsys.readouterr().err
    assert sorted(p.name for p in images.iterdir()) == before and sorted(p.name for p in photos.iterdir()) == ["cat.JPG"]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_zero(synth_data, tmp_path):
    run = tmp_path / "early"
    assert _train(synth_data, run, iters=3, extra=["checkpoint_period=100"]) == 0
    for p in list(run.glob("model_*.pth")) + [run / "last_checkpoint"]:
        p.unlink()  # as if killed before the first checkpoint: config and some records only
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert _train(synth_data, run, iters=3, extra=["checkpoint_period=100"], resume=True) == 0
    iters = [json.loads(l)["iteration"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["type"] == "train"]
    assert iters == [1, 2, 3]
    assert load_checkpoint(run)["iteration"] == 3


def test_resume_uses_the_runs_own_config(synth_data, tmp_path, capsys, caplog):
    run = tmp_path / "sim"
    sim_args = ["sim.warmup_frac=0.5", "sim.copy_paste=false"]
    assert main(["train", "-c", "configs/sim_tiny.yaml", *TINY, *sim_args, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(run), "--max-iters", "2",
                 "--no-progress"]) == 0
    # another preset (method boxinst) cannot continue a sim run
    assert _train(synth_data, run, iters=4, resume=True) == 2
    err = capsys.readouterr().err
    assert "method" in err and "'sim'" in err and "without -c" in err
    # the same preset with another learning rate: the run's value is kept, and the log says so
    with caplog.at_level("INFO", logger="boxmask"):
        assert main(["train", "-c", "configs/sim_tiny.yaml", *TINY, *sim_args, "solver.lr=0.5", "--train-json",
                     str(synth_data / "train.json"), "--train-images", str(synth_data / "images"), "--out", str(run),
                     "--max-iters", "4", "--resume", "--no-progress"]) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "solver.lr" in text and "kept" in text and "solver.max_iters: 2 -> 4" in text
    state = load_checkpoint(run)
    assert state["iteration"] == 4 and state["config"]["method"] == "sim" and "sim" in state
    assert state["config"]["solver"]["lr"] != 0.5


def test_resume_with_another_model_size_is_a_clear_error(good_run, synth_data, tmp_path, capsys):
    run = tmp_path / "other"
    _copy_run(good_run, run)
    assert _train(synth_data, run, iters=6, resume=True, extra=["model.fpn_channels=16"]) == 2
    err = capsys.readouterr().err
    assert "model.fpn_channels" in err and "Traceback" not in err


def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(synth_data, tmp_path):
    run = tmp_path / "int"
    cmd = [sys.executable, "-m", "boxmask", "train", "-c", str(ROOT / "configs" / "tiny.yaml"), *TINY,
           "checkpoint_period=1000", "--train-json", str(synth_data / "train.json"), "--train-images",
           str(synth_data / "images"), "--out", str(run), "--max-iters", "400", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "continue with --resume" in err
    it = load_checkpoint(run)["iteration"]
    assert 2 <= it < 400


def test_torchvision_cache_files_are_hash_checked_and_read_as_data(tmp_path, monkeypatch):
    import hashlib

    from boxmask.modeling.backbone import WeightsError, load_backbone_state, torchvision_cache_file

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # never the real cache
    name = "MobileNet_V2_Weights.IMAGENET1K_V1"
    cache = torchvision_cache_file(name)
    cache.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    _evil_checkpoint(cache, marker)  # a foreign file under torchvision's name: its hash does not match
    with pytest.raises(WeightsError, match="sha256"):
        load_backbone_state(name)
    # a payload whose name carries its own hash passes the hash check and is still refused
    evil = _evil_checkpoint(tmp_path / "w.pth", marker)
    named = tmp_path / f"w-{hashlib.sha256(evil.read_bytes()).hexdigest()[:8]}.pth"
    evil.rename(named)
    with pytest.raises(WeightsError, match="only tensors"):
        load_backbone_state(str(named))
    assert not marker.exists()


def test_a_read_only_run_folder_is_one_line(synth_data, tmp_path, capsys):
    if os.geteuid() == 0:
        # root writes through permission bits; a failing write is simulated where the run writes its config
        import boxmask.engine.trainer as trainer_mod

        def full_disk(path, text):
            raise OSError(28, "No space left on device", str(path))

        orig = trainer_mod.atomic_write_text
        trainer_mod.atomic_write_text = full_disk
        try:
            assert _train(synth_data, tmp_path / "ro") == 2
        finally:
            trainer_mod.atomic_write_text = orig
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert _train(synth_data, ro / "run") == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("boxmask: error: ") and "No space left" in last or "ermission" in last
    assert "Traceback" not in err and sum(l.startswith("boxmask: error") for l in err.splitlines()) == 1


def test_resume_without_a_config_file_takes_everything_from_the_run(good_run, synth_data, tmp_path):
    run = tmp_path / "plain"
    _copy_run(good_run, run)
    assert main(["train", "--out", str(run), "--resume", "--max-iters", "6", "--no-progress"]) == 0
    state = load_checkpoint(run)
    assert state["iteration"] == 6 and state["config"]["model"]["backbone"] == "resnet18"
    assert state["config"]["data"]["train_json"] == str(synth_data / "train.json")


def test_damaged_metrics_and_fifos_in_a_run_folder(good_run, synth_data, tmp_path, capsys):
    run = tmp_path / "damaged"
    _copy_run(good_run, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2, 3]\n{"iteration": "x"}\n\xff\xfe\x00 binary\n')
    assert main(["report", str(run), "--pictures", "0"]) == 0
    assert _train(synth_data, run, iters=6, resume=True) == 0  # the bad lines are dropped, not a traceback
    assert all(isinstance(json.loads(l)["iteration"], int) for l in (run / "metrics.jsonl").read_text().splitlines())
    # a FIFO where the pointer should be: never read (it would block), the checkpoints are scanned
    (run / "last_checkpoint").unlink()
    os.mkfifo(run / "last_checkpoint")
    assert last_checkpoint(run) == run / "model_0000006.pth"
    path, state, problems = load_latest_good(run)
    assert state["iteration"] == 6 and "not a regular file" in problems[0]
    capsys.readouterr()


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(synth_data, tmp_path, capsys, monkeypatch):
    import boxmask.engine.checkpoint as ckpt

    def full(state, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", full)
    assert _train(synth_data, tmp_path / "full") == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "model_0000002.pth" in err and "Traceback" not in err


@pytest.mark.parametrize("args, words", [
    (["predict", "RUN", "IMG", "--out", "OUT", "--device", "foo"], "--device"),
    (["predict", "RUN", "IMG", "--out", "OUT", "--score-thresh", "nan"], "--score-thresh"),
    (["predict", "RUN", "IMG", "--out", "OUT", "--draw-thresh", "2"], "--draw-thresh"),
    (["pseudo-label", "RUN", "--json", "J", "--images", "I", "--out", "O", "--mask-thresh", "-1"], "--mask-thresh"),
    (["pseudo-label", "RUN", "--json", "J", "--images", "I", "--out", "O", "--min-quality", "nan"], "--min-quality"),
    (["eval", "RUN", "--json", "J", "--images", "I", "--viz", "-3"], "--viz"),
    (["report", "RUN", "--pictures", "-2"], "--pictures"),
])
def test_out_of_range_options_are_refused_by_the_parser(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_size_divisibility_must_suit_the_backbone():
    from boxmask.config import ConfigError, load_config

    for bad in ("0", "3", "48"):
        with pytest.raises(ConfigError, match="data.size_divisibility"):
            load_config("configs/tiny.yaml", [f"data.size_divisibility={bad}"])
    assert load_config("configs/tiny.yaml", ["data.size_divisibility=64"]).data.size_divisibility == 64
