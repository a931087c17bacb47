"""Row 8: the compressor's time on one image at real shapes."""

from __future__ import annotations

import math

import torch

import globalcom2
from minillava.layout import unpad_area

from .timing import alternate, wall
from .tokens import packed


COMPRESS_DIM = 4096  # projected feature width of LLaVA-NeXT-7B: what the compressor moves around


def bench_compressor(scores: torch.Tensor, grid, size, repeats: int) -> list[float]:
    """Seconds of globalcom2 at r = 0.25 on one image: real shapes (P = 576 per tile), D = 4096 features."""
    g = torch.Generator().manual_seed(0)
    p = scores.shape[1]
    image = globalcom2.ImageFeatures(
        thumb=torch.randn(p, COMPRESS_DIM, generator=g), crops=torch.randn(len(scores) - 1, p, COMPRESS_DIM, generator=g),
        thumb_scores=scores[0], crop_scores=scores[1:], grid=grid, size=size, area=unpad_area(grid, size, math.isqrt(p)),
        newline=torch.randn(COMPRESS_DIM, generator=g),
    )
    run = wall(lambda: packed(image, globalcom2.compress([image], "globalcom2", 0.25)[0]))  # keep, then lay out
    return alternate({"compress": run}, repeats, label="compress")["compress"]
