"""GlobalCom2's token score: one named choice, read from the tower probes (globalcom2/probes.py).

Every step of GlobalCom2 that ranks tokens (the thumbnail's top share, the crops' budgets from the
thumbnail's region sums, the in-crop choice by local plus global scores) reads one score per token and
tile, (1 + C, P), tile 0 the thumbnail. Which score is a parameter of the method (`TOKEN_SCORES`):

    cls_logits  the paper's (default): the last layer's pre-softmax [CLS] logits q_cls . k_j / sqrt(hd),
                mean over heads (docs/globalcom2.md, "Inputs")
    cls_attn    FasterVLM's: layer -2's post-softmax [CLS] attention, mean over heads
                (globalcom2/fastervlm.py `fastervlm_scores`)
    similarity  for towers without [CLS]: s_i = -cos(x_i, mean_j x_j), x the tile's tokens in the
                hidden state the model feeds its projector, the mean over the tile's own P tokens
                (docs/globalcom2.md, "GlobalCom2 without [CLS]": the formula is the paper's, the layer
                and the mean are our choice)

A probe of a tower with [CLS] holds it in column 0 (row 0 of the features); `has_cls` says so.
Scores are float32, on the probes' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from .fastervlm import NEEDS as FASTERVLM_NEEDS
from .fastervlm import fastervlm_scores
from .probes import FEATURES


def cls_logits(probe: Tensor, has_cls: bool) -> Tensor:
    """(N, 1 + P) [CLS] logits -> (N, P): the [CLS] key's own column dropped."""
    return probe[:, 1:].float()


def cls_attn(probe: Tensor, has_cls: bool) -> Tensor:
    """(N, heads, 1 + P) [CLS] attention -> (N, P), mean over heads, as FasterVLM ranks."""
    return fastervlm_scores(probe.float())


def similarity(features: Tensor, has_cls: bool) -> Tensor:
    """(N, [1 +] P, Dv) the feature layer -> (N, P): -cos(x_i, mean of the tile's P patch tokens).

    The mean is taken per tile (each view its own, padding tokens included: the tile as the tower saw
    it); a [CLS] token, where there is one, is neither scored nor in the mean.
    """
    x = (features[:, 1:] if has_cls else features).float()  # (N, P, Dv)
    return -F.cosine_similarity(x, x.mean(dim=1, keepdim=True), dim=-1)


@dataclass(frozen=True)
class Score:
    probe: tuple[str, int]  # the tower probe it reads (globalcom2/probes.py)
    read: Callable[[Tensor, bool], Tensor]  # (probe (N, ...), has_cls) -> (N, P) float32
    needs_cls: bool  # reads a [CLS] token: refused on a tower without one


TOKEN_SCORES = {
    "cls_logits": Score(("cls_logits", -1), cls_logits, needs_cls=True),
    "cls_attn": Score(FASTERVLM_NEEDS[0], cls_attn, needs_cls=True),
    "similarity": Score(FEATURES, similarity, needs_cls=False),
}
DEFAULT_SCORE = "cls_logits"  # the paper's
NO_CLS_SCORE = "similarity"  # GlobalCom2's default on a tower without [CLS]


def tile_scores(probes: dict, score: str, has_cls: bool, group: int = 1) -> Tensor:
    """The score `score` of every token of every tile, (1 + C, P) float32, tile 0 the thumbnail. `group` g:
    each token is g x g of the tower's patches (InternVL's pixel shuffle: g = 2), its score the sum of
    theirs (`group_sum`)."""
    spec = TOKEN_SCORES[score]
    if spec.probe not in probes:
        raise ValueError(f"score {score!r} needs the tower probe {spec.probe} (globalcom2/probes.py); "
                         "compute needs(method) for the method")
    scores = spec.read(probes[spec.probe], has_cls)
    return group_sum(scores, group) if group > 1 else scores


def group_sum(scores: Tensor, group: int) -> Tensor:
    """Per-patch scores (N, side * side), raster order -> per-token (N, (side/g)^2): the sum over each g x g
    group of patches, the groups InternVL's pixel shuffle makes one token of (minillava/internvit.py
    `pixel_shuffle`). Our rule, not the paper's (docs/internvl.md): with the sum, a crop's region of the
    thumbnail's map sums to what the per-patch map gives (the crops' budgets are the patch map's), the
    ranking in a tile is the mean's, and post-softmax attention stays a share of the [CLS]'s attention."""
    n, p = scores.shape
    side = math.isqrt(p)
    if side * side != p or side % group:
        raise ValueError(f"{p} patch scores per tile do not form {group} x {group} groups of a square grid")
    x = scores.reshape(n, side // group, group, side // group, group)  # (N, i, dy, j, dx)
    return x.sum(dim=(2, 4)).reshape(n, -1)
