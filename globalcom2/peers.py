"""The peer methods (FasterVLM, VisionZip, HiRED, PruMerge+) as compressors of the same stage.

Each peer has a pure selection function over tensors (`fastervlm.py`, `visionzip.py`, `hired.py`,
`prumerge.py`) and two
emissions of its choice (`emit`): the default name packs it in LLaVA-NeXT's true layout (kept crop
tokens at their true grid positions, unpadded, a newline closing each unpadded row), the `-paper`
name packs it token for token as the authors' code does. Tokens with no grid position ([CLS],
merged summaries) go where the published code puts them, in both.

A peer is one entry of `PEERS`: name -> Peer(needs, run, paper), `run(image, ratio, paper)` -> `Packed`.
A new selection-only method needs a `run` of a few lines: its keep mask (1 + C, P) from its pure
function, then `emit` with the tiles' features as the table (see `_fastervlm`, `_hired`); a merging one
also passes its merged tokens as table rows and `merge_rows` (see `_visionzip`, `_prumerge`).
A sequence that is no crop-grid order at all (PruMerge+'s published one, tile by tile) goes straight
to `pack`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .fastervlm import NEEDS as FASTERVLM_NEEDS
from .fastervlm import fastervlm_keep
from .hired import NEEDS as HIRED_NEEDS
from .hired import hired_crop_order, hired_keep
from .layout import emit_rows, gather_tokens, to_grid, unpad_area
from .prumerge import NEEDS as PRUMERGE_NEEDS
from .prumerge import prumerge_merge, prumerge_plus
from .visionzip import NEEDS as VISIONZIP_NEEDS
from .visionzip import visionzip_split, visionzip_tokens


def tokens_per_tile(P: int, ratio: float) -> int:
    """T = round(P r) (half up), at least 1: FasterVLM's README, 576 x (1 - 0.9) = 57.6 -> 58 tokens."""
    return max(1, int(P * ratio + 0.5))


class Packed(NamedTuple):
    """A peer's result for one image (what `Compressed` adds to it: the valid area and `before`)."""

    tokens: Tensor  # (n, D) the sequence
    thumb_keep: Tensor  # (k0,) long: thumbnail positions kept, in emission order
    crop_keep: Tensor  # (H, W) bool: crop tokens emitted at their true grid positions
    crop_ratio: Tensor  # (C,) float64 CPU: each crop's share of tokens kept, T / P
    thumb_merge: Tensor | None  # (P,) long: index in `tokens` of the merged token a position went into
    # (a kept position that others were merged into: its own token), -1 if none
    crop_merge: Tensor | None  # (H, W) long: the same over the crop grid


