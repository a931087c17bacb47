"""config.json paths of the two OneVision layouts that no test took (issue 32, the coverage audit): the
original layout's pinpoints written as a range of grids, and the refusals of a projector bias that is
not a boolean, a OneVision config with a CLIP tower, and tower weights that cannot size an unknown
tower. Each is parsed from a config built as tests/tiny.py's checkpoints are (no weights are written).
"""

from __future__ import annotations

import pytest

from minillava.config import parse_config, vision_config_from_shapes
from minillava.trust import ConfigError
from tests import tiny


@pytest.fixture(scope="module")
def ov():
    return tiny.ov_hf_config()


def test_original_pinpoints_as_a_range_of_grids(ov):
    """lmms-lab's configs may write "(1x1),...,(6x6)": every a x b from the first grid to the last, times
    the tile (LLaVA-NeXT's mm_utils.py `process_anyres_image`), known only for a tower we know by name."""
    raw = {**tiny.ov_original_config(ov), "mm_vision_tower": "google/siglip-so400m-patch14-384",
           "image_grid_pinpoints": "(1x1),...,(2x3)"}
    cfg = parse_config(raw)
    assert cfg.grid_pinpoints == [(a * 384, b * 384) for a in (1, 2) for b in (1, 2, 3)]
    with pytest.raises(ConfigError, match=r"image_grid_pinpoints '1x1, 2x2': a string must name grids as \(AxB\),...,\(CxD\)"):
        parse_config({**raw, "image_grid_pinpoints": "1x1, 2x2"})


def test_onevision_hub_config_refusals(ov):
    raw = ov.to_dict()
    with pytest.raises(ConfigError, match="multimodal_projector_bias must be true or false, got 'yes'"):
        parse_config({**raw, "multimodal_projector_bias": "yes"})
    clip = {**raw["vision_config"], "model_type": "clip_vision_model"}
    with pytest.raises(ConfigError, match="LLaVA-OneVision is supported with its SigLIP tower only"):
        parse_config({**raw, "vision_config": clip})


def test_unknown_tower_sized_from_its_weights():
    shapes = {"vision.embeddings.patch_embedding.weight": (64, 3, 14, 14),
              "vision.embeddings.position_embedding.weight": (17, 64),
              "vision.encoder.layers.0.mlp.fc1.weight": (128, 64)}
    with pytest.raises(ConfigError, match=r"vision tower weight 'vision.embeddings.position_embedding.weight' is "
                       r"missing \(needed to size an unknown mm_vision_tower\)"):
        vision_config_from_shapes({k: v for k, v in shapes.items() if "position" not in k})
    with pytest.raises(ConfigError, match="unexpected names or shapes for a CLIP tower"):
        vision_config_from_shapes({**shapes, "vision.embeddings.patch_embedding.weight": (64, 3, 14)})
