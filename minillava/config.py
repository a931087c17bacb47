"""Model configuration: plain dataclasses filled from a checkpoint's `config.json`, validated whole
before anything is built from them.

Two layouts exist on the hub:
- transformers (`llava-hf/...`): nested `vision_config` / `text_config`; keys that are missing take
  the defaults of transformers' `CLIPVisionConfig` / `LlamaConfig`, which the dataclass defaults
  below reproduce. Grid pinpoints are (height, width).
- original LLaVA (`liuhaotian/...`): the decoder's keys at the top level, `mm_*` keys for the rest,
  and no vision config at all (the tower is named by `mm_vision_tower`; its sizes are read from the
  checkpoint's tensor shapes, see `vision_config_from_shapes`). Grid pinpoints are (width, height).

Internally every pinpoint is (width, height).

A config.json is untrusted input: it is read by trust.py, and every value passes validate.py (its
type, its range in `validate.BOUNDS`, the rules between fields) before a dataclass is returned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .quant import Spec, parse_spec
from .trust import ConfigError, parse_json, read_regular, show
from .validate import check_pinpoints, check_text, check_vision, fill

MAX_CONFIG_BYTES = 4 << 20  # config.json: real ones are a few KB


@dataclass
class VisionConfig:
    """CLIP vision tower. Defaults are transformers' `CLIPVisionConfig` defaults."""

    hidden_size: int = 768  # width of the residual stream
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # heads per layer
    image_size: int = 224  # tile side in pixels
    patch_size: int = 32  # patch side in pixels (a token per patch)
    num_channels: int = 3  # tiles are RGB
    layer_norm_eps: float = 1e-5  # floats: finite and > 0
    hidden_act: str = "quick_gelu"  # MLP activation, one of clip.ACTIVATIONS

    @property
    def patches_per_side(self) -> int:
        """Patches along a tile's side: the tower sees patches_per_side ** 2 tokens per tile."""
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """LLaMA-architecture decoder: Vicuna, Yi (LLaMA's layers, GQA) or Mistral (the same layers, GQA and a
    sliding window). Defaults are transformers' `LlamaConfig` defaults; a Mistral config's missing keys
    take `MistralConfig`'s (MISTRAL_DEFAULTS)."""
    vocab_size: int = 32000  # rows of the embedding table (may exceed the tokenizer's pieces)
    hidden_size: int = 4096  # width of the residual stream
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads per layer
    num_key_value_heads: int | None = None  # key/value heads (GQA); None: same as num_attention_heads
    head_dim: int | None = None  # width of one head; None: hidden_size // num_attention_heads
    # Context length. The KV cache is sized to the prompt plus the answer, at most this.
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6  # floats: finite and > 0
    rope_theta: float = 10000.0  # RoPE's base: the slowest rotation's wavelength
    attention_bias: bool = False  # q, k, v and o projections have biases
    mlp_bias: bool = False  # the SwiGLU projections have biases
    tie_word_embeddings: bool = False  # lm_head is the embedding table
    bos_token_id: int = 1  # prepended to every prompt; below vocab_size (validate.check_text)
    eos_token_id: int = 2  # ends an answer
    model_type: str = "llama"  # "llama" or "mistral" (the original layout's llava_llama / llava_mistral)
    # Mistral: each position attends to the last `sliding_window` positions only (None: to all of them).
    # Honoured by never running past it: max_position_embeddings is capped to it (see `_text_config`).
    sliding_window: int | None = None

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
    quantization: Spec | None = None  # quantization_config of a checkpoint from python -m minillava.quantize


# transformers' MistralConfig defaults where they differ from LlamaConfig's (transformers 5.24,
# models/mistral/configuration_mistral.py); LLaVA's LlavaMistralConfig subclasses MistralConfig.
MISTRAL_DEFAULTS = {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                    "sliding_window": 4096}
# Decoder model types we run: the LLaMA layer stack (Vicuna, Yi) and Mistral's (the same layers). The
# original layout's top-level model_type names the LLaVA class; absent means LlamaConfig.
DECODER_TYPES = {"llama": "llama", "llava_llama": "llama", "mistral": "mistral", "llava_mistral": "mistral"}

HF_DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (height, width)

# The towers original LLaVA checkpoints name in `mm_vision_tower`.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(1024, 4096, 24, 16, 336, 14),
    "openai/clip-vit-large-patch14": VisionConfig(1024, 4096, 24, 16, 224, 14),
}


