"""torch.distributed glue for `torchrun ... -m boxmask train`: process group from the environment,
rank-0-only writing, reductions of logged values, gathering of evaluation results, and a check that
every rank holds the same weights, teacher and prototypes."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> tuple[bool, int]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL for CUDA, gloo for the CPU. Returns (whether this call created the group, local rank)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available() or dist.is_initialized():
        return False, local
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return True, local


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def mean_over_ranks(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Average each value over the ranks (one collective for all of them)."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu().reshape(()) for k in keys])
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return dict(zip(keys, t.tolist()))


def all_ranks_true(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (so that all ranks take the same branch)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_lists(items: list) -> list:
    """Concatenate a picklable list from every rank, in rank order (on every rank)."""
    if world_size() == 1:
        return items
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


@torch.no_grad()
def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers per tensor (sum, sum of squares): equal fingerprints mean equal states."""
    return torch.stack([torch.stack([t.double().sum(), (t.double() ** 2).sum()]) for t in tensors]).flatten().cpu()


def ranks_differ(tensors: list[torch.Tensor]) -> float:
    """The largest difference between this state's fingerprint on any two ranks (0 when in sync)."""
    if world_size() == 1:
        return 0.0
    fp = fingerprint(tensors)
    parts = [torch.zeros_like(fp) for _ in range(world_size())]
    dist.all_gather(parts, fp)
    return float(max((p - parts[0]).abs().max() for p in parts))
