"""GlobalCom2 on InternVL (docs/internvl.md): a token's score is the sum of its 2 x 2 patches' scores, the
thumbnail's map meets the squashed crop grid, the crops' kept tokens go tile by tile and the thumbnail's last;
a one-tile image is its thumbnail alone. Token counts through the CLI, batch == alone, the refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2.scores import group_sum
from globalcom2.scoring import crop_scales
from minillava import generate as gen
from minillava.batch import generate_batch
from globalcom2 import visualize as vis
from minillava.apps import visualize
from minillava.compression import encode, stage_inputs
from minillava.layout import on_tiles
from tests import tiny
from tests.test_model import noise_image

QUESTION = "What is in the picture?"
TILE = 112  # 8 x 8 patches of 14 px: 4 x 4 = 16 tokens per tile after the pixel shuffle
ONE, MANY = (112, 112), (448, 336)  # 1 tile (no thumbnail of its own); 4 x 3 crops + the thumbnail: 13 tiles


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ivc")
    tok = tiny.train_internvl_tokenizer(root / "tokenizer.json")
    return tiny.save_iv_checkpoint(tiny.iv_hf_model(seed=2, layers=4, tile=TILE), root / "ckpt", "original", tok)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return gen.load(str(checkpoint))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ivimg")
    out = {}
    for name, size in (("one", ONE), ("many", MANY)):
        out[name] = root / f"{name}.png"
        noise_image(*size, seed=len(name)).save(out[name])
    return out


def test_group_sum_is_the_direct_formula():
    """Token (i, j)'s score is s[2i, 2j] + s[2i, 2j+1] + s[2i+1, 2j] + s[2i+1, 2j+1] of the patch map."""
    rng = torch.Generator().manual_seed(0)
    for side in (2, 4, 8, 32):
        s = torch.randn(3, side * side, generator=rng)
        grid = s.reshape(3, side, side)
        half = side // 2
        direct = torch.stack([grid[:, 2 * i, 2 * j] + grid[:, 2 * i, 2 * j + 1] + grid[:, 2 * i + 1, 2 * j]
                              + grid[:, 2 * i + 1, 2 * j + 1] for i in range(half) for j in range(half)], dim=1)
        assert torch.allclose(group_sum(s, 2), direct, atol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        group_sum(torch.zeros(1, 9), 2)


@pytest.mark.parametrize("grid", [(4, 3), (2, 2), (3, 1), (1, 4)])  # not (1, 6): 16 // 6 rows of 2 vs 32 // 6 of 5
def test_crop_budgets_are_the_patch_maps(grid):
    """With the sum, each crop's region of the 16 x 16 token map sums to its region of the 32 x 32 patch map
    (where the published cut of both maps aligns), so the crops' ratios are what the patch map would give."""
    s = torch.randn(1, 32 * 32, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(crop_scales(group_sum(s, 2)[0], grid, 0.25), crop_scales(s[0], grid, 0.25), rtol=1e-6)  # float32 sums


def test_the_thumbnail_scores_are_the_probes_summed(loaded, images):
    """The stage's token scores on InternVL: the paper's last-layer [CLS] logits per patch, summed per token."""
    model, _ = loaded
    tiles = model.tile(Image.open(images["many"]))
    image = stage_inputs(model, encode(model, [tiles], "globalcom2"))[0]
    thumb, crops = globalcom2.token_scores(image, "globalcom2")
    probe = image.probes[globalcom2.SCORE_PROBE]  # (1 + C, 1 + 64): [CLS] column first
    assert probe.shape == (13, 65) and thumb.shape == (16,) and crops.shape == (12, 16)
    assert torch.allclose(thumb, group_sum(probe[:1, 1:], 2)[0]) and torch.allclose(crops, group_sum(probe[1:, 1:], 2))


@pytest.mark.parametrize("method", ["globalcom2", "uniform", "random", "global-only"])
def test_kept_tokens_go_tile_by_tile_then_the_thumbnail(loaded, images, method):
    """The decoder's sequence: each crop's kept tokens in raster order, crops row-major, then the thumbnail's
    kept tokens in the method's order; with every crop ratio forced to 1 and r = 1 it is `none`'s sequence."""
    model, _ = loaded
    tiles = model.tile(Image.open(images["many"]))
    encoded = encode(model, [tiles], method)
    image = stage_inputs(model, encoded)[0]
    kept = globalcom2.compress_image(image, method, 0.25)
    seq = model.image_tokens(encoded[0], kept)
    side, (gw, gh) = 4, image.grid
    expected = [image.crops[c, y * side + x] for c in range(gw * gh) for y in range(side) for x in range(side)
                if kept.crop_keep[(c // gw) * side + y, (c % gw) * side + x]]
    assert torch.equal(seq, torch.cat([torch.stack(expected), image.thumb[kept.thumb_keep]]))
    full = globalcom2.compress_image(image, "globalcom2" if method != "random" else method, 1.0,
                                     scales=None if method == "random" else torch.ones(12))
    none = model.image_tokens(encoded[0])
    assert torch.equal(model.image_tokens(encoded[0], full)[:192], none[:192])  # the crops: every token, in order
    assert sorted(full.thumb_keep.tolist()) == list(range(16))


def run_json(capsys, checkpoint, image, *extra):
    code = gen.main(["--model", str(checkpoint), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "3",
                     "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["visual_tokens"]


@pytest.mark.parametrize("ratio", [pytest.param(0.5, marks=pytest.mark.slow), 0.25, pytest.param(0.1, marks=pytest.mark.slow)])
def test_cli_token_counts(capsys, checkpoint, images, ratio):
    """Visual tokens through the CLI: a one-tile image keeps int(16 r) (its thumbnail's share) under every
    GlobalCom2 method; 13 tiles keep int(16 r) per tile under uniform and random, and GlobalCom2 keeps the
    thumbnail's int(16 r) plus each crop's int(16 scale_c), scale_c around r."""
    one = {m: run_json(capsys, checkpoint, images["one"], "--compressor", m, "--retention-ratio", str(ratio))
           for m in ("none", "globalcom2", "uniform", "random")}
    assert one["none"] == {"before": 16, "after": 16}
    assert all(one[m] == {"before": 16, "after": int(16 * ratio)} for m in ("globalcom2", "uniform", "random"))
    many = {m: run_json(capsys, checkpoint, images["many"], "--compressor", m, "--retention-ratio", str(ratio))
            for m in ("none", "globalcom2", "uniform", "random")}
    assert many["none"] == {"before": 208, "after": 208}
    assert many["uniform"] == many["random"] == {"before": 208, "after": 13 * int(16 * ratio)}
    assert abs(many["globalcom2"]["after"] - 208 * ratio) <= 13  # truncation: at most one token per tile


@pytest.mark.parametrize("method", ["globalcom2", pytest.param("random", marks=pytest.mark.slow),
                                    pytest.param("fastv", marks=pytest.mark.slow)])
def test_batch_answers_equal_alone(loaded, images, method):
    model, tok = loaded
    items = [(Image.open(images["many"]), QUESTION), (Image.open(images["one"]), "Which colour?")]
    alone = [gen.generate(model, tok, im, q, method, 0.5, max_new_tokens=4).token_ids for im, q in items]
    batch = [r.token_ids for r in generate_batch(model, tok, items, method, 0.5, max_new_tokens=4)]
    assert batch == alone


@pytest.mark.parametrize("method", ["fastervlm", "hired", "visionzip", "prumerge+", "globalcom2-paper", "fastervlm-paper",
                                    "ficoco"])
def test_published_peers_refuse_in_one_line(capsys, checkpoint, images, method):
    code = gen.main(["--model", str(checkpoint), "--image", str(images["many"]), "--prompt", QUESTION,
                     "--compressor", method])
    _, err = capsys.readouterr()
    assert code != 0 and err.startswith(f"error: {method} ") and "InternVL" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra", [["--quantize", "int8"], pytest.param(["--compressor", "pdrop"], marks=pytest.mark.slow),
                                   pytest.param(["--compressor", "sparsevlm"], marks=pytest.mark.slow)])
def test_cli_runs_the_other_paths(capsys, checkpoint, images, extra):
    counts = run_json(capsys, checkpoint, images["many"], *extra)
    assert counts["before"] == 208


def drawn_cells(picture, box, image, rows, cols):
    """Which token cells of the panel at `box` are drawn kept (the image's pixel, as the model's tile saw it:
    `image` resized to the panel's cells, nearest zoom) or dropped (that pixel dimmed), read at each cell's
    centre: (rows, cols) bool, every cell checked to be one of the two."""
    left, top, right, bottom = box
    zoom = (right - left) // image.width
    px = np.asarray(picture, dtype=np.float32)
    src = np.asarray(image, dtype=np.float32)
    ys = ((np.arange(rows) + 0.5) * (bottom - top) / rows).astype(int)
    xs = ((np.arange(cols) + 0.5) * (right - left) / cols).astype(int)
    drawn = px[np.ix_(top + ys, left + xs)]
    original = src[np.ix_(ys // zoom, xs // zoom)]
    kept = np.abs(drawn - original).max(-1) <= 1
    dropped = np.abs(drawn - (original * vis.DIM + vis.DIM_TO * (1 - vis.DIM))).max(-1) <= 1
    assert (kept ^ dropped).all(), "a cell drawn neither kept nor dropped"
    return kept


@pytest.mark.parametrize("name", ["one", "many"])
def test_visualize_draws_the_kept_tokens(loaded, images, name):
    """The picture on InternVL: the cells drawn kept on the squashed crop grid (4 x 4 tokens per 112 px tile:
    the 2 x 2 pixel-shuffled groups) and on the thumbnail are exactly the ones the compressor kept."""
    model, _ = loaded
    image = Image.open(images[name]).convert("RGB")
    picture = visualize.kept_picture(model, image, "globalcom2", 0.25)
    tiles = model.tile(image)
    encoded = encode(model, [tiles], "globalcom2")
    kept = globalcom2.compress(stage_inputs(model, encoded), "globalcom2", 0.25)[0]
    assert picture.after == model.image_tokens(encoded[0], kept).shape[0]
    panels = picture.image.info["panels"]
    thumb = np.zeros(16, bool)
    thumb[kept.thumb_keep.numpy()] = True
    drawn = drawn_cells(picture.image, panels["thumbnail"], image.resize((TILE, TILE), Image.Resampling.BICUBIC), 4, 4)
    np.testing.assert_array_equal(drawn, thumb.reshape(4, 4))
    if name == "one":  # the thumbnail alone: no canvas, no crop; int(16 r) of its 16 tokens
        assert tiles.grid == (0, 0) and "canvas" not in panels and (picture.before, picture.after) == (16, 4)
        assert drawn.sum() == 4
        return
    gw, gh = tiles.grid
    assert (gw, gh) == (4, 3) and picture.before == 208
    canvas = image.resize((gw * TILE, gh * TILE), Image.Resampling.BICUBIC)  # the grid the crops are cut from
    drawn = drawn_cells(picture.image, panels["canvas"], canvas, gh * 4, gw * 4)
    np.testing.assert_array_equal(drawn, kept.crop_keep.numpy())
    assert 0 < drawn.sum() < drawn.size and picture.after == drawn.sum() + thumb.sum()
    text = picture.image.info["text"]
    assert f"crops {drawn.sum()}/192 kept" in text and f"visual tokens 208 -> {picture.after} " in text[-1] + " "


def test_on_tiles_inverts_the_tile_sequence():
    """A decoder method's kept sequence positions (FastV) back on the crops and thumbnail: position
    c P + y side + x is crop c's cell (y, x), then the thumbnail's p at C P + p."""
    grid, side = (3, 2), 4
    P, (gw, gh) = side * side, grid
    kept = torch.randperm(7 * P, generator=torch.Generator().manual_seed(0))[:40].sort().values
    thumb, crop_keep = on_tiles(kept, grid, side)
    expected = torch.zeros(gh * side, gw * side, dtype=torch.bool)
    for i in kept[kept < 6 * P].tolist():
        c, j = divmod(i, P)
        expected[(c // gw) * side + j // side, (c % gw) * side + j % side] = True
    assert torch.equal(crop_keep, expected) and torch.equal(thumb, kept[kept >= 6 * P] - 6 * P)


def test_visualize_fastv_and_cli(capsys, loaded, checkpoint, images, tmp_path):
    """FastV's kept positions drawn on InternVL's tiles; the command writes the PNG with the counts."""
    model, tok = loaded
    image = Image.open(images["many"]).convert("RGB")
    picture = visualize.kept_picture(model, image, "fastv", 0.25, tokenizer=tok, prompt=QUESTION)
    canvas = image.resize((4 * TILE, 3 * TILE), Image.Resampling.BICUBIC)
    crops = drawn_cells(picture.image, picture.image.info["panels"]["canvas"], canvas, 12, 16)
    thumb = drawn_cells(picture.image, picture.image.info["panels"]["thumbnail"],
                        image.resize((TILE, TILE), Image.Resampling.BICUBIC), 4, 4)
    assert picture.before == 208 and crops.sum() + thumb.sum() == picture.after == 52  # FastV keeps int(208 r)
    out = tmp_path / "kept.png"
    code = visualize.main(["--model", str(checkpoint), "--image", str(images["one"]), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0 and "visual tokens 16 -> 4" in stdout, err
    one = visualize.kept_picture(model, Image.open(images["one"]), "globalcom2", 0.25).image  # the CLI's defaults
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(one))


@pytest.mark.slow  # gradio's import alone is seconds
def test_demo_shows_the_picture(loaded, images):
    """The demo page on InternVL: the answer, its counts and the kept-token picture."""
    pytest.importorskip("gradio")
    from minillava.apps import demo

    model, tok = loaded
    steps = list(demo.ask(demo.Session(model, tok, max_new_tokens=3), str(images["many"]), QUESTION, "globalcom2", 0.25))
    answer, picture, counts, message = steps[-1]
    assert message == "" and "208 ->" in counts
    expected = visualize.kept_picture(model, Image.open(images["many"]), "globalcom2", 0.25).image
    assert np.array_equal(np.asarray(picture), np.asarray(expected))



def test_a_tower_method_is_refused_before_its_schedule(loaded):
    """`compression.tower_schedule` (what eval's and lmms-eval's up-front checks call, through
    eval/efficiency.py) refuses FiCoCo-V on InternVL in the one line generate gives, not per question."""
    from minillava.compression import tower_schedule
    from minillava.trust import ConfigError

    model, _ = loaded
    with pytest.raises(ConfigError, match=r"^ficoco merges tokens inside the vision tower, and InternVL's pixel"):
        tower_schedule(model, "ficoco", 0.5)
    assert tower_schedule(model, "globalcom2", 0.5) == ()
