"""The picture of what a compressor kept: `python -m minillava.apps.visualize` writes it, the drawing
(globalcom2.visualize) tells kept from dropped, errors are one line; globalcom2 imports nothing of minillava."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2 import visualize as vis
from minillava.apps import visualize as cli
from globalcom2.layout import area_mask
from minillava.anyres import CLIP_MEAN, CLIP_STD, _normalise, tile_image
from minillava.layout import compressed_sequence, unpad_area
from minillava.trust import load_image
from tests import tiny

COLOUR = np.array([200, 100, 50], dtype=np.float32)  # the test images are one flat colour
DIMMED = COLOUR * vis.DIM + vis.DIM_TO * (1 - vis.DIM)


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("method, counts", [("globalcom2", "52 -> "), ("none", "52 -> 52")])
def test_cli_writes_a_png(capsys, checkpoints, image_path, tmp_path, method, counts):
    out = tmp_path / "kept.png"
    code, stdout, err = run_cli(capsys, "--model", checkpoints["hub"], "--image", image_path, "--out", out,
                                "--compressor", method)
    assert code == 0, err
    assert f"visual tokens {counts}" in stdout and str(out) in stdout
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        # 56 px tiles drawn 6x: thumbnail and score map (336 px each) above the 2 x 1 crop canvas
        assert 700 <= picture.width <= 1600 and 600 <= picture.height <= 1600


def fake_result(grid, size, side, method="globalcom2", ratio=0.25, seed=0):
    """Random features and scores through the real compressor: (thumbnail scores, Compressed, the
    unpadded area and the token count that `draw` also takes)."""
    g = torch.Generator().manual_seed(seed)
    gw, gh = grid
    P, D = side * side, 8
    features = globalcom2.ImageFeatures(
        thumb=torch.randn(P, D, generator=g), crops=torch.randn(gw * gh, P, D, generator=g),
        thumb_scores=torch.randn(P, generator=g), crop_scores=torch.randn(gw * gh, P, generator=g),
        grid=grid, size=size, area=unpad_area(grid, size, side), newline=torch.randn(D, generator=g),
    )
    result = globalcom2.compress([features], method, ratio, seed)[0]
    after = compressed_sequence(result, features.crops, grid, features.area, features.newline).shape[0]
    return features.thumb_scores, result, {"area": features.area, "after": after}


def cell_colours(picture, box, rows, cols):
    """The colour at the centre of every token cell of the panel in `box`, (rows, cols, 3)."""
    left, top, right, bottom = box
    px = np.asarray(picture, dtype=np.float32)
    ys = top + ((np.arange(rows) + 0.5) * (bottom - top) / rows).astype(int)
    xs = left + ((np.arange(cols) + 0.5) * (right - left) / cols).astype(int)
    return px[np.ix_(ys, xs)]


def close(a, b):
    return np.abs(a - b).max(axis=-1) <= 2


def test_draw_tells_kept_from_dropped_cells():
    grid, size, side, tile = (2, 2), (112, 112), 4, 56  # the tiny model's tiles; square: no padding
    scores, result, kw = fake_result(grid, size, side)
    picture = vis.draw(Image.new("RGB", size, tuple(int(c) for c in COLOUR)), grid, size, tile, scores, result,
                       "globalcom2", 0.25, **kw)
    panels = picture.info["panels"]

    canvas = cell_colours(picture, panels["canvas"], 8, 8)
    keep = result.crop_keep.numpy()
    assert 0 < keep.sum() < keep.size
    assert close(canvas[keep], COLOUR).all()
    assert close(canvas[~keep], DIMMED).all()

    thumb = cell_colours(picture, panels["thumbnail"], side, side)
    thumb_keep = np.zeros(side * side, bool)
    thumb_keep[result.thumb_keep.numpy()] = True
    thumb_keep = thumb_keep.reshape(side, side)
    assert close(thumb[thumb_keep], COLOUR).all() and close(thumb[~thumb_keep], DIMMED).all()


def test_draw_hatches_padding_and_none_keeps_everything():
    grid, size, side, tile = (3, 1), (300, 60), 4, 56  # padded rows: 300/60 is wider than 3 x 1 tiles
    scores, result, kw = fake_result(grid, size, side, method="none")
    picture = vis.draw(Image.new("RGB", size, tuple(int(c) for c in COLOUR)), grid, size, tile, scores, result,
                       "none", 0.25, **kw)
    canvas = cell_colours(picture, picture.info["panels"]["canvas"], 4, 12)
    valid = area_mask(kw["area"], (4, 12), "cpu").numpy()
    assert valid[1:3].all() and not valid[[0, 3]].any()
    assert close(canvas[valid], COLOUR).all()  # none: every valid token kept
    hatch = np.stack([close(canvas, h) for h in vis.HATCH]).any(0)
    hatch[:, 5:7] = True  # the "padding" labels sit mid-band, over the centre columns
    assert hatch[~valid].all()
    assert np.asarray(picture, dtype=np.float32).shape[1] >= 3 * 336  # the canvas at 6x


def test_real_size_picture_is_a_sensible_size():
    grid, size, side, tile = (2, 2), (672, 672), 24, 336
    scores, result, kw = fake_result(grid, size, side)
    picture = vis.draw(Image.new("RGB", size, (90, 160, 220)), grid, size, tile, scores, result, "globalcom2", 0.25,
                       **kw)
    assert 1000 <= picture.width <= 1600 and picture.height <= 1600
    assert picture.info["panels"]["canvas"][2] - picture.info["panels"]["canvas"][0] == 672  # drawn 1:1


def test_canvas_is_the_anyres_canvas(image_path):
    """The drawn canvas is pixel for pixel the one the crops are cut from, so token cells line up."""
    image = load_image(str(image_path)).resize((300, 60))
    tiles = tile_image(image, [tuple(p) for p in tiny.PINPOINTS_WH], tiny.TILE)
    gw, gh = tiles.grid
    canvas = np.asarray(vis.anyres_canvas(image, tiles.grid, tiles.size, tiny.TILE))
    crops = canvas.reshape(gh, tiny.TILE, gw, tiny.TILE, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tiny.TILE, tiny.TILE, 3)
    assert torch.equal(_normalise(crops, CLIP_MEAN, CLIP_STD), tiles.pixels[1:])


def test_colormap_runs_dark_to_bright():
    ramp = vis.colormap(np.linspace(0, 1, 11)).astype(int)
    assert ramp.shape == (11, 3) and ramp.dtype == int
    assert tuple(ramp[0]) == tuple(vis.RAMP[0]) and tuple(ramp[-1]) == tuple(vis.RAMP[-1])
    assert (np.diff(ramp.sum(1)) > 0).all()  # brightness rises along the ramp


def test_bad_inputs(capsys, checkpoints, image_path, tmp_path):
    model = checkpoints["hub"]
    out = tmp_path / "kept.png"
    code, _, err = run_cli(capsys, "--model", model, "--image", tmp_path / "nope.png", "--out", out)
    one_error_line(code, err, "nope.png")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    code, _, err = run_cli(capsys, "--model", model, "--image", text, "--out", out)
    one_error_line(code, err, "not an image")
    code, _, err = run_cli(capsys, "--model", tmp_path, "--image", image_path, "--out", out)
    one_error_line(code, err, "config.json")
    for bad_out, needle in [(tmp_path / "missing" / "kept.png", "does not exist"), (tmp_path, "is a directory"),
                            (tmp_path / "kept.jpg", ".png")]:
        code, _, err = run_cli(capsys, "--model", model, "--image", image_path, "--out", bad_out)
        one_error_line(code, err, "--out", needle)
    with pytest.MonkeyPatch.context() as m:  # a folder this user may not write in (root may write anywhere)
        m.setattr(cli.os, "access", lambda path, mode: False)
        code, _, err = run_cli(capsys, "--model", model, "--image", image_path, "--out", out)
        one_error_line(code, err, "--out", "no permission to write there")
    assert not out.exists()
    for ratio in ("0", "1.5", "nan"):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(["--image", "x", "--out", "y.png", "--retention-ratio", ratio])
        assert e.value.code == 2


def test_module_entry_point_and_import_rule(tmp_path):
    """`python -m minillava.apps.visualize` fails in one line; the stage imports nothing of the model package:
    importing all of globalcom2 loads no minillava module, and no file of it names minillava in an import."""
    env, root = {**os.environ, "HF_HUB_OFFLINE": "1"}, Path(__file__).resolve().parent.parent
    bad = subprocess.run([sys.executable, "-m", "minillava.apps.visualize", "--model", str(tmp_path), "--image",
                          str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    modules = sorted(p.stem for p in (root / "globalcom2").glob("*.py") if p.stem != "__init__")
    check = (f"import sys, globalcom2; [__import__('globalcom2.' + m) for m in {modules!r}]; "
             "print(sorted(m for m in sys.modules if m.startswith('minillava')))")
    ok = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "[]"
    for path in (root / "globalcom2").glob("*.py"):
        assert not re.search(r"^\s*(from|import) minillava", path.read_text(), re.M), path
