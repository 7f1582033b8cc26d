"""Quality against images seen and against training wall-clock for a few capacities of the MobileNetV2
preset, `boxinst` and `full`, with paired seeds.

    python benchmarks/capacity.py --capacities preset,wide,deep,heavy --methods boxinst,full --seeds 0,1,2
    python benchmarks/capacity.py --summary-only             # tables and plot from the runs already done
    python benchmarks/capacity.py --name capacity_wall --capacities preset,heavy --methods boxinst \
        --budget heavy=1728 --reuse capacity                  # heavy at the preset's training wall-clock

Data: the textured data of sim_paired.py (every class its own texture family, 600 train / 200 val images of
192 px). Each (capacity, method, seed) trains in its own process, one at a time, and is evaluated on val
every quarter of the schedule (box and mask AP from the run's own metrics.jsonl); training seconds are
the run's logged seconds per iteration summed over the iterations (evaluation excluded). Capacities
differ from the `mobilenet_v2_192` preset (64-channel FPN on 3 levels, 2 head convolutions, 64-channel
mask branch) in the keys listed in CAPACITIES. Per capacity and method at the final point: mean and sd
over the seeds of box AP, mask AP, mask AP / box AP and seconds per step, and the paired difference to
the preset. Results: benchmarks/results/NAME.{json,md,png}. Not a test: a run takes 7-15 minutes on 2
CPU cores.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from sim_paired import _env, make_data, mean_sd, paired  # noqa: E402

REPO = ROOT.parent
FIVE_LEVELS = ["model.fpn_strides=[8,16,32,64,128]", "model.sizes_of_interest=[48,96,192,384]"]
CAPACITIES: dict[str, list[str]] = {
    "preset": [],
    "wide": ["model.fpn_channels=128", "model.mask_branch_channels=128"],
    "deep": ["model.head_convs=4"],
    "levels5": FIVE_LEVELS,
    "wide-deep": ["model.fpn_channels=128", "model.mask_branch_channels=128", "model.head_convs=4"],
    "wide256": ["model.fpn_channels=256", "model.mask_branch_channels=128"],
    # wide256 with depthwise-separable 3x3s in the FCOS towers and the FPN outputs (model.head_conv)
    "wide256sep": ["model.fpn_channels=256", "model.mask_branch_channels=128", "model.head_conv=separable"],
    # MMDetection's CondInst head on this backbone: 256-channel FPN on 5 levels, 4 head convolutions
    "heavy": ["model.fpn_channels=256", "model.mask_branch_channels=128", "model.head_convs=4", *FIVE_LEVELS],
}
METHODS = {"boxinst": "train.json", "full": "train_full.json"}
METRICS = ("box_AP", "mask_AP", "mask_over_box", "sec_per_iter")


def run_name(capacity: str, method: str, seed: int) -> str:
    return f"{capacity}_{method}_s{seed}"


def train(capacity: str, method: str, seed: int, data: Path, out: Path, args) -> None:
    iters = args.budgets.get(capacity, args.images_seen) // args.batch
    if curve(out):
        return
    cmd = [sys.executable, "-m", "boxmask", "train", "-c", args.config, "--method", method,
           "--train-json", str(data / METHODS[method]), "--train-images", str(data / "images"),
           "--val-json", str(data / "val.json"), "--val-images", str(data / "images"),
           "--out", str(out), "--max-iters", str(iters), f"solver.ims_per_batch={args.batch}", f"seed={seed}",
           f"eval_period={max(iters // args.points, 1)}", f"checkpoint_period={iters}", "tb_image_period=0",
           f"device={args.device}", "--no-progress", *CAPACITIES[capacity], *args.overrides]
    if out.exists():
        cmd.append("--resume")
    print(f"== {run_name(capacity, method, seed)}", flush=True)
    subprocess.run(cmd, check=True, env=_env(args.threads))


def curve(out: Path) -> list[dict] | None:
    """Per evaluation of a finished run: iteration, images seen, training seconds so far, box and mask AP;
    None while the run is unfinished."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_recs = [r for r in recs if r.get("type") == "train"]
    evals = [r for r in recs if r.get("type") == "eval"]
    cfg_iters = max((r["iteration"] for r in train_recs), default=0)
    if not evals or evals[-1]["iteration"] != cfg_iters or not (out / "last_checkpoint").is_file():
        return None
    points, seconds, last = [], 0.0, 0
    by_it = sorted(train_recs, key=lambda r: r["iteration"])
    for e in evals:
        for r in by_it:
            if last < r["iteration"] <= e["iteration"]:
                seconds += r["sec_per_iter"] * (r["iteration"] - last)
                last = r["iteration"]
        box, mask = e["bbox"]["AP"], e["segm"]["AP"]
        points.append({"iteration": e["iteration"], "images_seen": e["images_seen"], "train_seconds": seconds,
                       "box_AP": box, "mask_AP": mask, "mask_over_box": mask / box if box > 0 else float("nan"),
                       "sec_per_iter": seconds / max(e["iteration"], 1)})
    return points


