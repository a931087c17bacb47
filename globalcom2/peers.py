"""The peer methods (FasterVLM, VisionZip) as compressors of the same stage: budgets and emission.

Each peer has a pure selection function over tensors (`fastervlm.py`, `visionzip.py`) and two
emissions of its choice (`emit`): the default name packs it in LLaVA-NeXT's true layout (kept crop
tokens at their true grid positions, unpadded, a newline closing each unpadded row), the `-paper`
name packs it token for token as the authors' code does. Tokens with no grid position ([CLS],
merged summaries) go where the published code puts them, in both.

A peer is one entry of `PEERS`: name -> Peer(needs, run, paper), `run(image, ratio, paper)` -> `Packed`.
A new selection-only method needs a `run` of a few lines: its keep mask (1 + C, P) from its pure
function, then `emit` with the tiles' features as the table (see `_fastervlm`); a merging one also
passes its merged tokens as table rows and `merge_rows` (see `_visionzip`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .fastervlm import NEEDS as FASTERVLM_NEEDS
from .fastervlm import fastervlm_keep
from .layout import emit_rows, gather_tokens, to_grid, unpad_area
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
    thumb_merge: Tensor | None  # (P,) long: index in `tokens` of the merged token a position went into, -1 if none
    crop_merge: Tensor | None  # (H, W) long: the same over the crop grid


def full_raster(index: Tensor, keep: Tensor) -> Tensor:
    """The published crop order of FasterVLM and VisionZip: the kept entries of the whole H x W grid in
    raster order, padding included, no newline. index, keep (H, W) -> (n,) long."""
    return index[keep]


def emit(image, table: Tensor, thumb_rows: Tensor, grid_rows: Tensor, crop_keep: Tensor, tail_rows: Tensor,
         merge_rows: Tensor | None, T: int, paper: Callable | None) -> Packed:
    """Gather one image's sequence from `table` (R, D) of token rows.

    thumb_rows (k,) long: the thumbnail part, rows in emission order. grid_rows (C, P) long: the row of
    each crop position's token; crop_keep (C, P) bool which of them are kept. tail_rows (t,) long: rows
    emitted after the crop grid. merge_rows (1 + C, P) long or None: the row of the merged token each
    position went into, -1 if none. T: tokens kept per tile. `paper`: None for LLaVA-NeXT's true layout
    of the crop grid (the unpadded rows, each closed by a newline, as `spatial_unpad`), else the
    published order, a function (index (H, W) long, keep (H, W) bool) -> (n,) long, e.g. `full_raster`.
    """
    gw, gh = image.grid
    side = math.isqrt(image.thumb.shape[0])
    index, keep = to_grid(grid_rows, image.grid, side), to_grid(crop_keep, image.grid, side)  # (H, W)
    if paper is not None:
        crop_order = paper(index, keep)
    else:
        top, bottom, left, right = unpad_area(image.grid, image.size, side)
        crop_order = emit_rows(index[top:bottom, left:right], keep[top:bottom, left:right])
        emitted = torch.zeros_like(keep)
        emitted[top:bottom, left:right] = keep[top:bottom, left:right]
        keep = emitted
    order = torch.cat([thumb_rows, crop_order, tail_rows])
    tokens = gather_tokens(table, image.newline.to(table.dtype), order)
    thumb_merge = crop_merge = None
    if merge_rows is not None:  # rows -> places in the sequence
        place = torch.full((table.shape[0] + 1,), -1, dtype=torch.long, device=table.device)  # last: "none"
        real = order >= 0
        place[order[real]] = torch.arange(len(order), device=table.device)[real]
        merged = place[torch.where(merge_rows >= 0, merge_rows, table.shape[0])]  # (1 + C, P)
        thumb_merge, crop_merge = merged[0], to_grid(merged[1:], image.grid, side)
    P = side * side
    ratios = torch.full((gw * gh,), T / P, dtype=torch.float64)  # T of P tokens per crop (padding included)
    return Packed(tokens, thumb_rows.new_empty(0), keep, ratios, thumb_merge, crop_merge)


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


@dataclass(frozen=True)
class Peer:
    needs: tuple[tuple[str, int], ...]  # tower probes, see minillava/clip.py
    run: Callable  # (image, ratio, paper) -> Packed
    paper: Callable | None = None  # the published crop order (see `emit`), None: LLaVA-NeXT's true layout


PEERS = {
    "fastervlm": Peer(FASTERVLM_NEEDS, _fastervlm),
    "fastervlm-paper": Peer(FASTERVLM_NEEDS, _fastervlm, paper=full_raster),
    "visionzip": Peer(VISIONZIP_NEEDS, _visionzip),
    "visionzip-paper": Peer(VISIONZIP_NEEDS, _visionzip, paper=full_raster),
}
