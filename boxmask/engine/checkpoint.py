"""Checkpoints: atomic writes, the pointer to the last one, validated loading."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic_io import atomic_write_bytes, atomic_write_text


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(run_dir: str | Path, name: str, state: dict[str, Any], keep: int = 2) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / name
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    atomic_write_text(run_dir / "last_checkpoint", name + "\n")
    if keep > 0:
        olds = sorted(run_dir.glob("model_[0-9]*.pth"), key=lambda p: p.stat().st_mtime)
        for old in olds[:-keep]:
            if old.name != name:
                old.unlink()
    return path


def last_checkpoint(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / "last_checkpoint"
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    return path if path.is_file() else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = last_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in run folder {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign files raise many types
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a boxmask checkpoint")
    return state


def load_latest_good(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest readable checkpoint of a run (the one ``last_checkpoint`` names first, then the others
    by iteration, newest first), its state, and a message per unreadable one skipped."""
    run_dir = Path(run_dir)
    first = last_checkpoint(run_dir)
    others = sorted(run_dir.glob("model_[0-9]*.pth"), key=lambda p: p.name, reverse=True)
    candidates = ([first] if first else []) + [p for p in others if p != first]
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path), problems
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError(f"no readable checkpoint in {run_dir}" + (": " + "; ".join(problems) if problems else ""))
