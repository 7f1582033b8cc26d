"""The EMA (momentum) teacher: a deep copy of the student, updated after every optimiser step.

With the warm-up (mean-teacher practice, as TensorFlow's ``ExponentialMovingAverage(num_updates=t)``) the
momentum after t updates is min(m, (1 + t) / (10 + t)): at m = 0.9999 a teacher that starts from the
student's random heads would still hold 0.9999^10000 = 37% of them after 10k steps; with the warm-up the
share of step 0 is 9! t! / (t + 9)!, i.e. nothing after a few hundred steps."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, momentum: float = 0.9999, backbone: str = "ema", warmup: bool = True):
        super().__init__()
        if backbone not in ("ema", "student"):
            raise ValueError(f"teacher backbone must be 'ema' or 'student', got {backbone!r}")
        self.backbone = backbone
        self.model = copy.deepcopy(student)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.warmup = warmup
        self.num_updates = 0  # a host-side count (saved as extra state): reading it never waits on a device

    def current_momentum(self) -> float:
        """The momentum of the next update."""
        t = self.num_updates
        return min(self.momentum, (1.0 + t) / (10.0 + t)) if self.warmup else self.momentum

    def get_extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the update count: its teacher is taken as warmed up
        state_dict.setdefault(prefix + "_extra_state", {"num_updates": 1 << 40})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher always runs with its (copied) BN statistics, never batch statistics.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """theta' <- m theta' + (1 - m) theta; buffers (BN statistics) are copied from the student."""
        m = self.current_momentum()
        self.num_updates += 1
        s_params = dict(student.named_parameters())
        t_params = list(self.model.named_parameters())
        # one fused lerp over all tensors: t + (1 - m)(s - t) = m t + (1 - m) s
        torch._foreach_lerp_([p for _, p in t_params], [s_params[n].detach() for n, _ in t_params], 1.0 - m)
        s_bufs = dict(student.named_buffers())
        for name, b in self.model.named_buffers():
            b.copy_(s_bufs[name])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # BatchNorm statistics are per rank: take rank 0's, so every rank's teacher stays identical
            for b in self.model.buffers():
                dist.broadcast(b, 0)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, student_fpn: list[torch.Tensor] | None = None) -> dict:
        """Teacher outputs: what instance masks need (mask features and controller parameters; no class,
        box or centerness maps, which SIM does not read). With ``backbone='student'`` the EMA heads run on
        the student's FPN features (detached), which saves the teacher's backbone pass."""
        if self.backbone == "student":
            if student_fpn is None:
                raise ValueError("teacher backbone 'student' needs the student's FPN features")
            return self.model.heads_on([f.detach() for f in student_fpn], params_only=True)
        return self.model.head_outputs(images, params_only=True)
