"""GlobalCom2 visual-token compression for LLaVA-NeXT: one image's features in, its token sequence out.

The stage sits between the projector and the decoder. Per image it receives (`ImageFeatures`):

    thumb         (P, D)       projected thumbnail tokens, raster order; P = side * side (576 = 24 x 24)
    crops         (C, P, D)    projected crop tokens, C = gw * gh crops in row-major order: crop c sits
                               at row c // gw, column c % gw of the crop grid; each crop in raster order
    thumb_scores  (P,)         [CLS] score of each thumbnail token: last CLIP layer, pre-softmax
                               q_cls . k_j / sqrt(head_dim), mean over heads (GLOBALCOM2.md "Inputs")
    crop_scores   (C, P)       the same for every crop
    grid          (gw, gh)     columns and rows of crops (AnyRes best resolution / tile size)
    size          (w0, h0)     original image size in pixels (decides the unpadded area)
    newline       (D,)         the learned image_newline vector
    probes        {(kind, layer): (1 + C, ...)}  what the tower gave for the method's `needs(method)`
                               (minillava/clip.py), tile 0 the thumbnail; empty for GlobalCom2's methods
    project       the projector (vision width -> D), for methods that merge before it (VisionZip)

Together the crops form one H x W token grid, H = gh * side, W = gw * side, of which the rows
[top, bottom) and columns [left, right) show the image (`unpad_area`); the rest is padding.

It returns (`Compressed`) the image's tokens for the decoder, (T, D) in the features' dtype and
device, and what was kept. Methods (`METHODS`):

    none              the uncompressed LLaVA-NeXT packing: thumbnail (P tokens, raster order), then
                      the unpadded crop grid row by row, a newline closing each row
    globalcom2        GlobalCom2 with every kept crop token at its true grid position and a newline
                      closing each unpadded row; with all crop ratios forced to 1 the crop part
                      equals `none`
    globalcom2-paper  token for token what the published code emits (kept tokens placed by their
                      index among the crop's valid tokens; a newline after every one of the H rows)
    uniform           every crop keeps the ratio r (no budget guidance), global + local scores
    local-only        budget from the thumbnail, tokens chosen by the crop's own scores only
    global-only       budget from the thumbnail, tokens chosen by the thumbnail's map only
    random            r of every tile's valid tokens at random (seeded), thumbnail in raster order

The peer methods (`globalcom2/peers.py`; each default name in LLaVA-NeXT's true layout, each `-paper`
name token for token the authors' published sequence):

    fastervlm         FasterVLM: every tile (thumbnail and crops) keeps its T = round(P r) tokens of
                      highest [CLS] attention in CLIP layer -2 (mean over heads); P = 576 gives T = 58
                      at r = 0.1, FasterVLM's "90% reduction" (its knob: reduction ratio 1 - r). Kept
                      tokens in raster order; the crops unpadded, a newline closing each row (FasterVLM's
                      own `spatial_unpad` branch, which its code switches off)
    fastervlm-paper   the published sequence: thumbnail then the whole crop grid in raster order,
                      padding tokens included, no newlines (its code forces mm_patch_merge_type =
                      'spatial'). Our tiler's grid is LLaVA's; FasterVLM's own `select_best_resolution`
                      picks another grid for some sizes (tests/test_fastervlm_published.py lists them)
    visionzip         VisionZip: every tile keeps T = round(P r) tokens, split dominant : contextual as
                      54 : 10 (contextual = round(T * 10 / 64), at least 1; the dominant count includes
                      [CLS]): [CLS], the patches of highest [CLS] attention (layer -2, summed over heads),
                      and contextual tokens, each an evenly spaced remaining token plus the mean of the
                      remaining tokens whose layer -2 keys (mean over heads) are most similar to it;
                      merged before the projector. Thumbnail: [CLS], dominant, contextual; then the crops'
                      dominant tokens unpadded with newlines; then the crops' [CLS] and contextual tokens
    visionzip-paper   the published sequence: as `visionzip` but the crop grid is not unpadded and has
                      no newlines (the published code computes a newline and does not use it)
    hired             HiRED: a total budget int((1 + C) P r), alpha = 0.5 of it (at most P) for the
                      thumbnail, the crops' share split by the thumbnail's layer-0 [CLS] attention
                      (summed over heads) over C consecutive chunks of its raster order; every tile
                      keeps its budget by layer -2 [CLS] attention (summed over heads), padding included;
                      r = 1 keeps everything. Thumbnail in raster order, crops unpadded with newlines
    hired-paper       the published sequence: the crop grid laid out with width and height swapped
                      (`get_anyres_image_grid_shape` returns rows, columns), unpadded as such, no newlines
    prumerge+         PruMerge+: r is ignored, PruMerge+ chooses its own count. Per tile the patches
                      whose last-layer [CLS] attention (one full-width softmax) is above Q3 + 1.5 IQR,
                      plus extras at a step set by their share; each kept token absorbs its 32 most
                      key-similar positions (layer -1 keys, attention-weighted), one extra token sums
                      the rest; merged in layer -2's width, then projected. Thumbnail: kept tokens in
                      raster order, its extra token; crops unpadded with newlines; then the crops'
                      extra tokens
    prumerge+-paper   the published sequence: tile by tile, each tile's merged tokens (most attended
                      first, then the extras by position) and its extra token; no unpadding, no newlines

The peers need tower probes (`needs(method)`; `ImageFeatures.probes`), VisionZip and PruMerge+ also the
projector (`ImageFeatures.project`). Their ties: lower position first (a stable sort); the published `topk`
leaves the order of equal scores unspecified. A padded crop's kept padding tokens are dropped by the
default layout (unpadding), so the default emits at most, the `-paper` exactly, T tokens per tile.
VisionZip's and PruMerge+'s merges (`Compressed.thumb_merge` / `crop_merge`) say which positions each
merged token stands for (PruMerge+ merges into kept tokens; a position in several clusters shows the
first, and every non-kept position also goes into its tile's extra token, not recorded there).
FastV (`minillava.llama.FastV`) is no method here: it prunes the `none` sequence inside the decoder;
`keep_sequence` maps what it kept back onto the grid.

All but `none`, `globalcom2-paper` and the peers emit in the `globalcom2` layout. The thumbnail keeps
int(P * r) tokens in descending score order, without newlines; crop c keeps int(N_c * scale_c) of
its N_c valid tokens.

Token scores are float32 on the features' device; the per-crop budget is float64 numpy on the host
(the published arithmetic). Ties go to the earlier position in raster order, so results are
deterministic, and each image is compressed on its own: a batch gives what one-at-a-time calls give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .peers import PEERS
from .layout import area_mask, crop_extents, emit_rows, gather_tokens, paper_slots, to_crops, to_grid, unpad_area
from .scoring import (
    crop_scales,
    global_scores,
    keep_top_per_crop,
    kept_counts,
    normalize_per_crop,
    random_priorities,
    top_order,
)

METHODS = ("none", "globalcom2", "globalcom2-paper", "uniform", "local-only", "global-only", "random", *PEERS)


def needs(method: str) -> tuple[tuple[str, int], ...]:
    """The tower probes a method needs, (kind, layer) pairs (minillava/clip.py); () for GlobalCom2's own."""
    return PEERS[method].needs if method in PEERS else ()


