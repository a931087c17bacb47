"""GlobalCom2's token score as one parameter: the scores against formulas written here, the NAME-attn and
NAME-sim methods as the same algorithm fed another score, the path for towers without [CLS], and the
refusal of the methods that read [CLS] on such a tower (in the stage and, as one line, in the CLI)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import globalcom2
from globalcom2 import FEATURES, STAGE_METHODS, SCORE_PROBE, ImageFeatures, compress_image, needs, score_of, token_scores
from globalcom2.compress import SCORED
from globalcom2.peers import PEERS
from minillava import generate as gen
from minillava.anyres import tile_image
from minillava.compression import encode, stage_inputs
from minillava.layout import unpad_area
from minillava.trust import ConfigError, load_image
from minillava.weights import load_model
from tests import tiny
from tests.peers_cases import project, tokens
from tests.test_globalcom2 import CASES, reference_scales, valid

ATTN = ("cls_attn", -2)
CLS_METHODS = [*PEERS, "globalcom2-paper", *(f"{m}-attn" for m in SCORED)]  # read a [CLS] token
NO_CLS_METHODS = [m for m in STAGE_METHODS if m not in CLS_METHODS]  # run on a tower without [CLS]


def direct_similarity(x: torch.Tensor) -> torch.Tensor:
    """s_i = -cos(x_i, mean(x)) over one tile's tokens x (P, D), token by token."""
    mean = [sum(float(x[j, d]) for j in range(x.shape[0])) / x.shape[0] for d in range(x.shape[1])]
    out = []
    for i in range(x.shape[0]):
        dot = sum(float(x[i, d]) * mean[d] for d in range(x.shape[1]))
        norm = math.sqrt(sum(float(v) ** 2 for v in x[i])) * math.sqrt(sum(v * v for v in mean))
        out.append(-dot / norm)
    return torch.tensor(out)


def case(grid, size, side, seed, has_cls=True, heads=2, Dv=8):
    """One image's stage inputs as the model leaves them: no scores, only tower probes, [CLS] in column 0
    of every probe where the tower has one (the attention probes only then)."""
    g = torch.Generator().manual_seed(seed)
    gw, gh = grid
    P, N, c = side * side, 1 + gw * gh, int(has_cls)
    features = torch.randn(N, c + P, Dv, generator=g)
    probes = {FEATURES: features}
    if has_cls:
        probes[SCORE_PROBE] = torch.randn(N, 1 + P, generator=g) * 3
        probes[ATTN] = (torch.randn(N, heads, 1 + P, generator=g) * 2).softmax(-1)
    projected = project(features[:, c:])  # (N, P, 12)
    return ImageFeatures(projected[0], projected[1:], None, None, grid, size, unpad_area(grid, size, side),
                         torch.full((projected.shape[-1],), -7.0), probes, project, has_cls)


@pytest.mark.parametrize("has_cls", [True, False])
def test_similarity_is_the_formula(has_cls):
    image = case((2, 1), (150, 90), 4, 0, has_cls)
    thumb, crops = token_scores(image, "globalcom2-sim")
    x = image.probes[FEATURES][:, int(has_cls):]  # the [CLS] token, where there is one, is not a view token
    assert torch.allclose(thumb, direct_similarity(x[0]), atol=1e-6)
    for c in range(2):
        assert torch.allclose(crops[c], direct_similarity(x[1 + c]), atol=1e-6)


def test_attention_and_logits_are_the_probes_patch_columns():
    image = case((2, 2), (100, 60), 4, 1)
    thumb, crops = token_scores(image, "globalcom2-attn")
    attn = image.probes[ATTN]
    assert torch.equal(thumb, attn[0, :, 1:].mean(0)) and torch.equal(crops, attn[1:, :, 1:].mean(1))
    for method in ("globalcom2", "globalcom2-paper", "uniform", "local-only", "global-only"):
        thumb, crops = token_scores(image, method)
        assert torch.equal(thumb, image.probes[SCORE_PROBE][0, 1:]) and torch.equal(crops, image.probes[SCORE_PROBE][1:, 1:])


@pytest.mark.parametrize("has_cls", [True, False])
def test_a_score_is_a_parameter_not_a_copy(has_cls):
    """NAME-attn and NAME-sim keep exactly what NAME keeps when handed that score; the plain names take
    the paper's score from the probes (what the model used to slice out itself), or the similarity
    without [CLS]."""
    for seed, (grid, size) in enumerate(CASES):
        image = case(grid, size, 4, seed, has_cls)
        for base in SCORED:
            for suffix in ("attn", "sim") if has_cls else ("sim",):
                given = ImageFeatures(**{**image.__dict__, "probes": {}})
                given.thumb_scores, given.crop_scores = token_scores(image, f"{base}-{suffix}")
                for r in (0.5, 0.1):
                    ours, ref = compress_image(image, f"{base}-{suffix}", r), compress_image(given, base, r)
                    assert torch.equal(tokens(image, ours), tokens(given, ref))
                    assert torch.equal(ours.crop_ratio, ref.crop_ratio)
            plain = compress_image(image, base, 0.25)
            same = compress_image(image, f"{base}-sim" if not has_cls else base, 0.25)
            assert torch.equal(tokens(image, plain), tokens(image, same))
        if has_cls:  # the model's former slicing of the [CLS] logits gives the same globalcom2-paper sequence
            sliced = ImageFeatures(**{**image.__dict__, "probes": {}, "thumb_scores": image.probes[SCORE_PROBE][0, 1:],
                                      "crop_scores": image.probes[SCORE_PROBE][1:, 1:]})
            assert torch.equal(compress_image(image, "globalcom2-paper", 0.25).sequence,
                               compress_image(sliced, "globalcom2-paper", 0.25).sequence)


