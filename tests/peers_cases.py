"""Shared inputs of the peer tests: one image's features and tower probes, random but reproducible."""

import pytest
import torch

from globalcom2 import ImageFeatures
from minillava.layout import unpad_area

GRIDS = [(2, 2), (1, 3), (3, 1), (1, 2), (2, 1), (3, 2)]
RATIOS = {24: (0.5, 0.25, 0.1), 6: (1.0, 0.5, 0.25, 0.1), 8: (0.5, 0.1)}  # tile side: ratios tried
# every grid at sides 6 and 8; the real side 24 (576 tokens) on two grids by default, on all with -m slow
CASES = [pytest.param(grid, side, RATIOS[side], marks=[pytest.mark.slow] if side == 24 and grid not in GRIDS[:2] else [])
         for side in (6, 8, 24) for grid in GRIDS]
SIZES = [(640, 480), (480, 640), (1000, 333), (333, 1000), (800, 799), (1280, 300), (300, 1280), (672, 672)]


def project(h):
    """A stand-in projector: per token, and exact whatever the batch shape (so that projecting rows
    together or apart gives the same bits), widening Dv = 8 to D = 12."""
    return torch.cat([h, torch.tanh(h[..., :4]) * 2], dim=-1)


def peer_case(grid, size, side, seed, heads=2, Dv=8, dtype=torch.float32):
    """ImageFeatures with every probe of every peer, and the full layer -2 attention (N, heads, 1 + P, 1 + P)
    whose [CLS] row the probe is, for the transcriptions of the published code."""
    g = torch.Generator().manual_seed(seed)
    gw, gh = grid
    P, N = side * side, 1 + gw * gh
    hidden = torch.randn(N, 1 + P, Dv, generator=g).to(dtype)
    keys = torch.randn(N, 1 + P, Dv, generator=g).to(dtype)
    attn = (torch.randn(N, heads, 1 + P, 1 + P, generator=g) * 3).softmax(-1)
    features = project(hidden[:, 1:])
    probes = {("cls_attn", -2): attn[:, :, 0, :], ("keys", -2): keys, ("hidden", -2): hidden}
    thumb_scores, crop_scores = torch.randn(P, generator=g), torch.randn(N - 1, P, generator=g)
    # HiRED's and PruMerge+'s (drawn after the others, so those keep their values)
    probes["cls_attn", 0] = torch.randn(N, heads, 1 + P, generator=g).softmax(-1)
    probes["cls_attn", -1] = (torch.randn(N, heads, 1 + P, generator=g) * 2).softmax(-1)
    probes["keys", -1] = torch.randn(N, 1 + P, Dv, generator=g).to(dtype)
    image = ImageFeatures(features[0], features[1:], thumb_scores, crop_scores,
                          grid, size, unpad_area(grid, size, side), torch.full((features.shape[-1],), -7.0, dtype=dtype),
                          probes, project)
    return image, attn


def tower_run(tower, pixels, feature_layer=-2, needs=()):
    """A tower's feature layer (without [CLS]), GlobalCom2's [CLS] scores (N, P) and the probes of `needs`,
    computed as minillava.compression does: hidden states from the tower, probes by globalcom2.probes."""
    from globalcom2 import SCORE_PROBE, hidden_states_needed, tower_probes

    n = len(tower.encoder.layers)
    asked = tuple(dict.fromkeys((SCORE_PROBE, *needs)))
    states = tower(pixels, (feature_layer, *hidden_states_needed(asked, n)))
    probes = tower_probes(asked, states, tower.query_key, n)
    return states[feature_layer][:, 1:], probes[SCORE_PROBE][:, 1:], {need: probes[need] for need in needs}


def tokens(image, result):
    """The sequence the model feeds the decoder for what a method kept of `image` (minillava/layout.py)."""
    from minillava.layout import compressed_sequence

    return compressed_sequence(result, image.crops, image.grid, image.area, image.newline)
