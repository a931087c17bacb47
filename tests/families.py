"""A tiny random model of every family in `config.FAMILIES`, of any tile geometry (tests/strategies.py
`Geometry`), built directly from a `LlavaConfig` (no transformers, no files): what the property tests run
every image and compressor through. A family added to FAMILIES is built here from its `Family` alone (its
first tower; an anyres_max where it downscales), so the properties cover it without a new fixture.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from hypothesis import strategies as st

from minillava.config import FAMILIES, LlavaConfig, TextConfig, VisionConfig
from minillava.model import Llava
from minillava.validate import check_vision
from tests import tiny
from tests.strategies import Geometry, geometries

SHIPPED = "llava-next-tiny-scenes"  # the shipped model (weights/), which `models` draws beside the families

TOWER_ACT = {"clip": "quick_gelu", "siglip": "gelu_pytorch_tanh", "internvit": "gelu"}


def config(family: str, geometry: Geometry, decoder_layers: int = 3) -> LlavaConfig:
    """A config of `family` tiling as `geometry`, checked as a config.json's would be (validate.py). A family
    whose tokens are 2 x 2 patches (InternVL) gets tiles of twice the geometry's side in patches, so that its
    tiles hold the geometry's side x side tokens; its candidate grids are the geometry's."""
    spec = FAMILIES[family]
    tower = spec.towers[0]
    group = 2 if spec.tile_by_tile else 1
    tile = geometry.tile * group
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=tile, patch_size=geometry.patch, hidden_act=TOWER_ACT[tower],
                          model_type=tower)
    text = TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=decoder_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tiny.VOCAB, max_position_embeddings=1 << 16)
    cfg = LlavaConfig(vision=vision, text=text, grid_pinpoints=[(gw * tile, gh * tile) for gw, gh in geometry.grids],
                      family=family, vision_feature_layer=-2 if tower == "clip" else -1,
                      anyres_max=(geometry.max_tiles or 9) if spec.downscales else None, downsample_ratio=1 / group)
    check_vision(cfg)
    return cfg


@lru_cache(maxsize=64)
def model(family: str, geometry: Geometry, decoder_layers: int = 3, seed: int = 0) -> Llava:
    """The tiny model of `family` and `geometry`, random weights (tests/tiny.py `randomise`), float32."""
    torch.manual_seed(seed)
    return tiny.randomise(Llava(config(family, geometry, decoder_layers))).eval()


@st.composite
def models(draw, max_grid: int = 8):
    """(SHIPPED, None, 4) or (family, Geometry, decoder layers): a family of FAMILIES on a geometry it may
    have, with 1 to 3 decoder layers (FastV, which prunes after layer 2, refuses fewer than 3)."""
    if draw(st.integers(0, 3)) == 0:
        return SHIPPED, None, 4
    family = draw(st.sampled_from(sorted(FAMILIES)))
    geometry = draw(geometries(downscales=FAMILIES[family].downscales, max_grid=max_grid))
    return family, geometry, draw(st.sampled_from([3, 3, 2, 1]))
