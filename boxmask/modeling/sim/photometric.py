"""Strong photometric augmentation of the student's view (teacher asymmetry, ``sim.student_aug``).

The recipe of semi-supervised detection's strong view (Unbiased Teacher, after SimCLR): colour jitter
(brightness, contrast, saturation 0.4, hue 0.1, in random order) with probability 0.8, grayscale with
probability 0.2, Gaussian blur (sigma 0.1-2 pixels) with probability 0.5. Nothing geometric, so the boxes,
the teacher's maps and the colour affinities (computed on the clean image) stay aligned with the student."""
from __future__ import annotations

import random

import torch
import torchvision.transforms.v2.functional as TF

JITTER_PROB, GRAY_PROB, BLUR_PROB = 0.8, 0.2, 0.5
BRIGHTNESS = CONTRAST = SATURATION = 0.4
HUE = 0.1
BLUR_SIGMA = (0.1, 2.0)


@torch.no_grad()
def strong_photometric(images: torch.Tensor, image_sizes: list[tuple[int, int]], rng: random.Random) -> torch.Tensor:
    """A strongly augmented copy of a uint8 batch [B, 3, H, W]: each image's valid area (``image_sizes``)
    gets its own draw from ``rng`` (on the host, so a run is a function of its seed); the padding stays
    zero. Every operation is elementwise or a convolution on the device: no host sync."""
    out = images.clone()
    for i, (h, w) in enumerate(image_sizes):
        x = out[i, :, :h, :w]
        if rng.random() < JITTER_PROB:
            ops = [
                (TF.adjust_brightness, rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)),
                (TF.adjust_contrast, rng.uniform(1 - CONTRAST, 1 + CONTRAST)),
                (TF.adjust_saturation, rng.uniform(1 - SATURATION, 1 + SATURATION)),
                (TF.adjust_hue, rng.uniform(-HUE, HUE)),
            ]
            rng.shuffle(ops)
            for fn, factor in ops:
                x = fn(x, factor)
        if rng.random() < GRAY_PROB:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if rng.random() < BLUR_PROB:
            sigma = rng.uniform(*BLUR_SIGMA)
            # kernel of +-3 sigma, odd, and smaller than the image (reflect padding needs that)
            k = min(2 * int(3 * sigma + 0.5) + 1, (min(h, w) - 1) // 2 * 2 + 1)
            if k >= 3:
                x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        out[i, :, :h, :w] = x
    return out
