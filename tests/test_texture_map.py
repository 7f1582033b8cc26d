"""SIM's texture map: an object's own cells against its background in the backbone's stride-8 features."""
import math

import pytest
import torch

from boxmask.config import ConfigError, load_config
from boxmask.modeling.sim.texture_map import background_ring, texture_map


def _two_textures() -> torch.Tensor:
    """Two images of 4 x 6 cells; image 0: feature (1, 0) on the left three columns, (0, 1) on the right;
    image 1 the other way round."""
    feats = torch.zeros(2, 2, 4, 6)
    feats[0, 0, :, :3] = feats[0, 1, :, 3:] = 1.0
    feats[1, 1, :, :3] = feats[1, 0, :, 3:] = 3.0  # any length: the map works on unit features
    return feats


def test_texture_map_scores_cells_by_the_closer_prototype_in_their_own_image():
    feats = _two_textures()
    box = torch.ones(3, 4, 6)
    fg = torch.zeros(3, 4, 6, dtype=torch.bool)
    bg = torch.zeros_like(fg)
    fg[:, 1:3, 0:2] = True  # the object's own cells: on the left
    bg[:, :, 4:] = True  # its background: on the right
    fg[2] = False
    fg[2, 0, 0] = True  # one cell only: too few
    image = torch.tensor([0, 1, 1])
    m_t, valid = texture_map(feats, image, fg, bg, box, tau=0.5)
    hi, lo = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))  # cos difference +1 / -1, over tau 0.5
    for g in (0, 1):  # the same answer whichever image the object is in
        assert torch.allclose(m_t[g, :, :3], torch.full((4, 3), hi))
        assert torch.allclose(m_t[g, :, 3:], torch.full((4, 3), lo))
    assert valid.tolist() == [True, True, False]
    # outside the box: 0
    box[0, :, 5] = 0.0
    m_t, _ = texture_map(feats, image, fg, bg, box, tau=0.5)
    assert torch.equal(m_t[0, :, 5], torch.zeros(4))


def test_background_ring_is_the_cells_just_outside_the_box():
    box = torch.zeros(1, 7, 7)
    box[0, 2:5, 2:5] = 1.0
    ring = background_ring(box, 1)
    want = torch.zeros(7, 7, dtype=torch.bool)
    want[1:6, 1:6] = True
    want[2:5, 2:5] = False
    assert torch.equal(ring[0], want)


def test_texture_keys_are_refused_without_the_texture_map():
    with pytest.raises(ConfigError, match=r"'sim\.texture_weight' only acts through the texture map"):
        load_config(None, ["method=sim", "sim.texture_weight=0.5"])
    with pytest.raises(ConfigError, match=r"sim\.texture_tau"):
        load_config(None, ["method=sim", "sim.texture_map=true", "sim.texture_tau=0"])
    cfg = load_config(None, ["method=sim", "sim.texture_map=true", "sim.texture_weight=0.5"])
    assert (cfg.sim.texture_map, cfg.sim.texture_weight) == (True, 0.5)
