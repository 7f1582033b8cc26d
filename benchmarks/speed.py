"""Speed and memory: boxmask against torchvision's Mask R-CNN, and how a training step scales.

    python benchmarks/speed.py [--size 512] [--images 5] [--device cpu|cuda] [--skip-train]

(a) inference seconds per image, same random images and input size, untrained weights, at the default
    score threshold and forced to return up to 100 detections with masks: boxmask R-50 and MobileNetV2 vs
    torchvision's Mask R-CNN with the same backbones (R-50-FPN; MobileNetV2-FPN built from torchvision
    parts); (b) seconds per training step of boxinst, sim (no copy-paste), sim with the student-backbone
    teacher, and sim with copy-paste (tiny preset, identical pre-loaded batches); (c) peak memory of each
    (RSS of a fresh process on the CPU, ``max_memory_allocated`` on CUDA); (d) step time against image
    size and against objects per image. Each measurement runs in its own process, one after the other.
    Results: ``benchmarks/results/speed.json`` and ``.md``. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def _child(kind: str, args: dict) -> dict:
    """Run one measurement in a fresh process (clean peak memory); returns its JSON result."""
    res = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True, text=True,
                         cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _peak(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_inference(a: dict) -> dict:
    import torch
    import torchvision
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    from boxmask.config import load_config
    from boxmask.data.batch import collate
    from boxmask.engine.trainer import build_model

    torch.set_num_threads(a["threads"]) if a["threads"] else None
    device = torch.device(a["device"])
    size, n_img = a["size"], a["images"]
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (3, size, size * 4 // 3), generator=g, dtype=torch.uint8) for _ in range(n_img + 2)]
    backbone = a["backbone"]
    if a["model"] == "boxmask":
        preset = "boxinst_R50_1x.yaml" if backbone == "resnet50" else "mobilenet_v2_192.yaml"
        thresh = 0.0 if a["forced"] else 0.05
        cfg = load_config(REPO / "configs" / preset, [
            "model.weights=none", f"data.min_size_test={size}", f"data.max_size={size * 2}", f"model.score_thresh={thresh}",
            "model.detections_per_image=100", "device=" + a["device"]])
        model = build_model(cfg, 80).to(device).eval()

        def run(img):
            batch = collate([{"image": img, "image_size": tuple(img.shape[1:]), "orig_size": tuple(img.shape[1:]),
                              "image_id": 0, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
            batch["images"] = batch["images"].to(device)
            return model.inference(batch)[0]
    else:
        kw = dict(min_size=size, max_size=size * 2, box_score_thresh=0.0 if a["forced"] else 0.05, box_detections_per_img=100)
        if backbone == "resnet50":
            model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81, **kw)
        else:
            from torchvision.models.detection.anchor_utils import AnchorGenerator
            from torchvision.ops import MultiScaleRoIAlign

            feats = torchvision.models.mobilenet_v2(weights=None).features
            bb = BackboneWithFPN(feats, {"6": "0", "13": "1", "18": "2"}, [32, 96, 1280], 256)  # + max-pool level
            anchors = AnchorGenerator(((32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 4)
            model = MaskRCNN(bb, num_classes=81, rpn_anchor_generator=anchors,
                             box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
                             mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 14, 2), **kw)
        model = model.to(device).eval()

        def run(img):
            return model([img.to(device).float() / 255.0])[0]

    times, counts = [], []
    with torch.no_grad():
        for i, img in enumerate(images):
            _sync(device)
            t0 = time.perf_counter()
            out = run(img)
            _sync(device)
            if i >= 2:  # two warm-up images
                times.append(time.perf_counter() - t0)
                counts.append(len(out["boxes"]))
    return {"sec_per_image": sorted(times)[len(times) // 2], "detections": sum(counts) / len(counts),
            "peak_mb": _peak(device)}


def child_train(a: dict) -> dict:
    import torch

    from boxmask.config import load_config
    from boxmask.engine.trainer import build_model, build_optimizer
    from boxmask.modeling.criterion import total_loss
    from boxmask.modeling.sim.method import SIM

    torch.set_num_threads(a["threads"]) if a["threads"] else None
    device = torch.device(a["device"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"method={a['method']}", "device=" + a["device"],
                                                     "sim.bank_length=2", *a["overrides"]])
    g = torch.Generator().manual_seed(0)
    size, n_obj, bs = a["size"], a["objects"], cfg.solver.ims_per_batch

    def batch():
        imgs = torch.randint(0, 255, (bs, 3, size, size), generator=g, dtype=torch.uint8)
        targets = []
        for _ in range(bs):
            xy = torch.rand(n_obj, 2, generator=g) * size * 0.7
            wh = torch.rand(n_obj, 2, generator=g) * size * 0.25 + size * 0.05
            targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1).to(device),
                            "labels": torch.randint(0, 4, (n_obj,), generator=g).to(device)})
        return {"images": imgs.to(device), "image_sizes": [(size, size)] * bs, "orig_sizes": [(size, size)] * bs,
                "image_ids": list(range(bs)), "targets": targets}

    batches = [batch() for _ in range(a["steps"] + 3)]
    torch.manual_seed(0)
    model = build_model(cfg, 4).to(device).train()
    sim = SIM(cfg, model, 4).to(device) if a["method"] == "sim" else None
    opt = build_optimizer(model, cfg)
    times = []
    for i, b in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        if sim is not None:
            b = sim.prepare_batch(b, i, 0)
        losses, aux = model.forward_train(b, return_aux=True)
        if sim is not None:
            losses.update(sim.losses(b, aux, pseudo_on=True)[0])
        loss = total_loss(losses, cfg, cfg.solver.max_iters)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sim is not None:
            sim.after_step(model)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return {"sec_per_step": sorted(times)[len(times) // 2], "peak_mb": _peak(device)}


TRAIN_VARIANTS = {
    "boxinst": ("boxinst", []),
    "sim (no copy-paste)": ("sim", ["sim.copy_paste=false"]),
    "sim (no copy-paste), student-backbone teacher": ("sim", ["sim.copy_paste=false", "sim.teacher_backbone=student"]),
    "sim + copy-paste": ("sim", []),
    "sim + copy-paste, student-backbone teacher": ("sim", ["sim.teacher_backbone=student"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="inference input size (shorter side)")
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--keep-inference", action="store_true",
                    help="reuse the inference table of the last results/speed.json; measure training only")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, payload = args.child
        print(json.dumps({"inference": child_inference, "train": child_train}[kind](json.loads(payload))))
        return
    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    base = {"device": args.device, "threads": args.threads}
    result: dict = {"device": device_name, "threads": args.threads or torch.get_num_threads(), "inference": {},
                    "train": {}, "train_vs_size": {}, "train_vs_objects": {}}
    previous = ROOT / "results" / "speed.json"
    if args.keep_inference and previous.is_file():
        result["inference"] = json.loads(previous.read_text())["inference"]
    for forced in (False, True) if not result["inference"] else ():
        for backbone in ("resnet50", "mobilenet_v2"):
            for model in ("boxmask", "maskrcnn"):
                r = _child("inference", {**base, "model": model, "backbone": backbone, "size": args.size,
                                         "images": args.images, "forced": forced})
                result["inference"][f"{model} {backbone} {'forced' if forced else 'default'}"] = r
                print(model, backbone, forced, r, flush=True)
    if not args.skip_train:
        for name, (method, over) in TRAIN_VARIANTS.items():
            r = _child("train", {**base, "method": method, "overrides": over, "size": 128, "objects": 4, "steps": args.steps})
            result["train"][name] = r
            print(name, r, flush=True)
        for size in (128, 256, 384):
            result["train_vs_size"][size] = _child("train", {**base, "method": "boxinst", "overrides": [], "size": size,
                                                             "objects": 4, "steps": max(args.steps // 2, 3)})
            print("size", size, result["train_vs_size"][size], flush=True)
        for n in (1, 4, 16, 32):
            result["train_vs_objects"][n] = _child("train", {**base, "method": "boxinst", "overrides": [], "size": 128,
                                                             "objects": n, "steps": max(args.steps // 2, 3)})
            print("objects", n, result["train_vs_objects"][n], flush=True)
    from boxmask.atomic_io import atomic_write_text

    atomic_write_text(ROOT / "results" / "speed.json", json.dumps(result, indent=2))
    atomic_write_text(ROOT / "results" / "speed.md", to_markdown(result, args))
    print(to_markdown(result, args))


def to_markdown(r: dict, args) -> str:
    lines = [f"# Speed and memory ({r['device']}, {r['threads']} threads)", "",
             f"## Inference, {args.size} px shorter side, untrained weights (80 classes)", "",
             "`default`: score threshold 0.05 for both; untrained models then keep (almost) no detection, so this "
             "times the networks and their post-processing without masks. `forced`: score threshold 0, at most 100 "
             "detections with masks each; Mask R-CNN then runs NMS over 1000 proposals x 80 classes, which inflates "
             "its time beyond what a trained model pays.", "",
             "| model | backbone | regime | s / image | detections | vs Mask R-CNN | peak memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for key, v in r["inference"].items():
        model, backbone, regime = key.split(" ")
        ref = r["inference"].get(f"maskrcnn {backbone} {regime}", {}).get("sec_per_image")
        speedup = f"{ref / v['sec_per_image']:.2f}x faster" if model == "boxmask" and ref else "-"
        lines.append(f"| {model} | {backbone} | {regime} | {v['sec_per_image']:.3f} | {v['detections']:.0f} | {speedup} | "
                     f"{v['peak_mb']:.0f} |")
    if r["train"]:
        base = r["train"]["boxinst"]["sec_per_step"]
        lines += ["", "## Training step (tiny preset, 8 images of 128 px, 4 objects each)", "",
                  "| method | s / step | vs boxinst | peak memory (MB) |", "|---|---|---|---|"]
        for k, v in r["train"].items():
            lines.append(f"| {k} | {v['sec_per_step']:.3f} | {v['sec_per_step'] / base:.2f}x | {v['peak_mb']:.0f} |")
        lines += ["", "## boxinst step against image size (4 objects) and objects per image (128 px)", "",
                  "| image size | s / step | peak MB |", "|---|---|---|"]
        lines += [f"| {k} | {v['sec_per_step']:.3f} | {v['peak_mb']:.0f} |" for k, v in r["train_vs_size"].items()]
        lines += ["", "| objects per image | s / step | peak MB |", "|---|---|---|"]
        lines += [f"| {k} | {v['sec_per_step']:.3f} | {v['peak_mb']:.0f} |" for k, v in r["train_vs_objects"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
