"""`boxmask report RUN`: one self-contained HTML page about a run (finished or still training).

The conclusion that matters first (useless, spilling or box-shaped masks, a run far too short), then
loss and metric curves (matplotlib), the latest evaluation table, overlay pictures of predictions,
seconds per iteration and the config; every picture is embedded as a data URI, and the page is written
atomically. What cannot be shown is said, with what to pass to show it."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import yaml

from .atomic_io import atomic_write_text
from .evaluation.diagnostics import FULL_FILL, SPILL_WARN, mask_shape, short_run_warning

log = logging.getLogger("boxmask")

USELESS_RATIO = 0.1  # mask AP below this share of box AP: the masks add nothing to the boxes
POOR_RATIO = 0.5
MIN_BOX_AP = 0.05


def _records(run: Path) -> list[dict]:
    from .engine.run_folder import metrics_lines

    return [rec for _, rec in metrics_lines(run / "metrics.jsonl")]


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _png_uri(buf.getvalue())


def training_dir(run: Path, cfg: dict) -> Path | None:
    """The folder training ran in, from the run folder and the ``out`` it was given (the config's relative
    paths are relative to it); None when ``out`` was absolute or does not match."""
    out = cfg.get("out")
    if not out or Path(out).is_absolute():
        return None
    parts = Path(os.path.normpath(out)).parts
    here = run.resolve().parts
    if ".." in parts or len(parts) >= len(here) or tuple(here[-len(parts):]) != parts:
        return None
    return Path(*here[:-len(parts)])


def resolve_path(value: str | None, run: Path, cfg: dict) -> tuple[Path | None, list[Path]]:
    """A path from the run's config: as written (absolute, or relative to the current folder), else
    relative to the folder training ran in. Returns (the existing path or None, the places tried)."""
    if not value:
        return None, []
    p = Path(value)
    tried = [p] if p.is_absolute() else [Path.cwd() / p]
    base = training_dir(run, cfg)
    if not p.is_absolute() and base is not None and base != Path.cwd():
        tried.append(base / p)
    for t in tried:
        if t.exists():
            return t, tried
    return None, tried


def _smooth_range(values: np.ndarray) -> tuple[float, float]:
    """y limits holding the bulk of a curve: the first iterations' spike does not flatten the rest."""
    v = values[np.isfinite(values)]
    if not len(v):
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if max(abs(lo), abs(hi)) < 1e-6:  # a term that stays at zero (off, or not started): show it at zero
        return -0.01, 0.1
    q25, q75 = np.percentile(v, [25, 75])
    cap = max(float(q75 + 5 * (q75 - q25)), float(v[-1]))
    if hi > cap:  # a spike (the first iterations): keep the bulk readable
        hi = cap
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1e-3
    return lo - pad, hi + pad


