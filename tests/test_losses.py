"""BoxInst losses and colour similarity on hand-made cases with known answers."""
import math

import pytest
import torch

from boxmask.modeling import boxinst_loss
from boxmask.modeling.color import color_similarity, rgb_to_lab, unfold_neighbours
from boxmask.modeling.condinst import box_masks_on_grid


def test_dice_known_values():
    p = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert boxinst_loss.dice_loss(p, p).item() == pytest.approx(0.0, abs=1e-5)
    q = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert boxinst_loss.dice_loss(p, q).item() == pytest.approx(1.0)
    half = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # 2*1 / (1 + 2) -> loss 1/3
    assert boxinst_loss.dice_loss(half, p).item() == pytest.approx(1 / 3, abs=1e-5)


def test_projection_loss_zero_for_box_shaped_mask():
    box = torch.zeros(1, 16, 16)
    box[:, 4:10, 3:12] = 1
    assert boxinst_loss.projection_loss(box.clone(), box).item() == pytest.approx(0.0, abs=1e-5)
    # Any mask with the same projections (a plus sign filling the box extent) also gives 0 ...
    plus = torch.zeros(1, 16, 16)
    plus[:, 4:10, 7] = 1
    plus[:, 6, 3:12] = 1
    assert boxinst_loss.projection_loss(plus, box).item() == pytest.approx(0.0, abs=1e-5)
    # ... while a mask spilling outside the box does not.
    spill = box.clone()
    spill[:, 12:14, 3:12] = 1
    assert boxinst_loss.projection_loss(spill, box).item() > 0.05


def test_pairwise_only_counts_pairs_inside_box():
    logits = torch.full((1, 1, 12, 12), 5.0)
    logits[..., :, 6:] = -5.0  # left half fg, right half bg: label changes between columns 5 and 6
    sim = torch.ones(1, 8, 12, 12)
    box_left = torch.zeros(1, 12, 12)
    box_left[:, :, :2] = 1  # far from the label change: every pair agrees
    assert boxinst_loss.pairwise_loss(logits, sim, box_left).item() < 0.01
    box_mid = torch.zeros(1, 12, 12)
    box_mid[:, :, 4:8] = 1  # straddles the change: disagreeing pairs are penalised
    assert boxinst_loss.pairwise_loss(logits, sim, box_mid).item() > 1.0
    # With no similar colours there is nothing to penalise.
    assert boxinst_loss.pairwise_loss(logits, torch.zeros_like(sim), box_mid).item() == 0.0


def test_pairwise_log_same_value():
    logits = torch.zeros(1, 1, 5, 5)  # p = 0.5 everywhere -> P(same) = 0.5
    ls = boxinst_loss.pairwise_log_same(logits)
    assert torch.allclose(ls[:, :, 2, 2], torch.full((1, 8), math.log(0.5)), atol=1e-6)


def test_rgb_to_lab_reference_colours():
    rgb = torch.tensor([[255.0, 0.0, 0.0], [255.0, 255.0, 255.0], [0.0, 0.0, 0.0]]).T.reshape(3, 3, 1)
    lab = rgb_to_lab(rgb)[:, :, 0].T
    # skimage.color.rgb2lab: red (53.24, 80.09, 67.20), white (100, 0, 0), black (0, 0, 0)
    assert torch.allclose(lab[0], torch.tensor([53.24, 80.09, 67.20]), atol=0.05)
    assert torch.allclose(lab[1], torch.tensor([100.0, 0.0, 0.0]), atol=0.05)
    assert torch.allclose(lab[2], torch.zeros(3), atol=0.05)


def test_color_similarity_and_neighbours():
    img = torch.zeros(1, 3, 8, 8)
    img[:, :, :, 4:] = 255.0
    lab = rgb_to_lab(img)
    valid = torch.ones(1, 1, 8, 8)
    sim = color_similarity(lab, valid, 3, 2)
    assert sim.shape == (1, 8, 8, 8)
    # pixel (3, 1): all neighbours at dilation 2 are black -> similarity 1 (except out-of-image ones = 0)
    assert sim[0, :, 3, 1].max().item() == pytest.approx(1.0)
    # pixel (3, 3): its right neighbour (3, 5) is white -> tiny similarity
    right = 4  # neighbour order: row-major 3x3 without the centre -> index 4 is (0, +1)
    assert sim[0, right, 3, 3].item() < 1e-6
    n = unfold_neighbours(torch.arange(25.0).view(1, 1, 5, 5), 3, 2)
    assert n[0, 0, :, 2, 2].tolist() == [0, 2, 4, 10, 14, 20, 22, 24]
    # invalid pixels make zero-similarity pairs
    valid[..., 0, :] = 0
    assert color_similarity(lab, valid)[0, :, 0].abs().sum().item() == 0.0


def test_box_masks_on_grid():
    m = box_masks_on_grid(torch.tensor([[8.0, 4.0, 24.0, 16.0]]), 8, 8, 4)
    # cell centres at 4j + 2.5 -> columns j with 8 < c < 24: j = 2..5; rows 4 < c < 16: j = 1..3
    assert m[0].nonzero()[:, 1].unique().tolist() == [2, 3, 4, 5]
    assert m[0].nonzero()[:, 0].unique().tolist() == [1, 2, 3]


def test_neighbour_cosine_equals_the_unfolded_products():
    from boxmask.modeling.color import neighbour_cosine

    z = torch.nn.functional.normalize(torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(0)), dim=1)
    for size, dil in ((3, 1), (3, 2), (5, 1)):
        want = (z[:, :, None] * unfold_neighbours(z, size, dil)).sum(1)
        assert torch.allclose(neighbour_cosine(z, size, dil), want, atol=1e-6)
