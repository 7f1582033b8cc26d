"""A tiny train -> checkpoint -> resume -> eval -> predict run through the command line."""
import json
import shutil

import pytest
import torch
from PIL import Image

from boxmask.cli import main
from boxmask.engine.checkpoint import CheckpointError, load_checkpoint

from .conftest import one_thread

# device=cpu: the presets pick cuda when there is one, and the exact-resume checks need the CPU
TINY = ["data.min_size_train=[64]", "data.min_size_test=64", "solver.ims_per_batch=2", "checkpoint_period=2",
        "log_period=1", "model.fpn_channels=32", "model.mask_branch_channels=32", "solver.warmup_iters=1",
        "solver.scale_to_batch=false", "device=cpu"]


def _train(synth_data, out, method="boxinst", iters=4, extra=(), resume=False):
    args = ["train", "-c", "configs/tiny.yaml", *TINY, *extra, "--train-json", str(synth_data / ("train.json" if method == "boxinst" else "train_full.json")),
            "--train-images", str(synth_data / "images"), "--val-json", str(synth_data / "val.json"),
            "--val-images", str(synth_data / "images"), "--out", str(out), "--max-iters", str(iters),
            "--method", method, "--no-progress"]
    if resume:
        args.append("--resume")
    return main(args)


@pytest.fixture(scope="module")
def run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    with one_thread():  # test_resume_continues_exactly compares a resumed run with this one
        assert _train(synth_data, out) == 0
    return out


def test_train_writes_checkpoints_metrics_and_config(run):
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    assert sorted(p.name for p in run.glob("model_*.pth")) == ["model_0000002.pth", "model_0000004.pth"]
    assert (run / "last_checkpoint").read_text().strip() == "model_0000004.pth"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert {"loss_cls", "loss_box", "loss_ctr", "loss_proj", "loss_pairwise", "lr", "sec_per_iter"} <= set(train[0])
    final = json.loads((run / "metrics.json").read_text())
    assert {"bbox", "segm", "mask_iou", "box_fill"} <= set(final)
    assert not list(run.glob(".*.tmp"))


def test_resume_continues_exactly(run, synth_data, tmp_path):
    other = tmp_path / "b"
    other.mkdir()
    shutil.copy(run / "model_0000002.pth", other / "model_0000002.pth")
    shutil.copy(run / "config.yaml", other / "config.yaml")
    (other / "last_checkpoint").write_text("model_0000002.pth\n")
    with one_thread():
        assert _train(synth_data, other, resume=True) == 0
    a = load_checkpoint(run)
    b = load_checkpoint(other)
    assert b["iteration"] == 4
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k


def test_refuses_to_overwrite_and_needs_checkpoint_to_resume(run, synth_data, tmp_path, capsys):
    assert _train(synth_data, run) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _train(synth_data, tmp_path / "none", resume=True) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_eval_and_predict(run, synth_data, tmp_path, capsys):
    out_json = tmp_path / "m.json"
    assert main(["eval", str(run), "--json", str(synth_data / "val.json"), "--images", str(synth_data / "images"),
                 "--out", str(out_json), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "segm" in printed and "bbox" in printed
    metrics = json.loads(out_json.read_text())
    assert 0.0 <= metrics["segm"]["AP"] <= 1.0
    pred = tmp_path / "pred"
    img = synth_data / "images" / "val_000000.png"
    assert main(["predict", str(run / "model_0000004.pth"), str(img), "--out", str(pred), "--score-thresh", "0.0",
                 "--no-progress", "--device", "cpu"]) == 0
    overlay = Image.open(pred / "val_000000.png")
    w, h = Image.open(img).size
    scale = overlay.size[0] // w  # small images are drawn upscaled for legible labels
    assert scale >= 1 and overlay.size == (w * scale, h * scale)
    results = json.loads((pred / "results.json").read_text())
    assert all({"bbox", "score", "category_id", "segmentation", "file_name"} <= set(r) for r in results)


def test_full_method_trains(synth_data, tmp_path):
    assert _train(synth_data, tmp_path / "full", method="full", iters=2) == 0
    ckpt = load_checkpoint(tmp_path / "full")
    assert ckpt["config"]["method"] == "full"
    # the masks-for-GT-boxes check runs the model on boxes only: a full checkpoint must cope
    assert main(["eval", str(tmp_path / "full"), "--json", str(synth_data / "train_full.json"), "--images",
                 str(synth_data / "images"), "--device", "cpu", "--no-progress"]) == 0


def test_truncated_checkpoint_is_a_clear_error(run, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes((run / "model_0000004.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    assert main(["predict", str(bad), str(run), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
