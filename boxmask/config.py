"""Typed configuration: every default lives here; YAML files and ``key=value`` overrides change it."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

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
    # the FCOS towers' and the FPN output's 3x3 convolutions: full | separable (a depthwise 3x3 then a
    # pointwise 1x1, as in NanoDet and EfficientDet): about 1/8 of the multiply-adds at 256 channels, so a
    # wide FPN costs little more than a narrow one on a CPU
    head_conv: str = "full"
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
    """SIM (method: sim). Defaults follow the paper (spec section 7) except measured changes: no semantic
    map, instance competition in the pseudo label, soft pseudo targets, and the pairwise cut (widened by the
    texture split); the paper's and the released code's choices are switches."""
    ema_momentum: float = 0.9999  # EMA teacher
    # momentum min(ema_momentum, (1 + t) / (10 + t)) after t updates, so the teacher forgets its initial
    # (random-headed) weights within a few hundred steps whatever the momentum (mean-teacher practice)
    ema_warmup: bool = True
    # ema: the teacher runs its own (EMA) backbone (paper); student: its EMA heads and mask branch run on
    # the student's FPN features, saving the teacher's backbone pass (~20% of a CPU training step)
    teacher_backbone: str = "ema"
    num_prototypes: int = 10  # L per class
    tau: float = 1.0  # M_S temperature: 1.0 = released code (thresholds tuned for it), 0.1 = paper Eq. 1
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    proto_momentum: float = 0.999  # gamma
    proto_pixels: str = "pseudo"  # pseudo = M_hat foreground (paper) | mi = teacher M_I > fg_thresh (code)
    # Prototype pixel hygiene: also require teacher M_I > proto_confidence (0 = off), then erode the selected
    # region by proto_erode cells of the mask grid (0 = off); proto_from: start = update from iteration 0
    # (paper, code) | switch_on = only once the pseudo stage is on (past warmup_frac)
    proto_confidence: float = 0.0
    proto_erode: int = 0
    proto_from: str = "start"
    # Background prototypes learnt (Sinkhorn + EMA, like a class) from the pixels outside every box; with
    # semantic_softmax M_S = exp(s_c / tau) / (exp(s_c / tau) + exp(s_bg / tau)), s = the best similarity
    # among the object's class prototypes / the background prototypes (both keys go together)
    bg_prototypes: int = 0
    semantic_softmax: bool = False
    # a prototype's momentum warms up as min(proto_momentum, (1 + t) / (10 + t)) over its first t updates
    # (false: the paper's constant momentum, under which a short run's prototypes stay near their random start)
    proto_warmup: bool = False
    # use the semantic map M_S (and update prototypes). Off by default: on the textured benchmark it lowered
    # mask AP on every split over paired seeds, and class prototypes fitted on the true masks do not rank a
    # box's pixels better than M_I (benchmarks/results/sim_paired.md, semantic_probe.md). The paper's
    # formulation: sim.semantic=true sim.instance_competition=false sim.pairwise_pseudo_cut=false
    # sim.pseudo_target=hard
    semantic: bool = False
    self_correction: bool = True  # use the instance map M_I in the fusion
    # texture map M_T (texture_map.py): per object, sigmoid((cos(f, p_fg) - cos(f, p_bg)) / texture_tau) on
    # the student backbone's stride-8 features f (detached; whatever the teacher's backbone), p_fg / p_bg the
    # mean of the object's confident cells / of its confident in-box background and a 4-cell ring outside
    # the box; fused as (1 - texture_weight) P + texture_weight M_T before the pseudo label's thresholds.
    # Off: screened on the textured benchmark, it gained on near-colour objects and lost on plain ones
    # (README, SIM)
    texture_map: bool = False
    texture_weight: float = 0.25
    texture_tau: float = 0.1
    # instance competition: a box pixel where another object of the image has the more confident instance
    # map (its M_I > fg_thresh and above this object's) is background in this object's pseudo label
    # (on by default: +7 mask AP on same-class overlaps over paired seeds)
    instance_competition: bool = True
    weighting: str = "iou"  # iou = softmax(mu * IoU) over an object's positives (paper) | mean (code)
    mu: float = 5.0
    alpha: float = 0.5  # fusion (1 - alpha) M_S + alpha M_I
    fg_thresh: float = 0.7  # confident M_I (sizes the adaptive threshold; prototype pixels with proto_pixels=mi)
    tau_high_min: float = 0.7
    tau_high_max: float = 0.8
    tau_low: float = 0.4
    pseudo_weight: float = 0.5  # lambda1
    pseudo_loss: str = "bce_dice"  # bce_dice (paper) | bce (BCE alone) | focal (code)
    # which of the box's confident pixels the pseudo loss supervises: all (paper) | background (only those
    # the pseudo label makes background: the box's foreground is left to the projection and pairwise terms)
    pseudo_region: str = "all"
    # what the pseudo loss pulls those pixels to: hard = M_hat's 0/1 (paper) | soft = the fused map's value
    # there (0 where a rival claims the pixel), a distillation target that keeps the teacher's confidence |
    # rim = hard, except the soft value on the confident background next to the rest of the box | soft_rim =
    # soft, except the confident background beyond that rim, pulled to 0 (both screened, not better:
    # README, SIM).
    # soft by default: a hard label rounds a rim cell the object half covers to background, and with the
    # pairwise cut that shrinks small objects' masks (README, SIM)
    pseudo_target: str = "soft"
    # pseudo_target=rim / soft_rim: the rim's width, in mask cells of confident background next to the rest
    # of the box (pseudo foreground or ignore band)
    pseudo_rim: int = 1
    # hard (0/1) targets from the switch-on until this fraction of the schedule, then pseudo_target's own
    # (0 = never): the hard stage teaches the teacher that a colour-matched region is background, the
    # soft stage lets the rims of small objects grow back (screened: it trades like the others, README, SIM)
    hard_target_until: float = 0.0
    # hard targets (whatever pseudo_target) for the objects whose pseudo label splits at least this share of
    # their colour-linked neighbour pairs (0 = none): where a colour-matched region borders the pseudo
    # foreground a 0 pushes it out, elsewhere the soft target keeps the rim (screened: it trades, README, SIM)
    hard_target_min_share: float = 0.0
    # pseudo background within this many mask cells of the pseudo foreground is ignored rather than confident
    # (0 = none): self-training shrinks masks at the rim, and a confident background ring there feeds the
    # shrinkage back through the pseudo loss and the pairwise cut (measured with the cut and hard targets:
    # masks then grow past the object; soft targets are the better remedy)
    pseudo_bg_margin: int = 0
    warmup_frac: float = 0.111  # pseudo loss from this fraction of the schedule (10k of 90k)
    ramp_frac: float = 0.0  # then ramps linearly over this fraction (0 = on at once)
    # Teacher asymmetry: the student's input gets strong photometric augmentation (colour jitter, grayscale,
    # blur); the teacher and the colour-affinity (pairwise) term see the clean image. Needs teacher_backbone=ema.
    student_aug: bool = False
    pairwise_feat_sim: bool = False  # code-only: colour x teacher-feature similarity in the pairwise term
    pairwise_feat_thresh: float = 0.1
    # the pairwise term links two neighbours only where the student backbone's stride-8 features (C3,
    # detached) agree as well, cosine >= this (0 = off: colour alone). A colour-matched background region
    # keeps the background's texture, so its links to the object break more often than links inside one side.
    # Off: at 0.5, over seeds 0-4 on the textured benchmark, it gained on near-colour objects and lost on
    # small plain ones, like the pseudo-target options (README, SIM)
    pairwise_texture_thresh: float = 0.0
    # whose features the gate compares: c3 (stride 8, screened above) | c2 (the body's stride-4 output:
    # sharper at an object's rim, benchmarks/results/pairwise_probe_c2.md; screened at seeds 0 and 4: it
    # trades too, README)
    pairwise_texture_features: str = "c3"
    # from the pseudo loss's switch-on, the pairwise term drops the neighbour pairs the pseudo label
    # confidently splits (one pixel foreground, the other background): a colour-matched background region
    # inside the box is then no longer pulled into the mask by its colour while the pseudo loss pushes it out
    pairwise_pseudo_cut: bool = True
    # the cut's own confidence: a pair is left out only where the fused map is >= cut_high on the foreground
    # side and <= cut_low on the background side (or a rival claims the pixel); the defaults take the pseudo
    # label's thresholds as they are
    pairwise_cut_high: float = 0.0
    pairwise_cut_low: float = 1.0
    # the cut also leaves out the pairs whose two cells fall on opposite sides of the object's texture
    # contrast in the backbone's stride-4 features (C2): d = cos(f, p_fg) - cos(f, p_bg), p_fg the mean of its
    # pseudo foreground, p_bg of its confident in-box background and a 4-cell ring outside the box (the texture
    # map's prototypes); a pair is left out where one cell has d > 0, the other d <= 0, and they differ by at
    # least this (0 = off). Unlike the texture gate it compares each cell with the object's own appearance
    # and its surroundings', not with its neighbour: a colour-matched region of background texture falls on
    # the background side, a textured object's own cells stay on its side (pairwise_probe_c2tex.md).
    # 0.3 by default: over seeds 0-6 on the textured benchmark it lifted near-colour objects on the seeds where
    # the cut alone gained least, plain objects level (README, SIM)
    pairwise_texture_split: float = 0.3
    # the cut only in the objects where it would leave out at least this share of the pairwise term's pairs
    # (a colour-matched region the teacher separates from the object); the others keep every pair
    pairwise_cut_min_share: float = 0.0
    # the cut only in the objects whose box is at least this many mask cells (mask_out_stride pixels) on its
    # shorter side: on a small object the pseudo boundary's one-cell error is a large share of the mask, and
    # the pairs the cut then leaves out are its rim (0 = every object)
    pairwise_cut_min_side: int = 0
    # the cut stops at this fraction of the schedule (1 = to the end): the last stretch keeps every colour
    # pair again, so a pseudo boundary one mask cell off the true one is no longer held in place there
    pairwise_cut_until: float = 1.0
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
    keep_checkpoints: int = 2  # 0 = keep every checkpoint
    # Dotted keys the user gave on the command line (overrides and the flags that become overrides): the
    # batch scaling leaves them as typed. Not a field: it is not saved with the run's config.
    user_keys: ClassVar[frozenset[str]] = frozenset()
    # The YAML file or preset the values came from ("" = the defaults alone); not saved either.
    source: ClassVar[str] = ""


METHODS = ("boxinst", "sim", "full")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
# Presets shipped with the package: `-c NAME` or `-c NAME.yaml`.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"

# The values each string key may take; a string key missing here is free text (a path).
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "data.gt_masks": ("use", "ignore"),
    "model.backbone": BACKBONES,
    "model.norm": ("frozen_bn", "bn"),
    "model.head_norm": ("gn", "none"),
    "model.head_conv": ("full", "separable"),
    "model.mask_head_init": ("shared", "condinst"),
    "sim.teacher_backbone": ("ema", "student"),
    "sim.proto_pixels": ("pseudo", "mi"),
    "sim.weighting": ("iou", "mean"),
    "sim.pseudo_loss": ("bce_dice", "bce", "focal"),
    "sim.pseudo_region": ("all", "background"),
    "sim.pseudo_target": ("hard", "soft", "rim", "soft_rim"),
    "sim.proto_from": ("start", "switch_on"),
    "sim.pairwise_texture_features": ("c3", "c2"),
    "solver.optimizer": ("sgd", "adamw"),
    "solver.scheduler": ("step", "cosine"),
}
FREE_TEXT = ("data.train_json", "data.train_images", "data.val_json", "data.val_images", "model.weights",
             "model.init_from", "out", "device")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# The range of every number (for a list: of each element), as "[lo, hi]" / "(lo, hi)" intervals or "> x" / ">= x".
# Non-finite floats are refused everywhere. Model sizes have upper bounds too: a config read from a checkpoint
# someone gave you must not be able to ask for a model that fills the memory.
RANGES: dict[str, str] = {
    "data.min_size_train": "> 0", "data.min_size_test": "> 0", "data.max_size": "> 0", "data.hflip": "[0, 1]",
    "data.pixel_mean": "[0, 255]", "data.pixel_std": "> 0", "data.size_divisibility": ">= 32",
    "data.num_workers": ">= 0",
    "model.freeze_at": "[0, 2]", "model.fpn_channels": "[1, 4096]", "model.head_convs": "[0, 32]", "model.num_classes": ">= 0",
    "model.fpn_strides": "> 0", "model.sizes_of_interest": "> 0", "model.center_sampling_radius": "> 0",
    "model.prior_prob": "(0, 1)", "model.mask_branch_channels": "[1, 4096]", "model.mask_branch_convs": "[0, 32]",
    "model.mask_out_channels": "[1, 1024]", "model.mask_head_channels": "[1, 1024]", "model.mask_head_layers": "[1, 32]",
    "model.mask_out_stride": "[1, 8]", "model.max_proposals_per_image": ">= 1", "model.score_thresh": "[0, 1]",
    "model.nms_thresh": "[0, 1]", "model.pre_nms_topk": ">= 1", "model.detections_per_image": ">= 1",
    "model.mask_thresh": "[0, 1]",
    "loss.focal_alpha": "[0, 1]", "loss.focal_gamma": ">= 0", "loss.mask_weight": ">= 0", "loss.pairwise_size": ">= 3",
    "loss.pairwise_dilation": ">= 1", "loss.pairwise_color_thresh": "[0, 1]", "loss.pairwise_weight": ">= 0",
    "loss.pairwise_warmup_frac": "[0, 1]", "loss.bottom_pixels_removed": ">= 0", "loss.fill_warn": "[0, 1]",
    "sim.ema_momentum": "[0, 1)", "sim.num_prototypes": ">= 1", "sim.tau": "> 0", "sim.sinkhorn_eps": "> 0",
    "sim.sinkhorn_iters": ">= 1", "sim.proto_momentum": "[0, 1)", "sim.mu": ">= 0", "sim.alpha": "[0, 1]",
    "sim.fg_thresh": "[0, 1]", "sim.tau_high_min": "[0, 1]", "sim.tau_high_max": "[0, 1]", "sim.tau_low": "[0, 1]",
    "sim.pseudo_weight": ">= 0", "sim.pseudo_bg_margin": ">= 0", "sim.pseudo_rim": "[1, 8]", "sim.warmup_frac": "[0, 1]",
    "sim.hard_target_until": "[0, 1]", "sim.hard_target_min_share": "[0, 1]", "sim.texture_weight": "[0, 1]",
    "sim.texture_tau": "> 0",
    "sim.ramp_frac": "[0, 1]",
    "sim.pairwise_feat_thresh": "[0, 1]", "sim.pairwise_texture_thresh": "[0, 1)", "sim.pairwise_cut_high": "[0, 1]",
    "sim.pairwise_cut_low": "[0, 1]", "sim.pairwise_cut_min_share": "[0, 1]", "sim.pairwise_cut_min_side": ">= 0",
    "sim.pairwise_cut_until": "[0, 1]", "sim.pairwise_texture_split": "[0, 4]",
    "sim.paste_prob": "[0, 1]", "sim.bank_length": ">= 1",
    "sim.paste_fraction": "[0, 1]", "sim.paste_min": ">= 1", "sim.paste_max": ">= 1", "sim.paste_score_power": ">= 0",
    "sim.paste_weight": ">= 0", "sim.viz_paste": ">= 0", "sim.bg_prototypes": ">= 0", "sim.proto_erode": ">= 0",
    "sim.proto_confidence": "[0, 1)",
    "solver.lr": "> 0", "solver.momentum": "[0, 1)", "solver.weight_decay": ">= 0", "solver.ims_per_batch": ">= 1",
    "solver.max_iters": ">= 1", "solver.steps": "> 0", "solver.gamma": "(0, 1]", "solver.warmup_iters": ">= 0",
    "solver.warmup_factor": "[0, 1]", "solver.clip_grad_norm": ">= 0", "solver.controller_lr_mult": "> 0",
    "solver.reference_batch": ">= 0", "solver.nonfinite_skips": ">= 0",
    "seed": f"[0, {2**32 - 1}]", "log_period": ">= 1", "checkpoint_period": ">= 1", "tb_image_period": ">= 0",
    "eval_period": ">= 0", "keep_checkpoints": ">= 0",
}
# Lists that must not be empty, and those of a fixed length.
NON_EMPTY = ("data.min_size_train", "model.fpn_strides", "model.sizes_of_interest")
LENGTHS = {"data.pixel_mean": 3, "data.pixel_std": 3}


def _show(value: Any, limit: int = 60) -> str:
    """A value in an error message: one line, not too long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_device(name: str, what: str = "device") -> str:
    """``name`` if it is a device boxmask knows how to ask for (whether it exists is checked when used)."""
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"{what} must be auto, cpu, cuda, cuda:N or mps; got {_show(name)}")
    return name


