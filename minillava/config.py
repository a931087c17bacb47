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

LLaVA-OneVision (docs/onevision.md) comes in the same two layouts: `model_type` "llava_onevision" with a
SigLIP `vision_config` and a Qwen2 `text_config` (llava-hf/...-ov-hf), or the original one with
`image_aspect_ratio` "anyres_max_9", `mm_vision_tower` google/siglip-so400m-patch14-384 and Qwen2's keys
at the top level (lmms-lab/...-ov). Both become the same LlavaConfig, `anyres_max` set.

A config.json is untrusted input: it is read by trust.py, and every value passes validate.py (its
type, its range in `validate.BOUNDS`, the rules between fields) before a dataclass is returned.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .quant import Spec, parse_spec
from .trust import ConfigError, parse_json, read_regular, show
from .validate import check_pinpoints, check_text, check_value, check_vision, fill

MAX_CONFIG_BYTES = 4 << 20  # config.json: real ones are a few KB


@dataclass
class VisionConfig:
    """CLIP or SigLIP vision tower. Defaults are transformers' `CLIPVisionConfig` defaults; a SigLIP
    config's missing keys take `SiglipVisionConfig`'s (SIGLIP_DEFAULTS)."""

    hidden_size: int = 768  # width of the residual stream
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # heads per layer
    image_size: int = 224  # tile side in pixels
    patch_size: int = 32  # patch side in pixels (a token per patch)
    num_channels: int = 3  # tiles are RGB
    layer_norm_eps: float = 1e-5  # floats: finite and > 0
    hidden_act: str = "quick_gelu"  # MLP activation, one of activations.ACTIVATIONS
    model_type: str = "clip"  # "clip" (clip.py: [CLS] first), "siglip" (siglip.py: no [CLS]) or "internvit" (internvit.py)
    # InternViT only (internvit.py): "layer_norm" or "rms_norm" (the 6B tower), RMSNorm on q and k, biases on q, k, v
    norm_type: str = "layer_norm"
    qk_norm: bool = False
    qkv_bias: bool = True  # CLIP's and SigLIP's q, k, v have biases

    @property
    def patches_per_side(self) -> int:
        """Patches along a tile's side: the tower sees patches_per_side ** 2 tokens per tile."""
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """LLaMA-architecture decoder: Vicuna, Yi (LLaMA's layers, GQA), Mistral (the same layers, GQA and a
    sliding window) or Qwen2 (the same layers, GQA, biases on q, k, v). Defaults are transformers'
    `LlamaConfig` defaults; a Mistral or Qwen2 config's missing keys take `MistralConfig`'s or
    `Qwen2Config`'s (DECODER_DEFAULTS)."""
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
    qkv_bias: bool = False  # q, k, v projections have biases, o has none (Qwen2; set from model_type)
    mlp_bias: bool = False  # the SwiGLU projections have biases
    tie_word_embeddings: bool = False  # lm_head is the embedding table
    bos_token_id: int = 1  # prepended to every prompt; below vocab_size (validate.check_text)
    eos_token_id: int = 2  # ends an answer
    model_type: str = "llama"  # "llama", "mistral" or "qwen2" (original layout: llava_llama, llava_mistral, llava_qwen)
    # Mistral: each position attends to the last `sliding_window` positions only (None: to all of them).
    # Honoured by never running past it: max_position_embeddings is capped to it (see `_text_config`).
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Family:
    """How a model family sees an image: the towers it is released with (VisionConfig.model_type; each
    tower carries its own normalisation, minillava/model.py `TOWERS`), how it tiles and how it packs the
    crop grid. LLaVA's families tile with AnyRes, thumbnail first, project with mlp2x_gelu and close each
    unpadded row of the crop grid by a newline; InternVL (docs/internvl.md) tiles by the closest aspect
    ratio, thumbnail last (none with one crop; `Tiles.thumb` says where a tiler put it), merges each 2 x 2
    patches into one token (pixel shuffle) and lays the tiles out one after another, no newline."""

    towers: tuple[str, ...]
    downscales: bool  # packs a crop grid of more than about `anyres_max` tiles downscaled (layout.py)
    tiling: str = "anyres"  # "anyres" (anyres.select_best_resolution) or "closest-ratio" (anyres.closest_grid)
    tile_by_tile: bool = False  # the image's tokens tile after tile, thumbnail last, no newline (InternVL)


