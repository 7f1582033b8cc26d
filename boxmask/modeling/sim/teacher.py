"""The EMA (momentum) teacher: a deep copy of the student, updated after every optimiser step."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, momentum: float = 0.9999, backbone: str = "ema"):
        super().__init__()
        if backbone not in ("ema", "student"):
            raise ValueError(f"teacher backbone must be 'ema' or 'student', got {backbone!r}")
        self.backbone = backbone
        self.model = copy.deepcopy(student)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.momentum = momentum

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher always runs with its (copied) BN statistics, never batch statistics.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """theta' <- m theta' + (1 - m) theta; buffers (BN statistics) are copied from the student."""
        m = self.momentum
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
