"""LLaVA-NeXT's image token sequence: the thumbnail, then the crops as one grid, unpadded, a newline
closing each row.

The C = gw * gh crops of an image tile the AnyRes canvas row by row; their tokens, side x side each, form
one H x W grid (H = gh * side, W = gw * side). The canvas pads the resized image on two sides, so rows
[top, bottom) and columns [left, right) of the grid show the image and the rest is padding
(`unpad_area`, LLaVA's `unpad_image`). The sequence LLaVA-NeXT feeds the decoder for one image
(`spatial_unpad` with `anyres` in llava/model/llava_arch.py, `prepare_inputs_labels_for_multimodal`):

    thumbnail tokens (P, raster order) | grid row top, newline | ... | grid row bottom - 1, newline

A compressor keeps a subset (globalcom2/compress.py): `pack` lays it out the same way, kept grid
tokens at their places, every unpadded row still closed by its newline.

LLaVA-OneVision (anyres_max_N, `max_tiles` = N below) packs the same way, with one step more in its
uncompressed sequence: an unpadded grid of more than about N tiles' tokens is bilinearly downscaled
first (`downscaled_size`, LLaVA-NeXT's llava_arch.py `prepare_inputs_labels_for_multimodal`, the
"anyres_max" branch; transformers' `LlavaOnevisionModel.pack_image_features`), and the newlines close
the downscaled rows. Our decision for compression (docs/onevision.md): a compressor selects on the
full-resolution crop grid, as for LLaVA-NeXT, and its kept tokens are packed at their true positions
with a newline closing every full-resolution row; nothing it kept is resampled.

A method that merges inside the tower (FiCoCo-V, globalcom2/ficoco.py) leaves each tile T' tokens that
no longer stand on its side x side grid (merged, and in the method's own order). Our decision
(`merged_sequence`, docs/methods.md): the tiles' tokens one tile after another, as the published
LLaVA-1.5 code feeds its one view's tokens, the thumbnail first, then the crops row-major, each tile's
tokens in the tower's order; no unpadding (the padding's tokens are merged with the others) and no
newlines (there are no rows to close); OneVision's downscale does not apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def unpad_area(grid: tuple[int, int], size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """The rectangle of the H x W crop grid that shows the image rather than its padding.

    grid (gw, gh) crops, size (w0, h0) the original image in pixels, side tokens per tile side.
    Returns (top, bottom, left, right): rows [top, bottom) and columns [left, right) are valid.
    Python float arithmetic and int() truncation, as the original LLaVA `unpad_image`
    (llava/model/llava_arch.py); transformers rounds to 7 decimals first, we do not.
    """
    gw, gh = grid
    w0, h0 = size
    H, W = gh * side, gw * side
    if w0 / h0 > W / H:  # wider than the canvas: padded above and below
        new_h = int(h0 * (W / w0))
        pad = (H - new_h) // 2
        return pad, H - pad, 0, W
    new_w = int(w0 * (H / h0))  # taller (or the same shape): padded left and right
    pad = (W - new_w) // 2
    return 0, H, pad, W - pad


def crop_grid(crops: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per-crop tokens as one grid: (gw*gh, P, D), crops row-major, each raster -> (H, W, D)."""
    gw, gh = grid
    side = round(crops.shape[1] ** 0.5)
    x = crops.reshape(gh, gw, side, side, -1)  # (gh, gw, side, side, D)
    return x.transpose(1, 2).reshape(gh * side, gw * side, -1)  # (gh, side, gw, side, D) -> (H, W, D)