def test_without_cls_globalcom2_runs_on_similarity():
    """Tiles without a [CLS] column: every step of GlobalCom2 on the similarity score, counts as the
    algorithm says (thumbnail int(P r), crop c int(N_c scale_c), scale_c from the thumbnail's scores)."""
    for seed, (grid, size) in enumerate(CASES):
        image = case(grid, size, 6, seed, has_cls=False)
        thumb = direct_similarity(image.probes[FEATURES][0])
        assert score_of("globalcom2", has_cls=False) == "similarity"
        assert needs("globalcom2", has_cls=False) == (FEATURES,)
        for r, share in itertools.product((0.5, 0.25, 0.1), (1.0, 0.3)):
            image = dataclasses.replace(image, grid_share=share)  # OneVision's downscale: r of what the decoder sees
            result = compress_image(image, "globalcom2", r)
            assert len(result.thumb_keep) == int(36 * r)  # the thumbnail is never downscaled: its own r
            assert torch.equal(result.thumb_keep, torch.sort(thumb, descending=True, stable=True).indices[: int(36 * r)])
            assert result.crop_ratio.tolist() == pytest.approx(reference_scales(thumb, grid, r * share), abs=1e-6)
            for method in ("uniform", "random"):
                assert compress_image(image, method, r).crop_ratio.tolist() == pytest.approx([r * share] * len(image.crops))
            per_crop = valid(image).view(grid[1], 6, grid[0], 6).transpose(1, 2).reshape(-1, 36).sum(1)  # (C,)
            kept = result.crop_keep.view(grid[1], 6, grid[0], 6).transpose(1, 2).reshape(-1, 36).sum(1)
            assert kept.tolist() == [int(n * s) for n, s in zip(per_crop.tolist(), result.crop_ratio.tolist())]
            assert not (result.crop_keep & ~valid(image)).any()
        for method in NO_CLS_METHODS:
            assert torch.isfinite(tokens(image, compress_image(image, method, 0.25))).all()


def test_grid_share_is_checked():
    """A published method sees the crop grid whole: it refuses a grid the model shrinks; a share outside
    (0, 1] is refused for every method."""
    image = dataclasses.replace(case((2, 2), (100, 100), 4, 0), grid_share=0.5)
    for method in (*PEERS, "globalcom2-paper"):
        with pytest.raises(ValueError, match="does not take a grid the model shrinks"):
            compress_image(image, method, 0.25)
    for share in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"grid_share must be in \(0, 1\]"):
            compress_image(dataclasses.replace(image, grid_share=share), "globalcom2", 0.25)


@pytest.mark.parametrize("method", CLS_METHODS)
def test_cls_methods_refuse_a_tower_without_cls(method):
    image = case((2, 2), (100, 100), 4, 0, has_cls=False)
    for call in (lambda: needs(method, has_cls=False), lambda: compress_image(image, method, 0.25),
                 lambda: globalcom2.compress([image], method, 0.25)):
        with pytest.raises(ValueError, match=r"no \[CLS\] token") as error:
            call()
        assert "\n" not in str(error.value) and method in str(error.value)
    assert needs(method) == needs(method, has_cls=True)  # with [CLS] nothing changes


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hub"])


def test_features_probe_is_what_the_projector_gets(model, image_path):
    """Through the model: the similarity reads the feature layer (the projector's input, [CLS] dropped)."""
    tiles = tile_image(load_image(str(image_path)), model.cfg.grid_pinpoints, tiny.TILE)
    with torch.no_grad():
        image = stage_inputs(model, encode(model, [tiles], "globalcom2-sim"))[0]
        states = model.vision(tiles.pixels, (model.cfg.vision_feature_layer,))[model.cfg.vision_feature_layer]
    assert torch.equal(image.probes[FEATURES], states)
    assert torch.equal(model.projector(states[0, 1:]), image.thumb)  # the same tokens the projector got
    thumb, crops = token_scores(image, "globalcom2-sim")
    assert torch.allclose(thumb, direct_similarity(states[0, 1:]), atol=1e-5)
    assert torch.allclose(crops[0], direct_similarity(states[1, 1:]), atol=1e-5)


def test_cli_refuses_in_one_line(model, checkpoints, image_path, capsys, monkeypatch):
    """A tower without [CLS] (flagged here on the tiny CLIP model): the [CLS] methods fail with one line."""
    model.vision.has_cls = False
    try:
        monkeypatch.setattr(gen, "load", lambda *args, **kwargs: (model, None))
        for method in ("fastervlm", "globalcom2-attn", "globalcom2-paper"):
            rc = gen.main(["--model", str(checkpoints["hub"]), "--image", str(image_path), "--prompt", "x",
                           "--compressor", method])
            err = capsys.readouterr().err
            assert rc == 1 and err.count("\n") == 1 and "no [CLS] token" in err and "Traceback" not in err
        with pytest.raises(ConfigError):
            encode(model, [tile_image(load_image(str(image_path)), model.cfg.grid_pinpoints, tiny.TILE)], "visionzip")
    finally:
        del model.vision.has_cls