def _describe(spec: str) -> str:
    return spec if spec[0] in "<>" else f"in {spec}"


def _in_range(value: float, spec: str) -> bool:
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """``value`` (from YAML or an override) as ``typ``; anything else is a ConfigError naming ``key``."""
    origin = getattr(typ, "__origin__", None)
    name = getattr(typ, "__name__", str(typ))
    bad = ConfigError(f"config key '{key}': cannot use {_show(value)} as {name}")
    if origin is list:
        (inner,) = typ.__args__
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, inner, key) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        raise bad
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value) if isinstance(value, str) else value
            if typ is float:
                number = float(number)
        except ValueError:
            raise bad from None
        except OverflowError:
            number = math.inf
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number, got {_show(value)}")
        if typ is float:
            return number
        if isinstance(number, float) and not number.is_integer():
            raise bad
        return int(number)
    return value


def _merge(obj: Any, updates: dict, prefix: str = "", touched: set | None = None) -> None:
    """Set ``obj``'s fields from a nested mapping; the dotted keys set are added to ``touched``."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix[:-1] or '(top level)'}' must be a mapping, got {_show(updates)}")
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {_show(full)} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {_show(full)} is a section; give it a mapping")
            _merge(current, value, full + ".", touched)
        else:
            setattr(obj, key, _coerce(value, hints[key], full))
            if touched is not None:
                touched.add(full)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    cfg = Config()
    _merge(cfg, d)
    return cfg


def _split_override(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), raw


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # e.g. a date like 2020-13-45, or absurd nesting
        return raw


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    parts, raw = _split_override(text)
    out: dict = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = _parse_value(raw)
    return out


def _field_type(obj: Any, parts: list[str]) -> Any:
    """The declared type of the setting at ``parts`` below ``obj`` (None when there is none)."""
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            return None
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj):
        return None
    return get_type_hints(type(obj)).get(parts[-1])


def _apply_override(cfg: Config, text: str, touched: set) -> None:
    """One ``key=value``; a text key (a path, a name) takes the value as typed, not as YAML (``out=yes``
    stays the folder 'yes', not True)."""
    parts, raw = _split_override(text)
    update: dict = {}
    node = update
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = raw if _field_type(cfg, parts) is str else _parse_value(raw)
    _merge(cfg, update, "", touched)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config(name: str | Path, base_dir: Path | None = None) -> Path:
    """A YAML file (relative to ``base_dir`` for a ``_base_``) or a packaged preset: ``mobilenet_v2_192``,
    ``tiny.yaml``, or a ``configs/NAME.yaml`` path that is not on disk (the presets' former place in the
    source tree)."""
    path = Path(name)
    candidate = (base_dir / path) if base_dir is not None and not path.is_absolute() else path
    if candidate.is_file():
        return candidate.resolve()
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    bare = len(path.parts) == 1 or (path.parent.name == "configs" and path.name.endswith(".yaml"))
    preset = PRESETS_DIR / f"{stem}.yaml"
    if bare and preset.is_file():
        return preset
    raise ConfigError(f"config file not found: {candidate} (a YAML file, or one of the presets: "
                      f"{', '.join(preset_names())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file or preset (which may name a ``_base_`` file relative to itself, or a
    preset) <- overrides. Every value is validated; the overridden keys are kept in ``cfg.user_keys``."""
    cfg = Config()
    if path:
        for layer in _yaml_chain(resolve_config(path)):
            _merge(cfg, layer)
    touched: set[str] = set()
    for ov in overrides or []:
        _apply_override(cfg, ov, touched)
    validate(cfg)
    _check_idle_keys(cfg, touched)
    cfg.user_keys = frozenset(touched)
    cfg.source = str(path or "")
    return cfg


