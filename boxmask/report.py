"""`boxmask report RUN`: one self-contained HTML page about a run (finished or still training).

Loss and metric curves (matplotlib), the config, the latest evaluation table, seconds per iteration and
overlay pictures of validation predictions; every picture is embedded as a data URI, and the page is
written atomically."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import yaml

from .atomic_io import atomic_write_text


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                continue
    return out


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _png_uri(buf.getvalue())


def _array_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return _png_uri(buf.getvalue())


def curves(records: list[dict]) -> list[tuple[str, str]]:
    """(title, PNG data URI) of the training curves: loss terms, learning rate and box fill, evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    out = []
    if train:
        it = [r["iteration"] for r in train]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for k in sorted({k for r in train for k in r if k.startswith("loss")}):
            ax.plot(it, [r.get(k, np.nan) for r in train], label=k.replace("loss_", "") if k != "loss" else "total",
                    linewidth=2.0 if k == "loss" else 1.0)
        ax.set_xlabel("iteration"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
        out.append(("Loss terms", _figure_uri(fig)))
        fig, ax = plt.subplots(1, 2, figsize=(9, 3))
        ax[0].plot(it, [r.get("lr", np.nan) for r in train])
        ax[0].set_title("learning rate", fontsize=9), ax[0].set_xlabel("iteration")
        for k in ("box_fill", "box_fill_over_95", "pseudo_fg", "pseudo_ignored"):
            if any(k in r for r in train):
                ax[1].plot(it, [r.get(k, np.nan) for r in train], label=k)
        ax[1].set_title("mask statistics (training)", fontsize=9), ax[1].set_xlabel("iteration"), ax[1].legend(fontsize=7)
        for a in ax:
            a.grid(alpha=0.3)
        out.append(("Learning rate and mask statistics", _figure_uri(fig)))
    if evals:
        seen = [r.get("images_seen", r["iteration"]) for r in evals]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for label, get in (("box AP", lambda r: r.get("bbox", {}).get("AP")),
                           ("mask AP", lambda r: r.get("segm", {}).get("AP")),
                           ("mask mIoU", lambda r: r.get("mask_iou", {}).get("mIoU")),
                           ("box fill", lambda r: r.get("box_fill"))):
            ys = [get(r) for r in evals]
            if any(y is not None for y in ys):
                ax.plot(seen, [np.nan if y is None else y for y in ys], marker="o", label=label)
        ax.set_xlabel("images seen"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
        out.append(("Evaluation", _figure_uri(fig)))
    return out


def prediction_pictures(run: Path, cfg: dict, n: int, device: str = "cpu") -> list[tuple[str, str]]:
    """Overlays of the latest checkpoint's predictions on the first ``n`` validation images."""
    import torch

    from .data.coco import CocoDataset
    from .engine.checkpoint import CheckpointError, last_checkpoint
    from .engine.trainer import model_from_checkpoint
    from .predict import predict_images

    data = cfg.get("data", {})
    if n <= 0 or last_checkpoint(run) is None or not data.get("val_json"):
        return []
    try:
        model, state = model_from_checkpoint(run, device)
        ds = CocoDataset(data["val_json"], data.get("val_images") or data["train_images"], skip_invalid=True)
    except (CheckpointError, OSError, ValueError):
        return []
    files = [ds.image_root / im["file_name"] for im in ds.images[:n]]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        predict_images(model, state, files, tmp, torch.device(device), progress=False)
        return [(f.name, _png_uri((Path(tmp) / f"{f.stem}.png").read_bytes())) for f in files]


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
        extra.append(f"box fill {m['box_fill']:.3f}")
    head = "<tr><th>type</th><th>AP</th><th>AP50</th><th>AP75</th><th>APs</th><th>APm</th><th>APl</th></tr>"
    return f"<table>{head}{''.join(rows)}</table><p>{html.escape('; '.join(extra))}</p>"


def build_report(run: str | Path, out: str | Path | None = None, pictures: int = 4, device: str = "cpu") -> Path:
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a boxmask run folder (no config.yaml)")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    records = _records(run)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    max_iters = cfg.get("solver", {}).get("max_iters", "?")
    last_it = max([r["iteration"] for r in records], default=0)
    finished = (run / "metrics.json").is_file() or last_it == max_iters
    steady = train[1:] or train
    sec = sum(r.get("sec_per_iter", 0.0) for r in steady) / max(len(steady), 1) if steady else float("nan")
    parts = [
        f"<h1>boxmask run: {html.escape(run.name)}</h1>",
        f"<p>method <b>{html.escape(str(cfg.get('method', '?')))}</b>; "
        f"{'finished' if finished else 'in progress'}: iteration {last_it} of {max_iters}; "
        f"{sec:.3f} s / iteration; {html.escape(str(run.resolve()))}</p>",
    ]
    if evals:
        parts += [f"<h2>Evaluation at iteration {evals[-1]['iteration']}</h2>", _metrics_table(evals[-1])]
    for title, uri in curves(records):
        parts += [f"<h2>{html.escape(title)}</h2>", f'<img src="{uri}" alt="{html.escape(title)}">']
    pics = prediction_pictures(run, cfg, pictures, device)
    if pics:
        parts.append("<h2>Validation predictions (latest checkpoint)</h2><div>")
        parts += [f'<figure><img src="{uri}" alt="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'
                  for name, uri in pics]
        parts.append("</div>")
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}figure{display:inline-block;margin:4px}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:8px;font-size:12px}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>boxmask run {html.escape(run.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    out_path = Path(out) if out else run / "report.html"
    atomic_write_text(out_path, page)
    return out_path
