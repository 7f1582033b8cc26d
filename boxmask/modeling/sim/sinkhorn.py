"""Sinkhorn-Knopp equipartition assignment of pixels to prototypes (SwAV/ProtoSeg style)."""
from __future__ import annotations

import torch


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3, segments: torch.Tensor | None = None,
             num_segments: int = 1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft assignment Q [N, L] of N pixels to L prototypes from similarity ``scores`` [N, L].

    Solves max Tr(Q^T S) + eps H(Q) with rows of Q^T summing to 1/L (equal prototype shares) and columns
    to 1/N, by ``iters`` alternate normalisations; the result is rescaled so each pixel's row sums to 1.

    Several independent problems at once: ``segments`` [N] says which problem (class) each pixel belongs
    to and ``valid`` [N] which pixels take part (the others get 0). The result equals solving each
    segment on its valid pixels alone, without a host sync or a loop over segments."""
    n, l = scores.shape
    dev = scores.device
    seg = torch.zeros(n, dtype=torch.long, device=dev) if segments is None else segments
    v = torch.ones(n, device=dev) if valid is None else valid.float()
    s = scores.float()
    # subtract each segment's max (over its valid pixels) before exp: the scale cancels out below
    row_max = torch.where(v > 0, s.amax(dim=1), -torch.inf)
    smax = torch.full((num_segments,), -torch.inf, device=dev).scatter_reduce(0, seg, row_max, "amax")
    smax = torch.where(torch.isfinite(smax), smax, 0.0)
    q = torch.exp((s - smax[seg, None]) / eps) * v[:, None]
    total = torch.zeros(num_segments, device=dev).index_add_(0, seg, q.sum(dim=1))
    q = q / total[seg, None].clamp_min(1e-30)
    count = torch.zeros(num_segments, device=dev).index_add_(0, seg, v)[seg, None]  # pixels in the segment
    for _ in range(iters):
        per_proto = torch.zeros(num_segments, l, device=dev).index_add_(0, seg, q)
        q = q / per_proto[seg].clamp_min(1e-30) / l
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30) / count.clamp_min(1.0)
    return q * count


def hard_assignment(q: torch.Tensor) -> torch.Tensor:
    """Index of the prototype each pixel goes to (argmax; every pixel to exactly one prototype)."""
    return q.argmax(dim=1)
