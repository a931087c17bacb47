"""Model configuration: plain dataclasses filled from a checkpoint's `config.json`.

Two layouts exist on the hub (see shared/LLAVA_NEXT.md):
- transformers (`llava-hf/...`): nested `vision_config` / `text_config`; keys that are missing take
  the defaults of transformers' `CLIPVisionConfig` / `LlamaConfig`, which the dataclass defaults
  below reproduce. Grid pinpoints are (height, width).
- original LLaVA (`liuhaotian/...`): the decoder's keys at the top level, `mm_*` keys for the rest,
  and no vision config at all (the tower is named by `mm_vision_tower`; its sizes are read from the
  checkpoint's tensor shapes, see `vision_config_from_shapes`). Grid pinpoints are (width, height).

Internally every pinpoint is (width, height).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, unreadable or describes something we do not run."""


@dataclass
class VisionConfig:
    """CLIP vision tower. Defaults are transformers' `CLIPVisionConfig` defaults."""

    hidden_size: int = 768  # width of the residual stream
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224  # tile side in pixels
    patch_size: int = 32  # patch side in pixels (a token per patch)
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """LLaMA/Vicuna decoder. Defaults are transformers' `LlamaConfig` defaults."""

    vocab_size: int = 32000  # rows of the embedding table (may exceed the tokenizer's pieces)
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # context length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class LlavaConfig:
    """The whole LLaVA-NeXT model: tower, projector, AnyRes settings and decoder."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # AnyRes candidate resolutions, (width, height) in pixels, multiples of vision.image_size.
    grid_pinpoints: list[tuple[int, int]] = field(
        default_factory=lambda: [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    )
    vision_feature_layer: int = -2  # hidden state fed to the projector (-2: penultimate layer)
    projector_bias: bool = True
    layout: str = "transformers"  # "transformers" or "original": which config.json this came from
    vision_from_shapes: bool = False  # original layout with an unknown tower: sizes come from the weights


HF_DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (height, width)

# The towers original LLaVA checkpoints name in `mm_vision_tower`.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(1024, 4096, 24, 16, 336, 14),
    "openai/clip-vit-large-patch14": VisionConfig(1024, 4096, 24, 16, 224, 14),
}


def _fill(cls, raw: dict):
    """Build dataclass `cls` from the keys of `raw` it knows; unknown keys are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names and v is not None})


def _text_config(raw: dict) -> TextConfig:
    raw = dict(raw)
    rope = raw.get("rope_parameters") or {}  # transformers 5 moved rope_theta in here
    if "rope_theta" not in raw and "rope_theta" in rope:
        raw["rope_theta"] = rope["rope_theta"]
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"rope scaling {scaling} is not supported (LLaVA-1.6 Vicuna uses plain RoPE)")
    if isinstance(raw.get("eos_token_id"), list):
        raw["eos_token_id"] = raw["eos_token_id"][0]
    return _fill(TextConfig, raw)


def _pinpoints(raw, height_first: bool) -> list[tuple[int, int]]:
    if not isinstance(raw, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        raise ConfigError(f"image_grid_pinpoints must be a list of [a, b] pairs, got {raw!r}")
    return [(int(b), int(a)) if height_first else (int(a), int(b)) for a, b in raw]


def parse_config(raw: dict) -> LlavaConfig:
    """Turn a parsed config.json of either layout into a LlavaConfig."""
    if "text_config" in raw or "vision_config" in raw or raw.get("model_type") == "llava_next":
        strategy = raw.get("vision_feature_select_strategy", "default")
        layer = raw.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer {layer!r}: only a single layer is supported")
        if strategy != "default":  # "full" keeps [CLS], which cannot be laid out on the AnyRes grid
            raise ConfigError(f"vision_feature_select_strategy {strategy!r}: only 'default' works with AnyRes")
        text_raw = dict(raw.get("text_config") or {})
        text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        return LlavaConfig(
            vision=_fill(VisionConfig, raw.get("vision_config") or {}),
            text=_text_config(text_raw),
            grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints", HF_DEFAULT_PINPOINTS), True),
            vision_feature_layer=layer,
            projector_bias=raw.get("multimodal_projector_bias", True),
            layout="transformers",
        )
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ConfigError(f"mm_projector_type {raw['mm_projector_type']!r}: only mlp2x_gelu is supported")
        if raw.get("image_aspect_ratio", "anyres") != "anyres":
            raise ConfigError(f"image_aspect_ratio {raw['image_aspect_ratio']!r}: only anyres (LLaVA-1.6) is supported")
        if raw.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
            raise ConfigError(f"mm_patch_merge_type {raw['mm_patch_merge_type']!r}: only spatial_unpad is supported")
        if raw.get("mm_vision_select_feature", "patch") != "patch":  # cls_patch cannot be laid out on the grid
            raise ConfigError(f"mm_vision_select_feature {raw['mm_vision_select_feature']!r}: only 'patch' works with AnyRes")
        tower = raw.get("mm_vision_tower", "")
        known = KNOWN_TOWERS.get(tower)
        return LlavaConfig(
            vision=dataclasses.replace(known) if known else VisionConfig(),
            text=_text_config(raw),
            grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints"), False),
            vision_feature_layer=raw.get("mm_vision_select_layer", -2),
            layout="original",
            vision_from_shapes=known is None,
        )
    raise ConfigError("config.json is neither a transformers LLaVA-NeXT config nor an original LLaVA one")


def load_config(model_dir: str | Path) -> LlavaConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json (is this a LLaVA-NeXT checkpoint directory?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    return parse_config(raw)


def vision_config_from_shapes(shapes: dict[str, tuple[int, ...]], head_dim: int = 64) -> VisionConfig:
    """Vision sizes read off the tower's tensors (internal names), for original checkpoints of an
    unknown tower. The head count is not in any shape: CLIP towers use 64-wide heads."""
    hidden, channels, patch, _ = shapes["vision.embeddings.patch_embedding.weight"]
    positions = shapes["vision.embeddings.position_embedding.weight"][0]
    side = round((positions - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision.encoder.layers."))
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes["vision.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // head_dim, 1),
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
    )
