"""The rules a config.json's values must follow before a model is built from them.

A config.json is untrusted input: every value is checked for its type (an int is an int, not 5.0 or
true), its range (BOUNDS) and the rules between fields, so a hostile file fails with one line naming
the key (a ConfigError), not later with a traceback, a silently wrong model or a huge allocation.
config.py reads the file into dataclasses through `fill`; the rules between fields are
`check_text` and `check_vision`.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from .activations import ACTIVATIONS
from .trust import ConfigError, show

# name -> (lowest, highest, why the highest). The highest values are generous (several times the
# largest published model of each kind) but finite: a config must not make us build a million
# modules or size a tensor from a typo. A name VisionConfig and TextConfig share has the same
# bounds in both; the last three are no fields but are checked by the rules below.
BOUNDS = {
    "num_hidden_layers": (1, 1024, "Llama-3.1-405B has 126 decoder layers; CLIP/SigLIP towers at most 48"),
    "hidden_size": (1, 65536, "405B is 16384 wide; LLaVA-NeXT-34B (Yi) 7168"),
    "intermediate_size": (1, 262144, "MLP width: 405B 53248; Yi-34B 20480"),
    "num_attention_heads": (1, 1024, "405B has 128; Yi-34B 56"),
    "num_key_value_heads": (1, 1024, "at most num_attention_heads (a rule below)"),
    "head_dim": (2, 1024, "64 to 256 in published models; even for RoPE (a rule below)"),
    "vocab_size": (1, 1 << 20, "Gemma's 256000 is the largest common one; LLaVA 32000/32064/64000"),
    "bos_token_id": (0, (1 << 20) - 1, "an embedding row: also below vocab_size (a rule below)"),
    "eos_token_id": (0, (1 << 20) - 1, "as bos_token_id"),
    "max_position_embeddings": (1, 1 << 20, "Mistral has 32768, 1M-context models 1010000"),
    "sliding_window": (1, 1 << 20, "as max_position_embeddings"),
    "image_size": (1, 4096, "tile side in pixels: CLIP 224/336, SigLIP 384/448 (OneVision 384)"),
    "patch_size": (1, 4096, "patch side in pixels: at most the tile"),
    "num_channels": (3, 3, "tiles are RGB"),
    "patches_per_side": (1, 64, "4096 tokens per tile, attention quadratic per tile; CLIP-L/14-336 has 24"),
    "image_grid_pinpoints": (1, 1024, "AnyRes candidates: LLaVA-1.6 has 5, LLaVA-OneVision 36"),
    "anyres_max": (1, 1024, "OneVision's anyres_max_9: the crop grid is downscaled to about 9 tiles' tokens"),
    "dynamic_patch": (1, 64, "InternVL's crops per image: InternVL3 takes 1 to 12"),
    "canvas_pixels": (1, 4096 * 4096, "one AnyRes canvas (w x h): LLaVA-1.6 672 x 672, OneVision 2304 x 2304"),
}


def check_value(key: str, value, name: str, kind: type):
    """`value` of a field `name` of type `kind` (int, float, bool or str), checked; `key` is the
    field's name in the file, for the message. Floats must be finite and > 0 (epsilons, RoPE's base)."""
    if kind is bool:
        if type(value) is not bool:
            raise ConfigError(f"{key} must be true or false, got {show(value)}")
    elif kind is int:
        if type(value) is not int:  # not 5.0, not true: a size written wrong is a broken file
            raise ConfigError(f"{key} must be an integer, got {show(value)}")
        lo, hi, _ = BOUNDS[name]
        if not lo <= value <= hi:
            raise ConfigError(f"{key} = {show(value)} is outside [{lo}, {hi}]")
    elif kind is float:
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key} must be a finite number > 0, got {show(value)}")
        value = float(value)
    elif kind is str:
        if type(value) is not str:
            raise ConfigError(f"{key} must be a string, got {show(value)}")
    return value


def field_kinds(cls) -> dict[str, type]:
    """Field name -> int, float, bool or str, from the dataclass's annotations (`int | None` -> int)."""
    kinds = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        kinds[name] = args[0] if args else tp
    return kinds


