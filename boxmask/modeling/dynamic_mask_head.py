"""CondInst's dynamic mask head: per-instance 1x1 convs whose weights come from the controller."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample [B, C, h, w] by ``factor`` so that output pixel centres stay aligned with the input
    grid whose pixel (j) sits at image coordinate ``j*stride + stride/2`` (CondInst's convention)."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def aligned_bilinear_above(x: torch.Tensor, factor: int, thresh: float, size: tuple[int, int]) -> torch.Tensor:
    """``aligned_bilinear(x, factor)[..., :size[0], :size[1]] > thresh`` as a bool tensor, compared before
    the final shift (a pure rearrangement of values), which then moves bytes instead of floats and
    only the ``size`` rows and columns kept."""
    if factor == 1:
        return x[..., : size[0], : size[1]] > thresh
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    above = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True) > thresh
    rows = (torch.arange(min(size[0], factor * h), device=x.device) - factor // 2).clamp(min=0)
    cols = (torch.arange(min(size[1], factor * w), device=x.device) - factor // 2).clamp(min=0)
    return above.index_select(-2, rows).index_select(-1, cols)


class DynamicMaskHead(nn.Module):
    """Holds no weights of its own: it runs the MLP defined by each instance's generated params."""

    def __init__(self, in_channels: int, channels: int = 8, num_layers: int = 3):
        super().__init__()
        self.in_channels = in_channels + 2  # + relative coordinates
        self.channels = channels
        self.num_layers = num_layers
        self.weight_shapes: list[tuple[int, int]] = []
        c_in = self.in_channels
        for i in range(num_layers):
            c_out = 1 if i == num_layers - 1 else channels
            self.weight_shapes.append((c_out, c_in))
            c_in = c_out
        self.num_params = sum(o * i + o for o, i in self.weight_shapes)

    def default_params(self) -> torch.Tensor:
        """A flat parameter vector initialised like a plain ``nn.Conv2d`` stack (Kaiming uniform).

        The controller's bias starts at this vector: every instance then begins with a working MLP
        whose output already depends on the features and coordinates, instead of near-zero random
        weights whose gradients are products of near-zero factors (why CondInst's masks learn late)."""
        parts = []
        for c_out, c_in in self.weight_shapes:
            bound = math.sqrt(3.0 / c_in)  # std 1/sqrt(fan_in): unit-scale activations at the start
            parts.append(torch.empty(c_out * c_in).uniform_(-bound, bound))
            parts.append(torch.zeros(c_out))
        return torch.cat(parts)

    def split_params_batched(self, params: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer: weights [N, out, in] and biases [N, out]."""
        sizes = [o * i for o, i in self.weight_shapes] + [o for o, _ in self.weight_shapes]
        chunks = torch.split(params, sizes, dim=1)
        k = self.num_layers
        weights = [chunks[j].reshape(-1, o, i) for j, (o, i) in enumerate(self.weight_shapes)]
        biases = [chunks[k + j] for j in range(k)]
        return weights, biases

    def forward(
        self,
        mask_feats: torch.Tensor,
        feat_stride: int,
        params: torch.Tensor,
        image_idx: torch.Tensor,
        centres: torch.Tensor,
        soi: torch.Tensor,
        out_stride: int,
    ) -> torch.Tensor:
        """Mask logits [N, 1, H/out_stride, W/out_stride] for N instances.

        ``mask_feats`` [B, D, h, w] at ``feat_stride``; ``params`` [N, P]; ``image_idx`` [N];
        ``centres`` [N, 2] instance locations (x, y) in image pixels; ``soi`` [N] the size of interest of
        each instance's FPN level, which normalises its relative coordinates."""
        n = params.shape[0]
        b, d, h, w = mask_feats.shape
        if n == 0:
            return mask_feats.new_zeros(0, 1, h * feat_stride // out_stride, w * feat_stride // out_stride)
        xs = torch.arange(w, device=mask_feats.device, dtype=mask_feats.dtype) * feat_stride + feat_stride // 2
        ys = torch.arange(h, device=mask_feats.device, dtype=mask_feats.dtype) * feat_stride + feat_stride // 2
        rel_x = (centres[:, 0:1].to(xs.dtype) - xs[None]) / soi[:, None].to(xs.dtype)  # [N, w]
        rel_y = (centres[:, 1:2].to(ys.dtype) - ys[None]) / soi[:, None].to(ys.dtype)  # [N, h]
        coords = torch.stack([rel_x[:, None, :].expand(n, h, w), rel_y[:, :, None].expand(n, h, w)], dim=1)
        x = torch.cat([coords, mask_feats[image_idx]], dim=1).flatten(2)  # [N, C, h*w]
        # The per-instance 1x1 convs as batched matrix products: the same as a grouped conv with one group
        # per instance, but the number of instances stays a dynamic dimension (ONNX export).
        for i, (wt, bs) in enumerate(zip(*self.split_params_batched(params.to(x.dtype)))):
            x = torch.baddbmm(bs[:, :, None], wt, x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        x = x.reshape(n, 1, h, w)
        return aligned_bilinear(x, feat_stride // out_stride)