FAMILIES = {
    "llava-next": Family(towers=("clip",), downscales=False),  # LLaVA-1.6
    "llava-onevision": Family(towers=("siglip",), downscales=True),  # anyres_max_N (docs/onevision.md)
    "internvl": Family(towers=("internvit",), downscales=False, tiling="closest-ratio", tile_by_tile=True),  # InternVL2.5/3
}


@dataclass
class LlavaConfig:
    """The whole model, LLaVA-NeXT or LLaVA-OneVision: tower, projector, AnyRes settings and decoder;
    `family` says which of FAMILIES it is."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # AnyRes candidate resolutions, (width, height) in pixels, multiples of vision.image_size.
    grid_pinpoints: list[tuple[int, int]] = field(
        default_factory=lambda: [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    )
    vision_feature_layer: int = -2  # hidden state fed to the projector (-2: penultimate layer)
    projector_bias: bool = True
    layout: str = "transformers"  # "transformers" or "original": which config.json this came from
    # LLaVA-OneVision's anyres_max_N: the unpadded crop grid is bilinearly downscaled to about N tiles'
    # tokens when larger (layout.downscaled_size). None: LLaVA-NeXT, never downscaled.
    anyres_max: int | None = None
    family: str = "llava-next"  # a FAMILIES key, decided once when config.json is parsed
    vision_from_shapes: bool = False  # original layout with an unknown tower: sizes come from the weights
    # InternVL: each 2 x 2 patches become one token of 4x the width before the projector (pixel shuffle);
    # 1.0 everywhere else. Its tiler's grids are `grid_pinpoints`, all of min_tiles..max_tiles crops.
    downsample_ratio: float = 1.0
    quantization: Spec | None = None  # quantization_config of a checkpoint from python -m minillava.apps.quantize
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in ("float16", "bfloat16", "float32"), if it says

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def patch_group(self) -> int:
        """g: each token the decoder sees is g x g of the tower's patches (InternVL's pixel shuffle: 2; else 1)."""
        return round(1 / self.downsample_ratio)

    @property
    def token_side(self) -> int:
        """Tokens along a tile's side after the projector: the tower's patches, or InternVL's pixel-shuffled
        half of them (32 patches -> 16 tokens)."""
        return self.vision.patches_per_side // self.patch_group


# transformers' MistralConfig defaults where they differ from LlamaConfig's (transformers 5.24,
# models/mistral/configuration_mistral.py); LLaVA's LlavaMistralConfig subclasses MistralConfig.
MISTRAL_DEFAULTS = {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                    "sliding_window": 4096}
# transformers' Qwen2Config defaults where they differ from LlamaConfig's (transformers 5.24,
# models/qwen2/configuration_qwen2.py); LLaVA-NeXT's LlavaQwenConfig subclasses Qwen2Config. Its
# sliding_window applies only with use_sliding_window, which no OneVision checkpoint sets (refused).
QWEN2_DEFAULTS = {"vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768}
DECODER_DEFAULTS = {"mistral": MISTRAL_DEFAULTS, "qwen2": QWEN2_DEFAULTS}
# Decoder model types we run: the LLaMA layer stack (Vicuna, Yi), Mistral's and Qwen2's (the same layers).
# The original layout's top-level model_type names the LLaVA class; absent means LlamaConfig.
DECODER_TYPES = {"llama": "llama", "llava_llama": "llama", "mistral": "mistral", "llava_mistral": "mistral",
                 "qwen2": "qwen2", "llava_qwen": "qwen2"}
# lmms-lab's OneVision configs say model_type "llava" and name the class in `architectures` only.
ARCHITECTURES = {"LlavaQwenForCausalLM": "qwen2", "LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}

HF_DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (height, width)

# transformers' SiglipVisionConfig defaults where they differ from CLIPVisionConfig's.
SIGLIP_DEFAULTS = {"patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "model_type": "siglip"}
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}

# The towers original LLaVA checkpoints name in `mm_vision_tower`. SigLIP so400m has 27 layers, of which
# LLaVA-NeXT's siglip_encoder.py deletes the last (`del ...encoder.layers[-1:]`) and reads the output of
# the 26th: the checkpoint holds 26, and the feature layer is their last (see `parse_config`).
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(1024, 4096, 24, 16, 336, 14),
    "openai/clip-vit-large-patch14": VisionConfig(1024, 4096, 24, 16, 224, 14),
    "google/siglip-so400m-patch14-384": VisionConfig(1152, 4304, 26, 16, 384, 14, 3, 1e-6, "gelu_pytorch_tanh", "siglip"),
}


def _section(raw: dict, key: str) -> dict:
    """A nested object of config.json (absent or null: empty)."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {show(value)}")
    return value