ALL_NEEDS = tuple(dict.fromkeys(need for peer in PEERS.values() for need in peer.needs))  # every method's


@dataclass
class ImageFeatures:
    """One image's projected features and [CLS] scores, as the compression stage receives them."""

    thumb: Tensor  # (P, D) projected thumbnail tokens, P = side * side
    crops: Tensor  # (gw*gh, P, D) projected crop tokens, crops row-major
    thumb_scores: Tensor  # (P,) [CLS] scores of the thumbnail
    crop_scores: Tensor  # (gw*gh, P) [CLS] scores of the crops
    grid: tuple[int, int]  # (gw, gh) columns, rows of crops
    size: tuple[int, int]  # (w0, h0) original image size in pixels
    newline: Tensor  # (D,) image_newline
    probes: dict = field(default_factory=dict)  # {(kind, layer): (1 + gw*gh, ...)} tower probes, tile 0 = thumbnail
    project: Callable[[Tensor], Tensor] | None = None  # the projector, for methods that merge before it


@dataclass
class Compressed:
    """One image's token sequence for the decoder, and what was kept to make it."""

    tokens: Tensor  # (T, D) the sequence, dtype/device of the features
    thumb_keep: Tensor  # (k0,) long: thumbnail positions kept, in emission order
    crop_keep: Tensor  # (H, W) bool: kept crop tokens at their true grid positions
    valid: Tensor  # (H, W) bool: the unpadded area
    crop_ratio: Tensor  # (gw*gh,) float64 on the CPU: each crop's retention ratio (1 for none)
    before: int  # token count of the uncompressed packing (what `none` returns)
    thumb_merge: Tensor | None = None  # (P,) long: index in `tokens` of the merged token each thumbnail
    # position went into (a kept position that others went into: its own), -1 if none; None: no merging
    crop_merge: Tensor | None = None  # (H, W) long: the same over the crop grid


