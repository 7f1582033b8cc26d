"""Typed configuration: every default lives here; YAML files and ``key=value`` overrides change it."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class DataConfig:
    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    # Shorter side for training is drawn from this list (multi-scale); max_size bounds the longer side.
    min_size_train: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    min_size_test: int = 800
    max_size: int = 1333
    hflip: float = 0.5
    # ImageNet statistics (RGB, 0-255), as torchvision's pretrained weights expect.
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32
    num_workers: int = 0
    # Invalid images/annotations: error out (default) or log and skip them.
    skip_invalid: bool = False
    # Boxes partly outside the image are clipped; boxes fully outside are invalid.
    clip_boxes: bool = True
    # Annotations that carry a mask ('segmentation') in a box-supervised run (boxinst/sim): use = that
    # object is mask-supervised (Dice, as method full; SIM takes it as the object's best mask), box-only
    # objects keep the box losses; ignore = every object is box-only.
    gt_masks: str = "use"


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | mobilenet_v2
    # none | path to a .pth state dict | a torchvision weights enum name such as "ResNet50_Weights.IMAGENET1K_V1"
    weights: str = "none"
    # Fine-tuning: start from a boxmask checkpoint (a .pth or a run folder); a json with other categories
    # is refused unless reinit_classifier (then only the class logits layer starts fresh).
    init_from: str = ""
    reinit_classifier: bool = False
    # Under DDP (torchrun), BatchNorm layers (model.norm=bn) as SyncBatchNorm: statistics over the global batch.
    sync_bn: bool = False
    norm: str = "frozen_bn"  # frozen_bn | bn  (backbone normalisation)
    freeze_at: int = 2  # 0 = train everything; 1 = freeze the stem; 2 = stem + first stage
    fpn_channels: int = 256
    head_convs: int = 4
    head_norm: str = "gn"  # gn | none
    num_classes: int = 0  # 0 = taken from the training json
    fpn_strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    sizes_of_interest: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    center_sampling_radius: float = 1.5
    prior_prob: float = 0.01
    # Mask branch and dynamic mask head (CondInst).
    mask_branch_channels: int = 128
    mask_branch_convs: int = 4
    mask_out_channels: int = 8
    mask_head_channels: int = 8
    mask_head_layers: int = 3
    mask_out_stride: int = 4
    max_proposals_per_image: int = 64  # positives per image fed to the mask head (top-k per GT)
    # How the controller starts: "shared" = every instance begins with one well-scaled MLP (its bias),
    # "condinst" = the original init (weights N(0, 0.01), bias 0), kept for comparison.
    mask_head_init: str = "shared"
    # Inference.
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    pre_nms_topk: int = 1000
    detections_per_image: int = 100
    mask_thresh: float = 0.5
    # Inference (eval, predict) under bf16 autocast: faster on CPUs with AVX-512 bf16 or AMX and on GPUs.
    infer_bf16: bool = False


@dataclass
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_weight: float = 1.0
    # BoxInst pairwise term.
    pairwise_size: int = 3
    pairwise_dilation: int = 2
    pairwise_color_thresh: float = 0.3
    pairwise_weight: float = 1.0
    # Pairwise weight ramps linearly over this fraction of the schedule (10k of 90k in the paper's 1x).
    pairwise_warmup_frac: float = 0.111
    # Pixels this many rows at the bottom of each image take no part in the colour pairs (BoxInst: 10).
    bottom_pixels_removed: int = 10
    # Warn once if the predicted masks still fill more than this share of their boxes (mean box fill)
    # in two log windows after the pairwise warm-up; 0 = never.
    fill_warn: float = 0.9


@dataclass
class SimConfig:
    """SIM (method: sim). Defaults follow the paper (spec section 7); the released code's choices are switches."""
    ema_momentum: float = 0.9999  # EMA teacher
    # ema: the teacher runs its own (EMA) backbone (paper); student: its EMA heads and mask branch run on
    # the student's FPN features, saving the teacher's backbone pass (~20% of a CPU training step)
    teacher_backbone: str = "ema"
    num_prototypes: int = 10  # L per class
    tau: float = 1.0  # M_S temperature: 1.0 = released code (thresholds tuned for it), 0.1 = paper Eq. 1
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    proto_momentum: float = 0.999  # gamma
    proto_pixels: str = "pseudo"  # pseudo = M_hat foreground (paper) | mi = teacher M_I > fg_thresh (code)
    semantic: bool = True  # use the semantic map M_S (and update prototypes)
    self_correction: bool = True  # use the instance map M_I in the fusion
    weighting: str = "iou"  # iou = softmax(mu * IoU) over an object's positives (paper) | mean (code)
    mu: float = 5.0
    alpha: float = 0.5  # fusion (1 - alpha) M_S + alpha M_I
    fg_thresh: float = 0.7  # confident M_I (sizes the adaptive threshold; prototype pixels with proto_pixels=mi)
    tau_high_min: float = 0.7
    tau_high_max: float = 0.8
    tau_low: float = 0.4
    pseudo_weight: float = 0.5  # lambda1
    pseudo_loss: str = "bce_dice"  # bce_dice (paper) | focal (code)
    warmup_frac: float = 0.111  # pseudo loss from this fraction of the schedule (10k of 90k)
    ramp_frac: float = 0.0  # then ramps linearly over this fraction (0 = on at once)
    pairwise_feat_sim: bool = False  # code-only: colour x teacher-feature similarity in the pairwise term
    pairwise_feat_thresh: float = 0.1
    # Online copy-paste (section 2.6): a FIFO bank of recent images with the teacher's paste masks, filled
    # after the warm-up; once full, each batch is pasted with probability paste_prob. The released code's
    # variant: bank_length=50 paste_fraction=0.5 paste_replacement=true paste_score_power=3.
    copy_paste: bool = True
    paste_prob: float = 0.5
    bank_length: int = 100
    paste_fraction: float = 0.25  # of a bank image's objects, clamped to [paste_min, paste_max]
    paste_min: int = 1
    paste_max: int = 3
    paste_replacement: bool = False
    paste_score_power: float = 1.0  # objects drawn in proportion to quality score ** power
    paste_weight: float = 1.0  # lambda2 (BCE + Dice on the pasted objects)
    viz_paste: int = 0  # save this many composite images (with their updated boxes) to RUN/paste_viz/