# keys that only act through the semantic map M_S and its prototypes
SEMANTIC_KEYS = ("sim.num_prototypes", "sim.tau", "sim.sinkhorn_eps", "sim.sinkhorn_iters", "sim.proto_momentum",
                 "sim.proto_pixels", "sim.proto_confidence", "sim.proto_erode", "sim.proto_from",
                 "sim.bg_prototypes", "sim.semantic_softmax", "sim.proto_warmup", "sim.alpha")
# keys that only act through the texture map
TEXTURE_KEYS = ("sim.texture_weight", "sim.texture_tau")
# keys that only act with the pairwise cut
CUT_KEYS = ("sim.pairwise_cut_high", "sim.pairwise_cut_low", "sim.pairwise_cut_min_share", "sim.pairwise_cut_min_side",
            "sim.pairwise_cut_until", "sim.pairwise_texture_split")


def _check_idle_keys(cfg: Config, touched: set[str]) -> None:
    """A key typed while what it acts through is off would be silently ignored: refuse it."""
    if cfg.method != "sim":
        return
    s = cfg.sim
    if not s.semantic:
        _refuse_idle(touched, SEMANTIC_KEYS, "through the semantic map, which is off (sim.semantic=false, the "
                     "default); add sim.semantic=true to use them")
    if not s.texture_map:
        _refuse_idle(touched, TEXTURE_KEYS, "through the texture map, which is off; add sim.texture_map=true to "
                     "use them")
    if not s.pairwise_pseudo_cut:
        _refuse_idle(touched, CUT_KEYS, "with sim.pairwise_pseudo_cut=true, which is off; add it to use them")
    if s.pairwise_texture_thresh == 0:
        _refuse_idle(touched, ("sim.pairwise_texture_features",), "with sim.pairwise_texture_thresh > 0 (the "
                     "texture gate, off at 0)")
    if s.pseudo_target not in ("rim", "soft_rim"):
        _refuse_idle(touched, ("sim.pseudo_rim",),
                     f"with sim.pseudo_target=rim or soft_rim; got sim.pseudo_target={s.pseudo_target}")
    if s.pseudo_target == "hard":
        _refuse_idle(touched, ("sim.hard_target_until", "sim.hard_target_min_share"),
                     "with sim.pseudo_target other than hard (its targets are hard throughout)")


