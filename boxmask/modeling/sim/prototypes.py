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
    def update(self, scores: torch.Tensor, feats: torch.Tensor, cls: int) -> torch.Tensor:
        """One EMA step of class ``cls`` from N pixels: Sinkhorn on ``scores`` [N, L] (teacher
        similarities), argmax assignment, centroids of ``feats`` [N, D] (student, unit norm).
        Prototypes that got no pixel stay. Returns the assignment [N]."""
        assign = hard_assignment(sinkhorn(scores, self.eps, self.sinkhorn_iters))
        num_l = self.protos.shape[1]
        sums = torch.zeros(num_l, feats.shape[1], device=feats.device, dtype=torch.float32)
        sums.index_add_(0, assign, feats.float())
        counts = torch.bincount(assign, minlength=num_l)
        hit = counts > 0
        centroids = F.normalize(sums[hit], dim=-1)
        p = self.protos[cls]
        p[hit] = F.normalize(self.momentum * p[hit] + (1.0 - self.momentum) * centroids, dim=-1)
        return assign

    @torch.no_grad()
    def sync(self) -> None:
        """Average across DDP ranks (then renormalise) so every rank holds the same prototypes."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.protos)
            self.protos.div_(dist.get_world_size())
            self.protos.copy_(F.normalize(self.protos, dim=-1))