def downscaled_size(area: tuple[int, int, int, int], side: int, max_tiles: int | None) -> tuple[int, int]:
    """(h, w) of the unpadded grid as OneVision's uncompressed sequence lays it out: the area's own size,
    or, where it holds more than about `max_tiles` tiles of side x side tokens (ratio
    sqrt(h w / (max_tiles side^2)) > 1.1), (int(h // ratio), int(w // ratio)) as the published code
    computes it, each side at least 1. `max_tiles` None (LLaVA-NeXT): never downscaled.

    At least 1: a long, thin area (w < ratio, possible only where a canvas is more than max_tiles * side
    tiles long, e.g. 1 x 2 tiles of one token under anyres_max_1) would lose its only column; LLaVA's
    and transformers' `interpolate` to a zero size raises there, and we keep the column (issue 32).
    An area without rows or columns (a sliver image) holds no token and is never downscaled."""
    top, bottom, left, right = area
    h, w = bottom - top, right - left
    if max_tiles is None:
        return h, w
    ratio = math.sqrt(h * w / (max_tiles * side**2))
    return (max(1, int(h // ratio)), max(1, int(w // ratio))) if ratio > 1.1 else (h, w)


def grid_share(area: tuple[int, int, int, int], side: int, max_tiles: int | None) -> float:
    """h' w' / (h w): the share of the unpadded grid's tokens the uncompressed sequence holds after
    `downscaled_size` (1 when not downscaled). A compressor selects on the full-resolution grid with its
    crops' ratio scaled by it (globalcom2.ImageFeatures.grid_share), so that r keeps r of what the
    decoder would otherwise see."""
    top, bottom, left, right = area
    if bottom == top or right == left:  # a sliver image: no crop token to scale (LLaVA packs only newlines)
        return 1.0
    h, w = downscaled_size(area, side, max_tiles)
    return h * w / ((bottom - top) * (right - left))


def downscale(rows: Tensor, size: tuple[int, int]) -> Tensor:
    """The unpadded grid (h, w, D) resized to size (h', w') bilinearly (align_corners False, in its
    own dtype), as OneVision's `nn.functional.interpolate(..., mode="bilinear")`; unchanged if equal."""
    if tuple(rows.shape[:2]) == tuple(size):
        return rows
    x = rows.permute(2, 0, 1)[None]  # (1, D, h, w)
    return F.interpolate(x, list(size), mode="bilinear")[0].permute(1, 2, 0)  # (h', w', D)


def pack(head: Tensor, grid: Tensor, area: tuple[int, int, int, int], newline: Tensor,
         keep: Tensor | None = None, tail: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """One image's token sequence (T, D) in the dtype of `head`.

    head (k, D): the tokens before the grid (the thumbnail's), as they come. grid (H, W, D): the crop
    grid's tokens; of its unpadded `area` the rows in order, the tokens `keep` (H, W) bool marks (all if
    None) in raster order, a `newline` (D,) closing every row, even one with nothing kept.
    tail (t, D): tokens after the grid (a merging compressor's tokens that have no grid place).
    `size` (h', w') (OneVision's uncompressed sequence, `downscaled_size`; only without `keep`): the
    unpadded grid is first resized to it. A `keep` mask is on the full-resolution grid and is packed there.
    """
    if keep is not None and size is not None:
        raise ValueError("a kept subset is packed at full resolution: pass size only without keep")
    top, bottom, left, right = area
    rows = grid[top:bottom, left:right].to(head.dtype)  # (h, w, D)
    if size is not None:
        rows = downscale(rows, size)  # (h', w', D)
    h = rows.shape[0]
    rows = torch.cat([rows, newline.to(head.dtype).expand(h, 1, -1)], dim=1)  # (h, w + 1, D)
    if keep is None:
        rows = rows.flatten(0, 1)
    else:
        kept = keep[top:bottom, left:right]
        rows = rows[torch.cat([kept, kept.new_ones(h, 1)], dim=1)]  # (n, D), row-major
    parts = [head, rows] if tail is None else [head, rows, tail.to(head.dtype)]
    return torch.cat(parts)


def merged_sequence(thumb: Tensor, crops: Tensor) -> Tensor:
    """A tower method's shorter tiles in sequence: thumb (T', D), then crops (C, T', D) row-major -> ((1 + C) T', D)."""
    return torch.cat([thumb, crops.reshape(-1, crops.shape[-1])])


def tile_sequence(head: Tensor, crops: Tensor, grid: tuple[int, int], keep: Tensor | None = None) -> Tensor:
    """InternVL's image sequence (T, D): the crops one after another, row-major, each in raster order, then
    `head` (the thumbnail's tokens, or what a compressor kept of them, in its order); no unpadding (the image
    fills the grid), no newline. `keep` (H, W) bool on the crop grid: only the crop tokens it marks, each
    crop's in raster order (our choice for compression: docs/internvl.md)."""
    if keep is not None:
        gw, gh = grid
        side = round(crops.shape[1] ** 0.5)
        keep = keep.reshape(gh, side, gw, side).transpose(1, 2).reshape(gw * gh, crops.shape[1])  # (C, P) crops row-major
        return torch.cat([crops[keep].to(head.dtype), head])
    return torch.cat([crops.reshape(-1, head.shape[-1]).to(head.dtype), head])


def compressed_sequence(kept, crops: Tensor, grid: tuple[int, int], area: tuple[int, int, int, int],
                        newline: Tensor) -> Tensor:
    """What a compressor kept of one image (globalcom2.Compressed), laid out for the decoder: its head,
    the kept tokens of the crop grid (`kept.grid` where the method merged into them, else `crops`
    (gw*gh, P, D) as one grid), a newline closing each unpadded row, its tail; or, for a `-paper`
    method, the published sequence it emitted itself."""
    if kept.sequence is not None:
        return kept.sequence
    tokens = kept.grid if kept.grid is not None else crop_grid(crops, grid)
    return pack(kept.head, tokens, area, newline, kept.crop_keep, kept.tail)


def sequence_places(grid: tuple[int, int], area: tuple[int, int, int, int], side: int,
                    max_tiles: int | None = None) -> Tensor:
    """Where each token of the uncompressed sequence comes from: (P + h (w + 1),) long, a thumbnail
    position p as p, a grid cell (y, x) as P + y * W + x, a newline as -1. What a method that prunes
    the sequence itself (FastV, in the decoder) kept, read back onto the thumbnail and the grid.
    OneVision's downscaled grid (`max_tiles`): a token of the h' x w' grid stands for the full-resolution
    cell under its centre (row top + floor((y' + 1/2) h / h'), likewise for columns)."""
    top, bottom, left, right = area
    P, W = side * side, grid[0] * side
    (h, w), (h2, w2) = (bottom - top, right - left), downscaled_size(area, side, max_tiles)
    ys = top + ((torch.arange(h2) + 0.5) * h / h2).long()  # (h',) full-resolution rows
    xs = left + ((torch.arange(w2) + 0.5) * w / w2).long()
    cells = P + ys[:, None] * W + xs[None, :]  # (h', w')
    cells = torch.cat([cells, torch.full((h2, 1), -1)], dim=1)  # a newline closing each row
    return torch.cat([torch.arange(P), cells.flatten()])


def on_grid(kept: torch.Tensor, grid: tuple[int, int], area: tuple[int, int, int, int],
            side: int, max_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decoder-side method (FastV) kept of the uncompressed image sequence, `kept` (k,) long
    indices into it (minillava/schedule.py `kept_positions`), on the
    thumbnail (its positions (k0,) long) and the crop grid ((H, W) bool); kept newlines have no place.
    `max_tiles`: OneVision's downscaled grid, each token marked at the cell under its centre."""
    places = sequence_places(grid, area, side, max_tiles).to(kept.device)[kept]
    P, H, W = side * side, grid[1] * side, grid[0] * side
    crop_keep = torch.zeros(H * W, dtype=torch.bool, device=kept.device)
    crop_keep[places[places >= P] - P] = True
    return places[(places >= 0) & (places < P)], crop_keep.view(H, W)


def on_tiles(kept: torch.Tensor, grid: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`on_grid` for InternVL's sequence (`tile_sequence`: the crops one after another, each in raster
    order, then the thumbnail): the thumbnail's kept positions (k0,) long, the crop grid's (H, W) bool."""
    (gw, gh), P = grid, side * side
    H, W = gh * side, gw * side
    # each token's place coded as sequence_places does (thumbnail p: p; grid cell (y, x): P + y W + x), laid
    # out by tile_sequence itself so the two cannot disagree
    cells = P + torch.arange(H * W, device=kept.device).view(H, W, 1)  # (H, W, 1)
    crops = cells.reshape(gh, side, gw, side, 1).transpose(1, 2).reshape(gw * gh, P, 1)  # (C, P, 1) row-major
    places = tile_sequence(torch.arange(P, device=kept.device)[:, None], crops, grid)[:, 0][kept]
    crop_keep = torch.zeros(H * W, dtype=torch.bool, device=kept.device)
    crop_keep[places[places >= P] - P] = True
    return places[places < P], crop_keep.view(H, W)


def uncompressed_length(area: tuple[int, int, int, int], side: int, max_tiles: int | None = None) -> int:
    """Tokens of the uncompressed sequence: the thumbnail's P, then h rows of w tokens and a newline
    (OneVision, `max_tiles`: the downscaled h' x w' grid's rows)."""
    h, w = downscaled_size(area, side, max_tiles)
    return side * side + h * (w + 1)
