"""Model configuration: plain dataclasses filled from a checkpoint's `config.json`, validated whole
before anything is built from them.

Two layouts exist on the hub (see shared/LLAVA_NEXT.md):
- transformers (`llava-hf/...`): nested `vision_config` / `text_config`; keys that are missing take
  the defaults of transformers' `CLIPVisionConfig` / `LlamaConfig`, which the dataclass defaults
  below reproduce. Grid pinpoints are (height, width).
- original LLaVA (`liuhaotian/...`): the decoder's keys at the top level, `mm_*` keys for the rest,
  and no vision config at all (the tower is named by `mm_vision_tower`; its sizes are read from the
  checkpoint's tensor shapes, see `vision_config_from_shapes`). Grid pinpoints are (width, height).

Internally every pinpoint is (width, height).

A config.json is untrusted input: every value is checked for its type (an int is an int, not 5.0 or
true), its range and the rules between fields before a dataclass is returned, and every size is
bounded (`MAX_*` below), so a hostile file fails here with one line naming the key, not later with
a traceback, a silently wrong model, or a huge allocation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, unreadable or describes something we do not run."""


# Upper bounds on sizes. Generous (several times the largest published model of each kind) but
# finite: a config must not make us build a million modules or size a tensor from a typo.
MAX_LAYERS = 1024  # decoders: Llama-3.1-405B has 126; CLIP/SigLIP towers at most 48
MAX_WIDTH = 65536  # hidden_size: 405B has 16384; LLaVA-NeXT-34B (Yi) 7168
MAX_FFN = 262144  # intermediate_size: 405B has 53248; Yi-34B 20480
MAX_HEADS = 1024  # attention heads: 405B has 128; Yi-34B 56
MAX_HEAD_DIM = 1024  # per-head width: 64 to 256 in published models
MAX_VOCAB = 1 << 20  # embedding rows: Gemma's 256000 is the largest common one; LLaVA 32000/32064/64000
MAX_CONTEXT = 1 << 20  # max_position_embeddings: Mistral 32768, 1M-context models 1010000
MAX_TILE = 4096  # vision image_size in pixels: CLIP 224/336, SigLIP 384/448
MAX_PATCHES_PER_SIDE = 64  # 4096 tokens per tile, quadratic attention per tile; CLIP-L/14-336 has 24
MAX_PINPOINTS = 1024  # AnyRes candidates: LLaVA-1.6 has 5, LLaVA-OneVision 36
MAX_CANVAS_PIXELS = 4096 * 4096  # one AnyRes canvas (w x h): LLaVA-1.6 672 x 672, OneVision 2304 x 2304
MAX_CONFIG_BYTES = 4 << 20  # config.json: real ones are a few KB


def bounded(default, lo: int, hi: int):
    """A dataclass int field that config.json may set to a value in [lo, hi]."""
    return field(default=default, metadata={"bounds": (lo, hi)})


