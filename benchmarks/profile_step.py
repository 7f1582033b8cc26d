"""Profile training steps (torch.profiler) and list where the time goes.

    python benchmarks/profile_step.py [--method sim] [--device cpu]

``--method`` takes the variant names of ``mask_learning.py``. Runs 3 warm-up steps and profiles 3 more
of the tiny preset on the batches ``step_time.py`` uses (real synthetic images); writes the phases of a
step, SIM's parts, and the top operators by self CPU time to ``benchmarks/results/profile_<method>.md``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from boxmask.atomic_io import atomic_write_text
from boxmask.engine.trainer import build_model, build_optimizer
from boxmask.modeling.criterion import total_loss
from boxmask.modeling.sim.method import SIM
from step_time import training_batches

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="sim")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg, batches, num_classes = training_batches(args.method, str(ROOT.parent / "configs" / "tiny.yaml"), 6, args.device)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes).to(device).train()
    sim = SIM(cfg, model, num_classes).to(device) if cfg.method == "sim" else None
    opt = build_optimizer(model, cfg)

    def step(i: int) -> None:
        b = batches[i]
        with record_function("boxmask.copy_paste"):
            if sim is not None:
                b = sim.prepare_batch(b, i, 0)
        with record_function("boxmask.student_forward"):
            losses, aux = model.forward_train(b, return_aux=True)
        if sim is not None:
            with record_function("boxmask.sim_losses"):
                losses.update(sim.losses(b, aux, pseudo_on=True)[0])
        loss = total_loss(losses, cfg, cfg.solver.max_iters)
        opt.zero_grad()
        with record_function("boxmask.backward"):
            loss.backward()
        with record_function("boxmask.optimizer"):
            opt.step()
        if sim is not None:
            with record_function("boxmask.teacher_ema"):
                sim.after_step(model)

    for i in range(3):
        step(i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for i in range(3, 6):
            step(i)
    ev = prof.key_averages()
    # boxmask.sim.* are parts of boxmask.sim_losses / boxmask.teacher_ema (ranges inside SIM)
    ours = sorted((e for e in ev if e.key.startswith("boxmask.")), key=lambda e: -e.cpu_time_total)
    total = sum(e.cpu_time_total for e in ours if e.key in ("boxmask.student_forward", "boxmask.sim_losses",
                                                              "boxmask.backward", "boxmask.optimizer",
                                                              "boxmask.teacher_ema", "boxmask.copy_paste"))
    lines = [f"# One training step profiled ({args.method}, tiny preset, 8 synthetic images, {args.device}, "
             f"{torch.get_num_threads()} threads; 3 steps)", "", "## Phases", "",
             "| phase | ms / step | share |", "|---|---|---|"]
    for e in ours:
        lines.append(f"| {e.key} | {e.cpu_time_total / 3 / 1000:.1f} | {e.cpu_time_total / max(total, 1):.0%} |")
    lines += ["", "## Top operators by self CPU time", "", "```",
              ev.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48), "```"]
    out = ROOT / "results" / f"profile_{args.method}.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    main()
