"""Checkpoints: atomic writes, the pointer to the last one, safe validated loading.

A checkpoint holds only tensors and plain containers (dicts, lists, tuples, numbers, strings), so it is
read with ``torch.load(weights_only=True)``: a file a user is given (a colleague's run, a model zoo, a
download) can never run code. The ``last_checkpoint`` pointer may only name a checkpoint file inside its
own run folder; when it is missing or damaged, the run's checkpoints are found by scanning.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..atomic_io import atomic_write_bytes, atomic_write_text


class CheckpointError(RuntimeError):
    pass


CHECKPOINT_NAME = re.compile(r"model_(\d{7,})\.pth")


def save_checkpoint(run_dir: str | Path, name: str, state: dict[str, Any], keep: int = 2) -> Path:
    run_dir = Path(run_dir)
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"checkpoint name {name!r} is not of the form model_NNNNNNN.pth")
    path = run_dir / name
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the disk is full or not writable"
        raise CheckpointError(f"cannot write checkpoint {path}: {why}; the previous checkpoint is kept") from None
    atomic_write_text(run_dir / "last_checkpoint", name + "\n")
    if keep > 0:
        # only this run's own checkpoints, oldest iteration first (names, not mtimes: a copied file keeps its age)
        for old in run_checkpoints(run_dir)[keep:]:
            if old.name != name:
                old.unlink()
    return path


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint files (``model_NNNNNNN.pth``, regular files), newest iteration first."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("model_*.pth") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_file()
             and not p.is_symlink()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)), reverse=True)


def _pointer_target(run_dir: Path) -> tuple[Path | None, str | None]:
    """The file ``last_checkpoint`` names, or (None, why not) for a missing, damaged or escaping pointer."""
    pointer = run_dir / "last_checkpoint"
    if not pointer.exists() and not pointer.is_symlink():
        return None, None
    if not pointer.is_file() or pointer.is_symlink():  # a FIFO would block the reader; a link may point anywhere
        return None, f"{pointer} is not a regular file"
    try:
        raw = pointer.read_bytes()[:4096]
        name = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{pointer} is damaged (not a file name)"
    # a bare file name of this run: no folders, no '..', no absolute paths
    if not CHECKPOINT_NAME.fullmatch(name):
        return None, f"{pointer} names {name[:80]!r}, not a checkpoint file of this run folder"
    path = run_dir / name
    if not path.is_file() or path.is_symlink():
        return None, f"{pointer} names {name}, which is missing"
    return path, None


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run: the one ``last_checkpoint`` names, else (pointer missing or damaged)
    the checkpoint file with the highest iteration."""
    run_dir = Path(run_dir)
    path, _ = _pointer_target(run_dir)
    if path is not None:
        return path
    found = run_checkpoints(run_dir)
    return found[0] if found else None


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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if text.startswith("Weights only load failed"):
            # torch names the refused global in one of its lines ("... unsupported GLOBAL posix.system ...")
            what = next((l.strip() for l in text.splitlines() if "GLOBAL" in l or "global" in l), "")
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects, not only tensors and plain data, and a "
                f"checkpoint must never run code (nothing from it was run){': ' + what[:160] if what else ''}") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {text.strip()[:200] or type(e).__name__}") from None
    except Exception as e:  # truncated or foreign files raise many types
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).strip()[:200] or type(e).__name__}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a boxmask checkpoint")
    for key, typ in (("model", dict), ("config", dict), ("class_names", list), ("cat_ids", list)):
        if key in state and not isinstance(state[key], typ):
            raise CheckpointError(f"{path} is not a boxmask checkpoint ('{key}' is not a {typ.__name__})")
    if "class_names" not in state:
        raise CheckpointError(f"{path} has no class names; it is not a complete boxmask checkpoint")
    return state


def load_latest_good(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest readable checkpoint of a run (the one ``last_checkpoint`` names first, then the others
    by iteration, newest first), its state, and a message per unreadable one skipped (a damaged pointer
    included)."""
    run_dir = Path(run_dir)
    first, pointer_problem = _pointer_target(run_dir)
    problems = [pointer_problem] if pointer_problem else []
    candidates = ([first] if first else []) + [p for p in run_checkpoints(run_dir) if p != first]
    for path in candidates:
        try:
            return path, load_checkpoint(path), problems
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError(f"no readable checkpoint in {run_dir}" + (": " + "; ".join(problems) if problems else ""))