@dataclass
class VisionConfig:
    """CLIP vision tower. Defaults are transformers' `CLIPVisionConfig` defaults."""

    hidden_size: int = bounded(768, 1, MAX_WIDTH)  # width of the residual stream
    intermediate_size: int = bounded(3072, 1, MAX_FFN)  # MLP width
    num_hidden_layers: int = bounded(12, 1, MAX_LAYERS)
    num_attention_heads: int = bounded(12, 1, MAX_HEADS)
    image_size: int = bounded(224, 1, MAX_TILE)  # tile side in pixels
    patch_size: int = bounded(32, 1, MAX_TILE)  # patch side in pixels (a token per patch)
    num_channels: int = bounded(3, 3, 3)  # tiles are RGB
    layer_norm_eps: float = 1e-5  # floats: finite and > 0
    hidden_act: str = "quick_gelu"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """LLaMA-architecture decoder: Vicuna, Yi (LLaMA's layers, GQA) or Mistral (the same layers, GQA and a
    sliding window). Defaults are transformers' `LlamaConfig` defaults; a Mistral config's missing keys
    take `MistralConfig`'s (MISTRAL_DEFAULTS)."""
    vocab_size: int = bounded(32000, 1, MAX_VOCAB)  # rows of the embedding table (may exceed the tokenizer's pieces)
    hidden_size: int = bounded(4096, 1, MAX_WIDTH)
    intermediate_size: int = bounded(11008, 1, MAX_FFN)  # SwiGLU width
    num_hidden_layers: int = bounded(32, 1, MAX_LAYERS)
    num_attention_heads: int = bounded(32, 1, MAX_HEADS)
    num_key_value_heads: int | None = bounded(None, 1, MAX_HEADS)  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = bounded(None, 2, MAX_HEAD_DIM)  # None: hidden_size // num_attention_heads
    # Context length. The KV cache is sized to the prompt plus the answer, at most this.
    max_position_embeddings: int = bounded(2048, 1, MAX_CONTEXT)
    rms_norm_eps: float = 1e-6  # floats: finite and > 0
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = bounded(1, 0, MAX_VOCAB - 1)  # and < vocab_size (checked in `_text_config`)
    eos_token_id: int = bounded(2, 0, MAX_VOCAB - 1)
    model_type: str = "llama"  # "llama" or "mistral" (the original layout's llava_llama / llava_mistral)
    # Mistral: each position attends to the last `sliding_window` positions only (None: to all of them).
    # Honoured by never running past it: max_position_embeddings is capped to it (see `_text_config`).
    sliding_window: int | None = bounded(None, 1, MAX_CONTEXT)

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


# --- reading untrusted files -------------------------------------------------------------------