def full_raster(index: Tensor, keep: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The published crop order of FasterVLM and VisionZip: the kept entries of the whole H x W grid in
    raster order, padding included, no newline. index, keep (H, W) -> (n,) long; grid and size unused."""
    return index[keep]


def emit(image, table: Tensor, thumb_rows: Tensor, grid_rows: Tensor, crop_keep: Tensor, tail_rows: Tensor,
         merge_rows: Tensor | None, T: int, paper: Callable | None) -> Packed:
    """Gather one image's sequence from `table` (R, D) of token rows.

    thumb_rows (k,) long: the thumbnail part, rows in emission order. grid_rows (C, P) long: the row of
    each crop position's token; crop_keep (C, P) bool which of them are kept. tail_rows (t,) long: rows
    emitted after the crop grid. merge_rows (1 + C, P) long or None: the row of the merged token each
    position went into, -1 if none. T: tokens kept per tile. `paper`: None for LLaVA-NeXT's true layout
    of the crop grid (the unpadded rows, each closed by a newline, as `spatial_unpad`), else the
    published order, a function (index (H, W) long, keep (H, W) bool, grid, size) -> (n,) long, e.g.
    `full_raster`, `hired_crop_order`; the returned `crop_keep` is what that order emits.
    """
    side = math.isqrt(image.thumb.shape[0])
    index, keep = to_grid(grid_rows, image.grid, side), to_grid(crop_keep, image.grid, side)  # (H, W)
    if paper is not None:
        crop_order = paper(index, keep, image.grid, image.size)
        keep = keep & torch.isin(index, crop_order)  # what the order emits (HiRED's unpadding drops some)
    else:
        top, bottom, left, right = unpad_area(image.grid, image.size, side)
        crop_order = emit_rows(index[top:bottom, left:right], keep[top:bottom, left:right])
        emitted = torch.zeros_like(keep)
        emitted[top:bottom, left:right] = keep[top:bottom, left:right]
        keep = emitted
    order = torch.cat([thumb_rows, crop_order, tail_rows])
    P = side * side
    ratios = torch.full((image.grid[0] * image.grid[1],), T / P, dtype=torch.float64)  # T of P per crop
    return pack(image, table, order, thumb_rows.new_empty(0), keep, merge_rows, ratios)


def pack(image, table: Tensor, order: Tensor, thumb_keep: Tensor, crop_keep: Tensor, merge_rows: Tensor | None,
         ratios: Tensor) -> Packed:
    """The sequence of an emission `order` (n,) long over `table` (R, D) rows (NEWLINE for a newline),
    and where each row of `merge_rows` (1 + C, P) (see `emit`) landed in it."""
    side = math.isqrt(image.thumb.shape[0])
    tokens = gather_tokens(table, image.newline.to(table.dtype), order)
    thumb_merge = crop_merge = None
    if merge_rows is not None:  # rows -> places in the sequence
        place = torch.full((table.shape[0] + 1,), -1, dtype=torch.long, device=table.device)  # last: "none"
        real = order >= 0
        place[order[real]] = torch.arange(len(order), device=table.device)[real]
        merged = place[torch.where(merge_rows >= 0, merge_rows, table.shape[0])]  # (1 + C, P)
        thumb_merge, crop_merge = merged[0], to_grid(merged[1:], image.grid, side)
    return Packed(tokens, thumb_keep, crop_keep, ratios, thumb_merge, crop_merge)


def _fastervlm(image, ratio: float, paper: Callable | None) -> Packed:
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
    packed = emit(image, table, thumb_rows, grid_rows, keep[1:], thumb_rows[:0], None, T, paper)
    return packed._replace(thumb_keep=thumb_rows)


def _visionzip(image, ratio: float, paper: Callable | None) -> Packed:
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
    packed = emit(image, table, torch.arange(T, device=device), rows[1:], keep[1:], crop_tail, merge_rows, T, paper)
    return packed._replace(thumb_keep=keep[0].nonzero()[:, 0])


def _hired(image, ratio: float, paper: Callable | None) -> Packed:
    """HiRED: a total budget int((1 + C) P r), half of it (alpha 0.5) for the thumbnail, the crops' share
    split by the thumbnail's layer-0 [CLS] attention; tokens by layer -2 [CLS] attention (`hired.py`).
    The thumbnail's kept tokens in raster order (`pack_HiRED_image_features` masks it), then the crops."""
    P, D = image.thumb.shape
    C = image.crops.shape[0]
    keep = hired_keep(image.probes[HIRED_NEEDS[0]], image.probes[HIRED_NEEDS[1]], ratio)  # (1 + C, P)
    table = torch.cat([image.thumb[None], image.crops.to(image.thumb.dtype)]).reshape((1 + C) * P, D)
    thumb_rows = keep[0].nonzero()[:, 0]
    grid_rows = P + torch.arange(C * P, device=table.device).view(C, P)
    packed = emit(image, table, thumb_rows, grid_rows, keep[1:], thumb_rows[:0], None, P, paper)
    budgets = keep[1:].sum(dim=1).cpu().double() / P  # each crop's budget over P (padding included)
    return packed._replace(thumb_keep=thumb_rows, crop_ratio=budgets)


def tile_by_tile(used: Tensor) -> Tensor:
    """PruMerge+'s published order (n,) long: used (N, L + 1) bool slots of an (N, L + 1) table, tile
    by tile, each tile's merged tokens then its extra token (HiRED prumerge_llava_next.py `forward`:
    the tiles' outputs concatenated; no unpadding, no newlines)."""
    return torch.arange(used.numel(), device=used.device).view(used.shape)[used]


def _prumerge(image, ratio: float, paper: Callable | None) -> Packed:
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
    first = member.float().argmax(dim=1)  # (N, P) the first slot holding each position
    merge_rows = torch.where(sel.kept, rows, torch.where(member.any(dim=1), start + first, -1))
    crop_ratio = sel.count[1:].cpu().double() / P
    if paper is not None:
        used = torch.cat([filled, torch.ones(N, 1, dtype=torch.bool, device=device)], dim=1)  # (N, L + 1)
        thumb_keep = sel.order[0, : int(sel.count[0])]
        crop_keep = to_grid(sel.kept[1:], image.grid, math.isqrt(P))  # no unpadding: padding tokens too
        return pack(image, table, paper(used), thumb_keep, crop_keep, merge_rows, crop_ratio)
    thumb_keep = sel.kept[0].nonzero()[:, 0]
    thumb_rows = torch.cat([rows[0, thumb_keep], start[0] + L])
    packed = emit(image, table, thumb_rows, rows[1:], sel.kept[1:], start[1:, 0] + L, merge_rows, P, None)
    return packed._replace(thumb_keep=thumb_keep, crop_ratio=crop_ratio)


@dataclass(frozen=True)
class Peer:
    needs: tuple[tuple[str, int], ...]  # tower probes, see minillava/clip.py
    run: Callable  # (image, ratio, paper) -> Packed
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
