"""Mask AP against images seen, for every method on the same data, seed and budget.

    python benchmarks/mask_learning.py [--iters 600] [--eval-every 100] [--variants boxinst,full,sim,...]

Trains the tiny preset on `boxmask synth` data (CPU) for each variant, evaluates on the val split every
``--eval-every`` iterations, then scores the final model on the hard-case val sets (similar colours of
another class nearby; overlapping objects of one class) and the masks made for the train boxes (model
and, for SIM, its pseudo masks) against the true masks. Each variant's result is kept in
``benchmarks/work/results/NAME/VARIANT.json`` (so variants can run in separate processes) and the table
of all variants present is written to ``benchmarks/results/NAME.json`` and ``.md``. Not a test: minutes.
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
from boxmask.data.coco import CocoDataset
from boxmask.data.synth import HARD_CASES, generate, partial_masks
from boxmask.atomic_io import atomic_write_text
from boxmask.engine.trainer import evaluate_model, model_from_checkpoint, sim_from_checkpoint, train

ROOT = Path(__file__).resolve().parent
# name -> (method, train json, extra overrides)
VARIANTS = {
    "boxinst": ("boxinst", "train.json", []),
    # CondInst's original controller init, to show why the mask head starts late without ours.
    "boxinst-condinst-init": ("boxinst", "train.json", ["model.mask_head_init=condinst"]),
    # The COCO recipe's optimiser and fixed-length warm-ups (SGD 0.01, 1000-iteration LR warm-up, 10k-iteration
    # pairwise ramp, steps at 60k/80k) with CondInst's init, on the same short budget.
    "boxinst-coco-recipe": ("boxinst", "train.json", [
        "model.mask_head_init=condinst", "solver.optimizer=sgd", "solver.lr=0.01", "solver.warmup_iters=1000",
        "solver.warmup_factor=0.001", "solver.scheduler=step", "solver.steps=[60000,80000]",
        "loss.pairwise_warmup_frac=16.667"]),
    # The same SGD and CondInst init, with the warm-ups and LR steps as fractions of this budget.
    "boxinst-sgd-scaled-warmups": ("boxinst", "train.json", [
        "model.mask_head_init=condinst", "solver.optimizer=sgd", "solver.lr=0.01", "solver.warmup_iters=50",
        "solver.warmup_factor=0.001", "solver.scheduler=step", "solver.steps=[0.667,0.889]"]),
    # SIM's core: teacher, prototypes, self-correction, no copy-paste
    "sim-no-self-correction": ("sim", "train.json", ["sim.copy_paste=false", "sim.self_correction=false"]),
    "sim-no-copy-paste": ("sim", "train.json", ["sim.copy_paste=false"]),
    # the paper's temperature in M_S (the default 1.0 is the released code's)
    "sim-tau0.1": ("sim", "train.json", ["sim.copy_paste=false", "sim.semantic=true", "sim.tau=0.1"]),
    # the teacher's EMA heads on the student's FPN features: no second backbone pass
    "sim-student-backbone": ("sim", "train.json", ["sim.copy_paste=false", "sim.teacher_backbone=student"]),
    # SIM as it is by default (instance competition, no semantic map, the pairwise cut, soft targets, copy-paste)
    "sim": ("sim", "train.json", []),
    # the paper's formulation: semantic map and prototypes, no instance competition
    "sim-paper": ("sim", "train.json", ["sim.semantic=true", "sim.instance_competition=false", "sim.pairwise_pseudo_cut=false",
                                      "sim.pseudo_target=hard"]),
    # the same with the teacher's EMA heads on the student's FPN features
    "sim-student-teacher": ("sim", "train.json", ["sim.teacher_backbone=student"]),
    # the pairwise cut with hard targets on every step (warm-up 0, so a timed step is a self-training step), as
    # measured in step_time_cut.md before soft targets became the default (without them it would be sim-on)
    "sim-cut-on": ("sim", "train.json", ["sim.pairwise_pseudo_cut=true", "sim.pseudo_target=hard", "sim.warmup_frac=0.0",
                                      "sim.pairwise_texture_split=0"]),
    # the default sim on every step (warm-up 0, so a timed step is a self-training step)
    "sim-on": ("sim", "train.json", ["sim.warmup_frac=0.0"]),
    # the same without the texture split in the cut (the default before sim.pairwise_texture_split=0.3)
    "sim-nosplit-on": ("sim", "train.json", ["sim.warmup_frac=0.0", "sim.pairwise_texture_split=0"]),
    # the former default with the pairwise term's texture gate (sim.pairwise_texture_thresh)
    "sim-texgate-on": ("sim", "train.json", ["sim.warmup_frac=0.0", "sim.pairwise_texture_thresh=0.5",
                                             "sim.pairwise_texture_split=0"]),
    # the released code's copy-paste: bank of 50, half of the objects with replacement, score cubed
    "sim-release-copy-paste": ("sim", "train.json", ["sim.bank_length=50", "sim.paste_fraction=0.5",
                                                     "sim.paste_replacement=true", "sim.paste_score_power=3"]),
    # mixed supervision: SIM with GT masks for 10% / 25% of the objects (data.gt_masks=use)
    "sim-mask10": ("sim", "train_mask10.json", []),
    "sim-mask25": ("sim", "train_mask25.json", []),
    "full": ("full", "train_full.json", []),
}


def run_variant(name: str, data: Path, args) -> dict:
    method, train_json, extra = VARIANTS[name]
    out = ROOT / "work" / "runs" / f"{args.name}_{name}"
    reuse = args.reuse_runs and (out / "metrics.json").is_file()
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(args.config, [
        f"method={method}", f"data.train_json={data / train_json}", f"data.train_images={data / 'images'}",
        f"data.val_json={data / 'val.json'}", f"data.val_images={data / 'images'}", f"out={out}",
        f"solver.max_iters={args.iters}", f"eval_period={args.eval_every}", f"seed={args.seed}",
        f"checkpoint_period={args.iters}", *extra, *args.overrides,
    ])
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    if not reuse:
        train(cfg, progress=sys.stderr.isatty())
    wall = time.perf_counter() - t0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["type"] == "train"]
    curve = [{"iteration": r["iteration"], "images_seen": r["images_seen"], "box_AP": r["bbox"]["AP"],
              "mask_AP": r.get("segm", {}).get("AP", float("nan")), "mask_mIoU": r["mask_iou"]["mIoU"],
              "box_fill": r["box_fill"]} for r in records if r["type"] == "eval"]
    # seconds per iteration without the first log window (start-up) where possible
    steady = train_recs[1:] or train_recs
    sec = sum(r["sec_per_iter"] for r in steady) / max(len(steady), 1)
    model, state = model_from_checkpoint(out, "cpu")
    sim = sim_from_checkpoint(model, state)
    hard = {}
    for case in HARD_CASES:
        ds = CocoDataset(data / f"val_{case}.json", data / "images")
        m = evaluate_model(model, ds, model.cfg, torch.device("cpu"), progress=False)
        hard[case] = {"num_images": len(ds), "box_AP": m["bbox"]["AP"], "mask_AP": m["segm"]["AP"]}
    train_sub = CocoDataset(data / "train_full_sub.json", data / "images")
    quality = evaluate_model(model, train_sub, model.cfg, torch.device("cpu"), progress=False, sim=sim,
                             mask_quality=True)["gt_box_masks"]
    stats = {k: train_recs[-1][k] for k in ("pseudo_fg", "pseudo_ignored") if k in train_recs[-1]}
    res = {"method": method, "overrides": extra, "curve": curve, "sec_per_iter": sec, "wall_seconds": None if reuse else wall,
           "ims_per_batch": cfg.solver.ims_per_batch, "hard_cases": hard, "train_box_masks": quality,
           "last_train_stats": stats}
    last = curve[-1]
    print(f"   box AP {last['box_AP']:.3f} mask AP {last['mask_AP']:.3f} ({sec:.2f} s/iter)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--num-train", type=int, default=600)
    ap.add_argument("--num-val", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT.parent / "configs" / "tiny.yaml"))
    ap.add_argument("--name", default="mask_learning")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--summary-only", action="store_true", help="rebuild the tables from the variants already run")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="skip training where the variant's run folder holds a finished run; evaluate it again")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every variant")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = ROOT / "work" / f"synth_{args.num_train}_{args.num_val}_{args.size}_{args.seed}"
    if not (data / f"val_{HARD_CASES[-1]}.json").is_file():
        generate(data, args.num_train, args.num_val, args.size, args.seed, show_progress=False)
    if not (data / "train_full_sub.json").is_file():
        full = json.loads((data / "train_full.json").read_text())
        keep = {im["id"] for im in full["images"][:100]}
        full["images"] = [im for im in full["images"] if im["id"] in keep]
        full["annotations"] = [a for a in full["annotations"] if a["image_id"] in keep]
        atomic_write_text(data / "train_full_sub.json", json.dumps(full))
    for pct in (10, 25):
        if not (data / f"train_mask{pct}.json").is_file():
            partial = partial_masks(json.loads((data / "train_full.json").read_text()), pct / 100, args.seed)
            atomic_write_text(data / f"train_mask{pct}.json", json.dumps(partial))
    per_variant = ROOT / "work" / "results" / args.name
    for name in [] if args.summary_only else args.variants.split(","):
        res = run_variant(name, data, args)
        atomic_write_text(per_variant / f"{name}.json", json.dumps(res, indent=2))
    runs = {n: json.loads((per_variant / f"{n}.json").read_text()) for n in VARIANTS if (per_variant / f"{n}.json").is_file()}
    results = {"config": Path(args.config).name, "iters": args.iters, "threads": torch.get_num_threads(),
               "data": {"num_train": args.num_train, "num_val": args.num_val, "size": args.size, "seed": args.seed},
               "overrides": args.overrides, "runs": runs}
    res_dir = ROOT / "results"
    atomic_write_text(res_dir / f"{args.name}.json", json.dumps(results, indent=2))
    atomic_write_text(res_dir / f"{args.name}.md", to_markdown(results))
    print(to_markdown(results))


def _f(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def to_markdown(results: dict) -> str:
    d = results["data"]
    runs = results["runs"]
    lines = [
        f"# Mask AP against images seen ({results['config']}, CPU)",
        "",
        f"Data: `boxmask synth` {d['num_train']} train / {d['num_val']} val images, {d['size']} px, seed {d['seed']}; "
        f"{results['iters']} iterations for every variant; {results['threads']} CPU thread(s) per run; overrides: "
        f"{results['overrides'] or 'none'}. AP is COCO AP from pycocotools on the val split. "
        "s / iteration is the wall time of these runs, data loading included, and runs may have shared the "
        "machine: `speed.py` compares methods on identical batches. Variants are run one at a time as the code "
        "grows, each with its full override list (rows measured before copy-paste existed carry "
        "`sim.copy_paste=false`, which is what they ran). One run per variant: differences of about 0.02 AP are "
        "within run-to-run noise at this size.",
        "",
        "## Learning curves",
        "",
        "| variant | images seen | box AP | mask AP | mask/box | mask mIoU | box fill |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for c in run["curve"]:
            ratio = c["mask_AP"] / c["box_AP"] if c["box_AP"] > 0 else float("nan")
            lines.append(f"| {name} | {c['images_seen']} | {_f(c['box_AP'])} | {_f(c['mask_AP'])} | {ratio:.2f} | "
                         f"{_f(c['mask_mIoU'])} | {c['box_fill']:.2f} |")
    lines += ["", "## Final model", "",
              "| variant | box AP | mask AP | mask AP, near-colour val | mask AP, same-class-overlap val | box fill | "
              "train boxes: model mIoU | train boxes: pseudo-mask mIoU | s / iteration |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        h = run["hard_cases"]
        q = run["train_box_masks"]
        lines.append(f"| {name} | {_f(run['curve'][-1]['box_AP'])} | {_f(run['curve'][-1]['mask_AP'])} | "
                     f"{_f(h['near_colour']['mask_AP'])} | "
                     f"{_f(h['same_class_overlap']['mask_AP'])} | {run['curve'][-1]['box_fill']:.2f} | {_f(q['model_mIoU'])} | {_f(q.get('pseudo_mIoU', float('nan')))} | "
                     f"{run['sec_per_iter']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
