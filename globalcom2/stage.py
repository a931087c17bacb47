"""What the compression stage takes (`ImageFeatures`, one image) and returns (`Compressed`).

Tensors only, and one callable the model lends (the projector, for methods that merge before it).
Shapes: P = side * side tokens per tile, C = gw * gh crops, D the decoder's width, H x W = (gh side) x
(gw side) the crop grid. See globalcom2/compress.py for the methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor


@dataclass
class ImageFeatures:
    """One image's projected features and what the tower gave for the method, as the stage receives them."""

    thumb: Tensor  # (P, D) projected thumbnail tokens, P = side * side
    crops: Tensor  # (gw*gh, P, D) projected crop tokens, crops row-major
    thumb_scores: Tensor | None  # (P,) token scores of the thumbnail if the caller has them; None: computed
    # from `probes` by the method's score (globalcom2/scores.py), as the model leaves it
    crop_scores: Tensor | None  # (gw*gh, P) token scores of the crops, likewise
    grid: tuple[int, int]  # (gw, gh) columns, rows of crops
    size: tuple[int, int]  # (w0, h0) original image size in pixels (published orders that unpad their own way)
    area: tuple[int, int, int, int]  # (top, bottom, left, right) the unpadded rectangle of the crop grid
    newline: Tensor  # (D,) image_newline, for the published sequences that emit it themselves
    probes: dict = field(default_factory=dict)  # {(kind, layer): (1 + gw*gh, ...)} tower probes, tile 0 = thumbnail
    project: Callable[[Tensor], Tensor] | None = None  # the projector, for methods that merge before it
    has_cls: bool = True  # the tower's tokens begin with [CLS] (CLIP), held in column 0 of the probes; False
    # (SigLIP): no [CLS] anywhere, GlobalCom2 scores by similarity and the [CLS] methods refuse
    patch_group: int = 1  # g: each token is g x g of the tower's patches (InternVL's pixel shuffle: 2), so the
    # per-patch probes are summed per group into token scores (globalcom2/scores.py `group_sum`); with g > 1
    # the published peers and -paper names refuse (they rank LLaVA's own patches, emit its published sequence)
    grid_share: float = 1.0  # (0, 1]: the share of this crop grid's unpadded tokens the decoder would see
    # uncompressed. LLaVA-OneVision shrinks a large grid before its decoder (h' w' of h w tokens); the stage
    # selects on the full-resolution grid with the crops' ratio r * grid_share, so that r stays the kept
    # share of what the decoder would otherwise see. 1 (LLaVA-NeXT): the grid is seen whole


@dataclass
class Compressed:
    """What a method keeps of one image. The model lays it out as LLaVA-NeXT does (minillava/layout.py
    `pack`): `head`, then the kept tokens of the unpadded crop grid row by row, a newline closing each
    row, then `tail`. A `-paper` method reproduces a published order instead: its `sequence`."""

    thumb_keep: Tensor  # (k0,) long: thumbnail positions kept, in emission order
    crop_keep: Tensor  # (H, W) bool: kept crop tokens at their true grid positions (in the unpadded area,
    # but for a -paper sequence that emits padding tokens)
    crop_ratio: Tensor  # (gw*gh,) float64 on the CPU: each crop's retention ratio (1 for none)
    head: Tensor | None = None  # (k, D) tokens before the crop grid, in order: the thumbnail's kept tokens
    # (VisionZip: its [CLS], dominant and contextual tokens; PruMerge+: its merged tokens and extra token)
    grid: Tensor | None = None  # (H, W, D) the crop grid's tokens where a method merged into them; None:
    # the image's own crop features
    tail: Tensor | None = None  # (t, D) tokens after the crop grid (merged tokens with no grid place)
    sequence: Tensor | None = None  # (T, D) a -paper method's published sequence, emitted by the method
    thumb_merge: Tensor | None = None  # (P,) long: the token each thumbnail position was merged into (a
    # kept position that others went into: its own), -1 if none; None: no merging. A token is named by
    # its row in `sequence`, or else in head, grid cells (y * W + x), tail one after the other
    crop_merge: Tensor | None = None  # (H, W) long: the same over the crop grid