def _names(value, table: dict) -> bool:
    """Whether a value read from config.json names an entry of `table`: a string that is a key (a list or
    an object is no name, and would not even hash)."""
    return isinstance(value, str) and value in table


def _text_config(raw: dict, section: str) -> TextConfig:
    raw = dict(raw)
    kind = raw.get("model_type", "llama")
    architectures = raw.get("architectures")
    if kind == "llava" and isinstance(architectures, list) and len(architectures) == 1 and _names(architectures[0], ARCHITECTURES):
        kind = ARCHITECTURES[architectures[0]]
    if not _names(kind, DECODER_TYPES):
        raise ConfigError(f"{section}model_type {show(kind)}: the decoder runs LLaMA (Vicuna, Yi), Mistral and "
                          f"Qwen2 models only ({', '.join(DECODER_TYPES)})")
    raw["model_type"] = DECODER_TYPES[kind]
    if raw["model_type"] in DECODER_DEFAULTS:  # absent keys (not null ones: a null sliding_window is no window)
        raw.update({k: v for k, v in DECODER_DEFAULTS[raw["model_type"]].items() if k not in raw})
    if raw["model_type"] == "qwen2":
        # Qwen2Attention: biases on q, k, v, none on o. Its sliding_window is read only with
        # use_sliding_window (transformers' Qwen2Config layer_types), never set by OneVision.
        if raw.get("use_sliding_window", False) is not False:
            raise ConfigError(f"{section}use_sliding_window {show(raw['use_sliding_window'])}: only full attention "
                              "(false) is supported for Qwen2")
        raw.update(qkv_bias=True, attention_bias=False, sliding_window=None)
    else:
        raw["qkv_bias"] = False  # our flag, not a config.json key: only Qwen2 has it
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


def _vision_config(raw) -> VisionConfig:
    """A transformers `vision_config`: CLIP's, or SigLIP's (its own defaults)."""
    raw = dict(raw) if isinstance(raw, dict) else raw
    if isinstance(raw, dict):
        kind = raw.get("model_type", "clip_vision_model")  # LlavaNextConfig's default tower is CLIP
        if not _names(kind, VISION_TYPES):
            raise ConfigError(f"vision_config.model_type {show(kind)}: the tower is CLIP or SigLIP only "
                              f"({', '.join(VISION_TYPES)})")
        raw["model_type"] = VISION_TYPES[kind]
        if raw["model_type"] == "siglip":
            raw.update({k: v for k, v in SIGLIP_DEFAULTS.items() if k not in raw})
            if raw.get("vision_use_head", True) is not False:  # the pooling head: no OneVision checkpoint has it
                raise ConfigError(f"vision_config.vision_use_head {show(raw.get('vision_use_head', True))}: only a "
                                  "SigLIP tower without its pooling head (false) is supported")
    return fill(VisionConfig, raw, "vision_config.")


