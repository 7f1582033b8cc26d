"""RGB -> CIE LAB in torch and the neighbour colour similarity used by BoxInst's pairwise term."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# sRGB (D65) -> XYZ, as in skimage.color.rgb2lab.
_RGB2XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``rgb``: [..., 3, H, W] in 0-255 (float or uint8) -> LAB [..., 3, H, W] (L in 0-100)."""
    x = rgb.float() / 255.0
    x = torch.where(x > 0.04045, ((x + 0.055) / 1.055).clamp_min(0) ** 2.4, x / 12.92)
    m = _RGB2XYZ.to(x.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, x) / _WHITE.to(x.device).view(3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-3)
    L = 116.0 * fy - 16.0
    a = 500.0 * (fx - fy)
    b = 200.0 * (fy - fz)
    return torch.stack([L, a, b], dim=-3)


def unfold_neighbours(x: torch.Tensor, size: int, dilation: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, K, H, W]: the ``size x size`` dilated neighbours of every pixel, the
    centre excluded (K = size*size - 1); out-of-image neighbours are 0."""
    b, c, h, w = x.shape
    pad = (size + (size - 1) * (dilation - 1)) // 2
    cols = F.unfold(x, kernel_size=size, padding=pad, dilation=dilation).view(b, c, size * size, h, w)
    centre = size * size // 2
    return torch.cat([cols[:, :, :centre], cols[:, :, centre + 1 :]], dim=2)


def neighbour_cosine(z: torch.Tensor, size: int, dilation: int) -> torch.Tensor:
    """[B, C, H, W] unit feature vectors -> [B, K, H, W]: the cosine between every pixel and each of its K
    neighbours (``unfold_neighbours``' order; 0 for an out-of-image neighbour), one shift at a time, so
    C x K copies of the map are never held at once."""
    h, w = z.shape[-2:]
    pad = (size + (size - 1) * (dilation - 1)) // 2
    zp = F.pad(z, (pad, pad, pad, pad))
    out = []
    for i in range(size):
        for j in range(size):
            if i == size // 2 and j == size // 2:
                continue
            out.append((z * zp[:, :, i * dilation: i * dilation + h, j * dilation: j * dilation + w]).sum(1))
    return torch.stack(out, dim=1)


def color_similarity(lab: torch.Tensor, valid: torch.Tensor, size: int = 3, dilation: int = 2) -> torch.Tensor:
    """Similarity exp(-||lab_i - lab_j|| / 2) between each pixel and its K neighbours.

    ``lab``: [B, 3, H, W]; ``valid``: [B, 1, H, W] (1 on real image pixels). Pairs touching an invalid
    pixel (padding, removed bottom rows) get similarity 0. Returns [B, K, H, W].
    """
    diff = lab[:, :, None] - unfold_neighbours(lab, size, dilation)
    sim = torch.exp(-torch.linalg.vector_norm(diff, dim=1) * 0.5)
    vmask = valid.float()
    return sim * unfold_neighbours(vmask, size, dilation)[:, 0] * vmask
