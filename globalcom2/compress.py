"""GlobalCom2 visual-token compression for LLaVA-NeXT: one image's features in, what to keep out.

The stage sits between the projector and the decoder. Per image it receives (`ImageFeatures`):

    thumb         (P, D)       projected thumbnail tokens, raster order; P = side * side (576 = 24 x 24)
    crops         (C, P, D)    projected crop tokens, C = gw * gh crops in row-major order: crop c sits
                               at row c // gw, column c % gw of the crop grid; each crop in raster order
    thumb_scores  (P,)         the token score of each thumbnail token, if the caller has it; None (what
                               the model passes): computed from `probes` by the method's score
                               (`score_of`, globalcom2/scores.py; the paper's is the last CLIP layer's
                               pre-softmax q_cls . k_j / sqrt(head_dim), mean over heads: docs/globalcom2.md
                               "Inputs", the probe `SCORE_PROBE`). Given scores stand for the method's score
    crop_scores   (C, P)       the same for every crop
    grid          (gw, gh)     columns and rows of crops (AnyRes best resolution / tile size)
    size          (w0, h0)     original image size in pixels
    area          (top, bottom, left, right)  the unpadded rectangle of the crop grid, the model's
                               (minillava/layout.py `unpad_area`)
    newline       (D,)         the learned image_newline vector (for the published sequences)
    probes        {(kind, layer): (1 + C, ...)}  what the tower gave for the method's `needs(method)`
                               (globalcom2/probes.py), tile 0 the thumbnail
    project       the projector (vision width -> D), for methods that merge before it (VisionZip)
    has_cls       whether the tower's tokens begin with [CLS] (CLIP: True; SigLIP: False), so that the
                  probes hold it in column 0. Without it GlobalCom2's methods score by similarity and the
                  methods that read [CLS] refuse (`score_of`)
    grid_share    (0, 1]: the share of the unpadded crop grid the decoder would see uncompressed (1 but
                  for LLaVA-OneVision's downscaled grid); the crops' ratio is r * grid_share

Together the crops form one H x W token grid, H = gh * side, W = gw * side, of which the rows
[top, bottom) and columns [left, right) show the image; the rest is padding.

It returns (`Compressed`) what was kept: the tokens before the crop grid (`head`), the kept grid
positions (`crop_keep`), merged tokens where a method merges; the model lays them out as LLaVA-NeXT
does (minillava/layout.py `pack`). Only a `-paper` method emits its own `sequence`. Methods (`STAGE_METHODS`;
globalcom2/methods.py names them beside the methods that prune elsewhere):

    none              everything: the thumbnail in raster order and every unpadded crop token; packed,
                      the uncompressed LLaVA-NeXT sequence
    globalcom2        GlobalCom2 with every kept crop token at its true grid position and a newline
                      closing each unpadded row; with all crop ratios forced to 1 the crop part
                      equals `none`
    globalcom2-paper  token for token what the published code emits (kept tokens placed by their
                      index among the crop's valid tokens; a newline after every one of the H rows)
    uniform           every crop keeps the ratio r (r * grid_share; no budget guidance), global + local scores
    local-only        budget from the thumbnail, tokens chosen by the crop's own scores only
    global-only       budget from the thumbnail, tokens chosen by the thumbnail's map only
    random            r of every tile's valid tokens (crops: r * grid_share) at random (seeded), thumbnail
                      in raster order
    NAME-attn         NAME (globalcom2, uniform, local-only, global-only) with FasterVLM's token score,
                      layer -2's post-softmax [CLS] attention (mean over heads), in every step
    NAME-sim          NAME with the similarity score s_i = -cos(x_i, mean of the tile's tokens), x the
                      projector's input (docs/globalcom2.md, "GlobalCom2 without [CLS]"); the score of
                      the plain names on a tower without [CLS]

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
FastV (globalcom2/fastv.py) is no method of this stage: it prunes the uncompressed sequence inside the decoder.

GlobalCom2's methods but `globalcom2-paper` keep for the model's layout. The thumbnail keeps int(P * r)
tokens in descending score order (its part has no newlines); crop c keeps int(N_c * scale_c) of its N_c
valid tokens, the scale_c around r * grid_share: where the model shrinks the crop grid before its decoder
(OneVision), r stays the kept share of the tokens the decoder would otherwise see, and the selection
is still made on the full-resolution tokens (docs/onevision.md, "Compression").

Token scores are float32 on the features' device; the per-crop budget is float64 numpy on the host
(the published arithmetic). Ties go to the earlier position in raster order, so results are
deterministic, and each image is compressed on its own: a batch gives what one-at-a-time calls give.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .peers import PEERS
from .scores import DEFAULT_SCORE, NO_CLS_SCORE, TOKEN_SCORES, tile_scores
from .stage import Compressed, ImageFeatures
from .layout import area_mask, crop_extents, emit_rows, gather_tokens, paper_slots, to_crops, to_grid
from .scoring import (
    crop_scales,
    global_scores,
    keep_top_per_crop,
    kept_counts,
    normalize_per_crop,
    random_priorities,
    top_order,
)

SCORED = ("globalcom2", "uniform", "local-only", "global-only")  # the methods that take any token score
SCORE_SUFFIX = {"attn": "cls_attn", "sim": "similarity"}  # NAME-attn, NAME-sim: NAME with that score
STAGE_METHODS = ("none", "globalcom2", "globalcom2-paper", "uniform", "local-only", "global-only", "random",
           *(f"{m}-{s}" for m in SCORED for s in SCORE_SUFFIX), *PEERS)

SCORE_PROBE = TOKEN_SCORES[DEFAULT_SCORE].probe  # the probe of the paper's token score: the last layer's [CLS] logits


def _base(method: str) -> str:
    """The algorithm of a method name: NAME-attn and NAME-sim are NAME."""
    for suffix in SCORE_SUFFIX:
        if method.endswith(f"-{suffix}") and method[: -len(suffix) - 1] in SCORED:
            return method[: -len(suffix) - 1]
    return method


# Why each published peer does not run where a token is a 2 x 2 group of patches (InternVL, docs/internvl.md).
UNGROUPED = {
    "fastervlm": "ranks single patches by [CLS] attention in LLaVA-NeXT's sequence (globalcom2-attn ranks InternVL's "
                 "tokens by that attention summed over their 2 x 2 patches)",
    "hired": "splits its budget over chunks of the thumbnail's patches and lays out LLaVA-NeXT's sequence",
    "visionzip": "merges patches in the tower's width before the projector, where InternVL's pixel shuffle needs "
                 "every 2 x 2 group whole",
    "prumerge+": "merges patches in the tower's width before the projector, where InternVL's pixel shuffle needs "
                 "every 2 x 2 group whole",
}


def score_of(method: str, has_cls: bool = True, group: int = 1) -> str | None:
    """The token score (a `TOKEN_SCORES` name) `method` reads on a tower with or without [CLS]; None for
    a method that reads none (none, random, the peers, which read their own probes). A method that
    needs [CLS] is refused on a tower without it, and a published method (a peer, a `-paper` name) where a
    token is a `group` x `group` group of patches (InternVL), each with a one-line ValueError that says why."""
    check_arguments(method, 1.0)
    base = _base(method)
    if group > 1 and (method in PEERS or method.endswith("-paper")):
        why = UNGROUPED.get(method, "emits the published LLaVA-NeXT sequence")  # (every -paper name: the latter)
        raise ValueError(f"{method} does not run on InternVL: it {why}; use globalcom2 (or -attn, -sim), uniform, "
                         "local-only, global-only, random, none, fastv, pdrop, sparsevlm or ficoco-l")
    if method in PEERS or method == "globalcom2-paper":
        if not has_cls:
            what = "the published code of GlobalCom2" if method == "globalcom2-paper" else "its published code"
            raise ValueError(f"{method} ranks tokens by [CLS] attention ({what}), but this vision tower has no "
                             "[CLS] token: use globalcom2 (it scores by similarity there), uniform, random, none or fastv")
        return None if method in PEERS else DEFAULT_SCORE
    if base in ("none", "random"):
        return None
    suffix = method[len(base) + 1:]
    score = SCORE_SUFFIX[suffix] if suffix else DEFAULT_SCORE if has_cls else NO_CLS_SCORE
    if TOKEN_SCORES[score].needs_cls and not has_cls:
        raise ValueError(f"{method} scores tokens by [CLS] attention, but this vision tower has no [CLS] token: "
                         f"use {base} or {base}-sim (the similarity score)")
    return score


def needs(method: str, has_cls: bool = True, group: int = 1) -> tuple[tuple[str, int], ...]:
    """The tower probes a method needs, (kind, layer) pairs (globalcom2/probes.py), on a tower with or
    without [CLS] (a method that needs [CLS] refuses a tower without it: `score_of`), whose tokens are
    `group` x `group` patches (a published method refuses groups)."""
    score = score_of(method, has_cls, group)
    if method in PEERS:
        return PEERS[method].needs
    return () if score is None else (TOKEN_SCORES[score].probe,)


def token_scores(image: ImageFeatures, method: str) -> tuple[Tensor, Tensor]:
    """The token scores `method` ranks by: thumbnail (P,) and crops (C, P). The given
    `image.thumb_scores` and `crop_scores`, else computed from `image.probes` by the method's score
    (`score_of`; for a method that reads none, GlobalCom2's on this tower, e.g. for a picture)."""
    group = image.patch_group
    score = score_of(method, image.has_cls, group) or score_of("globalcom2", image.has_cls)
    if image.thumb_scores is not None or image.crop_scores is not None:
        return image.thumb_scores, image.crop_scores
    scores = tile_scores(image.probes, score, image.has_cls, group)  # (1 + C, P), InternVL's summed per 2 x 2 patches
    return scores[0], scores[1:]


def compress(images: list[ImageFeatures], method: str = "none", ratio: float = 1.0, seed: int = 0) -> list[Compressed]:
    """Compress every image of a batch; each result equals compressing that image alone."""
    check_arguments(method, ratio, seed)
    return [compress_image(image, method, ratio, seed) for image in images]


def compress_image(
    image: ImageFeatures, method: str = "none", ratio: float = 1.0, seed: int = 0, *, scales=None
) -> Compressed:
    """Compress one image.

    `scales` (gw*gh,), if given, replaces the crop ratios scale_c of step 2 (e.g. all 1 to check that
    `globalcom2` then keeps the crops exactly as `none` does): absolute ratios, `grid_share` not applied.
    """
    ratio = check_arguments(method, ratio, seed)
    score = score_of(method, image.has_cls, image.patch_group)  # refuses a [CLS] method on a tower without [CLS]
    thumb_scores, crop_scores = token_scores(image, method) if score is not None else (None, None)
    side = check_image(image, thumb_scores, crop_scores)
    base = _base(method)
    gw, gh = image.grid
    P, C = side * side, gw * gh
    device = image.thumb.device
    if C == 0:  # InternVL's one-tile image: the thumbnail alone, no crop to give a budget (docs/internvl.md)
        if scales is not None and len(scales):
            raise ValueError("scales must have one value per crop (0)")
        thumb_keep = torch.arange(P, device=device) if method == "none" else _keep_thumbnail(
            image, base, thumb_scores, ratio, seed, P)
        return Compressed(thumb_keep, torch.zeros(0, 0, dtype=torch.bool, device=device),
                          torch.zeros(0, dtype=torch.float64), head=image.thumb[thumb_keep])
    area = image.area
    valid = area_mask(area, (gh * side, gw * side), device)  # (H, W)
    rows, cols = crop_extents(area, image.grid, side)
    n_valid = np.outer(rows, cols).ravel()  # (C,) N_c, crops row-major

    if image.grid_share != 1 and (method in PEERS or method == "globalcom2-paper"):
        raise ValueError(f"{method} reproduces a published method, which sees the crop grid whole; it does not "
                         f"take a grid the model shrinks (grid_share {image.grid_share}): use globalcom2, uniform or random")
    if method in PEERS:
        if scales is not None:
            raise ValueError(f"scales do not apply to method {method!r}")
        missing = [need for need in PEERS[method].needs if need not in image.probes]
        if missing:
            raise ValueError(f"method {method!r} needs the tower probes {missing}: compute needs({method!r}) = "
                             f"{needs(method)} (globalcom2/probes.py)")
        token_dim = {"cls_attn": -1, "keys": -2, "hidden": -2}  # where the 1 + P tokens are in each kind
        bad = {need: tuple(p.shape) for need, p in image.probes.items()
               if p.shape[0] != 1 + C or p.shape[token_dim.get(need[0], 1)] != 1 + P}
        if bad:
            raise ValueError(f"probes must be (1 + {C} tiles, ..., 1 + {P} tokens, ...) for grid {image.grid}, got {bad}")
        return PEERS[method].run(image, ratio, PEERS[method].paper)
    if method == "none":
        if scales is not None:
            raise ValueError("scales do not apply to method 'none'")
        thumb_keep = torch.arange(P, device=device)
        ratios = np.ones(C)
        crop_keep = valid
    else:
        thumb_keep = _keep_thumbnail(image, base, thumb_scores, ratio, seed, P)
        ratios = _crop_ratios(image, base, thumb_scores, ratio * image.grid_share, scales)
        crop_keep = _keep_crops(image, base, thumb_scores, crop_scores, seed, ratios, area, valid, n_valid, side)
    head = image.thumb[thumb_keep]
    sequence = None
    if method == "globalcom2-paper":  # the published emission: kept tokens at their index among the valid ones
        slots = paper_slots(to_crops(crop_keep, image.grid, side), to_crops(valid, image.grid, side))  # (C, P)
        slots = to_grid(slots, image.grid, side)  # (H, W)
        order = emit_rows(slots, slots >= 0)  # a newline after each of the H rows
        crops = image.crops.reshape(C * P, -1).to(head.dtype)  # (C*P, D)
        sequence = torch.cat([head, gather_tokens(crops, image.newline.to(head.dtype), order)])
    return Compressed(thumb_keep, crop_keep, torch.from_numpy(ratios), head=None if sequence is not None else head,
                      sequence=sequence)


def _keep_thumbnail(image: ImageFeatures, method: str, thumb_scores: Tensor | None, ratio: float, seed: int,
                    P: int) -> Tensor:
    """Thumbnail positions kept, in emission order: int(P * r) best by score (random: raster order)."""
    k0 = int(P * ratio)
    if method == "random":
        thumb_priority, _ = random_priorities(P, len(image.crops), seed)
        return top_order(thumb_priority, k0).sort().values.to(image.thumb.device)
    return top_order(thumb_scores, k0)


def _crop_ratios(image: ImageFeatures, method: str, thumb_scores: Tensor | None, ratio: float, scales) -> np.ndarray:
    """Each crop's retention ratio scale_c (C,) float64: forced, uniform, or guided by the thumbnail."""
    C = len(image.crops)
    if scales is not None:
        ratios = torch.as_tensor(scales, dtype=torch.float64).cpu().numpy().reshape(-1).copy()
        if ratios.shape != (C,):
            raise ValueError(f"scales must have one value per crop ({C}), got {ratios.shape[0]}")
        return ratios
    if method in ("uniform", "random"):
        return np.full(C, ratio)
    return crop_scales(thumb_scores, image.grid, ratio)


def _keep_crops(
    image: ImageFeatures,
    method: str,
    thumb_scores: Tensor | None,
    crop_scores: Tensor | None,
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
        local = normalize_per_crop(to_grid(crop_scores.float(), grid, side), valid, grid, side)
        glob = normalize_per_crop(global_scores(thumb_scores, grid, side, area), valid, grid, side)
        scores = {"local-only": local, "global-only": glob}.get(method, local + glob)
    k = torch.as_tensor(kept_counts(n_valid, ratios), device=device)
    keep = keep_top_per_crop(to_crops(scores, grid, side), to_crops(valid, grid, side), k)
    return to_grid(keep, grid, side)


def check_arguments(method: str, ratio: float, seed: int = 0) -> float:
    """Refuse an unknown method, a ratio outside (0, 1] (NaN included) or a seed outside [0, 2**63 - 1]
    (the random method's torch.Generator overflows at 2**64); return the ratio as a float."""
    if not 0 <= seed <= 2**63 - 1:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed!r}")
    if method not in STAGE_METHODS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {', '.join(STAGE_METHODS)}")
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio!r}")
    return value


