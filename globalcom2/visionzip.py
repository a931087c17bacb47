"""VisionZip (Yang et al., 2024; github.com/dvlab-research/VisionZip): per tile, dominant tokens by [CLS]
attention and contextual tokens merged by key similarity. Pure tensors; the emission is `globalcom2.peers`.

Published rules (commit 3151f6d), each cited where it is used:
- visionzip/main.py, `visionzip(model, dominant, contextual)`: `dominant` counts the [CLS] token: the
  tower keeps [CLS] plus dominant - 1 patches (`apply_info(..., dominant_num=dominant - 1)`).
- visionzip/utils.py, `apply_info` / `CLIP_EncoderLayer_forward` / `CLIPAttention_forward`: the merge
  metric is the keys of layer -2 (`r` is 1 only for layer 22 of 24), mean over heads
  (`raw_key_states.mean(1)`).
- visionzip/clip_encoder.py, `CLIPVisionTower_VisionZip.forward`: all of the selection and merging below,
  batched over the tiles; the result per tile is [CLS], the dominant patches in raster order, then the
  contextual tokens, in the tower's width (the projector runs after, `llava_arch.py encode_images_visionzip_multi`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fastervlm import top_indices

NEEDS = (("cls_attn", -2), ("keys", -2), ("hidden", -2))  # clip_encoder.py: attentions[-2], hidden_states[-2], layers[-2].metric


def visionzip_split(T: int) -> tuple[int, int]:
    """(dominant, contextual) for T tokens per tile, in the published 54 : 10 proportion.

    The published code takes both counts as arguments (README: `visionzip(model, dominant=54,
    contextual=10)` for 64 tokens); for another T we keep the proportion: contextual = round(T * 10 / 64)
    (half up), at least 1 (the published code divides by it), dominant = T - contextual (>= 1: [CLS]).
    """
    contextual = max(1, (T * 10 + 32) // 64)
    return max(1, T - contextual), contextual


def visionzip_tokens(cls_attn: Tensor, keys: Tensor, hidden: Tensor, dominant: int, contextual: int):
    """One VisionZip pass over N tiles, all tiles at once.

    cls_attn (N, heads, 1 + P) float, keys (N, 1 + P, Dv), hidden (N, 1 + P, Dv) (layer -2, [CLS] row 0).
    Returns
        kept     (N, P) bool: the dominant patches (true positions; [CLS] is always kept as well)
        tokens   (N, dominant + contextual, Dv): [CLS], the dominant patches in raster order, then the
                 contextual tokens, in the tower's width (what the published tower returns)
        merge    (N, P) long: the contextual token (0 .. contextual - 1) each other patch went into
                 (its target included), -1 for dominant patches
    """
    N, T1, Dv = hidden.shape
    heads = cls_attn.shape[1]
    device = hidden.device
    # clip_encoder.py: cls_attention = attn_weights[:, :, 0, 1:]; .sum(dim=1); topk(dominant_num) + 1
    top = top_indices(cls_attn[:, :, 1:].sum(dim=1), dominant - 1) + 1  # (N, dominant - 1) token indices
    keep = torch.zeros(N, T1, dtype=torch.bool, device=device).scatter_(1, top, True)
    keep[:, 0] = True  # clip_encoder.py: all_indices = cat([zeros (the [CLS] index), topk_indices])
    kept_idx = keep.nonzero()[:, 1].view(N, dominant)  # raster order, as masked_select keeps it
    rest_idx = (~keep).nonzero()[:, 1].view(N, T1 - dominant)
    dominant_tokens = hidden.gather(1, kept_idx[..., None].expand(-1, -1, Dv))  # (N, dominant, Dv)

    # utils.py CLIPAttention_forward: metric = key_states (bsz, heads, T, hd) .mean(1)
    metric = keys.view(N, T1, heads, Dv // heads).transpose(1, 2).mean(1)  # (N, 1 + P, hd)
    metric = metric.gather(1, rest_idx[..., None].expand(-1, -1, metric.shape[-1]))  # metric[mask]
    rest = hidden.gather(1, rest_idx[..., None].expand(-1, -1, Dv))  # hidden_states_filtered
    metric = metric / metric.norm(dim=-1, keepdim=True)  # metric_normalized

    # clip_encoder.py "Contextual Visual Tokens": evenly spaced targets, the others to their most similar
    n_rest = rest.shape[1]
    step = max(1, n_rest // contextual)
    target = torch.arange(0, n_rest, step, device=device)[:contextual]
    is_target = torch.zeros(n_rest, dtype=torch.bool, device=device)
    is_target[target] = True
    similarity = torch.bmm(metric[:, ~is_target], metric[:, target].transpose(1, 2))  # (N, n_merge, contextual)
    assign = similarity.argmax(dim=2)  # the first of equal maxima, as torch.argmax documents
    one_hot = torch.zeros(*assign.shape, contextual, dtype=hidden.dtype, device=device)
    one_hot.scatter_(2, assign[..., None], 1)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]  # (N, contextual, 1)
    aggregated = torch.bmm(one_hot.transpose(1, 2), rest[:, ~is_target]) / counts
    contextual_tokens = rest[:, target] + aggregated  # the target plus the mean of what joined it

    group = torch.empty(N, n_rest, dtype=torch.long, device=device)
    group[:, target] = torch.arange(contextual, device=device)
    group[:, ~is_target] = assign
    merge = torch.full((N, T1), -1, dtype=torch.long, device=device).scatter_(1, rest_idx, group)
    return keep[:, 1:], torch.cat([dominant_tokens, contextual_tokens], dim=1), merge[:, 1:]
