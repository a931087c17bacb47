"""FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): prune the image tokens inside
the decoder, once, in the prefill.

As its KV-cache code prunes (pkunlp-icler/FastV: `LlamaModel.fastv_forward`, its `use_cache` branch, in
src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py; and
`FastVLlamaModel.forward` in src/FastV/lmms-eval/fastv_kvcache.py): before decoder layer K, of the image
span [start, start + length) keep the `keep` tokens that the prompt's last token attends to most in
layer K-1 (mean over heads), and every text token. Layers from K on see and cache only those, in prompt
order, at their original positions (RoPE and mask); layers before K see and cache everything. The
decoder calls `FastV.keep` between layers K-1 and K (minillava/llama.py `Decoder.forward`, `prune`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import sequence_places


def last_query_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention of the last query over every key, mean over heads: (B, T) from q, k
    (B, H, T, hd). One row, never the T x T matrix. Computed as the eager attention of FastV's
    transformers fork (modeling_llama.py above, `LlamaAttention.forward`): q k^T / sqrt(hd) in the
    model's dtype, softmax in float32 cast back, then `torch.mean(.., dim=1)` over heads
    (`LlamaModel.fastv_forward`). The last row of a causal mask masks nothing."""
    row = torch.matmul(q[:, :, -1:], k.transpose(2, 3)) / math.sqrt(q.shape[-1])  # (B, H, 1, T)
    return torch.softmax(row, dim=-1, dtype=torch.float32).to(q.dtype).mean(dim=1)[:, 0]


@dataclass(frozen=True)
class FastV:
    """Where FastV prunes one prompt and how much it keeps."""

    layer: int  # K: the first layer that sees only the kept tokens
    start: int  # the image's first position in the prompt
    length: int  # the image's token count
    keep_count: int  # image tokens kept

    @classmethod
    def from_ratio(cls, start: int, length: int, ratio: float, layer: int = 2) -> FastV:
        """`ratio` r of the image tokens kept: FastV's R = 1 - r dropped, and it keeps
        round(length * (1 - R)) (fastv_forward: `topk(round(FASTV_image_token_length*(1-FASTV_r)))`).
        K = 2, the paper's setting for its LLaVA results."""
        if not 0.0 < ratio <= 1.0:  # NaN fails too
            raise ValueError(f"retention ratio must be in (0, 1], got {ratio!r}")
        dropped = 1.0 - ratio  # R, FastV's `fastv_r`
        return cls(layer, start, length, round(length * (1 - dropped)))

    @property
    def dropped(self) -> int:
        return self.length - self.keep_count

    def kept(self, scores: torch.Tensor) -> torch.Tensor:
        """Prompt positions the layers from K on keep, ascending (T - dropped,), from the scores (B, T)
        of `last_query_attention` in layer K-1. As fastv_forward: the first batch row, the image span's
        top `keep_count` by score, every text token, sorted by position."""
        t, end, device = scores.shape[1], self.start + self.length, scores.device
        top = scores[0, self.start : end].topk(self.keep_count).indices + self.start
        text = torch.arange(self.start, device=device), torch.arange(end, t, device=device)
        return torch.cat([text[0], top, text[1]]).sort().values

    def keep(self, previous, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The decoder's pruning point: `previous` is layer K-1, x (B, T, D) its input, cos and sin (T, hd)
        its positions'. Its queries and keys are computed again from x (the same numbers the layer
        computed; one more q and k projection of one layer, against reading them out of every layer)."""
        if cos.dim() != 2:
            raise ValueError("FastV reads one prompt: pass positions (T,) shared by the rows")
        attn = previous.self_attn
        q, k = attn.qk(previous.input_layernorm(x), cos, sin)
        scores = last_query_attention(q, k.repeat_interleave(attn.heads // attn.kv_heads, dim=1))
        return self.kept(scores)


def kept_positions(llm, fastv: FastV, length: int) -> torch.Tensor:
    """Indices into the uncompressed image sequence (ascending) of the image tokens FastV kept, read from
    the KV cache of decoder layer K after the prefill of a `length`-token prompt: its first slots hold
    the positions the layers from K on see (minillava/llama.py `KVCache`)."""
    pos = llm.layers[fastv.layer].self_attn.cache.pos[: length - fastv.dropped]
    return pos[(pos >= fastv.start) & (pos < fastv.start + fastv.length)] - fastv.start


def on_grid(kept: torch.Tensor, grid: tuple[int, int], area: tuple[int, int, int, int],
            side: int, max_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What FastV kept of the uncompressed image sequence, `kept` (k,) long indices into it, on the
    thumbnail (its positions (k0,) long) and the crop grid ((H, W) bool); kept newlines have no place.
    `max_tiles`: OneVision's downscaled grid, each token marked at the cell under its centre."""
    places = sequence_places(grid, area, side, max_tiles).to(kept.device)[kept]
    P, H, W = side * side, grid[1] * side, grid[0] * side
    crop_keep = torch.zeros(H * W, dtype=torch.bool, device=kept.device)
    crop_keep[places[places >= P] - P] = True
    return places[(places >= 0) & (places < P)], crop_keep.view(H, W)
