"""CondInst's mask branch: P3-P5 -> one map of D-channel mask features at stride 8."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dynamic_mask_head import aligned_bilinear


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MaskBranch(nn.Module):
    def __init__(self, in_channels: int, channels: int = 128, num_convs: int = 4, out_channels: int = 16, num_in_levels: int = 3):
        super().__init__()
        self.refine = nn.ModuleList([conv_bn_relu(in_channels, channels) for _ in range(num_in_levels)])
        self.tower = nn.Sequential(*[conv_bn_relu(channels, channels) for _ in range(num_convs)])
        self.out = nn.Conv2d(channels, out_channels, 1)
        self.out_channels = out_channels

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """``feats``: FPN levels from stride 8 upward; returns [B, D, H/8, W/8]."""
        x = self.refine[0](feats[0])
        for i in range(1, len(self.refine)):
            y = self.refine[i](feats[i])
            factor = x.shape[-2] // y.shape[-2]
            y = aligned_bilinear(y, factor)[:, :, : x.shape[-2], : x.shape[-1]]
            x = x + y
        return self.out(self.tower(x))
