"""A run folder's safety: what counts as a run, one process at a time, and the config a resumed run uses.

A run folder is never written by two processes at once (an exclusive lock for the run's lifetime), a
fresh run never starts in a folder that holds one (a typo in ``--out`` must not delete a colleague's
checkpoints), and ``--resume`` continues with the run's own configuration.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import yaml

from ..config import Config, ConfigError, from_dict, to_dict
from .checkpoint import run_checkpoints

LOCK_NAME = ".lock"
# files whose presence means a run lives here
RUN_FILES = ("config.yaml", "metrics.jsonl", "last_checkpoint", "metrics.json")

# On --resume, these keys may differ from the run's own config and take the command line's value; the
# others keep the run's value (method, model and optimiser differences are refused outright).
RESUME_MAY_CHANGE = ("out", "device", "solver.max_iters", "eval_period", "log_period", "checkpoint_period",
                     "keep_checkpoints", "tensorboard", "tb_image_period", "data.num_workers", "data.train_json",
                     "data.train_images", "data.val_json", "data.val_images", "sim.viz_paste")
RESUME_REFUSED = ("method", "model.", "solver.optimizer")


class RunFolderError(RuntimeError):
    pass


def holds_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds (part of) a training run: its config, metrics, pointer or checkpoints."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return any((run_dir / f).exists() for f in RUN_FILES) or bool(run_checkpoints(run_dir))


def check_fresh_out(run_dir: str | Path, data_folders: list[str]) -> None:
    """A new run's folder must not be (or lie inside) a data folder, nor a folder of images: its files
    would mix with the data, and later runs or ``predict`` would read them as inputs."""
    from ..data.coco import IMAGE_SUFFIXES

    out = Path(run_dir).resolve()
    for folder in data_folders:
        if folder and Path(folder).is_dir():
            d = Path(folder).resolve()
            if out == d or d in out.parents:
                raise RunFolderError(f"--out {run_dir} is inside the image folder {folder}; choose a folder outside the data")
    if out.is_dir():
        images = [f.name for f in out.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
        if images:
            raise RunFolderError(f"--out {run_dir} holds images ({images[0]}{', ...' if len(images) > 1 else ''}); "
                                 "a run needs a folder of its own")


class RunLock:
    """An exclusive advisory lock on ``RUN/.lock`` (fcntl), held for the run's lifetime; the operating
    system releases it when the process ends, however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot create {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(
                    f"{self.path.parent} is in use by another boxmask run{f' (pid {holder})' if holder else ''}; "
                    "wait for it to finish or choose another --out") from None
            raise RunFolderError(f"cannot lock {self.path}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def metrics_lines(path: str | Path) -> list[tuple[str, dict]]:
    """(line, record) for every well-formed record of a ``metrics.jsonl``: a JSON object whose
    ``iteration``, when present, is a number. Torn, foreign or undecodable lines are left out; anything but
    a regular file (a FIFO, a folder) reads as empty, so it can never hang a reader."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            rec = json.loads(line)
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        it = rec.get("iteration", 0) if isinstance(rec, dict) else None
        if isinstance(it, (int, float)) and not isinstance(it, bool):
            out.append((line, rec))
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_config(run_dir: Path, state: dict | None) -> dict:
    """The run's own configuration: the checkpoint's copy (exactly what trained), else RUN/config.yaml."""
    if state is not None and isinstance(state.get("config"), dict):
        return state["config"]
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"--resume: {path} is not a regular file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunFolderError(f"--resume: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"--resume: {path} is not a boxmask config")
    return data


def resume_config(saved: dict, given: Config) -> tuple[Config, list[str], list[str]]:
    """The config a resumed run trains with: the run's saved one, with the keys of RESUME_MAY_CHANGE taken
    from ``given`` (the command line's: everything when it came from a -c file, else the typed keys). Returns (config, changed, kept): one line per key the command line
    changed, and per differing key whose saved value was kept. A differing method, model or optimiser is
    a RunFolderError: those cannot continue a run."""
    try:
        run_cfg = from_dict(saved)
    except ConfigError as e:
        raise RunFolderError(f"--resume: the run's saved config is invalid: {e}") from None
    old, new = _flat(to_dict(run_cfg)), _flat(to_dict(given))
    differ = [k for k in old if old[k] != new.get(k)]
    if not given.source:
        # no -c: the command line's other values are mere defaults; only what was typed can differ
        differ = [k for k in differ if k in given.user_keys]
    refused = [k for k in differ if any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_REFUSED)]
    if refused:
        details = ", ".join(f"{k}: run {old[k]!r}, command line {new[k]!r}" for k in refused[:4])
        raise RunFolderError(
            f"--resume: the command line changes what this run is ({details}{', ...' if len(refused) > 4 else ''}); "
            "resume without -c (the run's own config.yaml is used) or start a new run with another --out")
    changed, kept, updates = [], [], {}
    for k in differ:
        if k in RESUME_MAY_CHANGE:
            changed.append(f"{k}: {old[k]!r} -> {new[k]!r}")
            node = updates
            parts = k.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = new[k]
        else:
            kept.append(f"{k} = {old[k]!r} (command line: {new[k]!r})")
    return (from_dict({**_deep_merge(to_dict(run_cfg), updates)}) if updates else run_cfg), changed, kept


def _deep_merge(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