def check_image(image: ImageFeatures, thumb_scores: Tensor | None = None, crop_scores: Tensor | None = None) -> int:
    """Check the shapes of one image's inputs (and of the token scores a method reads, if given) against
    each other; return the tile side."""
    gw, gh = image.grid
    w0, h0 = image.size
    thumb_only = image.grid == (0, 0) and image.patch_group > 1  # InternVL's one tile: a thumbnail, no crop
    if (gw < 1 or gh < 1) and not thumb_only or w0 <= 0 or h0 <= 0:
        raise ValueError(f"grid {image.grid} and size {image.size} must be positive")
    if image.thumb.ndim != 2:
        raise ValueError(f"thumb must be (P, D), got {tuple(image.thumb.shape)}")
    P, D = image.thumb.shape
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"thumbnail token count {P} is not a square")
    given = {"crops": image.crops, "newline": image.newline, "thumb_scores": thumb_scores, "crop_scores": crop_scores}
    expected = {"crops": (gw * gh, P, D), "newline": (D,)}
    if not 0 < image.grid_share <= 1:  # NaN fails too
        raise ValueError(f"grid_share must be in (0, 1], got {image.grid_share!r}")
    if thumb_scores is not None or crop_scores is not None:
        expected.update(thumb_scores=(P,), crop_scores=(gw * gh, P))
    for name, shape in expected.items():
        value = given[name]
        if value is None or tuple(value.shape) != shape:
            got = None if value is None else tuple(value.shape)
            raise ValueError(f"{name} must be {shape} for grid {image.grid} and P = {P}, got {got}")
    top, bottom, left, right = image.area
    if not (0 <= top <= bottom <= gh * side and 0 <= left <= right <= gw * side):
        raise ValueError(f"unpadded area {image.area} is not a rectangle inside the {gh * side} x {gw * side} crop grid")
    return side
