"""Visual tokens of one image after our globalcom2 at each ratio, laid out as the model feeds the decoder."""

from __future__ import annotations

import math

import torch

import globalcom2
from minillava.layout import compressed_sequence, uncompressed_length, unpad_area

from .plan import RATIOS


def image_token_counts(thumb_scores: torch.Tensor, crop_scores: torch.Tensor, grid, size) -> dict[str, int]:
    """Visual tokens of one image after our globalcom2 at each ratio (r = 1: uncompressed, method none).

    Only the scores matter for the counts; the features are 8-wide stand-ins."""
    g = torch.Generator().manual_seed(0)
    p = thumb_scores.shape[0]
    side = math.isqrt(p)
    image = globalcom2.ImageFeatures(
        thumb=torch.randn(p, 8, generator=g), crops=torch.randn(len(crop_scores), p, 8, generator=g),
        thumb_scores=thumb_scores.float(), crop_scores=crop_scores.float(), grid=grid, size=size,
        area=unpad_area(grid, size, side), newline=torch.zeros(8),
    )
    counts = {"none": uncompressed_length(image.area, side)}
    for r in RATIOS:
        counts[f"globalcom2@{r:g}"] = packed(image, globalcom2.compress_image(image, "globalcom2", r)).shape[0]
    return counts


def packed(image: globalcom2.ImageFeatures, kept: globalcom2.Compressed) -> torch.Tensor:
    """The token sequence the model feeds the decoder for what a compressor kept (minillava/layout.py)."""
    return compressed_sequence(kept, image.crops, image.grid, image.area, image.newline)
