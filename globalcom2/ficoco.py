"""FiCoCo-V (`--compressor ficoco`): filter, correlate, compress, inside the vision tower's layers.

Source: kawhiiiileo/FiCoCo at commit 8995e93bf5c62435979f500e9d335e4810301656,
llava/model/multimodal_encoder/FiCoCo_V.py (`Filter`, `find_windows_min_indices`, `Correlate`,
`Compress`, `merge_ficoco_v`) and its call in llava/model/multimodal_encoder/clip_encoder.py
(`FiCoCo_Attention.forward`, `FiCoCo_CLIPEncoderLayer.forward`, module constants `r = 42`,
`control_encoding_layer = 11`). tests/test_ficoco.py runs a literal transcription of those functions
against ours.

The rule, in each tower layer with python index > `control_encoding_layer` (`FiCoCo_CLIPEncoderLayer`),
between the attention's residual and the MLP (a stage `inside` the layer, minillava/schedule.py):

  scores   the layer's attention logits (q scaled, before softmax) averaged over heads, A (T, T)
           (`FiCoCo_Attention.forward`: `att_score = attn_weights.mean(dim=0)`)
  filter   s = 0.35 normalize(A[0, 1:]) - 0.65 normalize(mean_j A[1:, 1:]) for the T - 1 tokens after the
           first (`Filter`: [CLS] score minus redundancy); the scores are written into a per-image memory
           over the P original grid positions (`dst_score_global`) at its positions not yet used; in each
           2 x 2 window of that grid the position of the smallest entry (`find_windows_min_indices`) is
           the local penalty: where that position index is < T - 1, s there is halved if positive, doubled
           if not, and the position is used (set to inf). The order: [inf, s] ascending (the first token
           protected, last); the first r are merged, the rest kept in that order.
  correlate  each merged token's targets: the k = max over merged rows of #{A_ij > quantile_0.998(A_i)}
           largest entries of softmax(A) in its row, their softmax values its weights (`Correlate`)
  compress kept tokens in score order; each merged token's weighted copies added at the kept positions
           its target indices name (an index >= T - r less r) and divided by 1 + the weights added
           there (`Compress`, `merge_ficoco_v` with `size` None: sizes start at 1 in every layer)

Published behaviour we keep, though it looks unintended (token for token the published code):
  - the kept tokens stand in ascending score order with the first token last, so after the first
    merging layer token 0 is no longer [CLS]: the next layer's "[CLS] score" is the row of the token
    that scored lowest among the kept, and LLaVA's feature select (`[:, 1:]`) drops that token and keeps
    the real [CLS] (last) as a visual token;
  - a target index is an index into the tokens before the merge, used as a position in the kept list
    (which is in score order), so a merged token is added to whichever kept token stands there;
  - the local penalty's window positions are positions of the original grid, used as indices of the
    current tokens (`rand_id_filtered < token_num`).

Adaptations (documented in docs/methods.md):
  - per tile: the published code is written for LLaVA-1.5 (one 576-token view, batch 1). On LLaVA-NeXT
    each tile (thumbnail and every crop) is merged on its own, as the published code merges one image:
    its own head-averaged scores (the published average runs over batch x heads, so a batch of tiles
    would share one average and one choice), its own memory.
  - the memory `dst_score_global` is a module-level tensor the published code never resets, so only the
    first image after loading sees its scores; from the second image on it is all inf and the penalty
    falls on every window's first position. Ours is fresh for every tile of every image (the first
    image's behaviour), so an answer does not depend on what was asked before (batch rows equal alone).
  - the memory has the tile's P positions (published: 576) and the penalty takes the (n // 2)^2 windows
    of the n x n grid (published: 144 = (24 // 2)^2): equal on LLaVA's 24 x 24 grid.
  - the scores are computed in float32 (torch.quantile refuses half precision); the merge in the
    tower's dtype.
  - LLaVA's feature layer is -2, so the published merge in the last layer never reaches the decoder; our
    tower does not run that layer (nor merge in it).

The budget knob, one rule: the published code merges `r` tokens in every layer from layer L/2 (12 of 24)
on; the M layers from L/2 up to the feature layer (11 on LLaVA: 12 .. 22) change what the decoder sees.
`--retention-ratio r` is the share of each tile's P patch tokens left at the end:
    merged per layer m = round((1 - r) P / M), start layer L // 2 (python index, any tower depth),
so each tile gives P - M m tokens (the published r = 42 on 576: 114 tokens, our r = 0.198). r = 1 merges
nothing (plain LLaVA-NeXT). A layer can merge at most half its tokens: `Compress` moves a target index
t >= T - r to t - r, below 0 where 2 r > T (the published code fails there; ToMe's bound
`min(r, (T - 1) // 2)` is commented out in `Filter`), so r below 1 - M floor((P + 1) / (M + 1)) / P refuses
(about 1 / (M + 1): 0.083 on LLaVA's tower, 0.5 on the tiny ones with one merging layer). A tower without
[CLS], or one too shallow for a merging layer before its feature layer, refuses too (ValueError, a
one-line error in the CLI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BETA = 0.35  # `Filter`: beta, the [CLS] score's weight against the redundancy
WINDOW = 2  # `Filter`: sx = sy = 2, the local penalty's window side
QUANTILE = 0.998  # `Correlate`: the threshold's quantile
UNUSED = 1e9  # `dst_score_global`'s initial value


def merge_layers(n_layers: int, feature_layer: int) -> range:
    """Tower layers (python index) that merge and feed the feature layer: from L // 2 (the published 12 of
    24, `idx_now > control_encoding_layer = 11`) up to the last one the feature layer runs."""
    return range(n_layers // 2, feature_layer % (n_layers + 1))


def merged_per_layer(ratio: float, patches: int, layers: int) -> int:
    """Tokens merged in each merging layer so that about `ratio` of a tile's `patches` remain."""
    return round((1 - ratio) * patches / layers) if layers else 0


