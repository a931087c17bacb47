"""PyramidDrop (Xing et al. 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"): drop image tokens inside the decoder at several layers, a pyramid
of shrinking shares. A decoder-side method: a schedule of three stages (globalcom2/methods.py).

As its published code prunes (Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py,
`LlamaModel.pdrop_forward` and `pdrop_rank_drop`, inference branch; its scripts/v1_6 evaluate LLaVA-NeXT
with `--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"`, to which its
model_vqa_loader.py prepends 1.0):

- after layer `rank_layer` - 1 (before layer `rank_layer`, for each of `layer_list`) the image span, which
  holds int(N ratio[s]) tokens at stage s, keeps int(N ratio[s + 1]) of them, N the image's token count
  before any drop (on LLaVA-NeXT the whole image sequence: thumbnail, unpadded crops and their newlines,
  llava_arch.py `image_tokens`, as ours);
- ranked by the attention of the prompt's last token computed with the *next* layer's input norm, q and
  k projections and RoPE at the current positions: q k^T / sqrt(hd) in the model's dtype, softmax in
  float32 cast back, mean over heads (the mean over the one text query row is the identity); the
  `keep` best image tokens, in position order, every text token kept;
- the kept sequence is renumbered 0 .. T'-1 (`position_ids[i, :cur_len] = arange(cur_len)`), and a decode
  step's position in those layers is shifted down by what was dropped (the `else` branch of pdrop_forward),
  so every pruned layer sees a contiguous sequence: the stage's `renumber`.

Our knob: r is the share of the image tokens the last layers see, as for FastV: ratio[s] = r^(s/3), so
r = 0.125 gives the published 0.5, 0.25, 0.125 (lambda = 0.5). The layers scale with the decoder's depth:
round(L s / 4) for s = 1, 2, 3, the published 8, 16, 24 of 32 layers. Departures: grouped-query attention
(Mistral, Yi, Qwen2) repeats the key heads (the published matmul assumes as many key heads as query
heads); ties of `topk` go to the lower position (the published order is unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fastv import last_query_attention

STAGES = (1, 2, 3)  # quarters of the decoder: the published layer_list 8, 16, 24 of 32 layers


@dataclass(frozen=True)
class PDropStage:
    """One stage: before decoder layer `layer`, the image span [start, start + length) keeps `keep_count`."""

    layer: int  # rank_layer: the first layer that sees only the kept tokens
    start: int  # the image's first position in the (current) sequence
    length: int  # image tokens before this stage: int(N ratio[s])
    keep_count: int  # int(N ratio[s + 1])
    renumber: bool = True  # the kept sequence is renumbered 0 .. T'-1 (see the module docstring)

    @property
    def dropped(self) -> int:
        return self.length - self.keep_count

    def keep(self, between) -> torch.Tensor:
        """The kept indices (T',) of the current sequence, from layer K's q and k of its input (`between.x`:
        layer K-1's output) at the current positions (minillava/schedule.py `Between`)."""
        q, k = between.query_key(self.layer, between.x)
        scores = last_query_attention(q, k)  # (B, T): the last prompt token's row, mean over heads
        end, t, device = self.start + self.length, scores.shape[1], scores.device
        top = scores[0, self.start : end].topk(self.keep_count).indices.sort().values + self.start
        return torch.cat([torch.arange(self.start, device=device), top, torch.arange(end, t, device=device)])


def stage_ratios(ratio: float) -> list[float]:
    """The published image_token_ratio_list with 1.0 prepended, from our r (the last share): r^(s/3), rounded
    to 12 decimals so that r = 0.125 gives 0.5, 0.25, 0.125 exactly as the published list."""
    if not 0.0 < ratio <= 1.0:  # NaN fails too
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio!r}")
    return [round(ratio ** (s / 3), 12) for s in (0, *STAGES)]


def stage_layers(n_layers: int) -> list[int]:
    """The decoder layers the stages prune before: round(L s / 4), the published 8, 16, 24 for L = 32."""
    layers = [round(n_layers * s / 4) for s in STAGES]
    if not 0 < layers[0] < layers[1] < layers[2] < n_layers:
        raise ValueError(f"pdrop prunes before three distinct decoder layers (a quarter, half and three quarters "
                         f"of the depth), but this model has only {n_layers} decoder layers; use another --compressor")
    return layers


def pdrop_schedule(start: int, length: int, ratio: float, n_layers: int) -> tuple[PDropStage, ...]:
    """PyramidDrop's three stages for a prompt whose image tokens are [start, start + length)."""
    ratios, layers = stage_ratios(ratio), stage_layers(n_layers)
    counts = [int(length * x) for x in ratios]  # pdrop_rank_drop: `image_tokens`, `keep_length`
    return tuple(PDropStage(layer, start, counts[s], counts[s + 1]) for s, layer in enumerate(layers))
