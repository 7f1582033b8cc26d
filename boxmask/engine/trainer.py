"""The training loop: data, model, optimiser, schedule, AMP, logging, checkpoints, evaluation."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import logging.handlers
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config, ConfigError, check_device, from_dict, scale_for_batch, to_dict, validate
from ..data.batch import TrainDataset, TrainSampler, batch_to, collate
from ..data.coco import CocoDataset, DatasetError
from ..evaluation.coco_eval import format_table
from ..evaluation.diagnostics import ap_gap_warning, degenerate_warning, fill_and_spill_from_logits, short_run_warning, spill_warning
from ..evaluation.evaluator import box_fill, gt_box_mask_quality, predict_dataset, score
from ..modeling.condinst import CondInst
from ..modeling.criterion import hard_targets_on, pairwise_cut_on, sim_switched_on, total_loss
from ..modeling.sim.method import SIM
from ..atomic_io import atomic_write_text
from ..visualize import grid
from .events import EventWriter, paste_picture, prediction_pictures, sim_pictures
from . import distributed as ddp
from .checkpoint import CheckpointError, load_checkpoint, load_latest_good, run_checkpoints, save_checkpoint
from .interrupt import StopRequest
from .run_folder import (RunFolderError, RunLock, check_fresh_out, holds_run, metrics_lines, resume_config,
                         saved_config)

log = logging.getLogger("boxmask")


class TrainingError(RuntimeError):
    pass


class TrainingInterrupted(TrainingError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (the CLI exits 130)."""


def resolve_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    s = cfg.solver
    decay, no_decay, ctrl = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head.controller."):
            ctrl.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)  # norms, biases and scales
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": ctrl, "weight_decay": s.weight_decay, "lr_mult": s.controller_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = s.lr * g["lr_mult"]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)
    return torch.optim.AdamW(groups, lr=s.lr)


def lr_factor(cfg: Config, it: int) -> float:
    s = cfg.solver
    warm = 1.0
    if it < s.warmup_iters:
        alpha = it / max(s.warmup_iters, 1)
        warm = s.warmup_factor * (1 - alpha) + alpha
    if s.scheduler == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * it / s.max_iters))
    drops = sum(it >= int(round(f * s.max_iters)) if f <= 1 else it >= f for f in s.steps)
    return warm * s.gamma**drops


def build_model(cfg: Config, num_classes: int) -> CondInst:
    # Channels-last weights: faster convolutions for inference on the CPU (~25% for the SIM teacher's
    # pass), with AMP on CUDA, and no slower for CPU training. The EMA teacher copies the layout, so its
    # update stays a plain elementwise pass (a layout mismatch made it ~20x slower).
    return CondInst(cfg, num_classes).to(memory_format=torch.channels_last)