def ficoco_v_schedule(ratio: float, patches: int, n_layers: int, feature_layer: int, has_cls: bool) -> tuple:
    """FiCoCo-V's stages for a tower of `n_layers` layers whose tiles have `patches` patch tokens (a square
    grid), read at hidden state `feature_layer`; () where r merges nothing."""
    if not has_cls:
        raise ValueError("ficoco scores tokens by the tower's [CLS] attention, and this tower has no [CLS] token; "
                         "use another --compressor")
    where = merge_layers(n_layers, feature_layer)
    if where.start < 1 or not len(where):
        raise ValueError(f"ficoco merges from tower layer {n_layers // 2} (half the tower) up to the feature layer, "
                         f"and this {n_layers}-layer tower reads its features before any; use another --compressor")
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"ficoco needs a square grid of patches; got {patches}")
    m = merged_per_layer(ratio, patches, len(where))
    if m <= 0:
        return ()
    last = 1 + patches - (len(where) - 1) * m  # tokens before the last merge
    if 2 * m > last:  # `Compress` would index below 0 (the published code fails there)
        lowest = 1 - (patches + 1) // (len(where) + 1) * len(where) / patches
        raise ValueError(f"ficoco at r = {ratio:g} would merge {m} of {last} tokens in tower layer {where[-1]}, more than "
                         f"half, which the published merge cannot do; on this tower r >= {lowest:.3g}")
    memory: list = []  # one per tile, shared by the stages of one pass (the published dst_score_global)
    return tuple(FiCoCoV(layer, m, patches, memory, first=(layer == where.start)) for layer in where)


@dataclass(eq=False)
class FiCoCoV:
    """One layer's merge (minillava/schedule.py `Stage`, `inside` the layer): `dropped` tokens of every
    tile merged into the others. The schedule's stages share `memory`, each tile's `dst_score_global`,
    which the first stage starts afresh."""

    layer: int
    dropped: int
    patches: int
    memory: list = field(repr=False)
    first: bool = False
    inside = True

    def keep(self, between) -> tuple[torch.Tensor, torch.Tensor]:
        x = between.x  # (N, T, D): the stream after this layer's attention
        q, k = between.query_key(self.layer, between.previous_input)  # (N, H, T, hd) each
        logits = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-1, -2)  # (N, H, T, T)
        if self.first:
            self.memory[:] = [torch.full((self.patches,), UNUSED, device=x.device) for _ in range(x.shape[0])]
        rows = [ficoco_v_merge(x[i], logits[i].mean(dim=0), self.memory[i], self.dropped) for i in range(x.shape[0])]
        return torch.arange(x.shape[1] - self.dropped, device=x.device), torch.stack(rows)


