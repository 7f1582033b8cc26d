"""Mask AP against images seen, for every method on the same data, seed and budget.

    python benchmarks/mask_learning.py [--iters 600] [--eval-every 100] [--variants boxinst,full,boxinst-condinst-init]

Trains the tiny preset on `boxmask synth` data (CPU), evaluates on the val split every ``--eval-every``
iterations, and writes ``benchmarks/results/mask_learning.json`` and ``.md``. Not a test: it takes minutes.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from boxmask.config import load_config
from boxmask.data.synth import generate
from boxmask.engine.checkpoint import atomic_write_text
from boxmask.engine.trainer import train

ROOT = Path(__file__).resolve().parent
# name -> (method, train json, extra overrides)
VARIANTS = {
    "boxinst": ("boxinst", "train.json", []),
    "full": ("full", "train_full.json", []),
    # CondInst's original controller init, to show why the mask head starts late without ours.
    "boxinst-condinst-init": ("boxinst", "train.json", ["model.mask_head_init=condinst"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--variants", default="boxinst,full,boxinst-condinst-init")
    ap.add_argument("--num-train", type=int, default=600)
    ap.add_argument("--num-val", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT.parent / "configs" / "tiny.yaml"))
    ap.add_argument("--name", default="mask_learning")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every variant")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = ROOT / "work"
    data = work / f"synth_{args.num_train}_{args.num_val}_{args.size}_{args.seed}"
    if not (data / "val.json").is_file():
        generate(data, args.num_train, args.num_val, args.size, args.seed, show_progress=False)
    results = {"config": args.config, "iters": args.iters, "threads": torch.get_num_threads(), "data": {"num_train": args.num_train, "num_val": args.num_val,
               "size": args.size, "seed": args.seed}, "overrides": args.overrides, "runs": {}}
    for name in args.variants.split(","):
        method, train_json, extra = VARIANTS[name]
        out = work / "runs" / f"{args.name}_{name}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(args.config, [
            f"method={method}", f"data.train_json={data / train_json}", f"data.train_images={data / 'images'}",
            f"data.val_json={data / 'val.json'}", f"data.val_images={data / 'images'}", f"out={out}",
            f"solver.max_iters={args.iters}", f"eval_period={args.eval_every}", f"seed={args.seed}",
            f"checkpoint_period={args.iters}", *extra, *args.overrides,
        ])
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        train(cfg, progress=sys.stderr.isatty())
        wall = time.perf_counter() - t0
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        train_recs = [r for r in records if r["type"] == "train"]
        curve = [{"iteration": r["iteration"], "images_seen": r["images_seen"], "box_AP": r["bbox"]["AP"],
                  "mask_AP": r.get("segm", {}).get("AP", float("nan")), "mask_mIoU": r["mask_iou"]["mIoU"],
                  "box_fill": r["box_fill"]} for r in records if r["type"] == "eval"]
        sec = sum(r["sec_per_iter"] for r in train_recs) / max(len(train_recs), 1)
        results["runs"][name] = {"method": method, "overrides": extra, "curve": curve, "sec_per_iter": sec,
                                 "wall_seconds": wall, "ims_per_batch": cfg.solver.ims_per_batch}
        last = curve[-1]
        print(f"   box AP {last['box_AP']:.3f} mask AP {last['mask_AP']:.3f} ({sec:.2f} s/iter)", flush=True)
    res_dir = ROOT / "results"
    atomic_write_text(res_dir / f"{args.name}.json", json.dumps(results, indent=2))
    atomic_write_text(res_dir / f"{args.name}.md", to_markdown(results))
    print(to_markdown(results))


def to_markdown(results: dict) -> str:
    d = results["data"]
    lines = [
        f"# Mask AP against images seen ({results['config'].split('/')[-1]}, CPU)",
        "",
        f"Data: `boxmask synth` {d['num_train']} train / {d['num_val']} val images, {d['size']} px, seed {d['seed']}; "
        f"{results['iters']} iterations; {results['threads']} CPU thread(s); overrides: {results['overrides'] or 'none'}. AP values are COCO AP (pycocotools) on val.",
        "",
        "| variant | images seen | box AP | mask AP | mask/box | mask mIoU | box fill |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        for c in run["curve"]:
            ratio = c["mask_AP"] / c["box_AP"] if c["box_AP"] > 0 else float("nan")
            lines.append(f"| {name} | {c['images_seen']} | {c['box_AP']:.3f} | {c['mask_AP']:.3f} | {ratio:.2f} | "
                         f"{c['mask_mIoU']:.3f} | {c['box_fill']:.2f} |")
    lines += ["", "| variant | seconds / iteration | images / iteration | wall seconds |", "|---|---|---|---|"]
    for name, run in results["runs"].items():
        lines.append(f"| {name} | {run['sec_per_iter']:.3f} | {run['ims_per_batch']} | {run['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