def compress(images: list[ImageFeatures], method: str = "none", ratio: float = 1.0, seed: int = 0) -> list[Compressed]:
    """Compress every image of a batch; each result equals compressing that image alone."""
    check_arguments(method, ratio, seed)
    return [compress_image(image, method, ratio, seed) for image in images]


def compress_image(
    image: ImageFeatures, method: str = "none", ratio: float = 1.0, seed: int = 0, *, scales=None
) -> Compressed:
    """Compress one image.

    `scales` (gw*gh,), if given, replaces the crop ratios scale_c of step 2 (e.g. all 1 to check that
    `globalcom2` then packs the crops exactly as `none` does).
    """
    ratio = check_arguments(method, ratio, seed)
    side = check_image(image)
    gw, gh = image.grid
    P, C = side * side, gw * gh
    dtype, device = image.thumb.dtype, image.thumb.device
    area = unpad_area(image.grid, image.size, side)
    top, bottom, left, right = area  # valid rows [top, bottom), columns [left, right)
    valid = area_mask(area, (gh * side, gw * side), device)  # (H, W)
    rows, cols = crop_extents(area, image.grid, side)
    n_valid = np.outer(rows, cols).ravel()  # (C,) N_c, crops row-major
    before = P + (bottom - top) * (right - left + 1)

    if method in PEERS:
        if scales is not None:
            raise ValueError(f"scales do not apply to method {method!r}")
        missing = [need for need in PEERS[method].needs if need not in image.probes]
        if missing:
            raise ValueError(f"method {method!r} needs the tower probes {missing}: pass needs={needs(method)} to the tower")
        token_dim = {"cls_attn": -1, "keys": -2, "hidden": -2}  # where the 1 + P tokens are in each kind
        bad = {need: tuple(p.shape) for need, p in image.probes.items()
               if p.shape[0] != 1 + C or p.shape[token_dim.get(need[0], 1)] != 1 + P}
        if bad:
            raise ValueError(f"probes must be (1 + {C} tiles, ..., 1 + {P} tokens, ...) for grid {image.grid}, got {bad}")
        packed = PEERS[method].run(image, ratio, PEERS[method].paper)
        return Compressed(packed.tokens, packed.thumb_keep, packed.crop_keep, valid, packed.crop_ratio, before,
                          packed.thumb_merge, packed.crop_merge)
    if method == "none":
        if scales is not None:
            raise ValueError("scales do not apply to method 'none'")
        thumb_keep = torch.arange(P, device=device)
        ratios = np.ones(C)
        crop_keep = valid
    else:
        thumb_keep = _keep_thumbnail(image, method, ratio, seed, P)
        ratios = _crop_ratios(image, method, ratio, scales)
        crop_keep = _keep_crops(image, method, seed, ratios, area, valid, n_valid, side)

    order = _crop_order(method, crop_keep, valid, area, image.grid, side)
    crops = image.crops.reshape(C * P, -1).to(dtype)  # (C*P, D)
    tokens = torch.cat([image.thumb[thumb_keep], gather_tokens(crops, image.newline.to(dtype), order)])
    return Compressed(tokens, thumb_keep, crop_keep, valid, torch.from_numpy(ratios), before)


