"""Procedural textures for the textured synthetic dataset (``boxmask synth --kind textured``).

Every function returns a pattern ``p`` in ``[0, 1]``, float32, of shape (h, w); a two-colour palette
(c1, c2) turns it into an image, ``c1 + (c2 - c1) * p``.  Lengths are in px at 192 px images and are
multiplied by ``scale``.

Object classes each have one texture family (``OBJECT_FAMILIES``) whose dominant wavelengths lie in a
band of their own (speckle 2.8-4.2 px, stripes 4.5-6.5, checker 7.8-9.9 along its diagonals, dots
10-13); per-instance parameters (scale, phase, orientation, sharpness) vary inside it.
The background pool (``BACKGROUND_FAMILIES``) holds only textures of wavelengths above 20 px or
flat cells, never a class family, so texture separates every class from the background.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

Pattern = Callable[[np.random.Generator, int, int, float], np.ndarray]


def _rotated_coords(rng: np.random.Generator, h: int, w: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by ``angle`` and shifted by a random offset (a random phase)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    off = rng.uniform(0, 1000, 2).astype(np.float32)
    return xx * c + yy * s + off[0], -xx * s + yy * c + off[1]


def _soft_sign(x: np.ndarray, sharp: float) -> np.ndarray:
    """Map a zero-mean wave to [0, 1]; larger ``sharp`` gives a squarer profile."""
    return (0.5 + 0.5 * np.tanh(sharp * x) / np.tanh(sharp)).astype(np.float32)


def band_noise(rng: np.random.Generator, h: int, w: int, lam_lo: float, lam_hi: float) -> np.ndarray:
    """Zero-mean, unit-variance isotropic noise with wavelengths in [lam_lo, lam_hi] px (FFT band-pass)."""
    white = rng.standard_normal((h, w)).astype(np.float32)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    # Soft edges in log-frequency avoid ringing.
    lo, hi = 1.0 / lam_hi, 1.0 / lam_lo
    with np.errstate(divide="ignore"):
        lf = np.log(np.maximum(f, 1e-6))
    filt = 1.0 / (1.0 + np.exp(-(lf - np.log(lo)) * 8.0)) / (1.0 + np.exp((lf - np.log(hi)) * 8.0))
    n = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(h, w)).astype(np.float32)
    return n / (float(n.std()) + 1e-6)


# --------------------------------------------------------------------------- object families


def stripes(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Straight parallel stripes, period 4.5-6.5 px, any orientation."""
    u, _ = _rotated_coords(rng, h, w, float(rng.uniform(0, np.pi)))
    period = rng.uniform(4.5, 6.5) * scale
    return _soft_sign(np.sin(2 * np.pi * u / period), float(rng.uniform(1.0, 4.0)))


def checker(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A rotated checkerboard, cells 5.5-7 px."""
    u, v = _rotated_coords(rng, h, w, float(rng.uniform(0, np.pi / 2)))
    cell = rng.uniform(5.5, 7.0) * scale
    return _soft_sign(np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell), float(rng.uniform(2.0, 5.0)))


def dots(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Round dots on a rotated square or hexagonal lattice, spacing 10-13 px."""
    u, v = _rotated_coords(rng, h, w, float(rng.uniform(0, np.pi / 2)))
    a = rng.uniform(10.0, 13.0) * scale
    if rng.random() < 0.5:  # hexagonal: every other row shifted by half a spacing
        row = np.floor(v / a)
        u = u + 0.5 * a * (row % 2)
    du = np.mod(u, a) - a / 2
    dv = np.mod(v, a) - a / 2
    r = rng.uniform(0.2, 0.32) * a
    edge = max(0.6, 0.15 * r)
    return np.clip((r - np.sqrt(du * du + dv * dv)) / edge + 0.5, 0, 1).astype(np.float32)


def speckle(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Fine isotropic grain, wavelengths within 2.8-4.2 px."""
    lo = rng.uniform(2.8, 3.2) * scale
    hi = rng.uniform(3.8, 4.2) * scale
    return _soft_sign(band_noise(rng, h, w, lo, hi), float(rng.uniform(0.8, 1.6)))


# --------------------------------------------------------------------------- background pool


def clouds(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Soft low-frequency blotches, wavelengths above 30 px."""
    lam = rng.uniform(30.0, 60.0) * scale
    return _soft_sign(band_noise(rng, h, w, lam, 6 * lam), float(rng.uniform(0.5, 1.2)))


def cells(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Flat-shaded Voronoi cells of 20-36 px (stones, tiles, leaves seen from afar)."""
    size = rng.uniform(20.0, 36.0) * scale
    n = max(2, int(round(h * w / (size * size))))
    seeds = np.ones((h, w), np.uint8)
    seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = 0
    # Labels of the nearest seed pixel: one connected region per seed.
    _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    shades = rng.uniform(0, 1, int(labels.max()) + 1).astype(np.float32)
    return shades[labels]


def grain(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Wood-like gently curved bands, period 20-30 px; low contrast.

    The warp's slope stays small, so the bands never bunch up into stripes of a class's frequency."""
    u, _ = _rotated_coords(rng, h, w, float(rng.uniform(0, np.pi)))
    period = rng.uniform(20.0, 30.0) * scale
    warp = band_noise(rng, h, w, 80 * scale, 400 * scale) * (rng.uniform(0.15, 0.35) * period)
    amp = rng.uniform(0.25, 0.45)
    return (0.5 + amp * np.sin(2 * np.pi * (u + warp) / period)).astype(np.float32)


def gradient(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A linear ramp across the image."""
    u, _ = _rotated_coords(rng, h, w, float(rng.uniform(0, 2 * np.pi)))
    return ((u - u.min()) / max(float(u.max() - u.min()), 1e-6)).astype(np.float32)


OBJECT_FAMILIES: dict[str, Pattern] = {"stripes": stripes, "dots": dots, "checker": checker, "speckle": speckle}
BACKGROUND_FAMILIES: dict[str, Pattern] = {"clouds": clouds, "cells": cells, "grain": grain, "gradient": gradient}
