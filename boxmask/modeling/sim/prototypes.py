"""Class prototypes (C x L x D, unit norm along D) and optional background prototypes (Lb x D): the pseudo
semantic map and their EMA update."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .sinkhorn import hard_assignment, sinkhorn


def _init(*shape: int) -> torch.Tensor:
    return F.normalize(nn.init.trunc_normal_(torch.empty(*shape), std=0.02), dim=-1)


class Prototypes(nn.Module):
    """``warmup``: a prototype's momentum after t updates of it is min(momentum, (1 + t) / (10 + t)), so
    its random initialisation is gone after a few dozen updates; without it, at momentum 0.999 a prototype
    still points 55% along its random start after 600 updates, and the semantic map of a short schedule
    measures mostly noise."""

    def __init__(self, num_classes: int, num_prototypes: int, dim: int, momentum: float = 0.999,
                 eps: float = 0.05, sinkhorn_iters: int = 3, num_background: int = 0, warmup: bool = False):
        super().__init__()
        self.register_buffer("protos", _init(num_classes, num_prototypes, dim))
        # only with background prototypes, so checkpoints without them keep their keys
        if num_background > 0:
            self.register_buffer("bg_protos", _init(num_background, dim))
        # updates each prototype has had (float, so the count stays on the device without syncs); only
        # with the warm-up, so checkpoints without it keep their keys
        self.warmup = warmup
        if warmup:
            self.register_buffer("updates", torch.zeros(num_classes * num_prototypes))
            if num_background > 0:
                self.register_buffer("bg_updates", torch.zeros(num_background))
        self.momentum, self.eps, self.sinkhorn_iters = momentum, eps, sinkhorn_iters

    @property
    def has_background(self) -> bool:
        return hasattr(self, "bg_protos")

    def similarity(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of unit-norm ``feats`` [G, D, h, w] to the prototypes of ``classes`` [G]:
        [G, L, h, w]."""
        return torch.einsum("gdhw,gld->glhw", feats, self.protos[classes].to(feats.dtype))

    def semantic_map(self, feats: torch.Tensor, classes: torch.Tensor, tau: float = 1.0, softmax: bool = False) -> torch.Tensor:
        """M_S for each object's class: [G, h, w]. Paper: sigmoid(max_l cos(z', p_l) / tau). ``softmax``:
        the class against the background prototypes, exp(s_c / tau) / (exp(s_c / tau) + exp(s_bg / tau))
        with s_c, s_bg the best similarity in each group, i.e. sigmoid((s_c - s_bg) / tau)."""
        s_c = self.similarity(feats, classes).amax(dim=1)
        if not softmax:
            return torch.sigmoid(s_c / tau)
        if not self.has_background:
            raise ValueError("the softmax semantic map needs background prototypes")
        s_bg = torch.einsum("gdhw,ld->glhw", feats, self.bg_protos.to(feats.dtype)).amax(dim=1)
        return torch.sigmoid((s_c - s_bg) / tau)

    @torch.no_grad()
    def update(self, scores: torch.Tensor, feats: torch.Tensor, classes: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """One EMA step of every class at once from N pixels: ``scores`` [N, L] (teacher similarities to
        the prototypes of the pixel's class), ``feats`` [N, D] (student, unit norm), ``classes`` [N],
        ``valid`` [N] (default all). Per class: Sinkhorn, argmax assignment, centroids, EMA. Prototypes
        that got no pixel stay. Returns the assignment [N] (meaningless where not valid)."""
        return self._ema_step(self.protos, scores, feats, classes, valid, getattr(self, "updates", None))

    @torch.no_grad()
    def update_background(self, scores: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The same step for the background prototypes, from N certain-background pixels (``scores``
        [N, Lb] against ``bg_protos``)."""
        segments = torch.zeros(feats.shape[0], dtype=torch.long, device=feats.device)
        return self._ema_step(self.bg_protos[None], scores, feats, segments, valid, getattr(self, "bg_updates", None))

    def _ema_step(self, protos: torch.Tensor, scores: torch.Tensor, feats: torch.Tensor, classes: torch.Tensor,
                  valid: torch.Tensor | None, updates: torch.Tensor | None = None) -> torch.Tensor:
        num_c, num_l, dim = protos.shape
        v = torch.ones(classes.shape[0], device=feats.device) if valid is None else valid.float()
        q = sinkhorn(scores, self.eps, self.sinkhorn_iters, classes, num_c, v > 0)
        assign = hard_assignment(q)
        cluster = classes * num_l + assign
        sums = torch.zeros(num_c * num_l, dim, device=feats.device).index_add_(0, cluster, feats.float() * v[:, None])
        counts = torch.zeros(num_c * num_l, device=feats.device).index_add_(0, cluster, v)
        p = protos.view(num_c * num_l, dim)
        m = torch.full((num_c * num_l,), self.momentum, device=feats.device)
        if updates is not None:
            m = torch.minimum(m, (1.0 + updates) / (10.0 + updates))
            updates.add_((counts > 0).float())
        moved = F.normalize(m[:, None] * p + (1.0 - m[:, None]) * F.normalize(sums, dim=-1), dim=-1)
        # torch.where, not a boolean write: no host sync
        p.copy_(torch.where(counts[:, None] > 0, moved, p))
        return assign

    @torch.no_grad()
    def sync(self) -> None:
        """Average across DDP ranks (then renormalise) so every rank holds the same prototypes."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for protos in [self.protos] + ([self.bg_protos] if self.has_background else []):
                dist.all_reduce(protos)
                protos.div_(dist.get_world_size())
                protos.copy_(F.normalize(protos, dim=-1))