def _anyres_max(value, key: str) -> int:
    """N of "anyres_max_N" (LLaVA-NeXT's llava_arch.py: `re.match(r"anyres_max_(\\d+)", ...)`)."""
    match = re.fullmatch(r"anyres_max_(\d{1,4})", value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{key} {show(value)}: only 'anyres_max_N' is supported for LLaVA-OneVision")
    return check_value(key, int(match.group(1)), "anyres_max", int)


def _pinpoints(raw, height_first: bool, key: str, tile: int | None = None) -> list[tuple[int, int]]:
    """(width, height) pairs from `raw`, a list of [a, b] positive integers (range checked later,
    against the tile size, in `check_vision`). The original layout may also write a range of grids,
    "(1x1),...,(6x6)" (LLaVA-NeXT's mm_utils.py `process_anyres_image`): every a x b from the first to
    the last, times the tile size."""
    if isinstance(raw, str) and tile is not None:
        found = re.findall(r"\((\d{1,3})x(\d{1,3})\)", raw[:1000])
        if not found:
            raise ConfigError(f"{key} {show(raw)}: a string must name grids as (AxB),...,(CxD)")
        (a0, b0), (a1, b1) = (tuple(map(int, p)) for p in (found[0], found[-1]))
        raw = [[i * tile, j * tile] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
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


def _onevision_hf(raw: dict) -> LlavaConfig:
    """transformers' LlavaOnevisionConfig (its defaults: a 26-layer SigLIP so400m, the last layer's output
    whole ("full"), anyres_max_9 on the 6 x 6 pinpoints, a Qwen2 decoder)."""
    if raw.get("vision_feature_select_strategy", "full") != "full":
        raise ConfigError(f"vision_feature_select_strategy {show(raw['vision_feature_select_strategy'])}: only "
                          "'full' is supported for LLaVA-OneVision (SigLIP has no [CLS] to drop)")
    _choice(raw, "projector_hidden_act", "gelu", "gelu", " (the projector is mlp2x_gelu)")
    vision_raw = _section(raw, "vision_config") if raw.get("vision_config") is not None else KNOWN_TOWER_DICT
    text_raw = {"model_type": "qwen2", **_section(raw, "text_config")}
    text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    bias = raw.get("multimodal_projector_bias", True)
    if type(bias) is not bool:
        raise ConfigError(f"multimodal_projector_bias must be true or false, got {show(bias)}")
    vision = _vision_config(vision_raw)
    if vision.model_type != "siglip":
        raise ConfigError("vision_config.model_type: LLaVA-OneVision is supported with its SigLIP tower only")
    return LlavaConfig(
        vision=vision,
        text=_text_config(text_raw, "text_config."),
        grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints", ONEVISION_PINPOINTS), True, "image_grid_pinpoints"),
        vision_feature_layer=_feature_layer(raw.get("vision_feature_layer", -1), "vision_feature_layer"),
        projector_bias=bias,
        layout="transformers",
        anyres_max=_anyres_max(raw.get("vision_aspect_ratio", "anyres_max_9"), "vision_aspect_ratio"),
        family="llava-onevision",
    )


# InternVL's tiles: every grid of min..max crops (InternVL3: 1..12), in the order its `dynamic_preprocess`
# tries them (the model card's and internvl_chat's `dynamic_preprocess`: a set of (columns, rows) sorted by
# the crop count; the order among equal counts is the set's, which `closest_grid`'s tie rule can see).
def internvl_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) of every InternVL tile grid, in the published order."""
    grids = set((i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_tiles <= i * j <= max_tiles)
    return sorted(grids, key=lambda g: g[0] * g[1])


# InternVisionConfig's defaults (OpenGVLab's configuration_intern_vit.py: the 6B tower) where a key is missing
# in an original config.json's vision_config; transformers' InternVLVisionConfig defaults (the 300M tower)
# for the -hf layout.
INTERNVIT_ORIGINAL = {"hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 48, "num_attention_heads": 25,
                      "image_size": 224, "patch_size": 14, "qkv_bias": False, "qk_normalization": True,
                      "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
INTERNVIT_HF = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 448, "patch_size": 14, "attention_bias": False, "use_qk_norm": False,
                "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
INTERNVL_MAX_TILES = 12  # InternVL3's max_dynamic_patch; the -hf processor's max_patches default


def _side(value, key: str):
    """An -hf size written as [h, w] (InternVLVisionConfig) or one integer: one side (square tiles only)."""
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    if isinstance(value, list):
        raise ConfigError(f"{key} {show(value)}: only square tiles and patches are supported")
    return value


def _internvit(raw: dict, original: bool) -> VisionConfig:
    """InternViT's vision_config, in OpenGVLab's names (qkv_bias, qk_normalization) or transformers'."""
    raw = {**(INTERNVIT_ORIGINAL if original else INTERNVIT_HF), **{k: v for k, v in raw.items() if v is not None}}
    if not original:
        for key, want in (("use_mean_pooling", True), ("use_absolute_position_embeddings", True), ("use_mask_token", False)):
            if raw.get(key, want) is not want:  # the last hidden state unnormalised, learned positions, no mask
                raise ConfigError(f"vision_config.{key} {show(raw[key])}: only {str(want).lower()} is supported for InternViT")
    if raw["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ConfigError(f"vision_config.norm_type {show(raw['norm_type'])}: InternViT has 'layer_norm' or 'rms_norm'")
    values = {k: raw[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "layer_norm_eps", "hidden_act", "norm_type")}
    values.update(image_size=_side(raw["image_size"], "vision_config.image_size"),
                  patch_size=_side(raw["patch_size"], "vision_config.patch_size"), model_type="internvit",
                  qk_norm=raw["qk_normalization" if original else "use_qk_norm"],
                  qkv_bias=raw["qkv_bias" if original else "attention_bias"])
    return fill(VisionConfig, values, "vision_config.")


def _internvl(raw: dict) -> LlavaConfig:
    """InternVL2.5/3 (docs/internvl.md) in either layout: OpenGVLab's `InternVLChatConfig` (model_type
    "internvl_chat": vision_config, llm_config, select_layer, the tiling keys) or transformers'
    `InternVLConfig` (model_type "internvl": vision_config, text_config; the tiling is its processor's,
    1..12 crops). Only the Qwen2 decoders (InternVL3 1B..78B, InternVL2.5 1B/8B...) are supported."""
    original = raw.get("model_type") == "internvl_chat"
    if original:
        text_raw = dict(_section(raw, "llm_config"))
        arch = text_raw.get("architectures")
        if arch != ["Qwen2ForCausalLM"]:
            raise ConfigError(f"llm_config.architectures {show(arch)}: only InternVL's Qwen2 decoders are supported")
        text_raw.setdefault("model_type", "qwen2")
        text_raw["tie_word_embeddings"] = False  # InternVLChatConfig sets it so for every size
        for key, want in (("ps_version", "v2"), ("dynamic_image_size", True), ("use_thumbnail", True)):
            if raw.get(key) != want:  # what InternVL2.5/3 were trained with
                raise ConfigError(f"{key} {show(raw.get(key))}: only {show(want)} is supported for InternVL")
        layer, section = _feature_layer(raw.get("select_layer", -1), "select_layer"), "llm_config."
        tiles = (check_value("min_dynamic_patch", raw.get("min_dynamic_patch", 1), "dynamic_patch", int),
                 check_value("max_dynamic_patch", raw.get("max_dynamic_patch", 6), "dynamic_patch", int))
    else:
        text_raw = {"model_type": "qwen2", **_section(raw, "text_config")}
        text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        if raw.get("vision_feature_select_strategy", "default") != "default":
            raise ConfigError(f"vision_feature_select_strategy {show(raw['vision_feature_select_strategy'])}: only "
                              "'default' (the [CLS] token dropped) is supported for InternVL")
        _choice(raw, "projector_hidden_act", "gelu", "gelu", " (InternVL's projector: LayerNorm, Linear, GELU, Linear)")
        layer, section = _feature_layer(raw.get("vision_feature_layer", -1), "vision_feature_layer"), "text_config."
        tiles = (1, INTERNVL_MAX_TILES)
    if text_raw.get("model_type") != "qwen2":
        raise ConfigError(f"{section}model_type {show(text_raw.get('model_type'))}: only InternVL's Qwen2 decoders are supported")
    if raw.get("downsample_ratio", 0.5) != 0.5:
        raise ConfigError(f"downsample_ratio {show(raw['downsample_ratio'])}: only 0.5 (2 x 2 patches per token) is supported")
    if not tiles[0] <= tiles[1]:
        raise ConfigError(f"min_dynamic_patch {tiles[0]} is above max_dynamic_patch {tiles[1]}")
    vision = _internvit(_section(raw, "vision_config"), original)
    force = raw.get("force_image_size")
    if original and force is not None and force != vision.image_size:
        raise ConfigError(f"force_image_size {show(force)}: only the tower's own image_size {vision.image_size} is supported")
    return LlavaConfig(
        vision=vision,
        text=_text_config(text_raw, section),
        grid_pinpoints=[(i * vision.image_size, j * vision.image_size) for i, j in internvl_grids(*tiles)],
        vision_feature_layer=layer,
        layout="original" if original else "transformers",
        family="internvl",
        downsample_ratio=0.5,
    )


def parse_config(raw) -> LlavaConfig:
    """Turn a parsed config.json of either layout into a LlavaConfig, every value checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json must be a JSON object, got {show(raw)}")
    if raw.get("model_type") == "llava_onevision":
        cfg = _onevision_hf(raw)
    elif raw.get("model_type") in ("internvl", "internvl_chat"):
        cfg = _internvl(raw)
    elif "text_config" in raw or "vision_config" in raw or raw.get("model_type") == "llava_next":
        # "full" keeps [CLS], which cannot be laid out on the AnyRes grid
        _choice(raw, "vision_feature_select_strategy", "default", "default", " with AnyRes")
        _choice(raw, "projector_hidden_act", "gelu", "gelu", " (the projector is mlp2x_gelu)")
        text_raw = dict(_section(raw, "text_config"))
        text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        bias = raw.get("multimodal_projector_bias", True)
        if type(bias) is not bool:
            raise ConfigError(f"multimodal_projector_bias must be true or false, got {show(bias)}")
        cfg = LlavaConfig(
            vision=_vision_config(raw["vision_config"]) if raw.get("vision_config") is not None
            else dataclasses.replace(KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]),  # LlavaNextConfig's default tower
            text=_text_config(text_raw, "text_config."),
            grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints", HF_DEFAULT_PINPOINTS), True, "image_grid_pinpoints"),
            vision_feature_layer=_feature_layer(raw.get("vision_feature_layer", -2), "vision_feature_layer"),
            projector_bias=bias,
            layout="transformers",
        )
    elif "mm_vision_tower" in raw or "mm_projector_type" in raw:
        _choice(raw, "mm_projector_type", "mlp2x_gelu", "mlp2x_gelu", "")
        _choice(raw, "mm_patch_merge_type", "spatial_unpad", "spatial_unpad", "")
        _choice(raw, "mm_vision_select_feature", "patch", "patch", " with AnyRes")  # cls_patch cannot be laid out on the grid
        tower = raw.get("mm_vision_tower", "")
        if type(tower) is not str:
            raise ConfigError(f"mm_vision_tower must be a string, got {show(tower)}")
        known = KNOWN_TOWERS.get(tower)
        aspect = raw.get("image_aspect_ratio", "anyres")
        if aspect == "anyres":  # LLaVA-1.6: a CLIP tower, its mm_vision_select_layer
            anyres_max, layer = None, _feature_layer(raw.get("mm_vision_select_layer", -2), "mm_vision_select_layer")
        else:  # OneVision: a SigLIP tower, whose last kept layer LLaVA-NeXT's siglip_encoder.py reads
            # (hidden_states[-1]) whatever mm_vision_select_layer says
            anyres_max, layer = _anyres_max(aspect, "image_aspect_ratio"), -1
        vision = dataclasses.replace(known) if known else VisionConfig()
        cfg = LlavaConfig(
            vision=vision,
            text=_text_config(raw, ""),
            grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints"), False, "image_grid_pinpoints",
                                      vision.image_size if known else None),  # "(1x1),..." needs the tile size
            vision_feature_layer=layer,
            layout="original",
            vision_from_shapes=known is None,
            anyres_max=anyres_max,
            family="llava-next" if anyres_max is None else "llava-onevision",
        )
    else:
        raise ConfigError("config.json is neither a transformers LLaVA-NeXT config nor an original LLaVA one")
    if not cfg.vision_from_shapes:  # otherwise checked once the weights have told the tower's sizes
        check_vision(cfg)
    cfg.quantization = parse_spec(raw.get("quantization_config"))
    cfg.torch_dtype = _saved_dtype(raw)
    return cfg


SAVED_DTYPES = ("float16", "bfloat16", "float32")


def _saved_dtype(raw: dict) -> str | None:
    """The dtype config.json says the weights were saved in: the top level's `torch_dtype`, or `dtype`
    (the key transformers writes since 4.56), else text_config's; None when absent. Only a hint for
    the default dtype (generate.default_dtype): a value we do not know is ignored, not refused."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    for section in (raw, text):
        for key in ("torch_dtype", "dtype"):
            value = section.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in SAVED_DTYPES:
                return value.removeprefix("torch.")
    return None


# LlavaOnevisionConfig's default tower (its sub_configs_defaults), as a vision_config.
KNOWN_TOWER_DICT = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14,
                    "image_size": 384, "num_hidden_layers": 26, "num_attention_heads": 16, "vision_use_head": False}
# LlavaOnevisionConfig's default pinpoints, (height, width): every grid of 1 .. 6 x 1 .. 6 tiles of 384 px.
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def load_config(model_dir: str | Path) -> LlavaConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{model_dir}: no config.json (is this a LLaVA-NeXT checkpoint directory?)")
    return parse_config(parse_json(read_regular(path, MAX_CONFIG_BYTES), str(path)))


def vision_config_from_shapes(shapes: dict[str, tuple[int, ...]], head_dim: int = 64) -> VisionConfig:
    """Vision sizes read off the tower's tensors (internal names), for original checkpoints of an
    unknown tower: CLIP if it has a [CLS] embedding, else SigLIP (its defaults for what no shape
    tells). The head count is not in any shape: taken as 64-wide heads (CLIP's; SigLIP so400m's are
    72 wide, but that tower is known by name). The result still has to pass `check_vision`."""
    siglip = "vision.embeddings.class_embedding" not in shapes
    try:
        hidden, channels, patch, _ = shapes["vision.embeddings.patch_embedding.weight"]
        positions = shapes["vision.embeddings.position_embedding.weight"][0]
        layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision.encoder.layers."))
        fc1 = shapes["vision.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ConfigError(f"vision tower weight {e} is missing (needed to size an unknown mm_vision_tower)") from None
    except (ValueError, IndexError):
        raise ConfigError("the vision tower's weights have unexpected names or shapes for a CLIP tower") from None
    side = round(max(positions - (not siglip), 0) ** 0.5)  # CLIP: one position more, the [CLS]'s
    kind = {k: v for k, v in SIGLIP_DEFAULTS.items() if k != "patch_size"} if siglip else {}
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=fc1,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // head_dim, 1),
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
        **kind,
    )