def check_regular(path, error: type[Exception] = ConfigError, what: str = "file"):
    """Raise `error` unless `path` is a regular file (symlinks followed), from its stat alone: a FIFO,
    device or socket would block a reader or never end, so it is refused without being opened."""
    try:
        kind = _kind(os.stat(path).st_mode)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}; check the path") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise error(f"cannot open {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if kind is not None:
        raise error(f"{what} {path}: not a regular file but {kind}")


def open_regular(path, error: type[Exception] = ConfigError, what: str = "file"):
    """`path` opened for binary reading if it is a regular file, else `error` (see check_regular).

    The descriptor is checked again and opened with O_NONBLOCK, so a FIFO swapped in after the first
    check can neither block the open nor be read."""
    path = os.fspath(path)
    check_regular(path, error, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise error(f"cannot open {what} {path}: {e.strerror or e}") from None
    kind = _kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise error(f"{what} {path}: not a regular file but {kind}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is, for the message."""
    if stat.S_ISREG(mode):
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a special file")


def read_regular(path: Path, max_bytes: int, error: type[Exception] = ConfigError) -> bytes:
    """The bytes of the regular file `path`, refused past `max_bytes` before anything is read."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, more than the {max_bytes} such a file can sensibly have")
        try:
            return f.read(max_bytes + 1)[:max_bytes]
        except OSError as e:
            raise error(f"{path}: cannot read it ({e.strerror})") from None


def parse_json(data: bytes, where: str, error: type[Exception] = ConfigError):
    """Strict JSON: UTF-8 only, and a key twice in one object is refused (Python would keep the last
    silently, so two readers of the file could disagree about what it says)."""

    def no_duplicates(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}: key {show(key)} appears twice")
            out[key] = value
        return out

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int too long, nesting too deep
        if isinstance(e, error):
            raise
        raise error(f"{where}: not valid JSON ({show(str(e), 80)[1:-1]})") from None


def show(value, limit: int = 60) -> str:
    """repr of a value from an untrusted file, one line and short enough for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- values into dataclasses -------------------------------------------------------------------


def _number_kind(tp) -> type:
    """int, float, bool or str from a field's annotation (`int | None` -> int)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _value(key: str, value, f: dataclasses.Field, tp):
    kind = _number_kind(tp)
    if kind is bool:
        if type(value) is not bool:
            raise ConfigError(f"{key} must be true or false, got {show(value)}")
    elif kind is int:
        if type(value) is not int:  # not 5.0, not true: a size written wrong is a broken file
            raise ConfigError(f"{key} must be an integer, got {show(value)}")
        lo, hi = f.metadata["bounds"]
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


def _fill(cls, raw, section: str):
    """Build dataclass `cls` from the keys of the JSON object `raw` it knows, each checked; unknown
    keys are dropped, missing or null ones take the default. `section` prefixes keys in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section.rstrip('.') or 'config.json'} must be a JSON object, got {show(raw)}")
    hints = typing.get_type_hints(cls)
    values = {
        f.name: _value(section + f.name, raw[f.name], f, hints[f.name])
        for f in dataclasses.fields(cls)
        if raw.get(f.name) is not None
    }
    return cls(**values)


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
    text = _fill(TextConfig, raw, section)
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    if raw.get("head_dim") is None and text.hidden_size % heads:
        raise ConfigError(f"{section}hidden_size {text.hidden_size} is not divisible by num_attention_heads {heads}")
    if kv > heads or heads % kv:
        raise ConfigError(f"{section}num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if text.head_dim % 2:  # RoPE rotates pairs: the first half of a head with the second
        raise ConfigError(f"{section}head_dim {text.head_dim} is odd; RoPE needs an even head width")
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(text, key) >= text.vocab_size:
            raise ConfigError(f"{section}{key} {getattr(text, key)} is not below vocab_size {text.vocab_size}")
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
    if not isinstance(raw, list) or not raw or len(raw) > MAX_PINPOINTS:
        raise ConfigError(f"{key} must be a list of 1 to {MAX_PINPOINTS} [a, b] pairs, got {show(raw)}")
    for p in raw:
        if not (isinstance(p, list) and len(p) == 2 and all(type(v) is int and v > 0 for v in p)):
            raise ConfigError(f"{key}: {show(p)} is not a pair of positive integers")
    return [(b, a) if height_first else (a, b) for a, b in raw]


def _feature_layer(value, key: str) -> int:
    if type(value) is not int:
        raise ConfigError(f"{key} {show(value)}: only a single layer (an integer) is supported")
    return value


def _choice(raw: dict, key: str, default: str, allowed: str, why: str):
    value = raw.get(key, default)
    if value != allowed:
        raise ConfigError(f"{key} {show(value)}: only {allowed!r} is supported{why}")


def check_vision(cfg: LlavaConfig):
    """The tower's rules and what depends on it (feature layer, pinpoints). Separate because an
    original-layout config with an unknown tower learns the tower's sizes from the weights."""
    from .clip import ACTIVATIONS  # clip imports this module: imported here, not at the top

    v, tile = cfg.vision, cfg.vision.image_size
    for f in dataclasses.fields(VisionConfig):  # sizes read off tensor shapes come through here too
        _value(f"vision_config.{f.name}", getattr(v, f.name), f, typing.get_type_hints(VisionConfig)[f.name])
    if v.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"vision_config.hidden_act {show(v.hidden_act)} is not supported ({', '.join(ACTIVATIONS)})")
    if v.hidden_size % v.num_attention_heads:
        raise ConfigError(f"vision_config.hidden_size {v.hidden_size} is not divisible by num_attention_heads {v.num_attention_heads}")
    if v.image_size % v.patch_size or v.patches_per_side > MAX_PATCHES_PER_SIDE:
        raise ConfigError(f"vision_config.image_size {tile} must be a multiple of patch_size {v.patch_size}, "
                          f"at most {MAX_PATCHES_PER_SIDE} patches per side")
    n = v.num_hidden_layers  # hidden states 0 (embeddings) .. n; negative ones count from the end
    if not -(n + 1) <= cfg.vision_feature_layer <= n:
        raise ConfigError(f"vision_feature_layer {cfg.vision_feature_layer} is outside the tower's hidden states "
                          f"{-(n + 1)} .. {n} ({n} layers)")
    for w, h in cfg.grid_pinpoints:
        if w % tile or h % tile or w * h > MAX_CANVAS_PIXELS:
            raise ConfigError(f"image_grid_pinpoints: {w} x {h} must be multiples of the tile size {tile}, "
                              f"at most {MAX_CANVAS_PIXELS} pixels")


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
            vision=_fill(VisionConfig, raw["vision_config"], "vision_config.") if raw.get("vision_config") is not None
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
