"""Speed and memory: boxmask against torchvision's Mask R-CNN, bf16 inference, and how a training step scales.

    python benchmarks/speed.py [--size 512] [--images 5] [--repeats 3] [--device cpu|cuda] [--skip-train]

(a) inference seconds per image, same random images and input size, untrained weights, at the default
    score threshold and forced to return up to 100 detections with masks: boxmask R-50 and MobileNetV2
    (fp32, and bf16 with ``model.infer_bf16``) vs torchvision's Mask R-CNN with the same backbones
    (R-50-FPN; MobileNetV2-FPN built from torchvision parts), the models taking turns image by image in
    one process, ``--repeats`` times in fresh processes; the speed ratio is reported per repeat;
(b) bf16 against fp32 inference of a trained model: seconds per image and how far boxes, scores and
    masks move (``--agreement-checkpoint``, or the tiny preset trained for ``--agreement-iters`` on
    generated ``--agreement-size`` px images, made once under benchmarks/work/);
(c) seconds per training step of boxinst, sim (no copy-paste), sim with the student-backbone
    teacher, and sim with copy-paste (tiny preset, identical pre-loaded batches); (d) peak memory of each
    (RSS of a fresh process on the CPU, ``max_memory_allocated`` on CUDA); (e) step time against image
    size and against objects per image. Each training measurement runs in its own process.
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


def _inference_models(a: dict, device) -> dict:
    """name -> a function running one uint8 image [3, H, W]: boxmask (fp32, and bf16 with ``a["bf16"]``)
    and torchvision's Mask R-CNN with the same backbone, input size and score threshold."""
    import torch
    import torchvision
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    from boxmask.config import load_config
    from boxmask.data.batch import collate
    from boxmask.engine.trainer import build_model

    size, backbone, models = a["size"], a["backbone"], {}
    preset = "boxinst_R50_1x.yaml" if backbone == "resnet50" else "mobilenet_v2_192.yaml"
    thresh = 0.0 if a["forced"] else 0.05
    torch.manual_seed(0)
    if "boxmask" in a["models"]:
        cfg = load_config(REPO / "configs" / preset, [
            "model.weights=none", f"data.min_size_test={size}", f"data.max_size={size * 2}", f"model.score_thresh={thresh}",
            "model.detections_per_image=100", "device=" + a["device"]])
        model = build_model(cfg, 80).to(device).eval()

        def boxmask(img, bf16: bool = False):
            model.cfg.model.infer_bf16 = bf16
            batch = collate([{"image": img, "image_size": tuple(img.shape[1:]), "orig_size": tuple(img.shape[1:]),
                              "image_id": 0, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
            batch["images"] = batch["images"].to(device)
            return model.inference(batch)[0]

        models["boxmask"] = boxmask
        if a.get("bf16"):
            models["boxmask bf16"] = lambda img: boxmask(img, True)
    if "maskrcnn" in a["models"]:
        kw = dict(min_size=size, max_size=size * 2, box_score_thresh=thresh, box_detections_per_img=100)
        if backbone == "resnet50":
            mrcnn = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81, **kw)
        else:
            from torchvision.models.detection.anchor_utils import AnchorGenerator
            from torchvision.ops import MultiScaleRoIAlign

            feats = torchvision.models.mobilenet_v2(weights=None).features
            bb = BackboneWithFPN(feats, {"6": "0", "13": "1", "18": "2"}, [32, 96, 1280], 256)  # + max-pool level
            anchors = AnchorGenerator(((32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 4)
            mrcnn = MaskRCNN(bb, num_classes=81, rpn_anchor_generator=anchors,
                             box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
                             mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 14, 2), **kw)
        mrcnn = mrcnn.to(device).eval()
        models["maskrcnn"] = lambda img: mrcnn([img.to(device).float() / 255.0])[0]
    return models


def child_inference(a: dict) -> dict:
    """Seconds per image of each model, the models taking turns image by image (rotating order), so a
    slow spell of a shared machine hits them all alike; two warm-up rounds are not timed."""
    import torch

    torch.set_num_threads(a["threads"]) if a["threads"] else None
    device = torch.device(a["device"])
    size, n_img = a["size"], a["images"]
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (3, size, size * 4 // 3), generator=g, dtype=torch.uint8) for _ in range(n_img + 2)]
    models = _inference_models(a, device)
    names = list(models)
    times: dict = {k: [] for k in names}
    cpu: dict = {k: [] for k in names}
    counts: dict = {k: [] for k in names}
    with torch.no_grad():
        for i, img in enumerate(images):
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                out = models[name](img)
                _sync(device)
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    counts[name].append(len(out["boxes"]))
    res = {k: {"sec_per_image": sorted(v)[len(v) // 2], "cpu_sec_per_image": sorted(cpu[k])[len(v) // 2],
               "detections": sum(counts[k]) / len(counts[k])} for k, v in times.items()}
    if len(a["models"]) == 1:
        res[names[0]]["peak_mb"] = _peak(device)
    return res


def child_agreement(a: dict) -> dict:
    """bf16 against fp32 inference of a trained checkpoint on the images of a COCO json: seconds per
    image of each (in turns), and how far the detections move. Each fp32 detection with score >=
    ``a["score"]`` is matched to the unmatched bf16 detection of its class with the highest box IoU
    (>= 0.5); reported: the share matched, the mean mask IoU, box IoU and |score change| of the matched."""
    import torch
    from torchvision.ops import box_iou

    from boxmask.data.batch import EvalDataset, collate
    from boxmask.data.coco import CocoDataset
    from boxmask.engine.trainer import model_from_checkpoint

    torch.set_num_threads(a["threads"]) if a["threads"] else None
    device = torch.device(a["device"])
    model, _ = model_from_checkpoint(a["checkpoint"], device)
    cfg = model.cfg
    ds = EvalDataset(CocoDataset(a["json"], a["images"]), cfg.data.min_size_test, cfg.data.max_size)
    times: dict = {"fp32": [], "bf16": []}
    n_ref = n_matched = 0
    mask_ious, box_ious, score_diffs, box_diffs = [], [], [], []
    for i in range(len(ds)):
        batch = collate([ds[i]], cfg.data.size_divisibility)
        batch["images"] = batch["images"].to(device)
        out = {}
        for mode in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            model.cfg.model.infer_bf16 = mode == "bf16"
            _sync(device)
            t0 = time.perf_counter()
            out[mode] = {k: v.cpu() for k, v in model.inference(batch)[0].items()}
            _sync(device)
            if i >= 1:  # the first image warms up
                times[mode].append(time.perf_counter() - t0)
        ref, got = out["fp32"], out["bf16"]
        sel = torch.nonzero(ref["scores"] >= a["score"])[:, 0]
        ious = box_iou(ref["boxes"][sel], got["boxes"]) if len(got["boxes"]) else torch.zeros(len(sel), 0)
        used: set = set()
        for row, j in enumerate(sel.tolist()):
            n_ref += 1
            cand = [(float(ious[row, k]), k) for k in range(ious.shape[1])
                    if k not in used and got["labels"][k] == ref["labels"][j] and ious[row, k] >= 0.5]
            if not cand:
                continue
            iou, k = max(cand)
            used.add(k)
            n_matched += 1
            ma, mb = ref["masks"][j], got["masks"][k]
            union = (ma | mb).sum().item()
            mask_ious.append((ma & mb).sum().item() / union if union else 1.0)
            box_ious.append(iou)
            score_diffs.append(abs(float(ref["scores"][j] - got["scores"][k])))
            box_diffs.append(float((ref["boxes"][j] - got["boxes"][k]).abs().max()))

    def mean(v):
        return sum(v) / len(v) if v else float("nan")

    return {"images": len(ds), "checkpoint": str(a["checkpoint"]), "score_thresh": a["score"],
            "sec_per_image_fp32": mean(times["fp32"]), "sec_per_image_bf16": mean(times["bf16"]),
            "detections_fp32": n_ref, "matched": n_matched / max(n_ref, 1), "mask_iou_mean": mean(mask_ious),
            "mask_iou_min": min(mask_ious) if mask_ious else float("nan"), "box_iou_mean": mean(box_ious),
            "score_abs_diff_mean": mean(score_diffs), "score_abs_diff_max": max(score_diffs) if score_diffs else float("nan"),
            "box_abs_diff_max_px": max(box_diffs) if box_diffs else float("nan")}


def agreement_checkpoint(args) -> tuple[str, str, str]:
    """(checkpoint, json, images) for the bf16 agreement: the given ones, or the tiny preset trained for
    ``--agreement-iters`` on generated data (made once under benchmarks/work/)."""
    if args.agreement_checkpoint:
        if not (args.agreement_json and args.agreement_images):
            raise SystemExit("--agreement-checkpoint needs --agreement-json and --agreement-images")
        return args.agreement_checkpoint, args.agreement_json, args.agreement_images
    from boxmask.config import load_config
    from boxmask.data.synth import generate
    from boxmask.engine.trainer import train

    size, iters = args.agreement_size, args.agreement_iters
    work = ROOT / "work" / f"bf16_agreement_{size}px_{iters}it"
    data = work / "data"
    if not (data / "val.json").is_file():
        generate(data, 64, 16, size, 0, show_progress=False)
    run = work / "run"
    if not (run / "last_checkpoint").is_file():
        cfg = load_config(REPO / "configs" / "tiny.yaml", [
            f"data.train_json={data / 'train.json'}", f"data.train_images={data / 'images'}",
            f"data.min_size_train=[{size}]", f"data.min_size_test={size}", f"data.max_size={size * 2}",
            f"solver.max_iters={iters}", f"solver.warmup_iters={max(iters // 10, 1)}", "tensorboard=false",
            "tb_image_period=0", f"checkpoint_period={iters}", f"out={run}", "device=cpu"])
        train(cfg, progress=False)
    return str(run), str(data / "val.json"), str(data / "images")


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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved inference measurements per backbone and regime")
    ap.add_argument("--backbones", default="resnet50,mobilenet_v2")
    ap.add_argument("--regimes", default="default,forced")
    ap.add_argument("--no-bf16", action="store_true", help="no bf16 inference timing or agreement")
    ap.add_argument("--agreement-checkpoint", help="trained checkpoint (.pth or run folder) for the bf16 agreement; "
                    "default: the tiny preset trained on generated data")
    ap.add_argument("--agreement-json")
    ap.add_argument("--agreement-images")
    ap.add_argument("--agreement-size", type=int, default=128)
    ap.add_argument("--agreement-iters", type=int, default=300)
    ap.add_argument("--agreement-score", type=float, default=0.3, help="fp32 detections at least this score are matched")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, payload = args.child
        fn = {"inference": child_inference, "train": child_train, "agreement": child_agreement}[kind]
        print(json.dumps(fn(json.loads(payload))))
        return
    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    base = {"device": args.device, "threads": args.threads}
    result: dict = {"device": device_name, "threads": args.threads or torch.get_num_threads(), "size": args.size,
                    "images": args.images, "inference": {}, "bf16_agreement": {}, "train": {}, "train_vs_size": {},
                    "train_vs_objects": {}}
    previous = ROOT / "results" / "speed.json"
    if args.keep_inference and previous.is_file():
        old = json.loads(previous.read_text())
        result["inference"], result["bf16_agreement"] = old.get("inference", {}), old.get("bf16_agreement", {})
    bf16 = not args.no_bf16 and (args.device == "cpu" or args.device.startswith("cuda") and torch.cuda.is_bf16_supported())
    for regime in args.regimes.split(",") if not result["inference"] else ():
        for backbone in args.backbones.split(","):
            spec = {**base, "backbone": backbone, "size": args.size, "images": args.images, "forced": regime == "forced"}
            row: dict = {"repeats": []}
            for _ in range(args.repeats):
                r = _child("inference", {**spec, "models": ["boxmask", "maskrcnn"], "bf16": bf16})
                r["ratio"] = r["maskrcnn"]["sec_per_image"] / r["boxmask"]["sec_per_image"]
                r["cpu_ratio"] = r["maskrcnn"]["cpu_sec_per_image"] / r["boxmask"]["cpu_sec_per_image"]
                row["repeats"].append(r)
                print(backbone, regime, r, flush=True)
            ratios = sorted(r["ratio"] for r in row["repeats"])
            row["ratio_median"] = ratios[len(ratios) // 2]
            cpu_ratios = sorted(r["cpu_ratio"] for r in row["repeats"])
            row["cpu_ratio_median"] = cpu_ratios[len(cpu_ratios) // 2]
            for model in ("boxmask", "maskrcnn"):  # peak memory: each model alone in a fresh process
                row[f"{model}_peak_mb"] = _child("inference", {**spec, "images": 1, "models": [model]})[model]["peak_mb"]
            result["inference"][f"{backbone} {regime}"] = row
    if bf16 and not result["bf16_agreement"]:
        ckpt, js, imgs = agreement_checkpoint(args)
        result["bf16_agreement"] = _child("agreement", {**base, "checkpoint": ckpt, "json": js, "images": imgs,
                                                        "score": args.agreement_score})
        print("bf16 agreement", result["bf16_agreement"], flush=True)
    if args.skip_train and previous.is_file():  # keep the last run's training tables
        old = json.loads(previous.read_text())
        for key in ("train", "train_vs_size", "train_vs_objects"):
            result[key] = old.get(key, {})
        result["train_threads"] = old.get("train_threads", old.get("threads"))
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
    lines = [f"# Speed and memory ({r['device']}, {r['threads']} threads)", ""]
    if r["inference"]:
        lines += [f"## Inference, {r.get('size', args.size)} px shorter side, untrained weights (80 classes)", "",
                  "`default`: score threshold 0.05 for both; untrained models then keep (almost) no detection, so this "
                  "times the networks and their post-processing without masks. `forced`: score threshold 0, at most 100 "
                  "detections with masks each; Mask R-CNN then runs NMS over 1000 proposals x 80 classes, which inflates "
                  "its time beyond what a trained model pays. The models take turns image by image in one process "
                  f"({r.get('images', args.images)} timed images each, median), repeated in fresh processes; the ratio "
                  "is Mask R-CNN's time over boxmask's (fp32) in each repeat. Peak memory: each model alone in a fresh "
                  "process.", "",
                  "CPU time (the process's, per image) is what a shared machine disturbs least; with one thread it "
                  "is the time an idle core would take.", "",
                  "| backbone | regime | boxmask s / image | boxmask bf16 s / image | Mask R-CNN s / image | "
                  "boxmask faster by, wall (each repeat) | median | faster by, CPU time (each repeat) | median | "
                  "detections (boxmask / Mask R-CNN) | peak MB (boxmask / Mask R-CNN) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, v in r["inference"].items():
            backbone, regime = key.split(" ")
            reps = v["repeats"]

            def med(name):
                t = sorted(x[name]["sec_per_image"] for x in reps if name in x)
                return f"{t[len(t) // 2]:.3f}" if t else "-"

            ratios = ", ".join(f"{x['ratio']:.2f}x" for x in reps)
            cpu_ratios = ", ".join(f"{x['cpu_ratio']:.2f}x" for x in reps)
            lines.append(f"| {backbone} | {regime} | {med('boxmask')} | {med('boxmask bf16')} | {med('maskrcnn')} | "
                         f"{ratios} | {v['ratio_median']:.2f}x | {cpu_ratios} | {v['cpu_ratio_median']:.2f}x | "
                         f"{reps[0]['boxmask']['detections']:.0f} / "
                         f"{reps[0]['maskrcnn']['detections']:.0f} | {v['boxmask_peak_mb']:.0f} / {v['maskrcnn_peak_mb']:.0f} |")
    a = r.get("bf16_agreement")
    if a:
        lines += ["", f"## bf16 against fp32 inference (trained checkpoint {'/'.join(Path(a['checkpoint']).parts[-2:])}, "
                  f"{a['images']} images)", "",
                  f"Each fp32 detection with score >= {a['score_thresh']} is matched to the bf16 detection of its class "
                  "with the highest box IoU (>= 0.5).", "",
                  "| s / image fp32 | s / image bf16 | fp32 detections | matched | mean mask IoU | min mask IoU | "
                  "mean box IoU | mean / max score change | max box change (px) |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {a['sec_per_image_fp32']:.3f} | {a['sec_per_image_bf16']:.3f} | {a['detections_fp32']} | "
                  f"{a['matched']:.1%} | {a['mask_iou_mean']:.3f} | {a['mask_iou_min']:.3f} | {a['box_iou_mean']:.3f} | "
                  f"{a['score_abs_diff_mean']:.4f} / {a['score_abs_diff_max']:.4f} | {a['box_abs_diff_max_px']:.2f} |"]
    if r["train"]:
        base = r["train"]["boxinst"]["sec_per_step"]
        lines += ["", f"## Training step (tiny preset, 8 images of 128 px, 4 objects each; {r.get('train_threads', r['threads'])} threads)", "",
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
