"""predict (inputs, output names, thresholds, ids), picture file names built from data, and the ONNX export."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boxmask.cli import main

from .test_end_to_end import TINY


@pytest.fixture(scope="module")
def tiny_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pe") / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", "2", "--no-progress"]) == 0
    return out


@pytest.fixture()
def alarm():
    """Fail instead of hanging for ever (a FIFO opened for reading blocks until a writer comes)."""
    def handler(signum, frame):
        raise TimeoutError("predict hung")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / n)


def _predict(run, *args) -> int:
    return main(["predict", str(run), *map(str, args), "--device", "cpu", "--no-progress"])


def test_predict_skips_a_fifo_and_keeps_output_names_unique(tiny_run, tmp_path, alarm, caplog):
    imgs = tmp_path / "imgs"
    _images(imgs, ["a.png", "a.jpg", "b.png"])
    os.mkfifo(imgs / "zz.png")
    other = tmp_path / "other"
    _images(other, ["b.png"])
    out = tmp_path / "pred"
    assert _predict(tiny_run, imgs, other, "--out", out, "--score-thresh", "0") == 0
    assert "zz.png: not a regular file, skipped" in caplog.text
    # a.png and a.jpg no longer both write a.png, nor the two b.png
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg.png", "a_png.png", "b_png.png", "b_png_2.png", "results.json"]
    res = json.loads((out / "results.json").read_text())
    assert {r["file_name"] for r in res} <= {"a.png", "a.jpg", "b.png"} and {r["image_id"] for r in res} <= {1, 2, 3, 4}
    # named explicitly, a FIFO is a clear error, not a hang
    assert _predict(tiny_run, imgs / "zz.png", "--out", tmp_path / "p2") == 2


def test_predict_refuses_an_output_folder_holding_the_inputs(tiny_run, tmp_path, capsys):
    imgs = tmp_path / "data" / "imgs"
    _images(imgs, ["a.png"])
    before = (imgs / "a.png").read_bytes()
    for out in (imgs, tmp_path / "data", imgs / ".." / "imgs"):
        capsys.readouterr()
        assert _predict(tiny_run, imgs, "--out", out) == 2
        err = capsys.readouterr().err
        assert err.startswith("boxmask: error: --out") and "input image folder" in err and "Traceback" not in err
    assert _predict(tiny_run, imgs / "a.png", "--out", imgs) == 2  # a single file, its own folder as --out
    assert sorted(p.name for p in imgs.iterdir()) == ["a.png"] and (imgs / "a.png").read_bytes() == before
    assert not (tmp_path / "data" / "results.json").exists()


def test_predict_score_thresh_governs_results_and_draw_thresh_pictures(tiny_run, synth_data, tmp_path):
    from boxmask.engine.trainer import model_from_checkpoint
    from boxmask.predict import predict_images

    model, state = model_from_checkpoint(tiny_run, "cpu")
    model.cfg.model.score_thresh = 1e-4  # an untrained model: let many detections through
    files = sorted((synth_data / "images").glob("val_*.png"))[:2]
    cpu = torch.device("cpu")
    every = json.loads(predict_images(model, state, files, tmp_path / "all", cpu, 0.0, progress=False).read_text())
    assert len(every) > 4 and model.cfg.model.score_thresh == 1e-4  # the model's own threshold is restored
    t = float(np.median([r["score"] for r in every]))
    path = predict_images(model, state, files, tmp_path / "t", cpu, t, progress=False, draw_thresh=1.1)
    some = json.loads(path.read_text())
    # dropping the detections before their masks are pasted gives exactly the filtered list
    key = lambda r: (r["image_id"], round(r["score"], 5), r["category_id"])  # noqa: E731
    assert sorted(map(key, some)) == sorted(key(r) for r in every if r["score"] >= t)
    assert all(r["score"] >= t for r in some) and len(some) < len(every)
    by_key = {key(r): r for r in every}
    assert all(by_key[key(r)]["segmentation"] == r["segmentation"] for r in some)
    # the pictures follow draw_thresh: nothing reaches 1.1, so the picture is the (upscaled) image with a note
    pic = np.asarray(Image.open(tmp_path / "t" / f"{files[0].stem}.png"))
    src = np.asarray(Image.open(files[0]).convert("RGB"))
    s = pic.shape[0] // src.shape[0]
    np.testing.assert_array_equal(pic[40:], np.repeat(np.repeat(src, s, 0), s, 1)[40:])


def test_predict_takes_image_ids_from_a_json(tiny_run, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    _images(imgs, ["a.png", "b.png"])
    coco = {"images": [{"id": 17, "file_name": "imgs/b.png", "width": 64, "height": 48},
                       {"id": "x5", "file_name": "a.png", "width": 64, "height": 48}],
            "annotations": [], "categories": []}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    from boxmask.engine.trainer import model_from_checkpoint
    from boxmask.predict import predict_images

    model, state = model_from_checkpoint(tiny_run, "cpu")
    model.cfg.model.score_thresh = 1e-4  # an untrained model: let detections through
    path = predict_images(model, state, [imgs], tmp_path / "p", torch.device("cpu"), 0.0, progress=False,
                          ids_json=tmp_path / "c.json")
    res = json.loads(path.read_text())
    assert {(r["file_name"], r["image_id"]) for r in res} == {("a.png", "x5"), ("b.png", 17)}
    coco["images"].pop()
    (tmp_path / "c.json").write_text(json.dumps(coco))
    capsys.readouterr()
    assert _predict(tiny_run, imgs, "--out", tmp_path / "p2", "--json", tmp_path / "c.json") == 2
    assert "a.png" in capsys.readouterr().err and not (tmp_path / "p2" / "results.json").exists()


def test_hostile_image_ids_never_write_pictures_outside_their_folder(tiny_run, synth_data, tmp_path, monkeypatch):
    """String image ids with ``../`` (accepted by the dataset reader) used to become ``../`` in the names of
    ``eval --viz`` and ``train --viz-paste`` pictures."""
    from boxmask.engine.trainer import save_paste_pictures

    data = json.loads((synth_data / "val.json").read_text())
    hostile = {im["id"]: f"../../../escaped{im['id']}" for im in data["images"]}
    for im in data["images"]:
        im["id"] = hostile[im["id"]]
    for a in data["annotations"]:
        a["image_id"] = hostile[a["image_id"]]
    (tmp_path / "val.json").write_text(json.dumps(data))
    viz = tmp_path / "a" / "b" / "viz"
    assert main(["eval", str(tiny_run), "--json", str(tmp_path / "val.json"), "--images", str(synth_data / "images"),
                 "--device", "cpu", "--no-progress", "--viz", "2", "--viz-out", str(viz)]) == 0
    # the pictures of images whose string ids reach the ranking (mask IoU matching maps ids to numbers
    # today; the file name must not depend on that)
    import boxmask.evaluation.coco_eval as coco_eval
    from boxmask.data.coco import CocoDataset
    from boxmask.evaluation.evaluator import save_worst_pictures

    ds = CocoDataset(tmp_path / "val.json", synth_data / "images")
    monkeypatch.setattr(coco_eval, "worst_images_first", lambda coco, results: [(i, 0.1) for i in ds.image_ids[:2]])
    viz2 = tmp_path / "c" / "d" / "viz2"
    assert len(save_worst_pictures(ds, [], 2, viz2)) == 2
    written = sorted(p for p in tmp_path.rglob("*.png"))
    assert len(written) == 4 and all(p.parent in (viz, viz2) for p in written), written

    h, w = 32, 40
    regions = torch.zeros(1, h, w, dtype=torch.bool)
    regions[0, 4:20, 4:20] = True
    batch = {"images": torch.zeros(1, 3, h, w, dtype=torch.uint8), "image_sizes": [(h, w)], "image_ids": ["../../../x"],
             "targets": [{"boxes": torch.tensor([[4.0, 4, 20, 20]]), "labels": torch.tensor([0]),
                          "pasted": torch.tensor([True])}], "region_masks_padded": [regions]}
    folder = tmp_path / "run" / "paste_viz"
    assert save_paste_pictures(batch, folder, 3, ["a"], 5) == 1
    assert [p.parent for p in tmp_path.rglob("*x.png")] == [folder]


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_checks_parity_and_carries_its_contract(tiny_run, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from boxmask.data.batch import collate
    from boxmask.engine.trainer import model_from_checkpoint
    from boxmask.export import export_onnx

    out = tmp_path / "m.onnx"
    capsys.readouterr()
    assert main(["export", str(tiny_run), "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity with PyTorch in onnxruntime" in text and "detections match" in text
    model, state = model_from_checkpoint(tiny_run, "cpu")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["class_names"]) == state["class_names"]
    assert json.loads(meta["category_ids"]) == state["cat_ids"]
    assert meta["min_size_test"] == str(model.cfg.data.min_size_test) and meta["boxmask_version"]
    assert "batch of exactly 1" in meta["input"]
    # an untrained model: a low score threshold gives many detections to compare, and no cap on their
    # number (near-equal scores would make the cut-off at detections_per_image arbitrary)
    model.cfg.model.score_thresh = 0.001
    model.cfg.model.detections_per_image = 100000
    export_onnx(model, out, class_names=state["class_names"], cat_ids=state["cat_ids"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()][0] == "image"
    cat_ids = np.asarray(state["cat_ids"])
    for h, w in ((96, 128), (64, 192)):  # dynamic image size
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
        boxes, scores, labels, masks = sess.run(None, {"image": image[None].numpy()})  # default score_thresh
        batch = collate([{"image": image, "image_size": (h, w), "orig_size": (h, w), "image_id": 1,
                          "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
        with torch.no_grad():
            ref = model.inference(batch)[0]
        assert len(boxes) == len(ref["boxes"]) > 10
        # the same detections; compared in (label, box) order, since equal scores may come out in either
        # order (boxes rounded: float noise must not reorder them; NMS leaves no two alike in one class)
        a = np.lexsort(np.c_[np.round(boxes, 2), labels].T)
        b = np.lexsort(np.c_[np.round(ref["boxes"].numpy(), 2), cat_ids[ref["labels"].numpy()]].T)
        np.testing.assert_allclose(boxes[a], ref["boxes"].numpy()[b], atol=1e-3)
        np.testing.assert_allclose(scores[a], ref["scores"].numpy()[b], atol=1e-5)
        assert (labels[a] == cat_ids[ref["labels"].numpy()[b]]).all()  # category ids, not 0-based indices
        agree = ((masks[a] > model.cfg.model.mask_thresh) == ref["masks"].numpy()[b]).mean()
        assert agree > 0.999, agree
        # the optional score_thresh input filters as a score threshold
        t = float(np.median(scores))
        _, high, _, _ = sess.run(None, {"image": image[None].numpy(), "score_thresh": np.array(t, np.float32)})
        assert len(high) == int((scores > t).sum()) and len(high) < len(scores)
        # no detection at all is an empty answer, not an onnxruntime error
        none = sess.run(None, {"image": image[None].numpy(), "score_thresh": np.array(1.0, np.float32)})
        assert [o.shape[0] for o in none] == [0, 0, 0, 0] and none[3].shape[1:] == (h, w)


def test_export_refuses_a_folder_and_a_graph_that_differs(tiny_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "dir").mkdir()
    capsys.readouterr()
    assert main(["export", str(tiny_run), "--onnx", str(tmp_path / "dir")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("boxmask: error: --onnx") and "is a folder" in err and err.count("\n") == 1
    # a graph whose scores differ from PyTorch's is refused, and nothing is written
    import boxmask.export as export

    forward = export.ExportModel.forward

    def wrong(self, image, score_thresh):
        boxes, scores, labels, masks = forward(self, image, score_thresh)
        return boxes, scores * 0.9, labels, masks

    monkeypatch.setattr(export.ExportModel, "forward", wrong)
    assert main(["export", str(tiny_run), "--onnx", str(tmp_path / "bad.onnx")]) == 2
    assert "does not reproduce the PyTorch model" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
