"""Sinkhorn-Knopp equipartition assignment of pixels to prototypes (SwAV/ProtoSeg style)."""
from __future__ import annotations

import torch


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Soft assignment Q [N, L] of N pixels to L prototypes from similarity ``scores`` [N, L].

    Solves max Tr(Q^T S) + eps H(Q) with rows of Q^T summing to 1/L (equal prototype shares) and columns
    to 1/N, by ``iters`` alternate normalisations; the result is rescaled so each pixel's row sums to 1."""
    n, l = scores.shape
    q = torch.exp((scores.float() - scores.float().max()) / eps).t()  # [L, N]
    q = q / q.sum().clamp_min(1e-30)
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30) / l
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / n
    return (q * n).t()


def hard_assignment(q: torch.Tensor) -> torch.Tensor:
    """Index of the prototype each pixel goes to (argmax; every pixel to exactly one prototype)."""
    return q.argmax(dim=1)
