"""What to keep: thumbnail selection, per-crop budgets and per-crop token selection (docs/globalcom2.md, steps 1-3).

Token scores are float32 on the features' device. The per-crop budget (a handful of numbers) is
computed on the host in float64 with numpy, the arithmetic of the published code, so that
k_c = int(N_c * scale_c) falls on the same integer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import crop_extents, to_crops, to_grid

TEMPERATURE = 10.0  # softmax temperature of the crop budget (step 2.2)
SOFTMAX_EPS = 1e-8  # added to the softmax denominator by the published code
NORM_EPS = 1e-12  # L2 floor of the score normalisation, as F.normalize (step 3.5)


def top_order(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, largest first; ties go to the lower index (deterministic)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices[:k]


def region_sums(thumb_scores: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The thumbnail's [CLS] scores summed over the region each crop covers, s_c (gw*gh,) float64
    (step 2.1): the map cut into gh x gw regions, the last row/column of regions taking the remainder."""
    gw, gh = grid
    s = thumb_scores.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(s).all():
        raise ValueError("thumbnail [CLS] scores contain NaN or inf")
    side = math.isqrt(s.size)
    ph, pw = max(side // gh, 1), max(side // gw, 1)
    region_row = np.minimum(np.arange(side) // ph, gh - 1)
    region_col = np.minimum(np.arange(side) // pw, gw - 1)
    owner = (region_row[:, None] * gw + region_col[None, :]).ravel()  # (P,) crop of each map position
    sums = np.zeros(gw * gh)
    np.add.at(sums, owner, s)  # in raster order, like the published loop
    return sums


def crop_scales(thumb_scores: Tensor, grid: tuple[int, int], ratio: float) -> np.ndarray:
    """Each crop's retention ratio scale_c (gw*gh,) float64, from the thumbnail's [CLS] scores (step 2):
    the region sums (`region_sums`) turned into ratios around `ratio`."""
    sums = region_sums(thumb_scores, grid)
    e = np.exp((sums - sums.max()) / TEMPERATURE)
    p = e / (e.sum() + SOFTMAX_EPS)
    return np.minimum(ratio * (1 + p - p.mean()), 1.0)  # no lower clip


def kept_counts(n_valid: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """k_c = int(N_c * scale_c) (float64 product, truncation), bounded to [0, N_c]."""
    k = np.trunc(n_valid * scales)
    return np.clip(k, 0, n_valid).astype(np.int64)


def global_scores(thumb_scores: Tensor, grid: tuple[int, int], side: int, area: tuple[int, int, int, int]) -> Tensor:
    """The thumbnail's [CLS] map carried onto the crop grid: (H, W) float32, 0 outside the valid area.

    The side x side map is resized (bilinear, align_corners=False) to the valid area's cur_h x cur_w
    and cut into per-crop pieces by the published walk (step 3.4): within a row of crops the column
    offset advances by each crop's valid width; after a row the row offset advances by the valid
    height of that row's first crop. Piece c is laid over crop c's valid tokens. This is the true
    position in the valid area unless the first column of crops is all padding (then the walk never
    advances the row offset; we reproduce that).
    """
    top, bottom, left, right = area
    gw, gh = grid
    device = thumb_scores.device
    out = torch.zeros(gh * side, gw * side, device=device)
    cur_h, cur_w = bottom - top, right - left
    if cur_h <= 0 or cur_w <= 0:
        return out
    thumb_map = thumb_scores.float().reshape(1, 1, side, side)
    resized = F.interpolate(thumb_map, size=(cur_h, cur_w), mode="bilinear", align_corners=False)[0, 0]  # (cur_h, cur_w)

    rows, cols = crop_extents(area, grid, side)
    first_heights = rows * (cols[0] > 0)  # valid height of each row's first crop (0 if it is all padding)
    row_offset = np.cumsum(first_heights) - first_heights  # where each row of pieces starts
    col_offset = np.cumsum(cols) - cols  # where each piece starts within a row of pieces
    y = np.arange(top, bottom)
    x = np.arange(left, right)
    crop_row, crop_col = y // side, x // side
    map_y = row_offset[crop_row] + y - np.maximum(top, crop_row * side)  # (cur_h,)
    map_x = col_offset[crop_col] + x - np.maximum(left, crop_col * side)  # (cur_w,)
    map_y = torch.as_tensor(map_y, device=device)
    map_x = torch.as_tensor(map_x, device=device)
    out[top:bottom, left:right] = resized[map_y[:, None], map_x[None, :]]
    return out


def normalize_per_crop(x: Tensor, valid: Tensor, grid: tuple[int, int], side: int) -> Tensor:
    """Divide each crop's valid scores by their L2 norm (floor 1e-12): (H, W) -> (H, W), 0 elsewhere."""
    x = to_crops(torch.where(valid, x, 0.0), grid, side)  # (C, P)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)  # (C, 1)
    return to_grid(x / norm, grid, side)


def keep_top_per_crop(scores: Tensor, valid: Tensor, k: Tensor) -> Tensor:
    """Keep the k[c] highest-scoring valid tokens of each crop, all crops at once.

    scores (C, P) float, valid (C, P) bool, k (C,) long -> (C, P) bool at true positions. Ties go to
    the token earlier in raster order.
    """
    C, P = scores.shape
    scores = scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (C, P)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(P, device=scores.device).expand(C, P))
    return (rank < k[:, None]) & valid


def random_priorities(P: int, C: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random scores for the `random` baseline: thumbnail (P,) and crops (C, P), on the CPU.

    Drawn from a generator seeded by `seed` alone, so an image's selection does not depend on the
    other images of the batch nor on the device.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(P, generator=gen), torch.rand(C, P, generator=gen)
