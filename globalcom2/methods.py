"""Every method in one table: where it prunes, what it reads from the tower, and its function.

Tokens can be dropped or merged at three places, each with one mechanism in the model:

    tower    between the vision tower's layers (minillava/clip.py `Tower.forward`, its `schedule`)
    stage    between the projector and the decoder: `compress_image` (globalcom2/compress.py) on one
             image's features, what it keeps laid out by the model (minillava/layout.py)
    decoder  between the decoder's layers, in the prefill (minillava/llama.py `Decoder.forward`, its
             `schedule`): the method builds a schedule of stages for one prompt, each at a layer

`METHODS` names every method (`none` included: the stage's identity). A stage method's function is
`compress_image(image, name, ratio, seed)`; a decoder method's, `schedule(start, length, ratio, n_layers)`
-> its stages for a prompt whose image tokens are [start, start + length), on a decoder of n_layers layers. What follows from a schedule (each
layer's cache length, positions, the FLOPs count) is derived from it in one place on the model's side
(minillava/schedule.py). A tower method's function is `(ratio, patches, n_layers, feature_layer, has_cls)`
-> the stages every tile goes through in the tower (`tower_schedule`; FiCoCo-V); its tiles come out with
fewer tokens, which the model lays out tile by tile (minillava/layout.py `merged_sequence`).

The CLI's choices, its help (`HELP`), the evaluation, the demo, visualize and the FLOPs count all read
this table; nothing else tests a method's name (but `none`, the plain sequence, which needs no table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .compress import STAGE_METHODS, compress_image
from .compress import needs as stage_needs
from .fastv import fastv_schedule
from .ficoco import ficoco_v_schedule
from .ficocol import ficoco_l_schedule
from .pdrop import pdrop_schedule
from .sparsevlm import sparsevlm_schedule

TOWER, STAGE, DECODER = "tower", "stage", "decoder"


@dataclass(frozen=True)
class Method:
    place: str  # TOWER, STAGE or DECODER: where it drops tokens
    run: Callable  # STAGE: compress_image(image, name, ratio, seed); DECODER: (start, length, ratio, n_layers) -> stages;
    # TOWER: (ratio, patches, n_layers, feature_layer, has_cls) -> the tower's stages (every tile)


METHODS = {
    **{name: Method(STAGE, compress_image) for name in STAGE_METHODS},
    "fastv": Method(DECODER, fastv_schedule),  # FastV: one stage before decoder layer 2 (globalcom2/fastv.py)
    "pdrop": Method(DECODER, pdrop_schedule),  # PyramidDrop: three stages, renumbered (globalcom2/pdrop.py)
    "sparsevlm": Method(DECODER, sparsevlm_schedule),  # SparseVLM: three stages, text raters, recycled tokens added
    "ficoco": Method(TOWER, ficoco_v_schedule),  # FiCoCo-V: merges inside the tower's layers (globalcom2/ficoco.py)
    "ficoco-l": Method(DECODER, ficoco_l_schedule),  # FiCoCo-L: merges inside the decoder's layers (globalcom2/ficocol.py)
}

HELP = (
    "visual-token compression: globalcom2 (default) and globalcom2-paper (token for token the published "
    "code); the paper's ablations uniform, local-only, global-only; each of those four also as NAME-attn "
    "(token score: FasterVLM's layer -2 [CLS] attention instead of the paper's last-layer [CLS] logits) and "
    "NAME-sim (score -cos(x_i, mean of the tile's tokens), x the projector's input: our choice of layer and "
    "mean, docs/globalcom2.md); on a tower without [CLS] (SigLIP) the plain names score by similarity and "
    "the [CLS] methods (-paper, -attn, the peers) refuse; a seeded random floor; none (plain "
    "LLaVA-NeXT); the peers fastervlm, visionzip, hired (r = HiRED's token budget rate), prumerge+ (r is "
    "ignored: PruMerge+ chooses its own count), each also as NAME-paper (the published sequence); inside the "
    "decoder fastv (prunes after layer 2; needs more than 2 decoder layers), pdrop (PyramidDrop: after a quarter, "
    "half and three quarters of the layers, r^(1/3) of the image each time, so r at the end; needs 4 or more "
    "decoder layers) and sparsevlm (SparseVLM v1.5: after layers 2, 6, 15 of 32, scaled, text-guided, the "
    "pruned tokens' best recycled into merged ones; r is the layer-averaged share its settings are named by, "
    "r = 1/3, 2/9, 1/9 its 192, 128, 64 of 576; needs 4 or more decoder layers) and ficoco-l (FiCoCo-L: merges "
    "image tokens into others inside each layer from 5 of 32, scaled, to the last but one, r the share the last "
    "layer sees; needs 3 or more decoder layers); "
    "inside the vision tower ficoco (FiCoCo-V: merges tokens of every tile in each layer from "
    "half the tower to the feature layer, r the share of a tile's tokens left; a layer merges at most half its "
    "tokens, so r >= about 1 / (merging layers + 1): 0.5 on the tiny models, 0.083 on LLaVA's tower). On "
    "InternVL (2 x 2 patches a token) a token's score is the sum of its 4 patches', a crop's kept tokens go tile "
    "by tile, the thumbnail's last, and a one-tile image is its thumbnail alone (our choices, docs/internvl.md); "
    "the published peers, the -paper names and ficoco refuse it. Each is described in docs/methods.md"
)


def method(name: str) -> Method:
    """The table's entry, or a one-line ValueError naming every method."""
    if name not in METHODS:
        raise ValueError(f"unknown compression method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def needs(name: str, has_cls: bool = True, group: int = 1) -> tuple[tuple[str, int], ...]:
    """The tower probes (globalcom2/probes.py) `name` reads, on a tower with or without [CLS], whose tokens
    are `group` x `group` patches: a stage method's (`compress.needs`, which refuses a [CLS] method on a tower
    without it, and a published peer on grouped tokens); none for a decoder method, which reads the decoder.
    A tower method refuses grouped tokens: its merged tiles would no longer form InternVL's 2 x 2 groups."""
    if group > 1 and method(name).place == TOWER:
        raise ValueError(f"{name} merges tokens inside the vision tower, and InternVL's pixel shuffle needs each "
                         "tile's patches whole afterwards (2 x 2 per token); use globalcom2, uniform, random, none, "
                         "fastv, pdrop, sparsevlm or ficoco-l")
    return stage_needs(name, has_cls, group) if method(name).place == STAGE else ()


def tower_schedule(name: str, ratio: float, patches: int, n_layers: int, feature_layer: int, has_cls: bool) -> tuple:
    """A tower method's stages for every tile (`patches` patch tokens each) of a tower of `n_layers` layers
    read at hidden state `feature_layer` (a ValueError where the method cannot run there); () for a method
    that prunes elsewhere."""
    entry = method(name)
    return entry.run(ratio, patches, n_layers, feature_layer, has_cls) if entry.place == TOWER else ()


def schedule(name: str, start: int, length: int, ratio: float, n_layers: int) -> tuple:
    """A decoder method's stages for one prompt whose image tokens are [start, start + length), on a decoder
    of `n_layers` layers (a ValueError where it has too few for the method); () for a method that prunes
    elsewhere."""
    entry = method(name)
    return entry.run(start, length, ratio, n_layers) if entry.place == DECODER else ()
