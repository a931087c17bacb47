"""FasterVLM (Zhang et al., 2024; github.com/Theia-4869/FasterVLM): keep each tile's T tokens with the
highest [CLS] attention of the feature layer. Pure tensors; the emission is `globalcom2.peers`.

Published rules (commit f5d5f12), each cited where it is used:
- llava/model/multimodal_encoder/clip_encoder.py, `CLIPVisionTower.feature_select`: the attention is
  `attentions[select_layer]` (select_layer = mm_vision_select_layer = -2, the layer whose output is the
  feature layer), [CLS] query row, patch keys only (`[:, :, 0, 1:]`), post-softmax.
- llava/model/llava_arch.py, `encode_images`: mean over heads, `topk(T)` per tile, every tile (thumbnail
  and crops) the same T, padding tokens of the crops included (the crops are not unpadded first).
"""

from __future__ import annotations

import torch
from torch import Tensor

NEEDS = (("cls_attn", -2),)  # clip_encoder.py feature_select: attentions[mm_vision_select_layer = -2]


def top_indices(scores: Tensor, k: int) -> Tensor:
    """(N, P) -> (N, k) long: each row's k largest, largest first; ties go to the lower index.

    The published code calls `torch.topk`, whose order among equal values is unspecified (it differs
    between CPU and CUDA); a stable sort makes ours deterministic and equal to it wherever there is no tie.
    """
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def fastervlm_scores(cls_attn: Tensor) -> Tensor:
    """FasterVLM's token score: cls_attn (N, heads, 1 + P) -> (N, P), the patch keys' attention, mean
    over heads (llava_arch.py encode_images: image_attentions.mean(dim=1))."""
    return cls_attn[:, :, 1:].mean(dim=1)


def fastervlm_keep(cls_attn: Tensor, T: int) -> Tensor:
    """Tokens FasterVLM keeps: cls_attn (N, heads, 1 + P) -> (N, P) bool, T per tile, true positions."""
    scores = fastervlm_scores(cls_attn)  # (N, P)
    top = top_indices(scores, T)  # llava_arch.py encode_images: torch.topk(image_attentions, k=T, dim=1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
