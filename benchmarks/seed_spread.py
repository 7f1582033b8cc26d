"""Mean and spread over training seeds of ``mask_learning.py`` results, to tell a difference from noise.

    python benchmarks/mask_learning.py --name seeds_s1 --variants sim,sim-student-teacher seed=1
    python benchmarks/seed_spread.py --runs mask_learning,seeds_s1,seeds_s2 --variants sim,sim-student-teacher

Reads ``benchmarks/work/results/RUN/VARIANT.json`` for every run name given (the trailing ``seed=N``
override changes the training seed only, so every run trains on the same data) and writes
``benchmarks/results/seed_spread.json`` and ``.md``: per variant, each run's final box AP, mask AP and
hard-case mask APs, their mean and their range.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from boxmask.atomic_io import atomic_write_text

ROOT = Path(__file__).resolve().parent
COLUMNS = [("box AP", lambda r: r["curve"][-1]["box_AP"]), ("mask AP", lambda r: r["curve"][-1]["mask_AP"]),
           ("near-colour mask AP", lambda r: r["hard_cases"]["near_colour"]["mask_AP"]),
           ("same-class-overlap mask AP", lambda r: r["hard_cases"]["same_class_overlap"]["mask_AP"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="comma-separated mask_learning.py --name values")
    ap.add_argument("--variants", required=True)
    args = ap.parse_args()
    runs = args.runs.split(",")
    table: dict = {}
    lines = ["# Spread over training seeds (mask_learning.py results; same data, one seed per run)", "",
             f"Runs: {', '.join(runs)}. Each cell: mean, then [min, max] over the runs, then the per-run values.", "",
             "| variant | runs | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for v in args.variants.split(","):
        found = [json.loads(p.read_text()) for r in runs if (p := ROOT / "work" / "results" / r / f"{v}.json").is_file()]
        if not found:
            continue
        row = {}
        cells = []
        for col, get in COLUMNS:
            vals = [get(r) for r in found]
            row[col] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "values": vals}
            cells.append(f"{row[col]['mean']:.3f} [{min(vals):.3f}, {max(vals):.3f}] ({', '.join(f'{x:.3f}' for x in vals)})")
        table[v] = row
        lines.append(f"| {v} | {len(found)} | " + " | ".join(cells) + " |")
    atomic_write_text(ROOT / "results" / "seed_spread.json", json.dumps({"runs": runs, "variants": table}, indent=2))
    atomic_write_text(ROOT / "results" / "seed_spread.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