def _section(raw: dict, key: str) -> dict:
    """A nested object of config.json (absent or null: empty)."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {show(value)}")
    return value


def _text_config(raw: dict, section: str) -> TextConfig:
    raw = dict(raw)
    kind = raw.get("model_type", "llama")
    if kind not in DECODER_TYPES:
        raise ConfigError(f"{section}model_type {show(kind)}: the decoder runs LLaMA (Vicuna, Yi) and Mistral "
                          f"models only ({', '.join(DECODER_TYPES)})")
    raw["model_type"] = DECODER_TYPES[kind]
    if raw["model_type"] == "mistral":  # absent keys (not null ones: a null sliding_window is no window)
        raw.update({k: v for k, v in MISTRAL_DEFAULTS.items() if k not in raw})
    rope = _section(raw, "rope_parameters")  # transformers 5 moved rope_theta in here
    if "rope_theta" not in raw and "rope_theta" in rope:
        raw["rope_theta"] = rope["rope_theta"]
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{section}rope_scaling must be a JSON object or null, got {show(scaling)}")
    scaling = scaling or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"rope scaling {show(scaling)} is not supported (LLaVA-1.6 Vicuna uses plain RoPE)")
    if raw.get("hidden_act", "silu") != "silu":  # the decoder's MLP is SwiGLU (llama.MLP)
        raise ConfigError(f"{section}hidden_act {show(raw['hidden_act'])}: the decoder supports only 'silu'")
    if isinstance(raw.get("eos_token_id"), list):  # generation configs list several; the first is the tokenizer's
        if not raw["eos_token_id"]:
            raise ConfigError(f"{section}eos_token_id is an empty list")
        raw["eos_token_id"] = raw["eos_token_id"][0]
    text = fill(TextConfig, raw, section)
    check_text(text, section, head_dim_given=raw.get("head_dim") is not None)
    if text.sliding_window is not None and text.sliding_window < text.max_position_embeddings:
        # A sequence no longer than the window attends exactly as with full causal attention (transformers'
        # sliding mask keeps key j for query i when i - window < j <= i), so the decoder, which has no
        # window, is exact up to the window and the context stops there: longer prompts are refused and
        # answers end at it (generate's context check). LLaVA-1.6-Mistral's own config has no window.
        text.max_position_embeddings = text.sliding_window
    return text


def _pinpoints(raw, height_first: bool, key: str) -> list[tuple[int, int]]:
    """(width, height) pairs from `raw`, a list of [a, b] positive integers (range checked later,
    against the tile size, in `check_vision`)."""
    check_pinpoints(raw, key)
    return [(b, a) if height_first else (a, b) for a, b in raw]


def _feature_layer(value, key: str) -> int:
    if type(value) is not int:
        raise ConfigError(f"{key} {show(value)}: only a single layer (an integer) is supported")
    return value


def _choice(raw: dict, key: str, default: str, allowed: str, why: str):
    value = raw.get(key, default)
    if value != allowed:
        raise ConfigError(f"{key} {show(value)}: only {allowed!r} is supported{why}")


def parse_config(raw) -> LlavaConfig:
    """Turn a parsed config.json of either layout into a LlavaConfig, every value checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json must be a JSON object, got {show(raw)}")
    if "text_config" in raw or "vision_config" in raw or raw.get("model_type") == "llava_next":
        # "full" keeps [CLS], which cannot be laid out on the AnyRes grid
        _choice(raw, "vision_feature_select_strategy", "default", "default", " with AnyRes")
        _choice(raw, "projector_hidden_act", "gelu", "gelu", " (the projector is mlp2x_gelu)")
        text_raw = dict(_section(raw, "text_config"))
        text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        bias = raw.get("multimodal_projector_bias", True)
        if type(bias) is not bool:
            raise ConfigError(f"multimodal_projector_bias must be true or false, got {show(bias)}")
        cfg = LlavaConfig(
            vision=fill(VisionConfig, raw["vision_config"], "vision_config.") if raw.get("vision_config") is not None
            else dataclasses.replace(KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]),  # LlavaNextConfig's default tower
            text=_text_config(text_raw, "text_config."),
            grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints", HF_DEFAULT_PINPOINTS), True, "image_grid_pinpoints"),
            vision_feature_layer=_feature_layer(raw.get("vision_feature_layer", -2), "vision_feature_layer"),
            projector_bias=bias,
            layout="transformers",
        )
    elif "mm_vision_tower" in raw or "mm_projector_type" in raw:
        _choice(raw, "mm_projector_type", "mlp2x_gelu", "mlp2x_gelu", "")
        _choice(raw, "image_aspect_ratio", "anyres", "anyres", " (LLaVA-1.6)")
        _choice(raw, "mm_patch_merge_type", "spatial_unpad", "spatial_unpad", "")
        _choice(raw, "mm_vision_select_feature", "patch", "patch", " with AnyRes")  # cls_patch cannot be laid out on the grid
        tower = raw.get("mm_vision_tower", "")
        if type(tower) is not str:
            raise ConfigError(f"mm_vision_tower must be a string, got {show(tower)}")
        known = KNOWN_TOWERS.get(tower)
        cfg = LlavaConfig(
            vision=dataclasses.replace(known) if known else VisionConfig(),
            text=_text_config(raw, ""),
            grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints"), False, "image_grid_pinpoints"),
            vision_feature_layer=_feature_layer(raw.get("mm_vision_select_layer", -2), "mm_vision_select_layer"),
            layout="original",
            vision_from_shapes=known is None,
        )
    else:
        raise ConfigError("config.json is neither a transformers LLaVA-NeXT config nor an original LLaVA one")
    if not cfg.vision_from_shapes:  # otherwise checked once the weights have told the tower's sizes
        check_vision(cfg)
    cfg.quantization = parse_spec(raw.get("quantization_config"))
    return cfg


def load_config(model_dir: str | Path) -> LlavaConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{model_dir}: no config.json (is this a LLaVA-NeXT checkpoint directory?)")
    return parse_config(parse_json(read_regular(path, MAX_CONFIG_BYTES), str(path)))


def vision_config_from_shapes(shapes: dict[str, tuple[int, ...]], head_dim: int = 64) -> VisionConfig:
    """Vision sizes read off the tower's tensors (internal names), for original checkpoints of an
    unknown tower. The head count is not in any shape: CLIP towers use 64-wide heads. The result
    still has to pass `check_vision`."""
    try:
        hidden, channels, patch, _ = shapes["vision.embeddings.patch_embedding.weight"]
        positions = shapes["vision.embeddings.position_embedding.weight"][0]
        layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision.encoder.layers."))
        fc1 = shapes["vision.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ConfigError(f"vision tower weight {e} is missing (needed to size an unknown mm_vision_tower)") from None
    except (ValueError, IndexError):
        raise ConfigError("the vision tower's weights have unexpected names or shapes for a CLIP tower") from None
    side = round(max(positions - 1, 0) ** 0.5)
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=fc1,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // head_dim, 1),
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
    )
