"""The peer methods (FasterVLM, VisionZip, HiRED, PruMerge+) as compressors of the same stage.

Each peer has a pure selection function over tensors (`fastervlm.py`, `visionzip.py`, `hired.py`,
`prumerge.py`) and two
results (`emit`): the default name returns what it keeps for LLaVA-NeXT's own layout (kept crop tokens
at their true grid positions, which the model packs unpadded, a newline closing each row), the `-paper`
name emits its sequence token for token as the authors' code does. Tokens with no grid position
([CLS], merged summaries) go where the published code puts them, in both.

A peer is one entry of `PEERS`: name -> Peer(needs, run, paper), `run(image, ratio, paper)` -> `Compressed`.
A new selection-only method needs a `run` of a few lines: its keep mask (1 + C, P) from its pure
function, then `emit` with the tiles' features as the table (see `_fastervlm`, `_hired`); a merging one
also passes its merged tokens as table rows and `merge_rows` (see `_visionzip`, `_prumerge`).
A sequence that is no crop-grid order at all (PruMerge+'s published one, tile by tile) goes straight
to `sequence`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from .fastervlm import NEEDS as FASTERVLM_NEEDS
from .fastervlm import fastervlm_keep
from .hired import NEEDS as HIRED_NEEDS
from .hired import hired_crop_order, hired_keep
from .layout import area_mask, gather_tokens, to_grid
from .prumerge import NEEDS as PRUMERGE_NEEDS
from .prumerge import prumerge_merge, prumerge_plus
from .stage import Compressed
from .visionzip import NEEDS as VISIONZIP_NEEDS
from .visionzip import visionzip_split, visionzip_tokens


def tokens_per_tile(P: int, ratio: float) -> int:
    """T = round(P r) (half up), at least 1: FasterVLM's README, 576 x (1 - 0.9) = 57.6 -> 58 tokens."""
    return max(1, int(P * ratio + 0.5))


