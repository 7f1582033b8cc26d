"""Seeing what the model learns: TensorBoard events, the SIM maps picture, the HTML report, worst-first."""
import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from boxmask.cli import main
from boxmask.data.coco import coco_from_dict
from boxmask.evaluation.coco_eval import worst_images_first
from boxmask.visualize import PSEUDO_BG, PSEUDO_FG, PSEUDO_IGNORED, PSEUDO_OUTSIDE, pseudo_label_picture, sim_maps_picture

from .conftest import rle
from .test_end_to_end import TINY


def _sim_run(synth_data, out, iters=5):
    return main(["train", "-c", "configs/tiny.yaml", *TINY, "sim.warmup_frac=0.2", "sim.bank_length=2",
                 "sim.paste_prob=1.0", "sim.fg_thresh=0.01", "tb_image_period=4", "eval_period=0", "--method", "sim",
                 "--train-json", str(synth_data / "train.json"), "--train-images", str(synth_data / "images"),
                 "--val-json", str(synth_data / "val.json"), "--val-images", str(synth_data / "images"),
                 "--out", str(out), "--max-iters", str(iters), "--no-progress"])


def test_training_writes_tensorboard_scalars_and_pictures_and_a_report(synth_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert _sim_run(synth_data, run) == 0
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss_cls", "train/loss_proj", "train/loss_pairwise", "train/loss_pseudo", "train/loss_paste",
                "train/lr", "train/box_fill", "train/box_fill_over_95", "eval/bbox/AP", "eval/segm/AP"):
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("train/loss_cls")] == [1, 2, 3, 4, 5]
    assert {"train/predicted_masks", "train/sim_maps", "train/copy_paste"} <= set(acc.Tags()["images"])

    capsys.readouterr()
    assert main(["report", str(run), "--pictures", "2"]) == 0
    page = (run / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 5  # 3 curve figures + 2 predictions
    for src in srcs:
        if src.startswith("data:image/png;base64,"):
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
        else:
            assert (run / src).is_file(), src
    assert "finished" in page and "method <b>sim</b>" in page


def test_report_on_a_run_in_progress(synth_data, tmp_path):
    run = tmp_path / "run"
    assert _sim_run(synth_data, run, iters=2) == 0
    (run / "metrics.json").unlink()  # as if the run were still going: no final metrics yet
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iteration": 3, "loss')  # a line being written
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--pictures", "0"]) == 0
    assert "iteration 2 of" in (tmp_path / "r.html").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_pseudo_label_and_sim_maps_picture_on_a_hand_made_case():
    box = np.zeros((6, 6))
    box[1:5, 1:5] = 1
    target = np.zeros((6, 6))
    target[2:4, 2:4] = 1
    weight = box.copy()
    weight[1, 1:5] = 0  # ignore band: the top row of the box
    pic = pseudo_label_picture(target, weight, box)
    assert tuple(pic[2, 2]) == PSEUDO_FG and tuple(pic[4, 4]) == PSEUDO_BG
    assert tuple(pic[1, 2]) == PSEUDO_IGNORED and tuple(pic[0, 0]) == PSEUDO_OUTSIDE
    image = np.zeros((6, 6, 3), np.uint8)
    maps = [np.full((6, 6), v) for v in (0.2, 0.5, 0.9)]
    full = sim_maps_picture(image, *maps, target, weight, box, min_side=12)
    no_semantic = sim_maps_picture(image, None, *maps[1:], target, weight, box, min_side=12)
    # five panels (image, M_S, M_I, fused, pseudo) vs four without M_S; 12 px each plus 4 px gaps
    assert full.shape[1] == 5 * 12 + 4 * 4 and no_semantic.shape[1] == 4 * 12 + 3 * 4
    # the M_S panel is a uniform colour distinct from the M_I panel's
    ms, mi = full[20, 12 + 4 + 6], full[20, 2 * (12 + 4) + 6]
    assert tuple(ms) != tuple(mi)


def test_worst_images_come_first():
    def mask(x0, x1):
        m = np.zeros((20, 20), np.uint8)
        m[5:15, x0:x1] = 1
        return m

    gt = {"images": [{"id": i, "width": 20, "height": 20, "file_name": f"{i}.png"} for i in (1, 2, 3)],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100,
                           "iscrowd": 0, "segmentation": rle(mask(5, 15))} for i in (1, 2, 3)]}
    coco = coco_from_dict(gt)
    # image 1 perfect, image 2 half the mask, image 3 no prediction at all
    results = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.9, "segmentation": rle(mask(5, 15))},
               {"image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.9, "segmentation": rle(mask(5, 10))}]
    order = worst_images_first(coco, results)
    assert [i for i, _ in order] == [3, 2, 1]
    assert [round(v, 2) for _, v in order] == [0.0, 0.5, 1.0]


def test_eval_viz_writes_worst_first_pictures(synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _sim_run(synth_data, run, iters=1) == 0
    assert main(["eval", str(run), "--json", str(synth_data / "val.json"), "--images", str(synth_data / "images"),
                 "--device", "cpu", "--no-progress", "--viz", "2", "--out", str(tmp_path / "m.json")]) == 0
    pics = sorted((tmp_path / "eval_viz").glob("*.png"))
    assert len(pics) == 2 and pics[0].name.startswith("001_")
    ious = [float(re.search(r"maskIoU([0-9.]+)\.png", p.name).group(1)) for p in pics]
    assert ious == sorted(ious)


def _fake_run(root, evals, n_images=33, train_extra=None):
    """A run folder written by hand: config, training records with a near-zero loss term, evaluations."""
    import json

    import yaml

    (root / "data").mkdir(parents=True)
    (root / "data" / "train.json").write_text(json.dumps(
        {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(n_images)], "annotations": [], "categories": []}))
    run = root / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "boxinst", "out": "runs/r", "solver": {"max_iters": 30},
                                                     "data": {"train_json": "data/train.json", "train_images": "data/images",
                                                              "val_json": "data/val.json"}}))
    lines = [{"type": "train", "iteration": i, "images_seen": 8 * i, "loss": 3.0 / i, "loss_cls": 1.0 / i,
              "loss_paste": 1e-18, "lr": 1e-3, "sec_per_iter": 0.2, "box_fill": 1.0, **(train_extra or {})}
             for i in range(5, 35, 5)]
    lines += [{"type": "eval", "iteration": 30, "images_seen": 240, **e} for e in evals]
    (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return run


def test_report_states_the_conclusion_that_matters_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where the run was "trained": its paths resolve from the run folder
    run = _fake_run(tmp_path / "proj", [{"bbox": {"AP": 0.458}, "segm": {"AP": 0.0}, "box_fill": 17.6,
                                         "box_fill_over_95": 1.0}])
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    top = page[:page.index("<h2>")]  # above every section
    assert "These masks are useless: mask AP 0.00 beside box AP 0.46." in top
    assert "The masks spill outside their boxes: mask area 17.6x the box area" in top
    assert "30 iterations (~7.27 epochs of these 33 images) is far too short" in top and "--max-iters 600" in top
    assert "no pictures: the run has no checkpoint yet" in top
    boxy = _fake_run(tmp_path / "proj2", [{"bbox": {"AP": 0.4}, "segm": {"AP": 0.15}, "box_fill": 0.99,
                                           "box_fill_over_95": 0.9}], n_images=1000)
    assert main(["report", str(boxy), "--pictures", "0"]) == 0
    page = (boxy / "report.html").read_text()
    assert "These masks are poor: mask AP 0.15 beside box AP 0.40." in page and "The masks are box-shaped" in page
    assert "is far too short: masks need about 1500 iterations" in page  # 12 epochs of 1,000 images


def test_report_without_evaluation_uses_the_training_statistics(tmp_path):
    run = _fake_run(tmp_path, [], train_extra={"box_spill": 12.0})
    assert main(["report", str(run), "--pictures", "0"]) == 0
    page = (run / "report.html").read_text()
    assert "spill outside their boxes during training: 12.0 box areas" in page
    assert "no metrics yet: the run evaluates on data/val.json" in page


def test_loss_curves_are_not_flattened_by_a_spike():
    from boxmask.report import _smooth_range

    lo, hi = _smooth_range(np.array([50.0, *np.linspace(2.0, 1.0, 59)]))  # the first window
    assert hi < 6.0 and lo < 1.0  # not 50
    lo, hi = _smooth_range(np.array([1e-18, 1e-18]))  # a term that stays at zero is drawn at zero
    assert lo < 0 and hi >= 0.1


def test_report_without_val_json_run_from_elsewhere(synth_data, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(synth_data)
    monkeypatch.chdir(work)  # training stores the relative paths it was given
    assert main(["train", "-c", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"), *TINY, "--train-json",
                 "data/train.json", "--train-images", "data/images", "--out", "runs/a", "--max-iters", "2",
                 "--no-progress"]) == 0
    run = work / "runs" / "a"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", str(run), "--pictures", "2"]) == 0
    page = (run / "report.html").read_text()
    assert "no metrics: this run has no validation json" in page and "--val-json FILE --val-images DIR" in page
    assert "Predictions on training images (this run has no validation json)" in page
    assert len(re.findall(r"<figure>", page)) == 2
    # the images moved: the page says so and what to pass
    (work / "data").rename(work / "moved")
    assert main(["report", str(run), "--pictures", "2"]) == 0
    page = (run / "report.html").read_text()
    assert "no pictures: data/train.json (data.train_json in config.yaml) not found; looked in" in page
    assert str(work / "data" / "train.json") in page and "<figure>" not in page
    assert main(["report", str(run), "--pictures", "2", "--json", str(work / "moved" / "val.json"),
                 "--images", str(work / "moved" / "images")]) == 0
    page = (run / "report.html").read_text()
    assert "Predictions on images of" in page and len(re.findall(r"<figure>", page)) == 2
