"""GPU check: training steps of the COCO R-50 recipe on generated images, boxinst against sim, AMP on and off.

One prepared command for a 10-minute GPU slot (about 7 minutes of timed steps, the rest start-up):

    python benchmarks/gpu_check.py --device cuda --size 800 --steps 300 --budget 420

Each (method, AMP) pair runs in its own process: the recipe of ``configs/boxinst_R50_1x.yaml`` /
``sim_R50_1x.yaml`` (R-50-FPN, 16 images per step unless ``--batch``; ImageNet weights are not needed
for timing and not loaded) on generated batches (random images of ``size`` x ``size * 4 / 3`` px,
2 to 8 random boxes each, a pool of batches kept on the device, so no data loading is timed). After
``--warmup`` untimed steps it trains ``--steps`` steps, or fewer when its share of ``--budget``
seconds is spent. sim runs as in training after its warm-up: pseudo-mask loss on and copy-paste live
(a 2-image bank). AMP on: the trainer's autocast (bf16 where the GPU supports it, else fp16 with a
grad scaler; bf16 on the CPU); off: float32.

Reported per pair: seconds per step (median), images per second, peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, peak RSS on the CPU), steps timed. Results:
``OUT/gpu_check.json`` and ``.md`` (``--out``, default ``benchmarks/results``). Trailing
``key=value`` arguments override the config (the test runs a tiny backbone on the CPU with them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RECIPES = {"boxinst": "boxinst_R50_1x.yaml", "sim": "sim_R50_1x.yaml", "full": "boxinst_R50_1x.yaml"}


def recipe_path(method: str) -> Path:
    """The method's COCO R-50 config, in ``configs/`` or (packaged) ``boxmask/configs/``."""
    for folder in (REPO / "configs", REPO / "boxmask" / "configs"):
        if (folder / RECIPES[method]).is_file():
            return folder / RECIPES[method]
    raise SystemExit(f"gpu_check: {RECIPES[method]} not found in configs/ or boxmask/configs/")