def full_raster(index: Tensor, keep: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The published crop order of FasterVLM and VisionZip: the kept entries of the whole H x W grid in
    raster order, padding included, no newline. index, keep (H, W) -> (n,) long; grid and size unused."""
    return index[keep]


def emit(image, table: Tensor, thumb_rows: Tensor, grid_rows: Tensor, crop_keep: Tensor, tail_rows: Tensor,
         merge_rows: Tensor | None, T: int, paper: Callable | None) -> Compressed:
    """What a peer keeps of one image, from `table` (R, D) of token rows.

    thumb_rows (k,) long: the rows before the crop grid, in emission order. grid_rows (C, P) long: the
    row of each crop position's token; crop_keep (C, P) bool which of them are kept. tail_rows (t,) long:
    rows after the crop grid. merge_rows (1 + C, P) long or None: the row of the merged token each
    position went into, -1 if none. T: tokens kept per tile. `paper`: None for LLaVA-NeXT's own layout
    (the model packs it: kept tokens of the unpadded area, a newline closing each row), else the published
    order, a function (index (H, W) long, keep (H, W) bool, grid, size) -> (n,) long, e.g. `full_raster`,
    `hired_crop_order`, and the sequence is emitted here; `crop_keep` is then what that order emits.
    """
    side = math.isqrt(image.thumb.shape[0])
    index, keep = to_grid(grid_rows, image.grid, side), to_grid(crop_keep, image.grid, side)  # (H, W)
    ratios = torch.full((image.grid[0] * image.grid[1],), T / side**2, dtype=torch.float64)  # T of P per crop
    empty = thumb_rows.new_empty(0)
    if paper is not None:
        crop_order = paper(index, keep, image.grid, image.size)
        keep = keep & torch.isin(index, crop_order)  # what the order emits (HiRED's unpadding drops some)
        return sequence(image, table, torch.cat([thumb_rows, crop_order, tail_rows]), empty, keep, merge_rows, ratios)
    keep = keep & area_mask(image.area, keep.shape, keep.device)  # the padding never reaches the decoder
    merged = None
    if merge_rows is not None:  # rows -> token ids: head, grid cells (y * W + x), tail one after the other
        k, cells = len(thumb_rows), keep.numel()
        ids = torch.full((table.shape[0] + 1,), -1, dtype=torch.long, device=table.device)  # last: "none"
        ids[thumb_rows] = torch.arange(k, device=table.device)
        ids[index[keep]] = k + keep.flatten().nonzero()[:, 0]
        ids[tail_rows] = k + cells + torch.arange(len(tail_rows), device=table.device)
        merged = ids[torch.where(merge_rows >= 0, merge_rows, table.shape[0])]  # (1 + C, P)
        merged = merged[0], to_grid(merged[1:], image.grid, side)
    thumb_merge, crop_merge = merged if merged is not None else (None, None)
    merging = merge_rows is not None  # else the grid holds the image's own crop features: the model's
    return Compressed(empty, keep, ratios, head=table[thumb_rows], grid=table[index] if merging else None,
                      tail=table[tail_rows], thumb_merge=thumb_merge, crop_merge=crop_merge)


def sequence(image, table: Tensor, order: Tensor, thumb_keep: Tensor, crop_keep: Tensor, merge_rows: Tensor | None,
             ratios: Tensor) -> Compressed:
    """A published sequence: the rows of an emission `order` (n,) long over `table` (R, D) (NEWLINE for a
    newline), and where each row of `merge_rows` (1 + C, P) (see `emit`) landed in it."""
    side = math.isqrt(image.thumb.shape[0])
    tokens = gather_tokens(table, image.newline.to(table.dtype), order)
    thumb_merge = crop_merge = None
    if merge_rows is not None:  # rows -> places in the sequence
        place = torch.full((table.shape[0] + 1,), -1, dtype=torch.long, device=table.device)  # last: "none"
        real = order >= 0
        place[order[real]] = torch.arange(len(order), device=table.device)[real]
        merged = place[torch.where(merge_rows >= 0, merge_rows, table.shape[0])]  # (1 + C, P)
        thumb_merge, crop_merge = merged[0], to_grid(merged[1:], image.grid, side)
    return Compressed(thumb_keep, crop_keep, ratios, sequence=tokens, thumb_merge=thumb_merge, crop_merge=crop_merge)


def _fastervlm(image, ratio: float, paper: Callable | None) -> Compressed:
    """FasterVLM: each tile's T best by [CLS] attention; thumbnail then crops, kept tokens in raster order
    (llava_arch.py prepare_inputs_labels_for_multimodal: `base_image_feature[base_index_mask]`, then the
    crop grid through the same index mask)."""
    P, D = image.thumb.shape
    C = image.crops.shape[0]
    T = min(tokens_per_tile(P, ratio), P)
    keep = fastervlm_keep(image.probes[FASTERVLM_NEEDS[0]], T)  # (1 + C, P)
    table = torch.cat([image.thumb[None], image.crops.to(image.thumb.dtype)]).reshape((1 + C) * P, D)
    thumb_rows = keep[0].nonzero()[:, 0]
    grid_rows = P + torch.arange(C * P, device=table.device).view(C, P)
    kept = emit(image, table, thumb_rows, grid_rows, keep[1:], thumb_rows[:0], None, T, paper)
    return replace(kept, thumb_keep=thumb_rows)


def _visionzip(image, ratio: float, paper: Callable | None) -> Compressed:
    """VisionZip: per tile [CLS], the dominant patches and the contextual tokens, projected together.

    Order (visionzip/llava_arch.py prepare_inputs_labels_for_multimodal_visionzip and
    restore_image_features_sorted, LLaVA-NeXT's spatial_unpad path): the thumbnail's tokens as the
    tower returns them ([CLS], dominant in raster order, contextual); the crops' dominant tokens over
    the crop grid; then the [CLS] token of every crop; then every crop's contextual tokens, crop by crop.
    """
    if image.project is None:
        raise ValueError("visionzip merges tokens before the projector: ImageFeatures.project must be given")
    P = image.thumb.shape[0]
    N = 1 + image.crops.shape[0]
    T = min(tokens_per_tile(P, ratio), P)
    dominant, contextual = visionzip_split(max(T, 2))
    probes = [image.probes[need] for need in VISIONZIP_NEEDS]
    keep, tokens, merge = visionzip_tokens(*probes, dominant, contextual)  # (N, P), (N, T, Dv), (N, P)
    table = image.project(tokens).to(image.thumb.dtype)  # (N, T, D): projected together, as published
    T = tokens.shape[1]
    table = table.reshape(N * T, -1)
    device = table.device
    start = torch.arange(N, device=device)[:, None] * T  # (N, 1) first row of each tile
    slot = keep.long().cumsum(dim=1)  # (N, P): 1 + rank among the tile's kept patches ([CLS] is row 0)
    rows = start + slot  # rows of the kept patches
    crop_tail = torch.cat([start[1:, 0], (start[1:] + torch.arange(dominant, T, device=device)).flatten()])
    merge_rows = torch.where(merge >= 0, start + dominant + merge, -1)
    kept = emit(image, table, torch.arange(T, device=device), rows[1:], keep[1:], crop_tail, merge_rows, T, paper)
    return replace(kept, thumb_keep=keep[0].nonzero()[:, 0])


def _hired(image, ratio: float, paper: Callable | None) -> Compressed:
    """HiRED: a total budget int((1 + C) P r), half of it (alpha 0.5) for the thumbnail, the crops' share
    split by the thumbnail's layer-0 [CLS] attention; tokens by layer -2 [CLS] attention (`hired.py`).
    The thumbnail's kept tokens in raster order (`pack_HiRED_image_features` masks it), then the crops."""
    P, D = image.thumb.shape
    C = image.crops.shape[0]
    keep = hired_keep(image.probes[HIRED_NEEDS[0]], image.probes[HIRED_NEEDS[1]], ratio)  # (1 + C, P)
    table = torch.cat([image.thumb[None], image.crops.to(image.thumb.dtype)]).reshape((1 + C) * P, D)
    thumb_rows = keep[0].nonzero()[:, 0]
    grid_rows = P + torch.arange(C * P, device=table.device).view(C, P)
    kept = emit(image, table, thumb_rows, grid_rows, keep[1:], thumb_rows[:0], None, P, paper)
    budgets = keep[1:].sum(dim=1).cpu().double() / P  # each crop's budget over P (padding included)
    return replace(kept, thumb_keep=thumb_rows, crop_ratio=budgets)


def tile_by_tile(used: Tensor) -> Tensor:
    """PruMerge+'s published order (n,) long: used (N, L + 1) bool slots of an (N, L + 1) table, tile
    by tile, each tile's merged tokens then its extra token (HiRED prumerge_llava_next.py `forward`:
    the tiles' outputs concatenated; no unpadding, no newlines)."""
    return torch.arange(used.numel(), device=used.device).view(used.shape)[used]


def _prumerge(image, ratio: float, paper: Callable | None) -> Compressed:
    """PruMerge+: per tile the [CLS] attention outliers plus spatially sampled extras, each merged with
    its 32 most key-similar positions, and one extra token of the rest; merged in the tower's width (layer
    -2, before the projector), then projected. `ratio` is not used: PruMerge+ chooses its own count.

    Default layout: the thumbnail's kept tokens in raster order, then its extra token; the crops' kept
    tokens at their grid positions (unpadded, newlines); then the crops' extra tokens, crop by crop (no
    grid position; the published code puts each after its tile). `paper`: the published sequence.
    """
    if image.project is None:
        raise ValueError("prumerge+ merges tokens before the projector: ImageFeatures.project must be given")
    P = image.thumb.shape[0]
    N = 1 + image.crops.shape[0]
    sel = prumerge_plus(*(image.probes[need] for need in PRUMERGE_NEEDS))
    raw = image.probes["hidden", -2][:, 1:]  # (N, P, Dv) the feature layer, before the projector
    merged, extra = prumerge_merge(sel, raw)  # (N, L, Dv), (N, Dv)
    L = merged.shape[1]
    table = image.project(torch.cat([merged, extra[:, None]], dim=1)).to(image.thumb.dtype)  # (N, L + 1, D)
    table = table.reshape(N * (L + 1), -1)
    device = table.device
    start = torch.arange(N, device=device)[:, None] * (L + 1)  # (N, 1) first row of each tile
    filled = sel.order >= 0  # (N, L)
    slot = torch.zeros(N, P + 1, dtype=torch.long, device=device)  # column P takes the unfilled slots
    slot.scatter_(1, torch.where(filled, sel.order, P), torch.arange(L, device=device).expand(N, L))
    rows = start + slot[:, :P]  # (N, P) the row of each kept position's token
    # A non-kept position is shown as merged into the first kept token (published order) whose cluster
    # holds it; it also goes into its tile's extra token, as every non-kept position does (not shown).
    member = sel.weights > 0  # (N, L, P)
    # the first slot holding each position (N, P); a slot L past the last holds none, so that a tile of
    # one patch, which keeps none (P = 1: no outlier, no extra below P - 1), has an argmax too
    first = torch.cat([member, member.new_ones(N, 1, P)], dim=1).float().argmax(dim=1)
    merge_rows = torch.where(sel.kept, rows, torch.where(member.any(dim=1), start + first, -1))
    crop_ratio = sel.count[1:].cpu().double() / P
    if paper is not None:
        used = torch.cat([filled, torch.ones(N, 1, dtype=torch.bool, device=device)], dim=1)  # (N, L + 1)
        thumb_keep = sel.order[0, : int(sel.count[0])]
        crop_keep = to_grid(sel.kept[1:], image.grid, math.isqrt(P))  # no unpadding: padding tokens too
        return sequence(image, table, paper(used), thumb_keep, crop_keep, merge_rows, crop_ratio)
    thumb_keep = sel.kept[0].nonzero()[:, 0]
    thumb_rows = torch.cat([rows[0, thumb_keep], start[0] + L])
    kept = emit(image, table, thumb_rows, rows[1:], sel.kept[1:], start[1:, 0] + L, merge_rows, P, None)
    return replace(kept, thumb_keep=thumb_keep, crop_ratio=crop_ratio)


@dataclass(frozen=True)
class Peer:
    needs: tuple[tuple[str, int], ...]  # tower probes, see globalcom2/probes.py
    run: Callable  # (image, ratio, paper) -> Compressed
    paper: Callable | None = None  # the published order, None: LLaVA-NeXT's true layout. A crop order
    # for `emit` (index, keep, grid, size) -> (n,); PruMerge+'s is `tile_by_tile` (it has no crop grid)


PEERS = {
    "fastervlm": Peer(FASTERVLM_NEEDS, _fastervlm),
    "fastervlm-paper": Peer(FASTERVLM_NEEDS, _fastervlm, paper=full_raster),
    "visionzip": Peer(VISIONZIP_NEEDS, _visionzip),
    "visionzip-paper": Peer(VISIONZIP_NEEDS, _visionzip, paper=full_raster),
    "hired": Peer(HIRED_NEEDS, _hired),
    "hired-paper": Peer(HIRED_NEEDS, _hired, paper=hired_crop_order),
    "prumerge+": Peer(PRUMERGE_NEEDS + (("hidden", -2),), _prumerge),
    "prumerge+-paper": Peer(PRUMERGE_NEEDS + (("hidden", -2),), _prumerge, paper=tile_by_tile),
}