def _refuse_idle(touched: set[str], keys: tuple[str, ...], why: str) -> None:
    """ConfigError naming the ``keys`` the user typed, if any: they only act ``why``."""
    idle = [k for k in keys if k in touched]
    if idle:
        many = len(idle) > 1
        raise ConfigError(f"config key{'s' if many else ''} {', '.join(repr(k) for k in idle)} only "
                          f"{'act' if many else 'acts'} {why}")


def _yaml_chain(path: Path, depth: int = 0) -> list[dict]:
    if depth > 8:
        raise ConfigError(f"{path}: _base_ chain too deep")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: undecodable bytes, impossible dates
        raise ConfigError(f"{path}: invalid YAML: {_show(' '.join(str(e).split()), 300)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: _base_ must be a file name, got {_show(base)}")
    if not base:
        return [data]
    try:
        base_path = resolve_config(base, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: _base_: {e}") from None
    chain = _yaml_chain(base_path, depth + 1)
    return chain + [data]


def _leaves(obj: Any, prefix: str = ""):
    """(dotted key, value, type) of every setting, sections unfolded."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, hints[f.name]


def validate(cfg: Config) -> None:
    """Every value in its range, every name among its choices, and the few rules that tie keys together;
    the first problem is a one-line ConfigError naming its key."""
    for key, value, typ in _leaves(cfg):
        items = value if isinstance(value, list) else [value]
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}; got {_show(value)}")
        if key in NON_EMPTY and not value:
            raise ConfigError(f"config key '{key}' must not be empty")
        if key in LENGTHS and len(value) != LENGTHS[key]:
            raise ConfigError(f"config key '{key}' needs {LENGTHS[key]} values, got {len(value)}")
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key '{key}' must be a finite number, got {v}")
            if key in RANGES and not _in_range(v, RANGES[key]):
                shown = f"{v:g}" if isinstance(v, float) else str(v)
                raise ConfigError(f"config key '{key}' must be {_describe(RANGES[key])}, got {shown}")
    check_device(cfg.device, "config key 'device'")
    if not cfg.out.strip():
        raise ConfigError("config key 'out' must name a folder")
    m, s = cfg.model, cfg.sim
    if m.fpn_strides != [8, 16, 32, 64, 128][: len(m.fpn_strides)] or len(m.fpn_strides) < 3:
        raise ConfigError(f"config key 'model.fpn_strides' must be 3 to 5 levels of [8, 16, 32, 64, 128], got "
                          f"{_show(m.fpn_strides)}")
    if len(m.sizes_of_interest) != len(m.fpn_strides) - 1:
        raise ConfigError("config key 'model.sizes_of_interest' needs one entry fewer than model.fpn_strides")
    if m.sizes_of_interest != sorted(m.sizes_of_interest):
        raise ConfigError(f"config key 'model.sizes_of_interest' must increase, got {_show(m.sizes_of_interest)}")
    if 8 % m.mask_out_stride:
        raise ConfigError("config key 'model.mask_out_stride' must divide the mask features' stride 8 (1, 2, 4 or 8), "
                          f"got {m.mask_out_stride}")
    if m.head_norm == "gn" and (m.fpn_channels % 4 or (m.fpn_channels > 128 and m.fpn_channels % 32)):
        raise ConfigError("config key 'model.fpn_channels' with head_norm=gn must be a multiple of 4 (of 32 above "
                          f"128), got {m.fpn_channels}")
    if cfg.data.size_divisibility < 1 or cfg.data.size_divisibility % 32:
        # the backbone's last stage has stride 32: padded sizes must divide by it for the FPN levels to align
        raise ConfigError("config key 'data.size_divisibility' must be a multiple of 32 (the backbone's stride), "
                          f"got {cfg.data.size_divisibility}")
    if cfg.loss.pairwise_size % 2 == 0:
        raise ConfigError(f"config key 'loss.pairwise_size' must be odd (a centred window), got "
                          f"{cfg.loss.pairwise_size}")
    if s.paste_min > s.paste_max:
        raise ConfigError(f"config key 'sim.paste_min' ({s.paste_min}) must not exceed sim.paste_max ({s.paste_max})")
    if s.pairwise_pseudo_cut and s.pairwise_cut_until <= s.warmup_frac:
        raise ConfigError(f"config key 'sim.pairwise_cut_until' ({s.pairwise_cut_until:g}) must be above "
                          f"sim.warmup_frac ({s.warmup_frac:g}): the cut acts only once self-training is on")
    if 0 < s.hard_target_until <= s.warmup_frac:
        raise ConfigError(f"config key 'sim.hard_target_until' ({s.hard_target_until:g}) must be 0 or above "
                          f"sim.warmup_frac ({s.warmup_frac:g}): the pseudo loss acts only once self-training is on")
    if not s.tau_low <= s.tau_high_min <= s.tau_high_max:
        raise ConfigError(f"config keys 'sim.tau_low' <= 'sim.tau_high_min' <= 'sim.tau_high_max' must hold, got "
                          f"{s.tau_low:g}, {s.tau_high_min:g}, {s.tau_high_max:g}")
    if not (s.semantic or s.self_correction):
        raise ConfigError("config keys 'sim.semantic' and 'sim.self_correction' cannot both be off "
                          "(no pseudo mask left)")
    if s.semantic_softmax != (s.bg_prototypes > 0):
        raise ConfigError("config keys 'sim.semantic_softmax'=true and 'sim.bg_prototypes' > 0 go together (the "
                          "background prototypes enter M_S only through the softmax); got "
                          f"semantic_softmax={s.semantic_softmax}, bg_prototypes={s.bg_prototypes}")
    if s.student_aug and s.teacher_backbone != "ema":
        raise ConfigError("config key 'sim.student_aug' needs sim.teacher_backbone=ema: with 'student' the teacher's "
                          "heads run on the student's (augmented) features and would not see the clean image")


def scale_for_batch(cfg: Config, world_size: int = 1) -> tuple[Config, str | None]:
    """The linear scaling rule (as detectron2's reference world size), and a warm-up no longer than the run.

    When the effective batch (images per process x processes) differs from ``solver.reference_batch`` by a
    factor f, lr becomes lr * f, every iteration count (max_iters, absolute steps, warmup_iters, checkpoint
    and eval periods) is divided by f, and the per-step momenta of SIM's EMA teacher and prototypes become
    m ** f, so that they forget at the same rate per image seen. Keys the user typed (``cfg.user_keys``)
    keep their value. Returns the config to train with and a line saying what changed (None when nothing did)."""
    s = cfg.solver
    effective = s.ims_per_batch * world_size
    new = copy.deepcopy(cfg)
    changed: list[str] = []
    kept: list[str] = []
    notes: list[str] = []

    def put(section: Any, key: str, value: Any, show: bool = True) -> None:
        name = key.split(".")[-1]
        old = getattr(section, name)
        if key in cfg.user_keys:
            if value != old:
                kept.append(f"{key}={old:g}" if isinstance(old, float) else f"{key}={old}")
            return
        setattr(section, name, value)
        if show and value != old:
            fmt = (lambda v: f"{v:.6g}") if isinstance(old, float) else str
            changed.append(f"{key} {fmt(old)} -> {fmt(value)}")

    scaling = s.scale_to_batch and s.reference_batch > 0 and effective != s.reference_batch
    if scaling:
        f = effective / s.reference_batch

        def iters(v: float) -> int:
            return max(int(round(v / f)), 1)

        n = new.solver
        put(n, "solver.lr", s.lr * f)
        put(n, "solver.max_iters", iters(s.max_iters))
        put(n, "solver.warmup_iters", int(round(s.warmup_iters / f)))
        put(n, "solver.steps", [v if v <= 1 else iters(v) for v in s.steps], show=any(v > 1 for v in s.steps))
        put(new, "checkpoint_period", iters(cfg.checkpoint_period))
        put(new, "eval_period", iters(cfg.eval_period) if cfg.eval_period else 0)
        # forgetting per image seen stays the same: m ** (steps before / steps now)
        put(new.sim, "sim.ema_momentum", cfg.sim.ema_momentum ** f, show=cfg.method == "sim")
        put(new.sim, "sim.proto_momentum", cfg.sim.proto_momentum ** f, show=cfg.method == "sim")
        n.reference_batch = effective  # scaling the result again changes nothing
    if new.solver.warmup_iters > new.solver.max_iters:
        notes.append(f"solver.warmup_iters {new.solver.warmup_iters} is longer than the run: clamped to "
                     f"max_iters {new.solver.max_iters}")
        new.solver.warmup_iters = new.solver.max_iters
    if not scaling and not notes:
        return cfg, None
    parts = []
    if scaling:
        line = (f"batch scaling: effective batch {effective} ({s.ims_per_batch} x {world_size} processes) vs the "
                f"{s.reference_batch} this config was tuned for: {', '.join(changed) or 'nothing to change'}")
        if kept:
            line += f"; kept as given: {', '.join(kept)}"
        parts.append(line + " (solver.scale_to_batch=false to turn off)")
    parts += notes
    validate(new)  # e.g. a huge lr times f is no longer finite
    return new, "; ".join(parts)