def curves(records: list[dict]) -> list[tuple[str, str]]:
    """(title, PNG data URI) of the training curves: one linear panel per loss term, learning rate and
    training mask statistics, evaluation (AP and mask IoU on 0-1, box fill on its own axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    out = []
    if train:
        it = np.array([r["iteration"] for r in train])
        keys = sorted({k for r in train for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
        cols = min(4, len(keys))
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), sharex=True, squeeze=False)
        for ax, k in zip(axes.flat, keys):
            ys = np.array([r.get(k, np.nan) for r in train], dtype=float)
            ax.plot(it, ys, linewidth=1.6 if k == "loss" else 1.0, color="black" if k == "loss" else None)
            ax.set_ylim(*_smooth_range(ys))
            ax.set_title("total" if k == "loss" else k.replace("loss_", ""), fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("iteration", fontsize=8)
        fig.tight_layout()
        out.append(("Loss terms (each on its own linear scale)", _figure_uri(fig)))

        fig, ax = plt.subplots(1, 3, figsize=(11, 2.8))
        ax[0].plot(it, [r.get("lr", np.nan) for r in train])
        ax[0].set_title("learning rate", fontsize=9)
        for k, label in (("box_fill", "in-box fill"), ("box_fill_over_95", "masks > 95% fill"),
                         ("pseudo_fg", "pseudo foreground"), ("pseudo_ignored", "pseudo ignored")):
            if any(k in r for r in train):
                ax[1].plot(it, [r.get(k, np.nan) for r in train], label=label)
        ax[1].set_ylim(-0.02, 1.02), ax[1].axhline(FULL_FILL, color="grey", linestyle=":", linewidth=1)
        ax[1].set_title("masks inside their boxes (training)", fontsize=9)
        if ax[1].lines[1:]:
            ax[1].legend(fontsize=7)
        if any("box_spill" in r for r in train):
            ax[2].plot(it, [r.get("box_spill", np.nan) for r in train], color="tab:red")
            ax[2].axhline(SPILL_WARN, color="grey", linestyle=":", linewidth=1)
        ax[2].set_title("spill: mask area outside the box / box area", fontsize=9)
        for a in ax:
            a.grid(alpha=0.3), a.set_xlabel("iteration", fontsize=8), a.tick_params(labelsize=7)
        out.append(("Learning rate and mask statistics", _figure_uri(fig)))
    if evals:
        seen = [r.get("images_seen", r["iteration"]) for r in evals]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [3, 2]})
        for label, get in (("box AP", lambda r: r.get("bbox", {}).get("AP")),
                           ("mask AP", lambda r: r.get("segm", {}).get("AP")),
                           ("mask mIoU", lambda r: r.get("mask_iou", {}).get("mIoU"))):
            ys = [get(r) for r in evals]
            if any(y is not None for y in ys):
                ax[0].plot(seen, [np.nan if y is None else y for y in ys], marker="o", label=label)
        ax[0].set_ylim(0, 1), ax[0].set_title("AP and mask IoU", fontsize=9), ax[0].legend(fontsize=8)
        fills = [r.get("box_fill", np.nan) for r in evals]
        ax[1].plot(seen, fills, marker="o", color="tab:purple")
        if all(f != f for f in fills):
            ax[1].text(0.5, 0.5, "no predicted masks (score >= 0.3)", ha="center", va="center", transform=ax[1].transAxes)
        ax[1].axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax[1].set_title("box fill: mask area / box area (1 = the box)", fontsize=9)
        for a in ax:
            a.set_xlabel("images seen", fontsize=8), a.grid(alpha=0.3), a.tick_params(labelsize=7)
        out.append(("Evaluation", _figure_uri(fig)))
    return out


def conclusions(cfg: dict, records: list[dict], dataset_size: int | None) -> list[str]:
    """The findings that matter, from the latest evaluation (or, without one, the latest training
    statistics) and the training budget; empty when nothing is wrong."""
    evals = [r for r in records if r.get("type") == "eval"]
    train = [r for r in records if r.get("type") == "train"]
    out = []
    if evals:
        m = evals[-1]
        box_ap = m.get("bbox", {}).get("AP", float("nan"))
        mask_ap = m.get("segm", {}).get("AP", float("nan"))
        fill = m.get("box_fill", float("nan"))
        if box_ap == box_ap and mask_ap == mask_ap:
            if box_ap < MIN_BOX_AP:
                out.append(f"The detector has not found the objects yet: box AP {box_ap:.2f} (mask AP {mask_ap:.2f}).")
            elif mask_ap < USELESS_RATIO * box_ap:
                out.append(f"These masks are useless: mask AP {mask_ap:.2f} beside box AP {box_ap:.2f}.")
            elif mask_ap < POOR_RATIO * box_ap:
                out.append(f"These masks are poor: mask AP {mask_ap:.2f} beside box AP {box_ap:.2f}.")
        shape = mask_shape(m)
        if shape == "spill":
            out.append(f"The masks spill outside their boxes: mask area {fill:.1f}x the box area on average "
                       f"(evaluation at iteration {m['iteration']}).")
        elif shape == "box":
            out.append(f"The masks are box-shaped: box fill {fill:.2f}, "
                       f"{m.get('box_fill_over_95', float('nan')):.0%} of them fill more than 95% of their box.")
    elif train:
        last = train[-1]
        spill, fill = last.get("box_spill", float("nan")), last.get("box_fill", float("nan"))
        if spill == spill and spill > SPILL_WARN:
            out.append(f"The masks spill outside their boxes during training: {spill:.1f} box areas outside each box "
                       f"at iteration {last['iteration']}.")
        elif fill == fill and fill > FULL_FILL:
            out.append(f"The masks are box-shaped during training: in-box fill {fill:.0%} at iteration {last['iteration']}.")
    with_seen = [r for r in records if r.get("images_seen") and r.get("iteration")]
    max_iters = cfg.get("solver", {}).get("max_iters")
    if with_seen and dataset_size and isinstance(max_iters, int) and cfg.get("method") != "full":
        per_step = round(with_seen[-1]["images_seen"] / with_seen[-1]["iteration"])
        short = short_run_warning(max_iters, per_step, dataset_size)
        if short:
            out.append(short[0].upper() + short[1:] + ".")
    return out


def prediction_pictures(model, state, files: list[Path], device: str = "cpu") -> list[tuple[str, str]]:
    """Overlays of the model's predictions on ``files``: (name, PNG data URI)."""
    import tempfile

    import torch

    from .predict import picture_names, predict_images

    with tempfile.TemporaryDirectory() as tmp:
        predict_images(model, state, files, tmp, torch.device(device), progress=False)
        return [(f.name, _png_uri((Path(tmp) / name).read_bytes())) for f, name in zip(files, picture_names(files))]