def fill(cls, raw, section: str):
    """Build dataclass `cls` from the keys of the JSON object `raw` it knows, each checked; unknown
    keys are dropped, missing or null ones take the default. `section` prefixes keys in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section.rstrip('.') or 'config.json'} must be a JSON object, got {show(raw)}")
    kinds = field_kinds(cls)
    values = {
        f.name: check_value(section + f.name, raw[f.name], f.name, kinds[f.name])
        for f in dataclasses.fields(cls)
        if raw.get(f.name) is not None
    }
    return cls(**values)


def check_text(text, section: str, head_dim_given: bool):
    """The decoder's rules between fields (`text` is a TextConfig; `head_dim_given`: config.json set
    head_dim, so hidden_size need not split into the heads)."""
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    if not head_dim_given and text.hidden_size % heads:
        raise ConfigError(f"{section}hidden_size {text.hidden_size} is not divisible by num_attention_heads {heads}")
    if kv > heads or heads % kv:
        raise ConfigError(f"{section}num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if text.head_dim % 2:  # RoPE rotates pairs: the first half of a head with the second
        raise ConfigError(f"{section}head_dim {text.head_dim} is odd; RoPE needs an even head width")
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(text, key) >= text.vocab_size:
            raise ConfigError(f"{section}{key} {getattr(text, key)} is not below vocab_size {text.vocab_size}")


def check_pinpoints(raw, key: str):
    """`raw` is a list of 1 to BOUNDS["image_grid_pinpoints"] [a, b] pairs of positive integers (their
    range is checked against the tile size in `check_vision`)."""
    _, most, _ = BOUNDS["image_grid_pinpoints"]
    if not isinstance(raw, list) or not raw or len(raw) > most:
        raise ConfigError(f"{key} must be a list of 1 to {most} [a, b] pairs, got {show(raw)}")
    for p in raw:
        if not (isinstance(p, list) and len(p) == 2 and all(type(v) is int and v > 0 for v in p)):
            raise ConfigError(f"{key}: {show(p)} is not a pair of positive integers")


def check_vision(cfg):
    """The tower's rules and what depends on it (feature layer, pinpoints); `cfg` is a LlavaConfig.
    Separate from parsing because an original-layout config with an unknown tower learns the tower's
    sizes from the weights, which come through here too."""
    v, tile = cfg.vision, cfg.vision.image_size
    for name, kind in field_kinds(type(v)).items():
        check_value(f"vision_config.{name}", getattr(v, name), name, kind)
    if v.model_type not in ("clip", "siglip", "internvit"):
        raise ConfigError(f"vision_config.model_type {show(v.model_type)}: the tower is CLIP, SigLIP or InternViT only")
    family = cfg.family_spec  # what each family was trained with
    if v.model_type not in family.towers or family.downscales != (cfg.anyres_max is not None):
        raise ConfigError("a SigLIP tower goes with LLaVA-OneVision's anyres_max, a CLIP one with LLaVA-NeXT's "
                          "anyres, InternViT with InternVL; this config mixes them")
    if (v.model_type == "internvit") != (cfg.downsample_ratio != 1) or v.model_type != "internvit" and (
            v.norm_type != "layer_norm" or v.qk_norm or not v.qkv_bias):
        raise ConfigError("the pixel shuffle (downsample_ratio), RMSNorm, q/k norm and q/k/v without biases are "
                          "InternViT's (InternVL) only; this config mixes them")
    if v.model_type == "internvit" and v.patches_per_side % 2:  # 2 x 2 patches per token
        raise ConfigError(f"vision_config: InternViT's pixel shuffle needs an even number of patches per side, "
                          f"got {v.patches_per_side}")
    if v.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"vision_config.hidden_act {show(v.hidden_act)} is not supported ({', '.join(ACTIVATIONS)})")
    if v.hidden_size % v.num_attention_heads:
        raise ConfigError(f"vision_config.hidden_size {v.hidden_size} is not divisible by num_attention_heads {v.num_attention_heads}")
    _, most_patches, _ = BOUNDS["patches_per_side"]
    # SigLIP's convolution ("valid") drops a remainder: so400m's 384 px tiles are 27 patches of 14 px (378 px)
    ragged = v.image_size % v.patch_size and v.model_type != "siglip"
    if ragged or not 1 <= v.patches_per_side <= most_patches:
        raise ConfigError(f"vision_config.image_size {tile} must be a multiple of patch_size {v.patch_size} "
                          f"(SigLIP: at least one patch), at most {most_patches} patches per side")
    n = v.num_hidden_layers  # hidden states 0 (embeddings) .. n; negative ones count from the end
    if not -(n + 1) <= cfg.vision_feature_layer <= n:
        raise ConfigError(f"vision_feature_layer {cfg.vision_feature_layer} is outside the tower's hidden states "
                          f"{-(n + 1)} .. {n} ({n} layers)")
    _, most_pixels, _ = BOUNDS["canvas_pixels"]
    for w, h in cfg.grid_pinpoints:
        if w % tile or h % tile or w * h > most_pixels:
            raise ConfigError(f"image_grid_pinpoints: {w} x {h} must be multiples of the tile size {tile}, "
                              f"at most {most_pixels} pixels")