def keep_sequence(full: Compressed, kept: Tensor) -> Compressed:
    """`full` (what `none` returns) restricted to its sequence positions `kept` (k,) long, ascending: what a
    method that prunes the uncompressed sequence keeps (FastV, in the decoder), on the true token grid.

    Positions 0 .. P-1 are the thumbnail's tokens; after them the unpadded crop grid row by row, a newline
    closing each row (kept newlines stay in `tokens` and have no grid position)."""
    P = full.thumb_keep.shape[0]
    side = math.isqrt(P)
    H, W = full.valid.shape
    grid = (W // side, H // side)
    rows, cols = full.valid.any(dim=1), full.valid.any(dim=0)  # the unpadded area is a rectangle
    flat = torch.arange(H * W, device=kept.device).view(H, W)
    order = emit_rows(flat[rows][:, cols], full.valid[rows][:, cols])  # crop part: grid cell or NEWLINE
    crop = order[kept[kept >= P] - P]
    crop_keep = torch.zeros(H * W, dtype=torch.bool, device=kept.device)
    crop_keep[crop[crop >= 0]] = True
    crop_keep = crop_keep.view(H, W)
    n_valid = to_crops(full.valid, grid, side).sum(dim=1).double().cpu()
    ratios = to_crops(crop_keep, grid, side).sum(dim=1).double().cpu() / n_valid.clamp(min=1)
    return Compressed(full.tokens[kept], kept[kept < P], crop_keep, full.valid, ratios, full.before)


def _crop_order(
    method: str, crop_keep: Tensor, valid: Tensor, area: tuple[int, int, int, int], grid: tuple[int, int], side: int
) -> Tensor:
    """Emission order of the crop part, (n,) long: crop token c * P + p, or NEWLINE (-1)."""
    if method == "globalcom2-paper":
        slots = paper_slots(to_crops(crop_keep, grid, side), to_crops(valid, grid, side))  # (C, P)
        slots = to_grid(slots, grid, side)  # (H, W)
        return emit_rows(slots, slots >= 0)  # a newline after each of the H rows
    top, bottom, left, right = area
    C, P = grid[0] * grid[1], side * side
    index = to_grid(torch.arange(C * P, device=valid.device).view(C, P), grid, side)  # (H, W)
    return emit_rows(index[top:bottom, left:right], crop_keep[top:bottom, left:right])  # unpadded rows


def _keep_thumbnail(image: ImageFeatures, method: str, ratio: float, seed: int, P: int) -> Tensor:
    """Thumbnail positions kept, in emission order: int(P * r) best by score (random: raster order)."""
    k0 = int(P * ratio)
    if method == "random":
        thumb_priority, _ = random_priorities(P, len(image.crops), seed)
        return top_order(thumb_priority, k0).sort().values.to(image.thumb.device)
    return top_order(image.thumb_scores, k0)


def _crop_ratios(image: ImageFeatures, method: str, ratio: float, scales) -> np.ndarray:
    """Each crop's retention ratio scale_c (C,) float64: forced, uniform, or guided by the thumbnail."""
    C = len(image.crops)
    if scales is not None:
        ratios = torch.as_tensor(scales, dtype=torch.float64).cpu().numpy().reshape(-1).copy()
        if ratios.shape != (C,):
            raise ValueError(f"scales must have one value per crop ({C}), got {ratios.shape[0]}")
        return ratios
    if method in ("uniform", "random"):
        return np.full(C, ratio)
    return crop_scales(image.thumb_scores, image.grid, ratio)


def _keep_crops(
    image: ImageFeatures,
    method: str,
    seed: int,
    ratios: np.ndarray,
    area: tuple[int, int, int, int],
    valid: Tensor,
    n_valid: np.ndarray,
    side: int,
) -> Tensor:
    """Kept crop tokens (H, W) bool: the k_c = int(N_c * scale_c) best valid tokens of each crop."""
    grid = image.grid
    device = valid.device
    if method == "random":
        _, crop_priority = random_priorities(side * side, len(image.crops), seed)
        scores = to_grid(crop_priority.to(device), grid, side)
    else:
        local = normalize_per_crop(to_grid(image.crop_scores.float(), grid, side), valid, grid, side)
        glob = normalize_per_crop(global_scores(image.thumb_scores, grid, side, area), valid, grid, side)
        scores = {"local-only": local, "global-only": glob}.get(method, local + glob)
    k = torch.as_tensor(kept_counts(n_valid, ratios), device=device)
    keep = keep_top_per_crop(to_crops(scores, grid, side), to_crops(valid, grid, side), k)
    return to_grid(keep, grid, side)


def check_arguments(method: str, ratio: float, seed: int = 0) -> float:
    """Refuse an unknown method, a ratio outside (0, 1] (NaN included) or a seed outside [0, 2**63 - 1]
    (the random method's torch.Generator overflows at 2**64); return the ratio as a float."""
    if not 0 <= seed <= 2**63 - 1:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed!r}")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {', '.join(METHODS)}")
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio!r}")
    return value


def check_image(image: ImageFeatures) -> int:
    """Check the shapes of one image's inputs against each other; return the tile side."""
    gw, gh = image.grid
    w0, h0 = image.size
    if gw < 1 or gh < 1 or w0 <= 0 or h0 <= 0:
        raise ValueError(f"grid {image.grid} and size {image.size} must be positive")
    if image.thumb.ndim != 2:
        raise ValueError(f"thumb must be (P, D), got {tuple(image.thumb.shape)}")
    P, D = image.thumb.shape
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"thumbnail token count {P} is not a square")
    expected = {
        "crops": (gw * gh, P, D),
        "thumb_scores": (P,),
        "crop_scores": (gw * gh, P),
        "newline": (D,),
    }
    for name, shape in expected.items():
        if tuple(getattr(image, name).shape) != shape:
            raise ValueError(f"{name} must be {shape} for grid {image.grid} and P = {P}, got {tuple(getattr(image, name).shape)}")
    return side
