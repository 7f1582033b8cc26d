"""The one place where loss terms are weighted and ramped."""
from __future__ import annotations

import torch

from ..config import Config


def sim_switched_on(cfg: Config, iteration: int) -> bool:
    """Whether SIM's self-training stage has begun (past its warm-up, a fraction of the schedule): the
    pseudo loss, the bank filling and (``sim.proto_from=switch_on``) the prototype updates, whatever
    the pseudo loss's weight."""
    return cfg.method == "sim" and iteration >= cfg.sim.warmup_frac * cfg.solver.max_iters


def pairwise_cut_on(cfg: Config, iteration: int) -> bool:
    """Whether the pairwise term leaves out the pairs the pseudo label splits: from SIM's switch-on until
    ``sim.pairwise_cut_until`` of the schedule."""
    return (cfg.sim.pairwise_pseudo_cut and sim_switched_on(cfg, iteration)
            and iteration < cfg.sim.pairwise_cut_until * cfg.solver.max_iters)


def hard_targets_on(cfg: Config, iteration: int) -> bool:
    """Whether the pseudo loss pulls to M_hat's 0/1 at this step: with ``sim.pseudo_target=hard``, or from
    the switch-on until ``sim.hard_target_until`` of the schedule."""
    return cfg.sim.pseudo_target == "hard" or (sim_switched_on(cfg, iteration)
                                               and iteration < cfg.sim.hard_target_until * cfg.solver.max_iters)


def pseudo_weight(cfg: Config, iteration: int) -> float:
    """lambda1 after SIM's warm-up (a fraction of the schedule), with an optional linear ramp."""
    if not sim_switched_on(cfg, iteration):
        return 0.0
    start = cfg.sim.warmup_frac * cfg.solver.max_iters
    ramp = cfg.sim.ramp_frac * cfg.solver.max_iters
    return cfg.sim.pseudo_weight * (min((iteration - start) / ramp, 1.0) if ramp > 0 else 1.0)


def loss_weights(cfg: Config, iteration: int) -> dict[str, float]:
    """Weight of every loss term at ``iteration`` (ramps are fractions of ``solver.max_iters``)."""
    warm = max(cfg.loss.pairwise_warmup_frac * cfg.solver.max_iters, 1.0)
    return {
        "loss_pseudo": cfg.loss.mask_weight * pseudo_weight(cfg, iteration),
        "loss_cls": 1.0,
        "loss_box": 1.0,
        "loss_ctr": 1.0,
        "loss_proj": cfg.loss.mask_weight,
        "loss_pairwise": cfg.loss.mask_weight * cfg.loss.pairwise_weight * min(iteration / warm, 1.0),
        "loss_mask": cfg.loss.mask_weight,
        # only non-zero once objects are pasted, which needs a bank filled after the warm-up
        "loss_paste": cfg.loss.mask_weight * cfg.sim.paste_weight,
    }


def total_loss(losses: dict[str, torch.Tensor], cfg: Config, iteration: int) -> torch.Tensor:
    weights = loss_weights(cfg, iteration)
    unknown = set(losses) - set(weights)
    if unknown:
        raise KeyError(f"no weight for loss terms {sorted(unknown)}")
    return sum(weights[k] * v for k, v in losses.items())
