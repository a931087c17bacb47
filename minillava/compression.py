"""Between the projector and the decoder: each image's token sequence, uncompressed or compressed.

Where minillava calls the compression stage (`globalcom2`: tensors in, tensors out), and only for a
method that compresses here (globalcom2/methods.py, place "stage"): the uncompressed model (`none`)
never imports it, and a method that prunes inside the decoder (`fastv`) gets the plain sequence here
and its schedule from minillava/schedule.py. A method that prunes inside the tower (`ficoco`) gives its
stages to the tower here (`tower_schedule`, `encode`); its shorter tiles are laid out tile by tile
(minillava/layout.py `merged_sequence`), and the stage passes them on. A compressor asks the tower for what it reads
(`globalcom2.needs`: [CLS] attention, keys, hidden states), computed from the tower's hidden states in
its one pass over all tiles, then keeps a subset of each image's tokens, which the model lays out as
LLaVA-NeXT does (minillava/layout.py `pack`). The stage is told whether the tower has a [CLS] token
(`has_cls`): without one GlobalCom2 scores by similarity and the [CLS] methods refuse, in one line.
"""

from __future__ import annotations

import torch

from .anyres import Tiles
from .layout import grid_share
from .model import Encoded, Llava
from .trust import ConfigError

def compressors() -> tuple[str, ...]:
    """Every name `--compressor` takes: the method table's (globalcom2/methods.py)."""
    import globalcom2

    return tuple(globalcom2.METHODS)


def compressor_help() -> str:
    """`--compressor`'s help: the method table's (globalcom2/methods.py `HELP`)."""
    import globalcom2

    return globalcom2.HELP


def place(method: str) -> str | None:
    """Where `method` drops tokens (globalcom2/methods.py: "tower", "stage" or "decoder"); None for `none`,
    the plain sequence, which never imports the compression package."""
    if method == "none":
        return None
    import globalcom2

    return globalcom2.method(method).place


def in_stage(method: str) -> bool:
    """Whether `method` compresses between the projector and the decoder."""
    return place(method) == "stage"


def has_cls(model: Llava) -> bool:
    """Whether the model's vision tower puts a [CLS] token first (CLIP does; SigLIP has none)."""
    return getattr(model.vision, "has_cls", True)


def patch_group(model: Llava) -> int:
    """g: each token the decoder sees is g x g of the tower's patches (config.py `LlavaConfig.patch_group`)."""
    return model.cfg.patch_group


def needs(model: Llava, method: str) -> tuple:
    """The tower probes `method` reads on this model's tower (globalcom2.needs); a method that reads
    [CLS] attention is refused on a tower without [CLS], as a one-line ConfigError."""
    if method == "none":
        return ()
    import globalcom2

    try:
        return globalcom2.needs(method, has_cls(model), patch_group(model))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def tower_schedule(model: Llava, method: str, ratio: float) -> tuple:
    """A method that prunes inside the tower (globalcom2/methods.py, place "tower"): its stages for every
    tile at `ratio`; () for any other. What it cannot run on this tower is a one-line ConfigError."""
    if place(method) != "tower":
        return ()
    needs(model, method)  # a tower this method cannot run on (InternVL's grouped tokens): its one line first
    import globalcom2

    vision = model.cfg.vision
    try:
        return globalcom2.tower_schedule(method, ratio, vision.patches_per_side**2, vision.num_hidden_layers,
                                         model.cfg.vision_feature_layer, has_cls(model))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def encode(model: Llava, tiles: list[Tiles], method: str, extra=(), ratio: float = 1.0) -> list[Encoded]:
    """The images through the tower and projector, with what `method` reads from the tower (and the
    probes `extra`, e.g. GlobalCom2's scores for a picture, from the same pass). A method that prunes
    inside the tower runs there at `ratio` (its tiles come out shorter: `Encoded.merged`)."""
    own = needs(model, method)  # refuses before the tower runs
    stages = tower_schedule(model, method, ratio)
    if not own and not extra:
        return model.encode_images(tiles, schedule=stages)
    import globalcom2

    asked = tuple(dict.fromkeys((*own, *extra)))
    n_layers, feature_layer = len(model.vision.encoder.layers), model.cfg.vision_feature_layer
    layers = globalcom2.hidden_states_needed(asked, n_layers, feature_layer)
    probe = lambda states: globalcom2.tower_probes(asked, states, model.vision.query_key, n_layers,  # noqa: E731
                                                   feature_layer)
    return model.encode_images(tiles, layers, probe, schedule=stages)


def stage_inputs(model: Llava, images: list[Encoded]) -> list:
    """What the compression stage takes for each image (globalcom2.ImageFeatures): the model's `Encoded`
    (what the tower and projector made of the image) and what the model lends the stage (its newline,
    its projector, whether its tower has [CLS], how much of the crop grid its decoder sees). The token scores are
    left to the stage, which computes the method's from the probes. On a model that downscales a large
    crop grid (OneVision) the stage still selects on the full-resolution crops, its crops' budget scaled
    to the downscaled grid (`grid_share`): r keeps r of the visual tokens the decoder would see."""
    import globalcom2

    side, max_tiles = model.cfg.token_side, model.cfg.anyres_max
    return [globalcom2.ImageFeatures(thumb=im.thumb, crops=im.crops, thumb_scores=None, crop_scores=None, grid=im.grid,
                                     size=im.size, area=im.area, newline=model.newline, probes=im.probes,
                                     project=model.projector, has_cls=has_cls(model), patch_group=patch_group(model),
                                     grid_share=grid_share(im.area, side, max_tiles))
            for im in images]


def sequences(model: Llava, images: list[Encoded], method: str, ratio: float,
              seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Each image's token sequence (T, D) for the decoder, and the uncompressed one's length (OneVision:
    after its downscale, `Llava.uncompressed_length`). Each image is compressed on its own (the random
    method seeded per image, as answered alone)."""
    if not in_stage(method):
        return [(model.image_tokens(im), model.uncompressed_length(im)) for im in images]
    import globalcom2

    kept = globalcom2.compress(stage_inputs(model, images), method, ratio, seed)
    return [(model.image_tokens(im, k), model.uncompressed_length(im)) for im, k in zip(images, kept)]
