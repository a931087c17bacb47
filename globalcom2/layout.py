"""Geometry of the LLaVA-NeXT crop grid: crop <-> grid views, and the published emission orders.

The crops of one image form a single H x W token grid (H = gh * side, W = gw * side), of which the
model's unpadded area (minillava/layout.py `unpad_area`) shows the image. Everything here is about
where tokens sit in that grid; nothing here scores. LLaVA-NeXT's own layout is the model's
(minillava/layout.py `pack`); the `-paper` methods emit the published orders with `emit_rows` on
token indices (c * P + p, NEWLINE for a newline), the features gathered once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def area_mask(area: tuple[int, int, int, int], shape: tuple[int, int], device) -> Tensor:
    """The unpadded area as an (H, W) bool mask."""
    top, bottom, left, right = area
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[top:bottom, left:right] = True
    return mask


def crop_extents(area: tuple[int, int, int, int], grid: tuple[int, int], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows of each crop row (gh,) and valid columns of each crop column (gw,).

    Crop (i, j) has `rows[i] * cols[j]` valid tokens; the area is a rectangle, so this is all there is.
    """
    top, bottom, left, right = area
    gw, gh = grid
    starts_h, starts_w = np.arange(gh) * side, np.arange(gw) * side
    rows = np.clip(np.minimum(bottom, starts_h + side) - np.maximum(top, starts_h), 0, None)
    cols = np.clip(np.minimum(right, starts_w + side) - np.maximum(left, starts_w), 0, None)
    return rows, cols


def to_grid(x: Tensor, grid: tuple[int, int], side: int) -> Tensor:
    """Lay per-crop tensors out as one token grid: (gw*gh, P, ...) -> (H, W, ...)."""
    gw, gh = grid
    rest = x.shape[2:]
    x = x.reshape(gh, gw, side, side, *rest)  # (gh, gw, side, side, ...)
    x = x.transpose(1, 2)  # (gh, side, gw, side, ...)
    return x.reshape(gh * side, gw * side, *rest)  # (H, W, ...)


def to_crops(x: Tensor, grid: tuple[int, int], side: int) -> Tensor:
    """Cut a token grid back into crops, each in raster order: (H, W, ...) -> (gw*gh, P, ...)."""
    gw, gh = grid
    rest = x.shape[2:]
    x = x.reshape(gh, side, gw, side, *rest)  # (gh, side, gw, side, ...)
    x = x.transpose(1, 2)  # (gh, gw, side, side, ...)
    return x.reshape(gw * gh, side * side, *rest)  # (C, P, ...)


NEWLINE = -1  # index that stands for the newline token in an emission order


def emit_rows(index: Tensor, keep: Tensor) -> Tensor:
    """Emission order of a grid: its kept entries in raster order, a newline closing every row.

    index (h, w) long (what each grid position holds), keep (h, w) bool -> (n,) long, NEWLINE for
    the newlines. Every row gets its newline, even one with nothing kept, as in LLaVA-NeXT.
    """
    h = index.shape[0]
    index = torch.cat([index, index.new_full((h, 1), NEWLINE)], dim=1)  # (h, w + 1)
    keep = torch.cat([keep, keep.new_ones(h, 1)], dim=1)  # (h, w + 1)
    return index[keep]  # (n,), row-major


def paper_slots(keep: Tensor, valid: Tensor) -> Tensor:
    """Where the published code puts kept crop tokens: at their index among the crop's valid tokens.

    keep, valid (C, P) bool over true tile positions -> (C, P) long: for each tile slot, the index
    (c * P + p) of the crop token placed there, or -1 if it stays empty. The v-th valid token of a crop
    (raster order), if kept, lands in slot v, read as a raster index into the full side x side tile
    (docs/globalcom2.md, "The two modes the project offers", deviation 1).
    """
    C, P = keep.shape
    slot = valid.long().cumsum(dim=1) - 1  # (C, P): index among the crop's valid tokens
    crop, pos = keep.nonzero(as_tuple=True)
    slots = torch.full_like(slot, -1)
    slots[crop, slot[crop, pos]] = crop * P + pos
    return slots


def gather_tokens(crops: Tensor, newline: Tensor, order: Tensor) -> Tensor:
    """The token sequence of an emission order: crops (C*P, D), newline (D,), order (n,) -> (n, D)."""
    tokens = crops[order.clamp(min=0)]  # (n, D)
    return torch.where((order == NEWLINE)[:, None], newline, tokens)