def _error_text(e: Exception) -> str:
    """A load_state_dict error on one line: its first two lines name the module and the keys or shapes."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    return " ".join(lines[:2])[:240]


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint file or a run folder."""
    state = load_checkpoint(path)
    where = path if Path(path).is_file() else f"the checkpoint of {path}"
    names = state["class_names"]
    if not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: 'class_names' is not a list of category names")
    try:
        cfg = from_dict(state["config"])
        validate(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{where}: its config is invalid: {e}") from None
    cfg.model.weights = "none"  # the checkpoint holds the weights
    model = build_model(cfg, len(names))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: its weights do not fit its own config: {_error_text(e)}") from None
    model.to(device).eval()
    return model, state


def sim_from_checkpoint(model, state: dict, device: torch.device | str = "cpu") -> SIM | None:
    """SIM's teacher and prototypes saved with a sim run (None for other methods)."""
    if "sim" not in state:
        return None
    sim = SIM(model.cfg, model, len(state["class_names"]))
    try:
        sim.load_state_dict(state["sim"])
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's SIM state (teacher, prototypes, bank) does not fit: {_error_text(e)}") from None
    return sim.to(device).eval()


def _autocast(cfg: Config, device: torch.device):
    if device.type == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    if device.type == "cpu" and cfg.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16
    return contextlib.nullcontext(), None


class _EarlyLines(logging.handlers.MemoryHandler):
    """Holds the lines logged before RUN/log.txt can exist (batch scaling, datasets, supervision)."""


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("boxmask")
    for early in [h for h in logger.handlers if isinstance(h, _EarlyLines)]:
        early.setTarget(handler)
        early.flush()
        logger.removeHandler(early)
    logger.addHandler(handler)
    return handler


def same_categories(state: dict, dataset: CocoDataset) -> bool:
    """Whether a checkpoint and a json have the same categories (ids and names, in order)."""
    return state.get("cat_ids") == dataset.cat_ids and state.get("class_names") == dataset.class_names


def check_categories(state: dict, dataset: CocoDataset, json_path) -> None:
    """A checkpoint only fits a json with the same categories."""
    if not same_categories(state, dataset):
        raise ConfigError(
            f"{json_path} has categories {dict(zip(dataset.cat_ids, dataset.class_names))}, but the checkpoint was "
            f"trained on {dict(zip(state.get('cat_ids', []), state.get('class_names', [])))}; to fine-tune on new "
            "categories, start training from it with model.init_from=CKPT model.reinit_classifier=true")


def init_from_checkpoint(model: CondInst, cfg: Config, train_set: CocoDataset) -> None:
    """Start from a boxmask checkpoint's weights (model.init_from). Other categories are refused unless
    model.reinit_classifier: then the class logits layer keeps its fresh initialisation."""
    path = Path(cfg.model.init_from)
    state = load_checkpoint(path)
    weights = state["model"]
    if not same_categories(state, train_set):
        if not cfg.model.reinit_classifier:
            check_categories(state, train_set, cfg.data.train_json)
        weights = {k: v for k, v in weights.items() if not k.startswith("head.cls_logits.")}
        log.info("init from %s: classifier re-initialised for %d categories", path, len(train_set.cat_ids))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    bad = [k for k in missing if not k.startswith("head.cls_logits.")] + list(unexpected)
    if bad:
        raise ConfigError(f"{path} does not match this model ({len(bad)} keys differ, e.g. {bad[:3]}); "
                          "check model.backbone and the other model.* settings")
    log.info("initialised from %s", path)


def uses_gt_masks(cfg: Config, train_set: CocoDataset) -> bool:
    """Whether training batches carry GT masks: method full, or masks in the json with data.gt_masks=use."""
    return cfg.method == "full" or (cfg.data.gt_masks == "use" and train_set.has_masks)


def load_datasets(cfg: Config) -> tuple[CocoDataset, CocoDataset | None]:
    d = cfg.data
    if not d.train_json or not d.train_images:
        raise ConfigError("training needs data.train_json and data.train_images (or --train-json/--train-images)")
    train = CocoDataset(d.train_json, d.train_images, d.skip_invalid, d.clip_boxes, require_masks=cfg.method == "full")
    log.info("train %s: %s", d.train_json, train.report.summary())
    if cfg.method == "full" and not train.has_masks:
        raise ConfigError(f"method 'full' needs masks ('segmentation') in {d.train_json}")
    with_mask, box_only = train.mask_counts()
    if cfg.method == "full":
        log.info("supervision: %d objects mask-supervised (method full)", with_mask)
    elif d.gt_masks == "use":
        log.info("supervision: %d objects mask-supervised (their GT masks), %d box-supervised", with_mask, box_only)
    else:
        log.info("supervision: %d objects box-supervised (data.gt_masks=ignore: %d GT masks unused)",
                 with_mask + box_only, with_mask)
    val = None
    if d.val_json:
        val = CocoDataset(d.val_json, d.val_images or d.train_images, d.skip_invalid, d.clip_boxes)
        log.info("val %s: %s", d.val_json, val.report.summary())
        if val.cat_ids != train.cat_ids:
            raise ConfigError(f"{d.val_json} has other categories than {d.train_json}")
    return train, val


def evaluate_model(model, dataset: CocoDataset, cfg: Config, device: torch.device, progress: bool = True,
                   sim: SIM | None = None, mask_quality: bool = False, results_out: list | None = None) -> dict:
    """AP (pycocotools), matched-mask IoU and box fill; with ``mask_quality`` (a json with GT masks) also
    the IoU of the masks made for the GT boxes: the model's, and SIM's pseudo masks when ``sim`` is given."""
    # under DDP each rank predicts its share of the images; rank 0 scores them all
    results = predict_dataset(model, dataset, cfg.data.min_size_test, cfg.data.max_size, device,
                              progress=progress, size_divisibility=cfg.data.size_divisibility,
                              shard=(ddp.rank(), ddp.world_size()))
    results = ddp.gather_lists(results)
    if not ddp.is_main():
        return {}
    if results_out is not None:
        results_out.extend(results)
    metrics = score(dataset, results)
    metrics["box_fill"], metrics["box_fill_over_95"] = box_fill(results)
    if mask_quality and dataset.has_masks:
        metrics["gt_box_masks"] = gt_box_mask_quality(model, dataset, cfg, device, sim, progress)
    return metrics


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``cfg.out``; returns the final evaluation metrics (empty without val data, and
    on ranks other than 0). Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the
    process group, trains its share of each global batch with DDP, and only rank 0 writes."""
    created, local_rank = ddp.init_from_env(cfg.device)
    early = _EarlyLines(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    logging.getLogger("boxmask").addHandler(early)
    try:
        return _train(cfg, resume, progress, local_rank)
    finally:
        logging.getLogger("boxmask").removeHandler(early)
        if created:
            torch.distributed.destroy_process_group()


def _train(cfg: Config, resume: bool, progress: bool, local_rank: int) -> dict:
    run_dir = Path(cfg.out)
    # A fresh run never starts in a folder that holds one (whatever state its pointer is in), and a resumed
    # run needs one; checked again under the run lock below, before anything is written.
    if not resume and holds_run(run_dir):
        raise TrainingError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    if resume and not holds_run(run_dir):
        raise TrainingError(f"--resume: no run in {run_dir} (no checkpoint and no config.yaml)")
    if not resume:
        try:
            check_fresh_out(run_dir, [cfg.data.train_images, cfg.data.val_images])
        except RunFolderError as e:
            raise TrainingError(str(e)) from None
    world, main = ddp.world_size(), ddp.is_main()
    ddp.barrier()  # every rank has looked at RUN/ before rank 0 writes into it
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
    if not main:
        progress = False
        logging.getLogger("boxmask").setLevel(logging.ERROR)  # rank 0 speaks for the run
    cfg, scaling = scale_for_batch(cfg, world)
    # a resumed run trains with its own (already scaled) config: the command line's scaling is not its news
    notes = [scaling] if scaling and not resume else []
    state, existing, problems = None, None, []
    if resume:
        if run_checkpoints(run_dir) or (run_dir / "last_checkpoint").exists():
            existing, state, problems = load_latest_good(run_dir)
        # the run's own configuration governs; the command line may only change what RESUME_MAY_CHANGE lists
        try:
            cfg, changed, kept = resume_config(saved_config(run_dir, state), cfg)
        except RunFolderError as e:
            raise TrainingError(str(e)) from None
        if changed:
            notes.append("resume: from the command line: " + "; ".join(changed))
        if kept:
            notes.append("resume: the run's own values kept for: " + "; ".join(kept))
        if state is None:
            notes.append("resume: the run has no checkpoint yet (stopped before the first); starting it again "
                         "from iteration 0 with its own config")
    for note in notes:
        log.info("%s", note)
    seed_everything(cfg.seed, cfg.deterministic)
    # Everything that can fail on the user's input is checked before RUN/ is written.
    train_set, val_set = load_datasets(cfg)
    model = build_model(cfg, len(train_set.cat_ids))
    if cfg.model.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.model.init_from and not resume:
        init_from_checkpoint(model, cfg, train_set)
    # SIM's teacher starts as a copy of the student (restored below when resuming).
    sim = SIM(cfg, model, len(train_set.cat_ids)).to(device) if cfg.method == "sim" else None
    optimizer = build_optimizer(model, cfg)
    start_iter = 0
    if state is not None:
        for msg in problems:
            log.warning("%s; resuming from %s instead", msg, existing.name)
        check_categories(state, train_set, cfg.data.train_json)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"{existing} does not fit this model or optimiser: {_error_text(e)}") from None
        if sim is not None:
            if "sim" not in state:
                raise TrainingError(f"{existing} holds no SIM state (teacher, prototypes); it was not a sim run")
            sim.load_state_dict(state["sim"])
        start_iter = int(state["iteration"])
    autocast, amp_dtype = _autocast(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if state is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if state is not None and "rng" in state:
        _set_rng(state["rng"])

    handler, lock = None, None
    try:
        if main:
            created = not run_dir.exists()
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = RunLock(run_dir).acquire()
            except (OSError, RunFolderError) as e:
                if created and run_dir.is_dir() and not any(run_dir.iterdir()):
                    run_dir.rmdir()
                raise TrainingError(str(e) if isinstance(e, RunFolderError) else f"cannot write {run_dir}: {e}") from None
            # another process may have started a run here between the first check and the lock
            if not resume and holds_run(run_dir):
                raise TrainingError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
            if resume:
                _truncate_metrics(run_dir / "metrics.jsonl", start_iter)
            handler = _setup_logging(run_dir)  # the lines logged so far (notes, datasets) go into log.txt too
        if main and not resume:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log.info("%s: %d classes %s, device %s%s, %s from iteration %d to %d",
                 cfg.method, len(train_set.cat_ids), train_set.class_names, device,
                 f", {world} processes x {cfg.solver.ims_per_batch} images" if world > 1 else "",
                 "resuming" if resume else "training", start_iter, cfg.solver.max_iters)
        try:
            return _loop(cfg, model, sim, optimizer, scaler, autocast, device, train_set, val_set, start_iter, run_dir,
                         progress, (state or {}).get("nonfinite_skipped", 0))
        except DatasetError as e:
            raise DatasetError(f"{e} (found during training; `boxmask check` decodes every image first; {run_dir} "
                               "keeps the run so far: fix the data, then continue with --resume)") from None
    finally:
        if handler is not None:
            logging.getLogger("boxmask").removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop the records a killed run wrote after the checkpoint it resumes from (they are redone), so the
    metrics of a resumed run equal an uninterrupted run's; a torn last line (or any malformed one) goes too."""
    if not path.is_file():
        return
    keep = [line for line, rec in metrics_lines(path) if rec.get("iteration", 0) <= iteration]
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values (the checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng(s: dict) -> None:
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def train_fill(aux: dict, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box fill of the masks the mask head predicts for the positives (mean, fraction > 95%) and their
    spill (area outside the box / box area): a mask covering the whole image fills its box too."""
    from ..modeling.condinst import box_masks_on_grid

    logits = aux["mask_logits"]
    boxes = aux.get("box_masks")
    if boxes is None:
        boxes = box_masks_on_grid(aux["inst"]["box"], logits.shape[-2], logits.shape[-1], stride)
    return fill_and_spill_from_logits(logits, boxes)


@torch.no_grad()
def write_pictures(events: EventWriter, batch: dict, aux: dict, sim, cfg: Config, class_names: list[str], it: int) -> None:
    """TensorBoard pictures of this training step (rank 0; a no-op when TensorBoard is off)."""
    if events.writer is None:
        return
    stride = cfg.model.mask_out_stride
    pic = prediction_pictures(batch, aux, stride, class_names)
    if pic is not None:
        events.image("train/predicted_masks", pic, it)
    if sim is not None and aux["mask_logits"].shape[0]:
        pic = sim_pictures(batch, sim.pseudo_masks(batch, aux), stride)
        if pic is not None:
            events.image("train/sim_maps", pic, it)
    if "region_masks_padded" in batch:
        pasted = [i for i, t in enumerate(batch["targets"]) if bool(t["pasted"].any())][:4]
        events.image("train/copy_paste", grid([paste_picture(batch, i, class_names) for i in pasted]), it)


def save_paste_pictures(batch: dict, folder: Path, iteration: int, class_names: list[str], limit: int) -> int:
    """Save up to ``limit`` copy-paste composites of ``batch``; returns how many were written."""
    from ..visualize import picture_path, save_png

    written = 0
    for i, t in enumerate(batch["targets"]):
        if written >= limit:
            break
        if bool(t["pasted"].any()):
            # image ids come from the dataset (strings allowed): made safe for a file name
            path = picture_path(folder, f"iter{iteration:07d}", f"img{batch['image_ids'][i]}")
            save_png(path, paste_picture(batch, i, class_names))
            written += 1
    return written


def _loop(cfg, model, sim, optimizer, scaler, autocast, device, train_set, val_set, start_iter, run_dir, progress,
          nonfinite_start: int = 0) -> dict:
    s = cfg.solver
    bs = s.ims_per_batch
    # each rank takes its slice of every global batch (the sampler is a function of seed and iteration)
    sampler = TrainSampler(len(train_set), bs, cfg.seed, start_iter, s.max_iters, ddp.rank(), ddp.world_size())
    workers = cfg.data.num_workers
    loader = DataLoader(
        TrainDataset(train_set, cfg.data.min_size_train, cfg.data.max_size, cfg.data.hflip, uses_gt_masks(cfg, train_set)),
        batch_sampler=sampler, num_workers=workers,
        collate_fn=functools.partial(collate, size_divisibility=cfg.data.size_divisibility),
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    metrics_path = run_dir / "metrics.jsonl"

    def write_metrics(rec: dict) -> None:
        if ddp.is_main():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint(it: int, nonfinite: int) -> None:
        if ddp.world_size() > 1:
            # the student's parameters (its BatchNorm statistics are per rank, as under any DDP), the whole
            # teacher and the prototypes
            tensors = list(model.parameters()) + (list(sim.state_dict().values()) if sim else [])
            diff = ddp.ranks_differ([t for t in tensors if torch.is_tensor(t) and t.is_floating_point()])
            if diff > 0:
                raise TrainingError(f"iteration {it}: the ranks' weights, teacher or prototypes differ (by {diff:.3g})")
            log.info("iteration %d: all %d ranks hold the same weights, teacher and prototypes", it, ddp.world_size())
        if not ddp.is_main():
            return
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "iteration": it, "config": to_dict(cfg), "class_names": train_set.class_names,
            "cat_ids": train_set.cat_ids, "rng": _rng_state(), "nonfinite_skipped": nonfinite,
        }
        if sim is not None:
            state["sim"] = sim.state_dict()
        save_checkpoint(run_dir, f"model_{it:07d}.pth", state, cfg.keep_checkpoints)

    events = EventWriter(run_dir, cfg.tensorboard, start_iter)
    try:
        with StopRequest() as stop:
            return _train_steps(cfg, model, sim, optimizer, scaler, autocast, device, train_set, val_set, start_iter,
                                run_dir, progress, nonfinite_start, loader, write_metrics, checkpoint, events, stop)
    finally:
        events.close()


def _train_steps(cfg, model, sim, optimizer, scaler, autocast, device, train_set, val_set, start_iter, run_dir,
                 progress, nonfinite_start, loader, write_metrics, checkpoint, events, stop: StopRequest) -> dict:
    s = cfg.solver
    bs = s.ims_per_batch * ddp.world_size()  # images per step, all ranks together
    main = ddp.is_main()
    runner = model
    if ddp.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a batch without objects leaves the mask branch out of the graph
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=True)

    def run_eval(it: int) -> dict:
        if val_set is None:
            return {}
        m = evaluate_model(model, val_set, cfg, device, progress)
        if not main:
            return {}
        write_metrics({"type": "eval", "iteration": it, "images_seen": it * bs, **m})
        events.scalars("eval", m, it)
        log.info("iteration %d (%d images seen)\n%s", it, it * bs, format_table(m))
        if it == s.max_iters and ap_gap_warning(m, short_run=short):
            log.warning("%s", ap_gap_warning(m, short_run=short))
        return m

    model.train()
    sums: dict[str, float] = {}
    count = 0
    t_last = time.perf_counter()
    final: dict = {}
    bar = tqdm(total=s.max_iters, initial=start_iter, desc="train", disable=not progress, dynamic_ncols=True)
    it = start_iter
    viz_left = cfg.sim.viz_paste if sim is not None else 0
    # the fill check starts well after the pairwise warm-up: masks are box-shaped until the term bites
    fill_check_from = (max(2 * cfg.loss.pairwise_warmup_frac, 0.3) * s.max_iters) if cfg.method != "full" else float("inf")
    high_windows, fill_warned = 0, False
    short = short_run_warning(s.max_iters, bs, len(train_set)) if cfg.method != "full" else None
    if short and main and start_iter == 0:
        log.warning("%s", short)
    nonfinite = int(nonfinite_start)
    for batch in loader:
        for g in optimizer.param_groups:
            g["lr"] = s.lr * g["lr_mult"] * lr_factor(cfg, it)
        batch = batch_to(batch, device)
        if sim is not None:
            batch = sim.prepare_batch(batch, it, cfg.seed)
            if viz_left > 0 and main and "region_masks_padded" in batch:
                viz_left -= save_paste_pictures(batch, run_dir / "paste_viz", it, train_set.class_names, viz_left)
        stats: dict = {}
        with autocast:
            losses, aux = runner(batch, return_aux=True)
            if sim is not None:
                extra, stats = sim.losses(batch, aux, pseudo_on=sim_switched_on(cfg, it),
                                          cut_on=pairwise_cut_on(cfg, it), hard_on=hard_targets_on(cfg, it))
                losses.update(extra)
        stats["box_fill"], stats["box_fill_over_95"], stats["box_spill"] = train_fill(aux, cfg.model.mask_out_stride)
        if cfg.tb_image_period and it % cfg.tb_image_period == 0:
            write_pictures(events, batch, aux, sim, cfg, train_set.class_names, it)
        del aux
        losses = {k: v.float() for k, v in losses.items()}
        loss = total_loss(losses, cfg, it)
        finite = torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        # backward is queued before the host reads the finite flag, so a GPU keeps working meanwhile
        scaler.scale(loss).backward()
        if not ddp.all_ranks_true(bool(finite)):  # every rank skips, or none does
            nonfinite += 1
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            if nonfinite > s.nonfinite_skips:
                checkpoint(it, nonfinite)
                raise TrainingError(
                    f"non-finite loss at iteration {it} (images {batch['image_ids']}): {terms}; "
                    f"{nonfinite} such steps, more than solver.nonfinite_skips={s.nonfinite_skips}. Checkpoint "
                    f"saved in {run_dir}; lower solver.lr or check these images")
            log.warning("non-finite loss at iteration %d (images %s): %s; step skipped (%d of %d allowed)",
                        it, batch["image_ids"], terms, nonfinite, s.nonfinite_skips)
            optimizer.zero_grad(set_to_none=True)
            it += 1
            bar.update(1)
            continue
        if s.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if sim is not None:
            sim.after_step(model)
        it += 1
        for k, v in list(losses.items()) + list(stats.items()):
            if k in stats:  # NaN where nothing was measured (no instances...): average over the steps that had some
                ok = torch.isfinite(v)
                sums[k] = sums.get(k, 0.0) + torch.where(ok, v, torch.zeros_like(v))
                sums[k + "#n"] = sums.get(k + "#n", 0.0) + ok.float()
            else:
                sums[k] = sums.get(k, 0.0) + v.detach()
        sums["loss"] = sums.get("loss", 0.0) + loss.detach()
        count += 1
        bar.update(1)
        if it % cfg.log_period == 0 or it == s.max_iters:
            now = time.perf_counter()
            sums = ddp.mean_over_ranks(sums)  # logged values: the mean over the ranks
            rec = {k: float(v) / count for k, v in sums.items() if not k.endswith("#n") and k + "#n" not in sums}
            for k in [k[:-2] for k in sums if k.endswith("#n")]:
                n = float(sums[k + "#n"])
                rec[k] = float(sums[k]) / n if n > 0 else float("nan")
            # One warning if the masks still spill outside or fill their boxes in two log windows after the
            # pairwise warm-up (a spilling mask fills its box too: spill is checked first).
            if it > fill_check_from and not fill_warned:
                warning = (spill_warning(rec["box_spill"], rec["box_fill"], short)
                           or degenerate_warning(rec["box_fill"], cfg.loss.fill_warn, short))
                high_windows = high_windows + 1 if warning else 0
                if high_windows >= 2:
                    log.warning("%s", warning)
                    fill_warned = True
            rec.update(type="train", iteration=it, images_seen=it * bs, lr=optimizer.param_groups[0]["lr"],
                       sec_per_iter=(now - t_last) / count)
            write_metrics(rec)
            events.scalars("train", {k: v for k, v in rec.items() if k not in ("type", "iteration")}, it)
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in rec.items() if k.startswith("loss")})
            # Without a progress bar, the log carries the progress.
            (log.debug if progress else log.info)(
                "iteration %d/%d  %s  lr %.2e  %.2f s/it", it, s.max_iters,
                "  ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in rec.items() if k.startswith("loss")),
                rec["lr"], rec["sec_per_iter"])
            sums, count, t_last = {}, 0, now
        if it % cfg.checkpoint_period == 0 and it < s.max_iters:
            checkpoint(it, nonfinite)
        if cfg.eval_period and it % cfg.eval_period == 0 and it < s.max_iters:
            run_eval(it)
        stop_now = stop.requested is not None
        if ddp.world_size() > 1:  # every rank stops at the same step
            stop_now = not ddp.all_ranks_true(not stop_now)
        if stop_now and it < s.max_iters:
            checkpoint(it, nonfinite)
            bar.close()
            raise TrainingInterrupted(f"stopped by {stop.requested or 'another rank'} at iteration {it} of {s.max_iters}: "
                                      f"checkpoint saved in {run_dir}; continue with --resume")
    bar.close()
    checkpoint(it, nonfinite)
    final = run_eval(it)
    if final and main:
        atomic_write_text(run_dir / "metrics.json", json.dumps({"iteration": it, "images_seen": it * bs, **final}, indent=2))
    return final
