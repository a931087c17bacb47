"""What every method keeps, over generated images, ratios and model families (tests/strategies.py,
tests/families.py): the invariants its documentation states (globalcom2/compress.py, docs/methods.md,
docs/onevision.md), checked on the stage's own output for every method at once.

- the kept positions are valid: thumbnail positions distinct and inside the tile, kept grid cells
  inside the unpadded area (but for a `-paper` sequence, which emits padding by design);
- the sequence is what `pack` lays out: the head, the kept cells, a newline per unpadded row, the tail;
- it is never longer than the full-resolution uncompressed sequence for LLaVA-NeXT's layout (which is
  the uncompressed sequence on a family that does not downscale: OneVision's slack is its full-resolution
  rows and newlines, docs/onevision.md), nor than every tile's tokens plus one per tile and a newline
  per grid row for any method;
- the documented counts: int(P r) thumbnail tokens and int(N_c scale_c) per crop for GlobalCom2 and its
  ablations, scale_c = r s for uniform and random (s: `grid_share`) and at most r s on average for the
  guided ones; FasterVLM's round(P r) per tile; HiRED's total budget int((1 + C) P r); FastV's round(n r);
- r = 1 keeps everything where the method says so (none, uniform, random, fastervlm, hired, fastv) on a
  grid the decoder sees whole;
- a batch compresses each image as alone.
"""

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

import globalcom2
from globalcom2.layout import area_mask, crop_extents, to_crops
from minillava import generate as gen
from minillava.compression import compressors, encode, needs, place, stage_inputs
from minillava.layout import uncompressed_length
from minillava.trust import ConfigError
from tests import families
from tests.families import SHIPPED, models
from tests.strategies import budgets, check, images, ratios

KEEPS_ALL_AT_1 = {"none", "uniform", "uniform-attn", "uniform-sim", "random", "fastervlm", "hired"}  # docs/methods.md
GUIDED = {"globalcom2", "local-only", "global-only", "globalcom2-paper",
          *(f"{m}-{s}" for m in ("globalcom2", "local-only", "global-only") for s in ("attn", "sim"))}
FLAT = {"uniform", "uniform-attn", "uniform-sim", "random"}  # every crop at r s


@pytest.fixture(scope="module")
def shipped():
    return gen.load(SHIPPED)[0]


def runnable(model) -> list[str]:
    """The stage methods this model's tower can feed (a [CLS] method is refused on SigLIP: test_props_answers)."""
    out = []
    for m in compressors():
        try:
            needs(model, m)
        except ConfigError:
            continue
        if place(m) in (None, "stage"):  # none, or the stage's (decoder and tower methods have their own tests)
            out.append(m)
    return out


def method_case(model, pictures, ratio, seed):
    methods = runnable(model)
    extra = tuple(dict.fromkeys(n for m in methods for n in needs(model, m)))
    encoded = encode(model, [model.tile(p) for p in pictures], "none", extra=extra)
    features = stage_inputs(model, encoded)
    side = model.cfg.token_side
    P = side * side
    for m in methods:
        batch = globalcom2.compress(features, m, ratio, seed)
        for image, f, kept in zip(encoded, features, batch):
            alone = globalcom2.compress([f], m, ratio, seed)[0]
            for name in ("thumb_keep", "crop_keep", "crop_ratio", "head", "tail", "sequence", "grid"):
                a, b = getattr(kept, name), getattr(alone, name)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (m, name)
            stage_invariants(model, image, f, kept, m, ratio, P, side)
    for image in encoded:  # FastV: round(n r) of the uncompressed sequence's n image tokens, all at r = 1
        n = model.uncompressed_length(image)
        (stage,) = globalcom2.schedule("fastv", 10, n, ratio, 32)  # K = 2 on any decoder deep enough
        assert 0 <= stage.keep_count <= n and abs(stage.keep_count - n * ratio) <= 0.5 + 1e-9
        if ratio == 1.0:
            assert stage.dropped == 0


