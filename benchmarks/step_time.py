"""Seconds per training step for each method on identical batches (tiny preset, CPU).

    python benchmarks/step_time.py [--steps 20] [--methods boxinst,sim,full]

``--methods`` takes the variant names of ``mask_learning.py`` (a method plus config overrides), each
optionally at a capacity of ``capacity.py`` (``sim-on@wide256``: that variant with the capacity's keys), so
step times of different model sizes are compared in the same rotation.

Every method trains its own model on the same pre-loaded batches (data loading excluded). The methods
take turns step by step, in a rotating order, so a slow spell of the machine hits them all alike;
3 warm-up rounds are not timed. Writes ``benchmarks/results/NAME.json`` and ``.md`` (``--name``, default step_time). Run it on an
otherwise idle machine: it measures wall time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from boxmask.config import load_config
from boxmask.data.batch import TrainDataset, TrainSampler, batch_to, collate
from boxmask.data.coco import CocoDataset
from boxmask.data.synth import generate
from boxmask.atomic_io import atomic_write_text
from boxmask.engine.trainer import build_model, build_optimizer
from boxmask.modeling.criterion import total_loss
from boxmask.modeling.sim.method import SIM
from capacity import CAPACITIES
from mask_learning import VARIANTS

ROOT = Path(__file__).resolve().parent


def variant(name: str) -> tuple[str, list[str]]:
    """(method, config overrides) of ``VARIANT`` or ``VARIANT@CAPACITY``."""
    base, _, capacity = name.partition("@")
    if base not in VARIANTS or (capacity and capacity not in CAPACITIES):
        raise SystemExit(f"step_time: unknown method {name!r}; variants: {', '.join(VARIANTS)}; "
                         f"capacities (after @): {', '.join(CAPACITIES)}")
    method, _, extra = VARIANTS[base]
    return method, [*extra, *(CAPACITIES[capacity] if capacity else [])]


def training_batches(name: str, config: str, num: int, device: str = "cpu"):
    """(config, ``num`` collated training batches of the step-time data set, number of classes) for a
    ``mask_learning.py`` variant; the data (64 synthetic 128 px images) is generated on first use."""
    data = ROOT / "work" / "synth_step_time"
    if not (data / "train_full.json").is_file():
        generate(data, 64, 4, 128, 0, show_progress=False)
    method, extra = variant(name)
    # a 2-entry bank is full after the first warm-up step: copy-paste (p = 0.5) is live in every timed step
    cfg = load_config(config, [f"method={method}", f"device={device}", *extra, "sim.bank_length=2"])
    ds = CocoDataset(data / "train_full.json", data / "images")
    td = TrainDataset(ds, cfg.data.min_size_train, cfg.data.max_size, cfg.data.hflip, method == "full")
    sampler = TrainSampler(len(ds), cfg.solver.ims_per_batch, 0)
    batches = [batch_to(collate([td[k] for k in sampler.batch_for(i)]), torch.device(device)) for i in range(num)]
    return cfg, batches, len(ds.cat_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default="boxinst,sim-no-copy-paste,sim-student-backbone,sim,sim-student-teacher,full")
    ap.add_argument("--config", default=str(ROOT.parent / "configs" / "tiny.yaml"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="step_time", help="results file name in benchmarks/results/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runners = {}
    for name in args.methods.split(","):
        cfg, batches, num_classes = training_batches(name, args.config, args.steps + 3)
        torch.manual_seed(0)
        model = build_model(cfg, num_classes).train()
        sim = SIM(cfg, model, num_classes) if cfg.method == "sim" else None
        runners[name] = {"cfg": cfg, "batches": batches, "model": model, "sim": sim,
                         "opt": build_optimizer(model, cfg), "times": []}

    def step(r: dict, i: int) -> float:
        cfg, model, sim, opt = r["cfg"], r["model"], r["sim"], r["opt"]
        t0 = time.perf_counter()
        batch = r["batches"][i]
        if sim is not None:
            batch = sim.prepare_batch(batch, i, 0)
            losses, aux = model.forward_train(batch, return_aux=True)
            losses.update(sim.losses(batch, aux, pseudo_on=True)[0])
        else:
            losses = model(batch)
        loss = total_loss(losses, cfg, cfg.solver.max_iters)  # after every warm-up: all loss terms on
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sim is not None:
            sim.after_step(model)
        return time.perf_counter() - t0

    names = list(runners)
    for i in range(args.steps + 3):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            dt = step(runners[name], i)
            if i >= 3:
                runners[name]["times"].append(dt)
    rows = {}
    for name, r in runners.items():
        times = sorted(r["times"])
        rows[name] = {"median_s": times[len(times) // 2], "mean_s": sum(times) / len(times)}
        print(name, rows[name], flush=True)
    base = rows.get("boxinst", {}).get("median_s")
    result = {"config": Path(args.config).name, "steps": args.steps, "threads": torch.get_num_threads(), "methods": rows}
    lines = [f"# Training step time ({result['config']}, CPU, {result['threads']} threads, {args.steps} steps, batches pre-loaded, methods in turn)",
             "", "| method | median s / step | mean s / step | vs boxinst |", "|---|---|---|---|"]
    for m, r in rows.items():
        rel = f"{r['median_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {m} | {r['median_s']:.3f} | {r['mean_s']:.3f} | {rel} |")
    atomic_write_text(ROOT / "results" / f"{args.name}.json", json.dumps(result, indent=2))
    atomic_write_text(ROOT / "results" / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
