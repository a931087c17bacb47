"""Theoretical cost of a prefill, LLM-Viewer's count (the GlobalCom2 paper's efficiency figures).

Matmul FLOPs of every layer with a multiply-add as 2 FLOPs; norms, RoPE, softmax and SiLU are not
matmuls and not counted. One function serves the table in docs/speed.md (scripts/bench.py, a 672 x 672
image at every r) and the per-question figure of `python -m minillava.eval` (minillava/eval/efficiency.py,
each question's real prompt: its text, its image's tokens after compression, newlines included).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TextConfig, VisionConfig


@dataclass(frozen=True)
class LlmSpec:
    """The decoder shapes the count needs."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_text(cls, name: str, t: TextConfig) -> LlmSpec:
        return cls(name, t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
                   t.num_key_value_heads, t.vocab_size)


LLAVA_7B = LlmSpec("LLaVA-NeXT-7B", 32, 4096, 11008, 32, 32, 32000)
LLAVA_13B = LlmSpec("LLaVA-NeXT-13B", 40, 5120, 13824, 40, 40, 32000)


def per_token_weights(spec: LlmSpec) -> tuple[int, int]:
    """Multiply-adds of one position through a layer's weights: (q, k, v, o projections; SwiGLU MLP)."""
    d, hd = spec.hidden, spec.head_dim
    return d * spec.heads * hd * 2 + d * spec.kv_heads * hd * 2, 3 * d * spec.intermediate


def prefill_flops(spec: LlmSpec, tokens: int, causal: bool = False) -> dict[str, int]:
    """Matmul FLOPs of a prefill of `tokens` positions (multiply-add = 2 FLOPs).

    linear: q, k, v, o and the SwiGLU gate, up, down projections of every position in every layer;
    attention: Q K^T and A V, over the full T x T square as LLM-Viewer counts it (`causal`: only the
    T (T + 1) / 2 pairs a causal kernel has to compute); lm_head: the last position only (a prefill
    only needs the next token's logits).
    """
    t, d, hd = tokens, spec.hidden, spec.head_dim
    per_token = sum(per_token_weights(spec))
    pairs = t * (t + 1) // 2 if causal else t * t
    linear = 2 * t * per_token * spec.layers
    attention = 2 * 2 * pairs * spec.heads * hd * spec.layers
    lm_head = 2 * d * spec.vocab
    return {"linear": linear, "attention": attention, "lm_head": lm_head, "total": linear + attention + lm_head}


def layered_prefill_flops(spec: LlmSpec, layer_tokens: list[int], mlp_tokens: list[int] | None = None) -> int:
    """`prefill_flops` total of a prefill whose layer i sees `layer_tokens[i]` positions (a decoder-side
    method's schedule: minillava/schedule.py `token_counts`; FastV: T in layers 0 .. K-1, T - dropped
    from K on, as FastV's paper counts its own savings), its MLP `mlp_tokens[i]` (fewer in a layer a stage
    merges inside, FiCoCo-L; default the same); the lm_head once. What a stage reads to choose its tokens
    (FastV: layer K-1's attention row) is not counted."""
    mlp_tokens = layer_tokens if mlp_tokens is None else mlp_tokens
    if not len(layer_tokens) == len(mlp_tokens) == spec.layers:
        raise ValueError(f"{len(layer_tokens)} layer token counts for a decoder of {spec.layers} layers")
    projections, mlp = per_token_weights(spec)
    layers = sum(2 * t * projections + 2 * m * mlp + 2 * 2 * t * t * spec.heads * spec.head_dim
                 for t, m in zip(layer_tokens, mlp_tokens))
    return layers + 2 * spec.hidden * spec.vocab


def kv_cache_bytes(spec: LlmSpec, tokens: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for `tokens` positions (fp16: 2 bytes)."""
    return 2 * spec.layers * tokens * spec.kv_heads * spec.head_dim * bytes_per_value


def tower_layer_flops(v: VisionConfig, tokens: int, mlp_tokens: int | None = None) -> int:
    """Matmul FLOPs of one vision-tower layer for one tile: q, k, v, o and the attention of `tokens` tokens,
    the MLP's two matrices of `mlp_tokens` (fewer where a stage merges inside the layer; default the same)."""
    t, m, d = tokens, tokens if mlp_tokens is None else mlp_tokens, v.hidden_size
    return 2 * t * 4 * d * d + 2 * m * 2 * d * v.intermediate_size + 2 * 2 * t * t * d


def tile_flops(v: VisionConfig, layer_tokens: list[int], mlp_tokens: list[int] | None = None) -> int:
    """Matmul FLOPs of one tile through the patch embedding and the tower layers that run, layer i at
    `layer_tokens[i]` tokens, its MLP at `mlp_tokens[i]` (a tower method's schedule: minillava/schedule.py
    `token_counts`)."""
    mlp_tokens = layer_tokens if mlp_tokens is None else mlp_tokens
    patch = 2 * (v.image_size // v.patch_size) ** 2 * v.hidden_size * v.num_channels * v.patch_size**2
    return patch + sum(tower_layer_flops(v, t, m) for t, m in zip(layer_tokens, mlp_tokens, strict=True))


def tower_flops(v: VisionConfig, tiles: int, text_hidden: int, features_only: bool = False) -> dict[str, int]:
    """Matmul FLOPs of the CLIP tower and the 2-layer projector for `tiles` tiles.

    Every layer in full, as transformers runs it; `features_only`: what our tower computes for features
    of layer -2 plus [CLS] scores (all layers but the last, then the last layer's keys and one query)."""
    p = (v.image_size // v.patch_size) ** 2
    n, d = p + 1, v.hidden_size
    if features_only:
        last = 2 * n * d * d + 2 * d * d + 2 * n * d  # k of every token, q of [CLS], one row of logits
        tower = tiles * (tile_flops(v, [n] * (v.num_hidden_layers - 1)) + last)
    else:
        tower = tiles * tile_flops(v, [n] * v.num_hidden_layers)
    projector = 2 * tiles * p * (d * text_hidden + text_hidden * text_hidden)
    return {"tower": tower, "projector": projector}
