"""FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): prune the image tokens inside
the decoder, once, in the prefill. A decoder-side method: a schedule of one stage (globalcom2/methods.py).

As its KV-cache code prunes (pkunlp-icler/FastV: `LlamaModel.fastv_forward`, its `use_cache` branch, in
src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py; and
`FastVLlamaModel.forward` in src/FastV/lmms-eval/fastv_kvcache.py): before decoder layer K, of the image
span [start, start + length) keep the `keep` tokens that the prompt's last token attends to most in
layer K-1 (mean over heads), and every text token. Layers from K on see and cache only those, in prompt
order, at their original positions (RoPE and mask); layers before K see and cache everything. The
decoder calls `FastV.keep` between layers K-1 and K (minillava/llama.py `Decoder.forward`, its
`schedule`), lending it the queries and keys of its layers; nothing here imports the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch



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

    def keep(self, between) -> torch.Tensor:
        """The decoder's pruning point (minillava/llama.py `Between`): the queries and keys of layer K-1
        for its input, computed again (the same numbers the layer computed; one more q and k projection
        of one layer, against reading them out of every layer), rank the image tokens."""
        q, k = between.query_key(self.layer - 1, between.previous_input)
        return self.kept(last_query_attention(q, k))


def fastv_schedule(start: int, length: int, ratio: float, n_layers: int) -> tuple[FastV]:
    """FastV's schedule for a prompt whose image tokens are [start, start + length): one stage before layer
    K = 2 whatever the decoder's depth (the paper's setting; the caller refuses a decoder of 2 layers)."""
    return (FastV.from_ratio(start, length, ratio),)
