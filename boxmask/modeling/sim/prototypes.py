"""Class prototypes (C x L x D, unit norm along D): the pseudo semantic map and its EMA update."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .sinkhorn import hard_assignment, sinkhorn


class Prototypes(nn.Module):
    def __init__(self, num_classes: int, num_prototypes: int, dim: int, momentum: float = 0.999,
                 eps: float = 0.05, sinkhorn_iters: int = 3):
        super().__init__()
        protos = nn.init.trunc_normal_(torch.empty(num_classes, num_prototypes, dim), std=0.02)
        self.register_buffer("protos", F.normalize(protos, dim=-1))
        self.momentum, self.eps, self.sinkhorn_iters = momentum, eps, sinkhorn_iters

    def similarity(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of unit-norm ``feats`` [G, D, h, w] to the prototypes of ``classes`` [G]:
        [G, L, h, w]."""
        return torch.einsum("gdhw,gld->glhw", feats, self.protos[classes].to(feats.dtype))

    def semantic_map(self, feats: torch.Tensor, classes: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        """M_S = sigmoid(max_l cos(z', p_l) / tau) for each object's class: [G, h, w]."""
        return torch.sigmoid(self.similarity(feats, classes).amax(dim=1) / tau)

    @torch.no_grad()
    def update(self, scores: torch.Tensor, feats: torch.Tensor, classes: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """One EMA step of every class at once from N pixels: ``scores`` [N, L] (teacher similarities to
        the prototypes of the pixel's class), ``feats`` [N, D] (student, unit norm), ``classes`` [N],
        ``valid`` [N] (default all). Per class: Sinkhorn, argmax assignment, centroids, EMA. Prototypes
        that got no pixel stay. Returns the assignment [N] (meaningless where not valid)."""
        num_c, num_l, dim = self.protos.shape
        v = torch.ones(classes.shape[0], device=feats.device) if valid is None else valid.float()
        q = sinkhorn(scores, self.eps, self.sinkhorn_iters, classes, num_c, v > 0)
        assign = hard_assignment(q)
        cluster = classes * num_l + assign
        sums = torch.zeros(num_c * num_l, dim, device=feats.device).index_add_(0, cluster, feats.float() * v[:, None])
        counts = torch.zeros(num_c * num_l, device=feats.device).index_add_(0, cluster, v)
        p = self.protos.view(num_c * num_l, dim)
        moved = F.normalize(self.momentum * p + (1.0 - self.momentum) * F.normalize(sums, dim=-1), dim=-1)
        # torch.where, not a boolean write: no host sync
        p.copy_(torch.where(counts[:, None] > 0, moved, p))
        return assign

    @torch.no_grad()
    def sync(self) -> None:
        """Average across DDP ranks (then renormalise) so every rank holds the same prototypes."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.protos)
            self.protos.div_(dist.get_world_size())
            self.protos.copy_(F.normalize(self.protos, dim=-1))