def ficoco_v_merge(x: torch.Tensor, att: torch.Tensor, memory: torch.Tensor, r: int) -> torch.Tensor:
    """One tile's merge: x (T, D) the stream, att (T, T) the head-averaged logits, memory (P,) the tile's
    `dst_score_global` (updated in place); -> (T - r, D)."""
    merge, remain = filter_tokens(att, memory, r)
    targets, weights = correlate(att, merge)
    size = torch.ones_like(x[:, :1])
    return compress(x, merge, remain, targets, weights) / compress(size, merge, remain, targets, weights)


def filter_tokens(att: torch.Tensor, memory: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`Filter`: the r tokens to merge and the kept ones, both in ascending score order (token 0 last)."""
    tokens = att.shape[0] - 1  # `token_num`
    cls = F.normalize(att[0, 1:], p=2, dim=-1)
    redundancy = F.normalize(att[1:, 1:].mean(dim=-1), p=2, dim=-1)
    score = BETA * cls - (1 - BETA) * redundancy  # (T - 1,)
    free = (memory != math.inf).nonzero()[:, 0]
    n = min(free.numel(), tokens)
    memory[free[:n]] = score[:n].to(memory.dtype)
    penalised = window_minima(memory)
    penalised = penalised[penalised < tokens]  # original grid positions used as current indices (sic)
    chosen = score[penalised]
    score[penalised] = torch.where(chosen > 0, chosen / 2, chosen * 2)
    memory[penalised] = math.inf
    order = torch.cat([score.new_full((1,), math.inf), score]).argsort(dim=-1, descending=False)
    return order[:r], order[r:]


def window_minima(memory: torch.Tensor) -> torch.Tensor:
    """`find_windows_min_indices`: in each 2 x 2 window of the n x n grid (the last row and column left
    out where n is odd) the position of its smallest entry (the first, on ties), as grid indices."""
    n = math.isqrt(memory.numel())
    h = w = n // WINDOW
    grid = memory.view(n, n)[: h * WINDOW, : w * WINDOW].reshape(h, WINDOW, w, WINDOW)
    low = grid.permute(0, 2, 1, 3).reshape(h, w, WINDOW * WINDOW).min(dim=-1).indices  # (h, w): dy * 2 + dx
    rows = torch.arange(h, device=memory.device)[:, None] * WINDOW + low // WINDOW
    cols = torch.arange(w, device=memory.device)[None] * WINDOW + low % WINDOW
    return (rows * n + cols).flatten()


def correlate(att: torch.Tensor, merge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Correlate`: each merged token's k targets (r, k) and every row's top-k softmax values (T, k)."""
    rows = att[merge]  # (r, T)
    threshold = torch.quantile(rows, QUANTILE, dim=-1, keepdim=True)
    k = int((rows > threshold).sum(dim=-1).max())
    values, indices = F.softmax(att, dim=-1).topk(k, dim=-1)  # (T, k)
    return indices[merge], values


def compress(x: torch.Tensor, merge: torch.Tensor, remain: torch.Tensor, targets: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor:
    """`Compress`: the kept rows of x (T, c), each merged row's weighted copies added at its targets."""
    kept = x[remain]  # (T - r, c), a copy
    if targets.shape[-1]:
        weights = (values / values.sum(dim=-1, keepdim=True))[merge].to(x.dtype)  # (r, k)
        copies = (x[merge][:, None] * weights[..., None]).reshape(-1, x.shape[-1])  # (r k, c)
        where = targets.reshape(-1)
        where = torch.where(where >= kept.shape[0], where - len(merge), where)
        kept.scatter_add_(0, where[:, None].expand(-1, x.shape[-1]), copies)
    return kept
