"""Between the projector and the decoder: each image's token sequence, uncompressed or compressed.

The one module of minillava that calls the compression stage (`globalcom2`: tensors in, tensors out),
and only for a compressor: the uncompressed model (`none`, and `fastv`, which prunes inside the
decoder: minillava/fastv.py) never imports it. A compressor asks the tower for what it reads
(`globalcom2.needs`: [CLS] attention, keys, hidden states), computed from the tower's hidden states in
its one pass over all tiles, then keeps a subset of each image's tokens, which the model lays out as
LLaVA-NeXT does (minillava/layout.py `pack`).
"""

from __future__ import annotations

import torch

from .anyres import Tiles
from .model import Encoded, LlavaNext
from .trust import ConfigError

UNCOMPRESSED = ("none", "fastv")  # no stage: the plain sequence (FastV prunes it in the decoder)


def compressors() -> tuple[str, ...]:
    """Every name `--compressor` takes: the stage's methods, and fastv."""
    import globalcom2

    return (*globalcom2.METHODS, "fastv")


def check_tower(model: LlavaNext, method: str):
    """ConfigError if `method` reads the tower's [CLS] token (its attention, keys or the layout after it)
    and the tower has none (SigLIP: LLaVA-OneVision). Every probe of globalcom2.needs is read off [CLS]
    or assumes it first, so a method with any probe is refused there."""
    if model.vision.has_cls or method in UNCOMPRESSED:
        return
    import globalcom2

    if globalcom2.needs(method):
        raise ConfigError(f"--compressor {method} scores tokens by the vision tower's [CLS] token, which this "
                          f"model's {model.cfg.vision.model_type} tower does not have; use none, fastv or random")


def encode(model: LlavaNext, tiles: list[Tiles], method: str, extra=()) -> list[Encoded]:
    """The images through the tower and projector, with what `method` reads from the tower (and the
    probes `extra`, e.g. GlobalCom2's scores for a picture, from the same pass). ConfigError for a
    method the tower cannot serve (`check_tower`)."""
    check_tower(model, method)
    if method in UNCOMPRESSED and not extra:
        return model.encode_images(tiles)
    import globalcom2

    needs = tuple(dict.fromkeys((*(() if method in UNCOMPRESSED else globalcom2.needs(method)), *extra)))
    n_layers = len(model.vision.encoder.layers)
    layers = globalcom2.hidden_states_needed(needs, n_layers)
    probe = lambda states: globalcom2.tower_probes(needs, states, model.vision.query_key, n_layers)  # noqa: E731
    return model.encode_images(tiles, layers, probe)


def stage_inputs(model: LlavaNext, images: list[Encoded]) -> list:
    """What the compression stage takes for each image (globalcom2.ImageFeatures)."""
    import globalcom2

    scores = globalcom2.SCORES  # GlobalCom2's own: the thumbnail's and the crops' patch columns
    return [globalcom2.ImageFeatures(
        im.thumb, im.crops,
        im.probes[scores][0, 1:] if scores in im.probes else None,  # (P,) [CLS] column dropped
        im.probes[scores][1:, 1:] if scores in im.probes else None,  # (C, P)
        im.grid, im.size, im.area, model.image_newline, im.probes, model.projector) for im in images]


def sequences(model: LlavaNext, images: list[Encoded], method: str, ratio: float,
              seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Each image's token sequence (T, D) for the decoder, and the uncompressed one's length (OneVision:
    after its downscale, `LlavaNext.uncompressed_length`). Each image is compressed on its own (the random
    method seeded per image, as answered alone)."""
    if method in UNCOMPRESSED:
        return [(model.image_tokens(im), model.uncompressed_length(im)) for im in images]
    import globalcom2

    kept = globalcom2.compress(stage_inputs(model, images), method, ratio, seed)
    return [(model.image_tokens(im, k), model.uncompressed_length(im)) for im, k in zip(images, kept)]
