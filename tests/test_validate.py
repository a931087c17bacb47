"""The table of config bounds (minillava/validate.py): every integer field has an entry, and the
limits are the ones the hardening work set (issue 10), so moving them into one table changed none."""

import dataclasses

from minillava.config import TextConfig, VisionConfig
from minillava.validate import BOUNDS, field_kinds

# The limits as they were, one constant each, before issue 17 gathered them into BOUNDS.
BEFORE = {
    "num_hidden_layers": (1, 1024), "hidden_size": (1, 65536), "intermediate_size": (1, 262144),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (2, 1024),
    "vocab_size": (1, 1 << 20), "bos_token_id": (0, (1 << 20) - 1), "eos_token_id": (0, (1 << 20) - 1),
    "max_position_embeddings": (1, 1 << 20), "sliding_window": (1, 1 << 20), "image_size": (1, 4096),
    "patch_size": (1, 4096), "num_channels": (3, 3), "patches_per_side": (1, 64),
    "image_grid_pinpoints": (1, 1024), "dynamic_patch": (1, 64), "canvas_pixels": (1, 4096 * 4096),
    "anyres_max": (1, 1024),  # added with LLaVA-OneVision (issue 19): anyres_max_N's N
}


def test_every_integer_field_has_bounds():
    for cls in (VisionConfig, TextConfig):
        ints = {f.name for f in dataclasses.fields(cls) if field_kinds(cls)[f.name] is int}
        assert ints <= set(BOUNDS), ints - set(BOUNDS)


def test_the_bounds_are_the_ones_before_and_each_says_why():
    assert {name: (lo, hi) for name, (lo, hi, _) in BOUNDS.items()} == BEFORE
    assert all(lo <= hi and why for lo, hi, why in BOUNDS.values())