def stage_invariants(model, image, f, kept, m, ratio, P, side):
    gw, gh = image.grid
    C, H, W = gw * gh, gh * side, gw * side
    top, bottom, left, right = image.area
    h = bottom - top  # unpadded rows, each closed by a newline (InternVL: none)
    newlines = 0 if model.cfg.family_spec.tile_by_tile else h
    valid = area_mask(image.area, (H, W), "cpu")
    s = f.grid_share
    thumb = kept.thumb_keep.cpu()
    assert thumb.ndim == 1 and thumb.unique().numel() == thumb.numel(), m
    assert bool(((thumb >= 0) & (thumb < P)).all()), m
    crop_keep = kept.crop_keep.cpu()
    assert crop_keep.shape == (H, W) and crop_keep.dtype == torch.bool, m
    if kept.sequence is None:
        assert not (crop_keep & ~valid).any(), m
    ratios_c = kept.crop_ratio.numpy()
    # a crop's tokens over P: at most 1, but where a method merges: VisionZip keeps [CLS] and a contextual
    # token of every tile, 2 tokens of a one-patch tile (globalcom2/visionzip.py `visionzip_split`)
    most = max(1, 2 / P) if kept.thumb_merge is not None else 1
    assert ratios_c.shape == (C,) and np.isfinite(ratios_c).all() and (ratios_c >= 0).all(), m
    assert (ratios_c <= most).all(), (m, ratios_c)

    tokens = model.image_tokens(image, None if m == "none" else kept)
    assert tokens.shape[1] == model.cfg.text.hidden_size
    assert len(tokens) <= (1 + C) * (P + 1) + H, m  # every tile's tokens, one more each, a newline per row
    full = uncompressed_length(image.area, side) - (h - newlines)  # P + h (w + 1): the full-resolution sequence
    if m == "none":
        assert len(tokens) == model.uncompressed_length(image)
    elif kept.sequence is None:  # LLaVA-NeXT's layout: head, the kept cells, a newline per row, tail
        tail = 0 if kept.tail is None else len(kept.tail)
        assert len(tokens) == len(kept.head) + int(crop_keep.sum()) + newlines + tail, m
        if tail == 0 and len(kept.head) <= P:  # no token without a grid place: within the grid's own
            assert len(tokens) <= full, m
            if s == 1:
                assert len(tokens) <= model.uncompressed_length(image), m

    rows, cols = crop_extents(image.area, image.grid, side)
    n_valid = np.outer(rows, cols).ravel()  # N_c
    per_crop = to_crops(crop_keep & valid, image.grid, side).sum(1).numpy()
    if m in GUIDED or m in FLAT:
        assert len(thumb) == int(P * ratio), m
        if m != "globalcom2-paper":
            assert (per_crop == np.trunc(n_valid * ratios_c)).all(), m
        if m in FLAT:
            assert np.allclose(ratios_c, ratio * s), m
        else:
            assert C == 0 or ratios_c.mean() <= ratio * s * (1 + 1e-9), m  # C = 0: InternVL's one tile
    if m == "fastervlm":
        T = max(1, int(P * ratio + 0.5))
        assert len(thumb) == T and (per_crop <= T).all(), m
    if m == "hired":
        assert len(thumb) + per_crop.sum() <= max(int((1 + C) * P * ratio), 0) or ratio == 1.0, m
    if ratio == 1.0 and m in KEEPS_ALL_AT_1 and s == 1:
        assert sorted(thumb.tolist()) == list(range(P)) and torch.equal(crop_keep, valid), m


@budgets(150, campaign=1000)
def test_every_method_keeps_what_it_documents(n, shipped):
    def prop(which, pictures, ratio, seed):
        name, geometry, layers = which
        model = shipped if name == SHIPPED else families.model(name, geometry, layers)
        with torch.inference_mode():
            method_case(model, pictures, ratio, seed)

    check(prop, n, which=models(), pictures=st.lists(images(max_pixels=1 << 16), min_size=1, max_size=2),
          ratio=ratios(), seed=st.integers(0, 2**63 - 1))