def summarise(curves: dict[str, dict[str, dict[int, list[dict]]]], reference: str = "preset") -> dict:
    """curves[capacity][method][seed] -> per capacity and method, each metric at the last point: values,
    mean, sd, and the paired difference to ``reference``."""
    out: dict = {}
    for cap, by_method in curves.items():
        for method, by_seed in by_method.items():
            row = {}
            for key in METRICS:
                vals = {s: c[-1][key] for s, c in by_seed.items()}
                m, sd = mean_sd(list(vals.values()))
                cell = {"values": vals, "mean": m, "sd": sd}
                ref = curves.get(reference, {}).get(method)
                if cap != reference and ref:
                    cell["vs_" + reference] = paired(vals, {s: c[-1][key] for s, c in ref.items()})
                row[key] = cell
            out.setdefault(cap, {})[method] = row
    return out


def _f(v: float, digits: int = 3) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def to_markdown(summary: dict, meta: dict) -> str:
    budgets = meta.get("budgets") or {}
    seen = f"{meta['images_seen']} images seen" + "".join(f", {c}: {n}" for c, n in budgets.items())
    lines = [f"# Capacity against quality ({meta['config']}, {seen}, CPU)", "",
             f"Textured data ({meta['num_train']} train / {meta['num_val']} val images, {meta['size']} px), seeds "
             f"{meta['seeds']} (the same for every row). Cells: mean ± sd over the seeds at the end of training; Δ: "
             "the paired difference to `preset` (mean ± sd). s / step: logged training seconds per step (no "
             "evaluation), which depend on what else ran on the machine. Capacities:", ""]
    lines += [f"- `{c}`: {' '.join(CAPACITIES[c]) or 'the preset as shipped'}" for c in summary]
    lines += ["", "| capacity | method | box AP | mask AP | mask / box | s / step |", "|---|---|---|---|---|---|"]
    for cap, by_method in summary.items():
        for method, row in by_method.items():
            cells = []
            for key in METRICS:
                c = row[key]
                txt = f"{_f(c['mean'], 2 if key == 'sec_per_iter' else 3)} ± {_f(c['sd'], 2 if key == 'sec_per_iter' else 3)}"
                p = c.get("vs_preset")
                if p and p["seeds"] and key != "sec_per_iter":
                    txt += f" (Δ {p['mean']:+.3f} ± {_f(p['sd'])})"
                cells.append(txt)
            lines.append(f"| {cap} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path) -> None:
    """Mask AP (solid) and box AP (dashed) against images seen and against training seconds, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (cap, by_method) in enumerate(curves.items()):
        for method, by_seed in by_method.items():
            runs = list(by_seed.values())
            n = min(len(c) for c in runs)
            mean = lambda k: [sum(c[j][k] for c in runs) / len(runs) for j in range(n)]  # noqa: E731
            colour = f"C{i}"
            style = "-" if method == "boxinst" else ":"
            for ax, x in zip(axes, ("images_seen", "train_seconds")):
                ax.plot(mean(x), mean("mask_AP"), style, color=colour, marker="o", ms=3, label=f"{cap} {method}")
    for ax, label in zip(axes, ("images seen", "training seconds (2 CPU cores)")):
        ax.set_xlabel(label)
        ax.set_ylabel("mask AP (val)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("mask AP against images seen and wall-clock (solid: boxinst, dotted: full)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacities", default="preset,wide,deep,heavy", help=f"from: {', '.join(CAPACITIES)}")
    ap.add_argument("--methods", default="boxinst,full")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--images-seen", type=int, default=4800)
    ap.add_argument("--budget", action="append", default=[], metavar="CAPACITY=IMAGES",
                    help="images seen for one capacity (e.g. heavy=1728: the preset's wall-clock at 4,800); "
                         "give a separate --name, since runs are found by capacity, method and seed")
    ap.add_argument("--reuse", metavar="NAME", help="take the finished runs of benchmark NAME for the capacities "
                    "without a --budget instead of training them again (linked, not copied)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--points", type=int, default=4, help="evaluations over the schedule")
    ap.add_argument("--config", default="mobilenet_v2_192")
    ap.add_argument("--num-train", type=int, default=600)
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=ROOT / "work", help="data and runs")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--name", default="capacity")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = ap.parse_args()
    caps, methods = args.capacities.split(","), args.methods.split(",")
    args.budgets = {}
    for item in args.budget:
        cap, _, n = item.partition("=")
        if cap not in CAPACITIES or not n.isdigit() or int(n) < args.batch:
            ap.error(f"--budget {item!r}: expected CAPACITY=IMAGES with a capacity from {', '.join(CAPACITIES)} "
                     f"and at least {args.batch} images")
        args.budgets[cap] = int(n)
    seeds = [int(s) for s in args.seeds.split(",")]
    bad = [c for c in caps if c not in CAPACITIES] + [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown {bad}; capacities: {', '.join(CAPACITIES)}; methods: {', '.join(METHODS)}")
    data = args.work / f"textured_{args.num_train}_{args.num_val}_{args.size}_{args.data_seed}"
    make_data(data, args.num_train, args.num_val, args.size, args.data_seed)
    runs = args.work / "runs" / args.name
    if args.reuse:
        reused = [c for c in caps if c not in args.budgets]
        for cap, method, seed in itertools.product(reused, methods, seeds):
            name = run_name(cap, method, seed)
            src, dst = args.work / "runs" / args.reuse / name, runs / name
            src_curve = curve(src)
            # only a run of the same length: NAME may hold this capacity at another --budget
            if src_curve and src_curve[-1]["iteration"] == args.images_seen // args.batch and not dst.exists():
                runs.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src.resolve(), target_is_directory=True)
    if not args.summary_only:
        for seed in seeds:  # seed-major: a stopped benchmark stays paired
            for cap in caps:
                for method in methods:
                    train(cap, method, seed, data, runs / run_name(cap, method, seed), args)
    curves: dict = {}
    for cap in caps:
        for method in methods:
            for seed in seeds:
                c = curve(runs / run_name(cap, method, seed))
                if c:
                    curves.setdefault(cap, {}).setdefault(method, {})[seed] = c
    meta = {"config": args.config, "images_seen": args.images_seen, "budgets": args.budgets, "batch": args.batch,
            "seeds": seeds,
            "num_train": args.num_train, "num_val": args.num_val, "size": args.size, "overrides": args.overrides}
    summary = summarise(curves)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "curves": curves}, indent=2))
    md = to_markdown(summary, meta)
    (args.results / f"{args.name}.md").write_text(md)
    if curves:
        plot(curves, args.results / f"{args.name}.png")
    print(md)


if __name__ == "__main__":
    main()
