"""Command line: argument parsing only; each subcommand calls one function."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError


def _train(args) -> int:
    from .config import load_config
    from .engine.trainer import train

    overrides = list(args.overrides)
    for flag, key in (("train_json", "data.train_json"), ("train_images", "data.train_images"), ("val_json", "data.val_json"),
                      ("val_images", "data.val_images"), ("method", "method"), ("out", "out"),
                      ("max_iters", "solver.max_iters"), ("device", "device"), ("viz_paste", "sim.viz_paste")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume, progress=not args.no_progress)  # logs the final evaluation table
    print(f"run folder: {cfg.out}")
    return 0


def _eval(args) -> int:
    from .data.coco import CocoDataset
    from .atomic_io import atomic_write_text
    from .engine.trainer import check_categories, evaluate_model, model_from_checkpoint, resolve_device, sim_from_checkpoint
    from .evaluation.diagnostics import ap_gap_warning
    from .evaluation.coco_eval import format_table

    device = resolve_device(args.device)
    model, state = model_from_checkpoint(args.checkpoint, device)
    model.cfg.model.infer_bf16 |= args.bf16
    dataset = CocoDataset(args.json, args.images, skip_invalid=args.skip_invalid)
    check_categories(state, dataset, args.json)
    results: list = []
    metrics = evaluate_model(model, dataset, model.cfg, device, progress=not args.no_progress,
                             sim=sim_from_checkpoint(model, state, device), mask_quality=True, results_out=results)
    print(format_table(metrics))
    if "mask_iou" in metrics:
        mi = metrics["mask_iou"]
        print(f"mask IoU of matched predictions: {mi['mIoU_matched']:.3f} (recall {mi['recall']:.3f}, mIoU over all GT {mi['mIoU']:.3f})")
    print(f"box fill (mask area / box area): {metrics['box_fill']:.3f}; masks filling > 95% of their box: "
          f"{metrics['box_fill_over_95']:.1%}")
    warning = ap_gap_warning(metrics)
    if warning:
        print(f"boxmask: warning: {warning}", file=sys.stderr)
    if "gt_box_masks" in metrics:
        q = metrics["gt_box_masks"]
        line = f"masks for the GT boxes vs GT masks: model mIoU {q['model_mIoU']:.3f}"
        if "pseudo_mIoU" in q:
            line += f", SIM pseudo masks mIoU {q['pseudo_mIoU']:.3f}"
        print(line + f" ({q['covered']} of {q['num_gt']} objects have positives)")
    if args.out:
        atomic_write_text(args.out, json.dumps(metrics, indent=2))
        print(f"metrics written to {args.out}")
    if args.viz:
        from .evaluation.evaluator import save_worst_pictures

        folder = args.viz_out or str(Path(args.out).parent / "eval_viz" if args.out else "eval_viz")
        paths = save_worst_pictures(dataset, results, args.viz, folder)
        print(f"{len(paths)} pictures (GT | predicted, worst mask IoU first) written to {folder}")
    return 0


def _pseudo_label(args) -> int:
    from .data.coco import CocoDataset
    from .engine.trainer import check_categories, model_from_checkpoint, resolve_device
    from .pseudo_label import gt_miou, pseudo_label, write_pseudo_labels

    device = resolve_device(args.device)
    model, state = model_from_checkpoint(args.checkpoint, device)
    dataset = CocoDataset(args.json, args.images)
    check_categories(state, dataset, args.json)
    labels, counts = pseudo_label(model, dataset, device, args.mask_thresh, args.min_quality, progress=not args.no_progress)
    write_pseudo_labels(args.json, labels, args.out, args.min_quality)
    n = counts["objects"]
    print(f"{n} objects: {n - counts['empty'] - counts['no_positive']} masks, {counts['empty']} empty masks and "
          f"{counts['no_positive']} objects without a positive location given their filled box "
          f"(pseudo_fallback in the json), {counts['low_quality']} below --min-quality {args.min_quality} "
          "(pseudo_low_quality)")
    miou = gt_miou(dataset, labels)
    if miou is not None:
        print(f"pseudo masks vs the GT masks of {args.json}: mIoU {miou:.3f}")
    print(f"written to {args.out}")
    return 0


def _convert(args) -> int:
    from .atomic_io import atomic_write_text
    from .data import convert

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give the path of the .json file to write")
    if Path(args.src).exists() and out.resolve() == Path(args.src).resolve():
        raise ConfigError(f"--out {out} is the input itself: give another path")
    if args.difficult and args.fmt != "voc":
        raise ConfigError("--difficult applies to --from voc only")
    if args.fmt == "yolo":
        if not args.names:
            raise ConfigError("--from yolo needs --names FILE (one class per line, or an Ultralytics data.yaml): "
                              "its label files hold class indices")
        result = convert.from_yolo(args.src, args.images, args.names, categories_from=args.categories_from)
    elif args.fmt == "voc":
        result = convert.from_voc(args.src, images=args.images, names=args.names, categories_from=args.categories_from,
                                  difficult=args.difficult or "keep")
    else:
        result = convert.from_labelme(args.src, names=args.names, categories_from=args.categories_from,
                                      exclude=(out, *([args.categories_from] if args.categories_from else [])))
    data = result.coco
    for note in result.notes:
        print(note)
    for warning in result.warnings:
        print(f"boxmask: warning: {warning}", file=sys.stderr)
    try:  # only now, after every input file was read: an error above leaves nothing behind
        atomic_write_text(out, json.dumps(data))
    except OSError as e:
        raise ConfigError(f"{out}: cannot write: {e.strerror or e}") from None
    if args.categories_from:
        rule = f"the ids of {args.categories_from}"
    elif args.names:
        rule = f"ids in the order of {args.names}"
    else:
        rule = "ids in sorted label order"
    cats = ", ".join(f"{c['id']} {c['name']}" for c in data["categories"])
    print(f"{len(data['images'])} images, {len(data['annotations'])} boxes, {len(data['categories'])} categories "
          f"({rule}: {cats}) written to {out}")
    return 0


def _export(args) -> int:
    import warnings

    from .engine.trainer import model_from_checkpoint
    from .export import export_onnx

    model, _ = model_from_checkpoint(args.checkpoint, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic
        path = export_onnx(model, args.onnx)
    print(f"ONNX model written to {path}: input 'image' uint8 [1, 3, H, W]; outputs boxes, scores, labels, "
          "masks (probabilities at the input size)")
    return 0


def _report(args) -> int:
    from .report import build_report

    try:
        path = build_report(args.run, args.out, args.pictures, args.device)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print(f"report written to {path}")
    return 0


def _check(args) -> int:
    from .data.coco import CocoDataset

    # Lenient mode so that every problem is listed, not just the first one (printed below, not logged).
    logging.getLogger("boxmask").setLevel(logging.ERROR)
    ds = CocoDataset(args.json, args.images, skip_invalid=True, clip_boxes=not args.no_clip)
    for msg in ds.report.messages:
        print(msg)
    print(f"{args.json}: {ds.report.summary()}")
    with_mask, box_only = ds.mask_counts()
    print(f"{len(ds.cat_ids)} categories; {with_mask} objects with masks, {box_only} boxes only")
    return 1 if ds.report.skipped else 0


def _predict(args) -> int:
    from .engine.trainer import model_from_checkpoint, resolve_device
    from .predict import predict_images

    device = resolve_device(args.device)
    model, state = model_from_checkpoint(args.checkpoint, device)
    model.cfg.model.infer_bf16 |= args.bf16
    path = predict_images(model, state, args.inputs, args.out, device, args.score_thresh, progress=not args.no_progress)
    print(f"overlays and {path.name} written to {args.out}")
    return 0


def _synth(args) -> int:
    from .data.synth import generate

    try:
        paths = generate(args.out, args.num_train, args.num_val, args.size, args.seed, show_progress=not args.no_progress,
                         mask_fraction=args.mask_fraction)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="boxmask", description="Instance segmentation from bounding boxes only.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate a synthetic dataset (boxes-only train json, masks for evaluation)")
    s.add_argument("out")
    s.add_argument("--num-train", type=int, default=200)
    s.add_argument("--num-val", type=int, default=50)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mask-fraction", type=float, metavar="F",
                   help="also write train_partial.json, where only a fraction F of the objects keep their masks")
    s.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train a model; key=value arguments override the config")
    t.add_argument("-c", "--config", default=None, help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="config overrides such as solver.lr=0.005")
    t.add_argument("--train-json")
    t.add_argument("--train-images")
    t.add_argument("--val-json")
    t.add_argument("--val-images")
    t.add_argument("--method", choices=["boxinst", "sim", "full"])
    t.add_argument("--out")
    t.add_argument("--max-iters", type=int)
    t.add_argument("--device")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--viz-paste", type=int, metavar="N",
                   help="(sim) save the first N copy-paste composites with their updated boxes to OUT/paste_viz/")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="box and mask AP of a checkpoint on a COCO json with masks")
    e.add_argument("checkpoint", help="a .pth file or a run folder")
    e.add_argument("--json", required=True)
    e.add_argument("--images", required=True)
    e.add_argument("--out", help="write the metrics as JSON here")
    e.add_argument("--device", default="auto")
    e.add_argument("--bf16", action="store_true", help="bf16 inference (model.infer_bf16): faster on CPUs with AVX-512 bf16 or AMX")
    e.add_argument("--skip-invalid", action="store_true")
    e.add_argument("--viz", type=int, default=0, metavar="N",
                   help="save N images with GT and predicted masks side by side, worst mask IoU first")
    e.add_argument("--viz-out", help="folder for --viz pictures (default: eval_viz/ beside --out, or ./eval_viz)")
    e.set_defaults(func=_eval)

    c = sub.add_parser("check", help="validate a COCO json and its images; list every problem (exit 1 if any)")
    c.add_argument("json")
    c.add_argument("--images", required=True)
    c.add_argument("--no-clip", action="store_true", help="report boxes partly outside the image instead of clipping them")
    c.set_defaults(func=_check)

    pr = sub.add_parser("predict", help="overlay pictures and a COCO results json for images or folders")
    pr.add_argument("checkpoint", help="a .pth file or a run folder")
    pr.add_argument("inputs", nargs="+")
    pr.add_argument("--out", required=True)
    pr.add_argument("--score-thresh", type=float, default=0.3)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--bf16", action="store_true", help="bf16 inference (model.infer_bf16): faster on CPUs with AVX-512 bf16 or AMX")
    pr.set_defaults(func=_predict)

    pl = sub.add_parser("pseudo-label", help="a mask for every GT box of a COCO json (for any downstream model)")
    pl.add_argument("checkpoint", help="a .pth file or a run folder")
    pl.add_argument("--json", required=True, help="COCO json with the boxes")
    pl.add_argument("--images", required=True)
    pl.add_argument("--out", required=True, help="the same json with RLE masks added")
    pl.add_argument("--mask-thresh", type=float, default=0.5)
    pl.add_argument("--min-quality", type=float, default=0.0,
                    help="flag masks whose mean probability is below this (pseudo_low_quality)")
    pl.add_argument("--device", default="auto")
    pl.set_defaults(func=_pseudo_label)

    cv = sub.add_parser(
        "convert", help="Pascal VOC / YOLO / LabelMe boxes to a COCO json",
        description="Pascal VOC / YOLO / LabelMe boxes to a COCO json. Category ids: with --categories-from, that "
                    "json's ids; else with --names, the name's index + 1 (for YOLO the class index + 1); else "
                    "(VOC, LabelMe) the labels found in sorted order, 1 first. Give every split of one dataset the "
                    "same --names (or --categories-from) so that their jsons share ids. Boxes past the image edge "
                    "are clipped and counted; the json is written only when every file was read without error.")
    cv.add_argument("src", help="VOC: folder of .xml (or one file); YOLO: folder of .txt labels; LabelMe: folder of "
                                ".json (or one file)")
    cv.add_argument("--from", dest="fmt", required=True, choices=["voc", "yolo", "labelme"], help="the input format")
    cv.add_argument("--out", required=True, metavar="FILE", help="the COCO json to write")
    cv.add_argument("--images", metavar="DIR", help="the images folder. YOLO: the images of the labels (default: the data.yaml's "
                                     "train/val/test folder whose labels these are, or images/ beside labels/); VOC: "
                                     "where to read image sizes missing from the XML (default: <path>, beside the "
                                     "XML, ../JPEGImages)")
    cv.add_argument("--names", metavar="FILE", help="class names: a text file with one name per line (class 0 first), or an "
                                    "Ultralytics data.yaml (its 'names' list or {0: name} mapping). Required for YOLO; "
                                    "for VOC and LabelMe it fixes the category order (a label not in it is an error)")
    cv.add_argument("--categories-from", metavar="JSON", help="reuse the category ids and names of an existing COCO "
                                                              "json (a label not in it is an error)")
    cv.add_argument("--difficult", choices=["keep", "crowd"], help="(voc) difficult objects: 'keep' them as objects "
                                                                  "marked attributes.difficult (default), or write them "
                                                                  "as 'crowd' regions (iscrowd 1: ignored by evaluation, "
                                                                  "not trained on)")
    cv.set_defaults(func=_convert)

    ex = sub.add_parser("export", help="the inference model as ONNX (dynamic image size)")
    ex.add_argument("checkpoint", help="a .pth file or a run folder")
    ex.add_argument("--onnx", required=True, help="output .onnx file")
    ex.set_defaults(func=_export)

    rp = sub.add_parser("report", help="one HTML page with a run's curves, metrics, config and predictions")
    rp.add_argument("run", help="a run folder (finished or in progress)")
    rp.add_argument("--out", help="where to write the page (default: RUN/report.html)")
    rp.add_argument("--pictures", type=int, default=4, help="validation images to show with predictions")
    rp.add_argument("--device", default="cpu")
    rp.set_defaults(func=_report)

    for sp in (s, t, e, c, pr, pl, rp):
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere on the train command line (argparse only takes one run of
    # positionals, so the ones after an option arrive here as unknown)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command == "train" and all("=" in u and not u.startswith("-") for u in unknown):
            args.overrides = list(args.overrides) + unknown
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="[boxmask] %(message)s")
    logging.getLogger("boxmask").setLevel(logging.INFO)
    from .data.coco import DatasetError
    from .engine.checkpoint import CheckpointError
    from .engine.trainer import TrainingError, TrainingInterrupted
    from .modeling.backbone import WeightsError

    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"boxmask: {e}", file=sys.stderr)
        return 130
    except (ConfigError, DatasetError, CheckpointError, TrainingError, WeightsError) as e:
        print(f"boxmask: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk, a vanished file: what and where, in one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"boxmask: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
