"""HiRED (Arif et al., arXiv 2408.10945) on LLaVA-NeXT, as its authors' published code runs it.

Source: hasanar1f/HiRED, transformers/src/transformers/models/llava_next/modeling_llava_next.py
(`HiRED_token_selection`, `HiRED_sub_img_budgets`, `pack_HiRED_image_features`, the HiRED block of
`forward`; the attention itself comes from `ViT_Attn_Hook.get_attn`). Per image, with T = 1 + C tiles
(tile 0 the thumbnail, then the C = gw * gh crops row-major) of P patches:

1. Total budget int(T * P * r); the thumbnail keeps its min(int(total * alpha), P) tokens with the
   largest final-layer [CLS] attention; the crops share the rest, min(total - thumb, C * P).
2. The crops' share is split by the thumbnail's early-layer [CLS] attention: mark its int(P * (1 - alpha))
   most attended patches, count the marks in C consecutive chunks of the thumbnail's RASTER order
   (the published `reshape(gh, gw, -1)` of a (P,) vector: chunk c is raster positions
   [c P / C, (c + 1) P / C), not a spatial region), crop c gets int(count_c / sum * share), at most P.
3. Crop c keeps its budget of patches by its own final-layer [CLS] attention, over all P positions,
   padding included (the published code unpads only when packing, so picks in padding are lost).
4. At r >= 1 nothing is dropped (`forward`: `if token_budget_rate < 1.0`).

Layers (`forward`: vit_top_layer = 0, vit_bottom_layer = 22, hooks on encoder.layers[i].self_attn
q_proj/k_proj): "early" is encoder layer 0, "final" is encoder layer 22 of CLIP-L's 24, i.e. -2, the
layer whose output is LLaVA's feature layer; we name it -2 so that any tower depth works.
Reductions: post-softmax attention (per head, scale head_dim^-0.5, softmax over all 1 + P keys),
[CLS] row, column 0 dropped (`[:, :, 0, -num_vision_tokens:]`), SUM over heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import area_mask, to_crops, to_grid
from .scoring import keep_top_per_crop, top_order

NEEDS = (("cls_attn", 0), ("cls_attn", -2))  # early layer (budgets), final layer (tokens)
ALPHA = 0.5  # share of the budget for the thumbnail (accuracy_benchmarks/*.sh: alpha=0.5)


def hired_keep(early: Tensor, final: Tensor, ratio: float, alpha: float = ALPHA) -> Tensor:
    """The published selection: (1 + C, P) bool, tile 0 the thumbnail, padding positions included.

    early, final: ("cls_attn", 0) and ("cls_attn", -2) probes, (1 + C, heads, 1 + P) post-softmax.
    Ties between equal attentions go to the lower position (stable sort); torch.topk leaves them
    unspecified, so the published code may pick either.
    """
    T, _, P1 = final.shape
    P, C = P1 - 1, T - 1
    device = final.device
    if ratio >= 1.0:  # `forward`: token dropping only if token_budget_rate < 1.0
        return torch.ones(T, P, dtype=torch.bool, device=device)
    early = early[:, :, 1:].float().sum(dim=1)  # (T, P) head sum, [CLS] column dropped
    final = final[:, :, 1:].float().sum(dim=1)  # (T, P)

    # `HiRED_token_selection`: budgets in Python int/float arithmetic.
    total = int(T * P * ratio)
    thumb_budget = min(int(total * alpha), P)
    crop_share = min(total - thumb_budget, C * P)

    k = torch.zeros(T, dtype=torch.long, device=device)
    k[0] = thumb_budget
    if crop_share > 0:
        k[1:] = crop_budgets(early[0], C, crop_share, alpha)
    return keep_top_per_crop(final, torch.ones_like(final, dtype=torch.bool), k)


def crop_budgets(early_thumb: Tensor, C: int, share: int, alpha: float = ALPHA) -> Tensor:
    """Each crop's budget (C,) long from the thumbnail's early-layer head-summed attention (P,).

    `HiRED_sub_img_budgets`. The published `reshape(gh, gw, -1)` needs C to divide P (always so for
    P = 576 and LLaVA-NeXT's grids; otherwise it raises); chunk c = positions p with p * C // P == c is
    the same split where it runs and an even split where it would not.
    """
    P, device = early_thumb.shape[0], early_thumb.device
    marked = top_order(early_thumb, int(P * (1 - alpha)))  # the marked positions
    chunk = marked * C // P  # chunk of each marked raster position
    ones = torch.ones_like(chunk, dtype=torch.float32)
    counts = torch.zeros(C, dtype=torch.float32, device=device).index_add_(0, chunk, ones)  # (C,)
    # published: int64 / int64 (float32 true division), float32 * int, .int() truncation, clamp
    return (counts / counts.sum() * share).int().clamp(max=P).long()


def hired_on_grid(keep: Tensor, grid: tuple[int, int], area: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """What reaches the LLM, on the true token grid.

    keep (1 + C, P) bool -> thumbnail positions (k0,) long in raster order (the published packing
    masks the thumbnail, so it emits its kept tokens in raster order), and the crops' kept tokens
    (H, W) bool, H = gh * side, W = gw * side, restricted to the unpadded `area` (top, bottom, left, right).
    """
    side = math.isqrt(keep.shape[1])
    crop_keep = to_grid(keep[1:], grid, side)  # (H, W)
    valid = area_mask(area, crop_keep.shape, keep.device)
    return keep[0].nonzero().flatten(), crop_keep & valid


def hired_paper_order(keep: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The published emission order (n,) long: index t * P + p into the (1 + C) tiles' tokens.

    `pack_HiRED_image_features` with image_newline=None: the thumbnail's kept tokens in raster order,
    then the crops as `hired_crop_order` packs them.
    """
    T, P = keep.shape
    side = math.isqrt(P)
    index = to_grid(torch.arange(P, T * P, device=keep.device).view(T - 1, P), grid, side)  # (H, W) token index
    crops = hired_crop_order(index, to_grid(keep[1:], grid, side), grid, size)
    return torch.cat([keep[0].nonzero().flatten(), crops])


def hired_crop_order(index: Tensor, keep: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The published crop part (n,) of what `index` (H, W) holds on the true crop grid where `keep` (H, W).

    `pack_HiRED_image_features`: the crops' grid, unpadded, kept tokens in raster order, no newlines.
    It names the grid shape `num_patch_width, num_patch_height = get_anyres_image_grid_shape(...)`,
    which returns (rows, columns): the crops are laid out as gw rows of gh crops (crop c at row c // gh,
    column c % gh) and that (gw * side) x (gh * side) grid is unpadded with the image's true (h0, w0).
    Square grids are unaffected; 1 x 2, 2 x 1, 1 x 3, 3 x 1 are transposed, and their unpadding is of
    the wrong shape.
    """
    gw, gh = grid
    side = index.shape[0] // gh
    swapped = (gh, gw)  # (columns, rows) as the published view has them
    index = to_grid(to_crops(index, grid, side), swapped, side)  # (gw * side, gh * side)
    keep = to_grid(to_crops(keep, grid, side), swapped, side)
    top, bottom, left, right = published_unpad(swapped, size, side)  # `unpad_image` on the swapped grid
    return index[top:bottom, left:right][keep[top:bottom, left:right]]  # raster order


def published_unpad(grid: tuple[int, int], size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """LLaVA's `unpad_image` (llava/model/llava_arch.py), which HiRED's packing calls on its transposed
    view of the grid: the rows [top, bottom) and columns [left, right) of a (gh side) x (gw side) grid
    that an image of `size` (w0, h0) fills, float arithmetic and int() truncation. The model's own
    unpadding (minillava/layout.py `unpad_area`) is the same rule on the true grid; HiRED's published
    order needs it on another grid, so it keeps this copy of the rule."""
    (gw, gh), (w0, h0) = grid, size
    H, W = gh * side, gw * side
    if w0 / h0 > W / H:
        pad = (H - int(h0 * (W / w0))) // 2
        return pad, H - pad, 0, W
    pad = (W - int(w0 * (H / h0))) // 2
    return 0, H, pad, W - pad


def hired_paper_sequence(features: Tensor, keep: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The published token sequence (n, D): features (1 + C, P, D) projected, tile 0 the thumbnail."""
    return features.flatten(0, 1)[hired_paper_order(keep, grid, size)]
