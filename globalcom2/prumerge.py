"""PruMerge+ (Shang et al., arXiv 2403.15388) on LLaVA-NeXT, as HiRED's authors run it as their baseline.

Source: hasanar1f/HiRED, prumerge_llava_next.py (`token_prune_merge_advanced_plus`, `outlier_dectection`,
`complement_idx`, the PruMerge block of `forward` with use_prumerge_plus = True, if_adaptive=True), a
copy of 42Shawn/LLaVA-PruMerge llava/model/multimodal_encoder/clip_encoder.py
(`token_prune_merge_advanced_plus`; the same rules). Every tile (thumbnail and crops alike) is
reduced on its own, before the projector:

1. Attention: one softmax over the 1 + P keys of the LAST encoder layer (hooks on encoder.layers[23]
   q_proj/k_proj of CLIP-L's 24, i.e. -1) with the full-width q, k and scale C^-0.5, C the feature
   width: no head split. Since C = heads * head_dim, that logit is the sum over heads of the per-head
   logits divided by sqrt(heads), and the per-head log-softmax differs from the per-head logit by a
   constant per head, so it is rebuilt exactly from the ("cls_attn", -1) probe. [CLS] column dropped.
2. Outliers: n = the patches above Q3 + 1.5 IQR (numpy percentiles, float32); ratio = n / P; the top
   int(P * ratio) patches by attention, most attended first.
3. Extras: positions 0, s, 2s, ... below P - 1 (published: `torch.arange(0, 575, s)`),
   s = int(int(1 / ratio) / 3), not already kept, ascending, appended.
4. Merge: each kept token becomes itself + sum of attention * feature over the 32 other positions
   (kept or not) whose keys (layer -1 k_proj, L2-normalised) are most cosine-similar to its own;
   one extra token = sum of attention * feature over all non-kept positions, appended after the tile.
5. The tiles' tokens are concatenated in tile order (thumbnail first), then projected: no unpadding,
   no newlines.

The published code divides by zero (`int(1 / reduction_ratio)`, ZeroDivisionError) on a tile with no
outlier. We take the limit ratio -> 0+ instead: no outlier, s infinite, so the tile keeps position 0
(merged as usual) and its extra token. Ties in attention or similarity go to the lower position (stable
sorts); the published torch.topk leaves them unspecified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NEEDS = (("cls_attn", -1), ("keys", -1))
NEIGHBOURS = 32  # tokens merged into each kept token (published: topk(cos_sim_matrix, k=int(32)))


@dataclass
class PruMergePlus:
    """What PruMerge+ keeps in each of T tiles of P patches, and what each kept token becomes."""

    order: Tensor  # (T, L) long: kept positions in published order (outliers, then extras), -1 past count
    count: Tensor  # (T,) long: kept tokens of each tile
    kept: Tensor  # (T, P) bool: the same positions as a mask over each tile (raster order)
    weights: Tensor  # (T, L, P) float32: kept token i = sum_p weights[t, i, p] x[t, p] (1 at itself)
    extra: Tensor  # (T, P) float32: the tile's extra token = sum_p extra[t, p] x[t, p] (non-kept only)


def prumerge_attention(cls_attn: Tensor) -> Tensor:
    """PruMerge's single-head [CLS] attention (T, P) float32 from the per-head probe (T, heads, 1 + P).

    softmax_j(q . k_j / sqrt(C)) = softmax_j(sum_h log p_hj / sqrt(heads)); a p_hj that underflowed to
    0 gives that patch attention 0.
    """
    heads = cls_attn.shape[1]
    logits = cls_attn.float().log().sum(dim=1) / math.sqrt(heads)  # (T, 1 + P)
    return torch.softmax(logits, dim=-1)[:, 1:]


def outlier_counts(attn: Tensor) -> np.ndarray:
    """Patches above Q3 + 1.5 IQR of each tile (T,) int64: `outlier_dectection`, float32 numpy."""
    a = attn.detach().to("cpu", torch.float32).numpy()  # (T, P)
    q1, q3 = np.percentile(a, 25, axis=1), np.percentile(a, 75, axis=1)  # float32, as per tile
    upper = q3 + 1.5 * (q3 - q1)
    return (a > upper[:, None]).sum(axis=1)


def prumerge_plus(cls_attn: Tensor, keys: Tensor, neighbours: int = NEIGHBOURS) -> PruMergePlus:
    """Select and plan the merges of every tile at once.

    cls_attn (T, heads, 1 + P) post-softmax, ("cls_attn", -1); keys (T, 1 + P, Dk), ("keys", -1).
    A tile needs more than `neighbours` patches (the published topk fails otherwise); with fewer, every
    other patch is merged.
    """
    T, _, P1 = cls_attn.shape
    P, device = P1 - 1, cls_attn.device
    attn = prumerge_attention(cls_attn)  # (T, P)

    # Counts and steps in float64 numpy, the published Python float arithmetic.
    n = outlier_counts(attn)
    ratio = n / P
    with np.errstate(divide="ignore"):
        step = np.where(n > 0, np.trunc(np.trunc(1 / ratio) / 3), P)  # no outlier: only position 0
    step = np.maximum(step, 1)  # s = 0 (published: arange raises) needs > 1/3 outliers, i.e. P < 16
    n_top = torch.as_tensor(np.trunc(P * ratio).astype(np.int64), device=device)  # int(N * reduction_ratio)
    step = torch.as_tensor(step.astype(np.int64), device=device)

    pos = torch.arange(P, device=device)
    by_attn = torch.sort(attn, dim=1, descending=True, stable=True).indices  # (T, P)
    rank = torch.empty_like(by_attn).scatter_(1, by_attn, pos.expand(T, P))  # rank of each position
    top = rank < n_top[:, None]  # (T, P)
    extras = (pos % step[:, None] == 0) & (pos < P - 1) & ~top  # arange(0, P - 1, s), minus the top
    kept = top | extras
    # Emission order: outliers by rank, then extras by position; dropped positions sort last.
    key = torch.where(top, rank, torch.where(extras, P + pos, 2 * P + pos))
    count = kept.sum(dim=1)  # (T,)
    L = int(count.max())
    order = torch.sort(key, dim=1, stable=True).indices[:, :L]  # (T, L)
    filled = pos[:L] < count[:, None]  # (T, L)
    order = torch.where(filled, order, -1)

    # Each kept token's cluster: the `neighbours` other positions with the most similar keys.
    k = min(neighbours, P - 1)
    unit = F.normalize(keys[:, 1:].float(), dim=-1)  # (T, P, Dk)
    centre = order.clamp(min=0)
    sim = unit.gather(1, centre[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)  # (T, L, P)
    sim = sim.scatter(2, centre[..., None], float("-inf"))  # not itself
    cluster = torch.sort(sim, dim=2, descending=True, stable=True).indices[..., :k]  # (T, L, k)
    member_attn = attn.gather(1, cluster.flatten(1)).view_as(cluster)  # (T, L, k)
    weights = torch.zeros(T, L, P, device=device).scatter_(2, cluster, member_attn)
    weights.scatter_(2, centre[..., None], 1.0)
    weights = weights * filled[..., None]
    return PruMergePlus(order, count, kept, weights, attn * ~kept)


def prumerge_merge(sel: PruMergePlus, features: Tensor) -> tuple[Tensor, Tensor]:
    """Merged tokens (T, L, D) (rows past count are 0) and extra tokens (T, D), features' dtype.

    features (T, P, D): for the published result, the tower's feature-layer patch features BEFORE
    the projector (PruMerge+ merges in the vision space and projects the merged tokens).
    """
    x = features.float()
    tokens = sel.weights @ x  # (T, L, D)
    extra = (sel.extra[:, None, :] @ x)[:, 0]  # (T, D)
    return tokens.to(features.dtype), extra.to(features.dtype)


def prumerge_paper_sequence(sel: PruMergePlus, features: Tensor) -> Tensor:
    """The published sequence (n, D): per tile its merged tokens in order, then its extra token.

    Apply the projector to the result (it acts token by token) when `features` are pre-projector.
    """
    tokens, extra = prumerge_merge(sel, features)
    T, L = sel.order.shape
    slots = torch.cat([tokens, extra[:, None]], dim=1)  # (T, L + 1, D)
    used = torch.cat([sel.order >= 0, torch.ones(T, 1, dtype=torch.bool, device=slots.device)], dim=1)
    return slots[used]  # tile by tile, row-major