def _picture_source(run: Path, cfg: dict, json_arg, images_arg) -> tuple[Path | None, Path | None, str, list[str]]:
    """(json, image folder, what they are, notes) for the pictures: --json/--images, else the run's
    validation data, else its training data."""
    data = cfg.get("data", {})
    notes = []
    if json_arg:
        if not images_arg:
            notes.append(f"no pictures: --json {json_arg} needs --images DIR (the folder of its images)")
        return Path(json_arg), Path(images_arg) if images_arg else None, f"images of {json_arg}", notes
    if data.get("val_json"):
        key, what = "val_json", "validation images"
        images_key = "val_images" if data.get("val_images") else "train_images"
    else:
        key, what, images_key = "train_json", "training images (this run has no validation json)", "train_images"
    json_path, tried = resolve_path(data.get(key), run, cfg)
    if json_path is None:
        notes.append(f"no pictures: {data.get(key)} (data.{key} in config.yaml) not found; looked in "
                     f"{', '.join(str(t) for t in tried) or 'nowhere'}; pass --json FILE --images DIR")
        return None, None, what, notes
    if images_arg:
        return json_path, Path(images_arg), what, notes
    folder, tried = resolve_path(data.get(images_key), run, cfg)
    if folder is None:
        notes.append(f"no pictures: the image folder {data.get(images_key)} (data.{images_key} in config.yaml) "
                     f"not found; looked in {', '.join(str(t) for t in tried)}; pass --images DIR")
    return json_path, folder, what, notes