def run_variant(a: dict) -> dict:
    """Train one (method, AMP) pair on generated batches; returns its timings and peak memory."""
    import resource

    import torch

    from boxmask.config import load_config
    from boxmask.engine.trainer import _autocast, build_model, build_optimizer
    from boxmask.modeling.criterion import total_loss
    from boxmask.modeling.sim.method import SIM

    device = torch.device(a["device"])
    amp = a["amp"] == "on"
    over = [f"method={a['method']}", "model.weights=none", f"device={a['device']}", f"amp={str(amp).lower()}",
            f"cpu_bf16={str(amp and device.type == 'cpu').lower()}", "sim.bank_length=2", *a["overrides"]]
    if a["batch"]:
        over.append(f"solver.ims_per_batch={a['batch']}")
    cfg = load_config(recipe_path(a["method"]), over)
    num_classes, size, bs = 80, a["size"], cfg.solver.ims_per_batch
    h, w = size, size * 4 // 3
    g = torch.Generator().manual_seed(0)

    def batch() -> dict:
        targets = []
        for _ in range(bs):
            n = int(torch.randint(2, 9, (1,), generator=g))
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = (torch.rand(n, 2, generator=g) * 0.35 + 0.05) * torch.tensor([w, h])
            boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)
            targets.append({"boxes": boxes.to(device), "labels": torch.randint(0, num_classes, (n,), generator=g).to(device)})
        images = torch.zeros(bs, 3, -(-h // 32) * 32, -(-w // 32) * 32, dtype=torch.uint8)  # padded as collate does
        images[:, :, :h, :w] = torch.randint(0, 255, (bs, 3, h, w), generator=g, dtype=torch.uint8)
        return {"images": images.to(device),
                "image_sizes": [(h, w)] * bs, "orig_sizes": [(h, w)] * bs, "image_ids": list(range(bs)), "targets": targets}

    pool = [batch() for _ in range(a["pool"])]
    torch.manual_seed(0)
    model = build_model(cfg, num_classes).to(device).train()
    sim = SIM(cfg, model, num_classes).to(device) if cfg.method == "sim" else None
    opt = build_optimizer(model, cfg)
    autocast, amp_dtype = _autocast(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[float] = []
    spent, i = 0.0, 0
    while len(times) < a["steps"] and (i < a["warmup"] or spent < a["budget"]):
        b = pool[i % len(pool)]
        sync()
        t0 = time.perf_counter()
        if sim is not None:
            b = sim.copy_paste(b, i, 0)
        with autocast:
            losses, aux = model(b, return_aux=True)
            if sim is not None:
                losses.update(sim.losses(b, aux, pseudo_on=True)[0])
        del aux
        loss = total_loss({k: v.float() for k, v in losses.items()}, cfg, cfg.solver.max_iters)  # every term on
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if sim is not None:
            sim.after_step(model)
        sync()
        dt = time.perf_counter() - t0
        if i >= a["warmup"]:
            times.append(dt)
            spent += dt
        i += 1
    med = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"method": a["method"], "amp": a["amp"], "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
            "images_per_step": bs, "steps": len(times), "sec_per_step": med, "mean_sec_per_step": sum(times) / len(times),
            "images_per_sec": bs / med, "peak_mb": peak, "final_loss": float(loss)}


def to_markdown(r: dict) -> str:
    lines = [f"# GPU check ({r['device_name']}, {r['size']} x {r['size'] * 4 // 3} px, COCO R-50 recipe)", "",
             f"Generated batches, {r['warmup']} warm-up steps, then up to {r['steps']} timed steps per row "
             f"(budget {r['budget']:.0f} s in all). Overrides: {' '.join(r['overrides']) or 'none'}.", "",
             "| method | AMP | dtype | images / step | steps timed | s / step (median) | images / s | peak memory (MB) | vs boxinst, same AMP |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {v["amp"]: v["sec_per_step"] for v in r["runs"] if v["method"] == "boxinst"}
    for v in r["runs"]:
        rel = f"{v['sec_per_step'] / base[v['amp']]:.2f}x" if v["amp"] in base else "-"
        lines.append(f"| {v['method']} | {v['amp']} | {v['amp_dtype']} | {v['images_per_step']} | {v['steps']} | "
                     f"{v['sec_per_step']:.3f} | {v['images_per_sec']:.1f} | {v['peak_mb']:.0f} | {rel} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=800, help="image height (width = size * 4 / 3)")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per (method, AMP) pair, at most")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds of timed steps in all, shared by the pairs")
    ap.add_argument("--methods", default="boxinst,sim")
    ap.add_argument("--amp", default="on,off", help="on, off or both (on,off)")
    ap.add_argument("--batch", type=int, default=0, help="images per step (default: the recipe's 16)")
    ap.add_argument("--pool", type=int, default=4, help="generated batches, used in turn")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(json.loads(args.child))))
        return {}
    methods = [m for m in args.methods.split(",") if m]
    amps = [x for x in args.amp.split(",") if x]
    for m in methods:
        if m not in RECIPES:
            ap.error(f"--methods: unknown method '{m}' (boxinst, sim, full)")
    for x in amps:
        if x not in ("on", "off"):
            ap.error(f"--amp: '{x}' is neither on nor off")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu for a tiny run)")
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    pairs = [(m, x) for m in methods for x in amps]
    runs = []
    for method, amp in pairs:
        spec = {"device": args.device, "size": args.size, "steps": args.steps, "warmup": args.warmup,
                "budget": args.budget / len(pairs), "method": method, "amp": amp, "batch": args.batch,
                "pool": args.pool, "overrides": args.overrides}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             cwd=REPO, env=env)
        if res.returncode != 0:
            raise SystemExit(f"gpu_check: {method} AMP {amp} failed:\n{res.stderr[-3000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    result = {"device": args.device, "device_name": device_name, "size": args.size, "steps": args.steps,
              "warmup": args.warmup, "budget": args.budget, "overrides": args.overrides, "torch": torch.__version__,
              "runs": runs}
    from boxmask.atomic_io import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gpu_check.json", json.dumps(result, indent=2))
    atomic_write_text(out / "gpu_check.md", to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