@dataclass
class SolverConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ims_per_batch: int = 16
    max_iters: int = 90000
    scheduler: str = "step"  # step | cosine
    # LR drops: values <= 1 are fractions of max_iters, larger values are iteration numbers.
    steps: list[float] = field(default_factory=lambda: [60000 / 90000, 80000 / 90000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 = off
    # The dynamic mask head's generated parameters learn with this multiple of the base LR (see modeling/fcos.py).
    controller_lr_mult: float = 1.0
    # The effective batch (images per process x processes) that lr and the schedule were tuned for. When the
    # run's effective batch differs, lr scales linearly and every iteration count (max_iters, absolute
    # steps, warmup_iters, checkpoint/eval periods) inversely; fractions of the schedule (warm-ups, SIM
    # switch-on points) follow max_iters. 0 or scale_to_batch=false: no scaling.
    reference_batch: int = 0
    scale_to_batch: bool = True
    # A step whose loss is NaN/inf is skipped (image ids logged) up to this many times in a run; one more
    # stops training with an error, after saving a checkpoint.
    nonfinite_skips: int = 3


@dataclass
class Config:
    method: str = "boxinst"  # boxinst | sim | full
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    out: str = "runs/train"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # autocast on CUDA (fp16 with grad scaler, or bf16 where supported)
    cpu_bf16: bool = False  # bf16 autocast on CPU
    seed: int = 0
    deterministic: bool = False
    log_period: int = 20
    checkpoint_period: int = 1000
    # TensorBoard event files in the run folder (scalars at every log period); pictures of training
    # images, SIM's maps and copy-paste composites every tb_image_period iterations (0 = none).
    tensorboard: bool = True
    tb_image_period: int = 0
    eval_period: int = 0  # 0 = evaluate at the end only
    keep_checkpoints: int = 2


METHODS = ("boxinst", "sim", "full")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return typ(value)
        if origin is list:
            (inner,) = typ.__args__
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(v, inner, key) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': cannot use {value!r} as {getattr(typ, '__name__', typ)}") from None
    return value


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it a mapping")
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    cfg = Config()
    _merge(cfg, d)
    return cfg


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (which may name a ``_base_`` file relative to itself) <- overrides."""
    cfg = Config()
    if path:
        for layer in _yaml_chain(Path(path)):
            _merge(cfg, layer)
    for ov in overrides or []:
        _merge(cfg, parse_override(ov))
    validate(cfg)
    return cfg


def _yaml_chain(path: Path, depth: int = 0) -> list[dict]:
    if depth > 8:
        raise ConfigError(f"{path}: _base_ chain too deep")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)
    chain = _yaml_chain((path.parent / base).resolve(), depth + 1) if base else []
    return chain + [data]


def validate(cfg: Config) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got '{cfg.method}'")
    if cfg.solver.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"solver.optimizer must be sgd or adamw, got '{cfg.solver.optimizer}'")
    if cfg.solver.scheduler not in ("step", "cosine"):
        raise ConfigError(f"solver.scheduler must be step or cosine, got '{cfg.solver.scheduler}'")
    if cfg.solver.max_iters < 1 or cfg.solver.ims_per_batch < 1:
        raise ConfigError("solver.max_iters and solver.ims_per_batch must be >= 1")
    if cfg.model.norm not in ("frozen_bn", "bn"):
        raise ConfigError(f"model.norm must be frozen_bn or bn, got '{cfg.model.norm}'")
    for key, value, allowed in (("sim.weighting", cfg.sim.weighting, ("iou", "mean")),
                                ("sim.proto_pixels", cfg.sim.proto_pixels, ("pseudo", "mi")),
                                ("sim.pseudo_loss", cfg.sim.pseudo_loss, ("bce_dice", "focal")),
                                ("sim.teacher_backbone", cfg.sim.teacher_backbone, ("ema", "student")),
                                ("data.gt_masks", cfg.data.gt_masks, ("use", "ignore"))):
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got '{value}'")
    if cfg.sim.bank_length < 1 or not 0.0 <= cfg.sim.paste_prob <= 1.0 or cfg.sim.paste_min > cfg.sim.paste_max:
        raise ConfigError("sim.bank_length must be >= 1, sim.paste_prob in [0, 1], sim.paste_min <= sim.paste_max")
    if not (cfg.sim.semantic or cfg.sim.self_correction):
        raise ConfigError("sim.semantic and sim.self_correction cannot both be off (no pseudo mask left)")
    if cfg.model.mask_head_init not in ("shared", "condinst"):
        raise ConfigError(f"model.mask_head_init must be shared or condinst, got '{cfg.model.mask_head_init}'")
    if len(cfg.model.sizes_of_interest) != len(cfg.model.fpn_strides) - 1:
        raise ConfigError("model.sizes_of_interest needs one entry fewer than model.fpn_strides")


def scale_for_batch(cfg: Config, world_size: int = 1) -> tuple[Config, str | None]:
    """The linear scaling rule (as detectron2's reference world size): returns the config to train with
    and a line saying what changed (None when nothing did)."""
    s = cfg.solver
    effective = s.ims_per_batch * world_size
    if not s.scale_to_batch or s.reference_batch <= 0 or effective == s.reference_batch:
        return cfg, None
    f = effective / s.reference_batch

    def iters(v: float) -> int:
        return max(int(round(v / f)), 1)

    new = copy.deepcopy(cfg)
    n = new.solver
    n.lr = s.lr * f
    n.max_iters = iters(s.max_iters)
    n.steps = [v if v <= 1 else iters(v) for v in s.steps]
    n.warmup_iters = int(round(s.warmup_iters / f))
    new.checkpoint_period = iters(cfg.checkpoint_period)
    new.eval_period = iters(cfg.eval_period) if cfg.eval_period else 0
    n.reference_batch = effective  # scaling the result again changes nothing
    msg = (f"batch scaling: effective batch {effective} ({s.ims_per_batch} x {world_size} processes) vs the "
           f"{s.reference_batch} this config was tuned for: lr {s.lr:g} -> {n.lr:g}, max_iters {s.max_iters} -> "
           f"{n.max_iters}, warmup_iters {s.warmup_iters} -> {n.warmup_iters}, steps {s.steps} -> {n.steps} "
           "(solver.scale_to_batch=false to turn off)")
    return new, msg