def pictures(run: Path, cfg: dict, n: int, device: str, json_arg=None, images_arg=None) -> tuple[str, list, list[str]]:
    """(heading, [(name, URI)], notes) of the latest checkpoint's predictions on ``n`` images."""
    from .data.coco import DatasetError, read_json
    from .engine.checkpoint import CheckpointError, last_checkpoint
    from .engine.trainer import model_from_checkpoint

    if n <= 0:
        return "", [], []
    if last_checkpoint(run) is None:
        return "", [], ["no pictures: the run has no checkpoint yet (one is written every checkpoint_period "
                        "iterations and at the end)"]
    json_path, folder, what, notes = _picture_source(run, cfg, json_arg, images_arg)
    if json_path is None or folder is None:
        return "", [], notes
    try:
        files = [folder / im["file_name"] for im in read_json(json_path)["images"][:n]]
    except (DatasetError, KeyError, TypeError) as e:
        return "", [], notes + [f"no pictures: {json_path}: {e}"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        return "", [], notes + [f"no pictures: {len(missing)} of {len(files)} images not found (e.g. {missing[0]}); "
                                "pass --images DIR with the folder that holds them"]
    try:
        model, state = model_from_checkpoint(run, device)
    except CheckpointError as e:
        return "", [], notes + [f"no pictures: {e}"]
    return f"Predictions on {what} (latest checkpoint)", prediction_pictures(model, state, files, device), notes


def _metrics_table(m: dict) -> str:
    rows = []
    for name in ("bbox", "segm"):
        if isinstance(m.get(name), dict):
            rows.append("<tr><td>{}</td>{}</tr>".format(
                name, "".join(f"<td>{100 * v:.1f}</td>" if v == v else "<td>-</td>"
                              for v in (m[name].get(k, float("nan")) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))))
    extra = []
    if isinstance(m.get("mask_iou"), dict):
        extra.append(f"mask mIoU (all GT) {m['mask_iou'].get('mIoU', float('nan')):.3f}")
    if "box_fill" in m:
        extra.append(f"box fill (mask area / box area) {m['box_fill']:.3f}")
    head = "<tr><th>type</th><th>AP</th><th>AP50</th><th>AP75</th><th>APs</th><th>APm</th><th>APl</th></tr>"
    return f"<table>{head}{''.join(rows)}</table><p>{html.escape('; '.join(extra))}</p>"


def _dataset_size(run: Path, cfg: dict) -> int | None:
    path, _ = resolve_path(cfg.get("data", {}).get("train_json"), run, cfg)
    if path is None:
        return None
    try:
        return len(json.loads(path.read_text()).get("images", []))
    except (OSError, ValueError, AttributeError):
        return None


def build_report(run: str | Path, out: str | Path | None = None, pictures_n: int = 4, device: str = "cpu",
                 json_path: str | None = None, images: str | None = None) -> Path:
    """Write the run's page (default RUN/report.html) and return its path; what it cannot show is said on
    the page and logged."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a boxmask run folder (no config.yaml)")
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise FileNotFoundError(f"{run / 'config.yaml'} is not a readable boxmask config ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise FileNotFoundError(f"{run / 'config.yaml'} is not a boxmask config")
    records = _records(run)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    max_iters = cfg.get("solver", {}).get("max_iters", "?")
    last_it = max([r["iteration"] for r in records], default=0)
    finished = (run / "metrics.json").is_file() or last_it == max_iters
    steady = train[1:] or train
    sec = sum(r.get("sec_per_iter", 0.0) for r in steady) / max(len(steady), 1) if steady else float("nan")
    notes = []
    data = cfg.get("data", {})
    if not evals:
        if not data.get("val_json"):
            notes.append("no metrics: this run has no validation json (data.val_json is empty), so it was never "
                         "evaluated; train with --val-json FILE --val-images DIR, or score a checkpoint with "
                         f"`boxmask eval {run} --json FILE --images DIR`")
        else:
            notes.append(f"no metrics yet: the run evaluates on {data['val_json']} every eval_period "
                         f"({cfg.get('eval_period', '?')}) iterations and at the end")
    heading, pics, pic_notes = pictures(run, cfg, pictures_n, device, json_path, images)
    notes += pic_notes
    findings = conclusions(cfg, records, _dataset_size(run, cfg))
    parts = [
        f"<h1>boxmask run: {html.escape(run.name)}</h1>",
        f"<p>method <b>{html.escape(str(cfg.get('method', '?')))}</b>; "
        f"{'finished' if finished else 'in progress'}: iteration {last_it} of {max_iters}; "
        f"{sec:.3f} s / iteration; {html.escape(str(run.resolve()))}</p>",
    ]
    if findings:
        parts.append("<div class='finding'>" + "".join(f"<p>{html.escape(f)}</p>" for f in findings) + "</div>")
    if notes:
        parts.append("<div class='note'>" + "".join(f"<p>{html.escape(n)}</p>" for n in notes) + "</div>")
    if evals:
        parts += [f"<h2>Evaluation at iteration {evals[-1]['iteration']}</h2>", _metrics_table(evals[-1])]
    for title, uri in curves(records):
        parts += [f"<h2>{html.escape(title)}</h2>", f'<img src="{uri}" alt="{html.escape(title)}">']
    if pics:
        parts.append(f"<h2>{html.escape(heading)}</h2><div>")
        parts += [f'<figure><img src="{uri}" alt="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'
                  for name, uri in pics]
        parts.append("</div>")
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}figure{display:inline-block;vertical-align:top;margin:4px}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:8px;font-size:12px}"
             ".finding{background:#fde8e8;border-left:6px solid #c0392b;padding:4px 12px;font-size:1.15em}"
             ".note{background:#fff6dd;border-left:6px solid #e0a800;padding:4px 12px}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>boxmask run {html.escape(run.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    out_path = Path(out) if out else run / "report.html"
    atomic_write_text(out_path, page)
    for f in findings:
        log.warning("%s", f)
    for n in notes:
        log.info("%s", n)
    return out_path
