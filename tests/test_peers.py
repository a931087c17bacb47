"""The peers everywhere a compressor works: the tower's probes through the model, the CLIs, the picture."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import globalcom2
import globalcom2.visionzip
import globalcom2.visualize as vis
import minillava.apps.visualize as cli
from globalcom2.peers import PEERS
import minillava.generate as gen
from globalcom2.layout import area_mask
from minillava.anyres import tile_image
from minillava.compression import encode, sequences, stage_inputs
from minillava.trust import load_image
from minillava.weights import load_model
from tests import tiny
from tests.peers_cases import peer_case, tokens

EVERY = tuple(dict.fromkeys(n for m in globalcom2.METHODS for n in globalcom2.needs(m)))  # every method's probes


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hub"])


@pytest.fixture(scope="module")
def wide(tmp_path_factory, image_path):
    path = tmp_path_factory.mktemp("wide") / "wide.png"
    Image.open(image_path).resize((300, 60)).save(path)  # a 3 x 1 grid with padded rows
    return path


def test_every_peer_is_a_method():
    assert set(PEERS) <= set(globalcom2.METHODS)
    assert globalcom2.needs("globalcom2") == (globalcom2.SCORE_PROBE,) and globalcom2.needs("none") == ()
    assert globalcom2.needs("fastervlm") == (("cls_attn", -2),)
    assert set(globalcom2.needs("visionzip")) == {("cls_attn", -2), ("keys", -2), ("hidden", -2)}
    assert globalcom2.needs("hired") == (("cls_attn", 0), ("cls_attn", -2))
    assert set(globalcom2.needs("prumerge+")) == {("cls_attn", -1), ("keys", -1), ("hidden", -2)}


def test_encode_computes_only_the_probes_asked(model, wide):
    tiles = tile_image(load_image(str(wide)), model.cfg.grid_pinpoints, tiny.TILE)
    with torch.no_grad():
        plain = encode(model, [tiles], "none")[0]
        fv = encode(model, [tiles], "fastervlm")[0]
        every = encode(model, [tiles], "none", extra=EVERY)[0]  # one pass gives every method's probes
    assert plain.probes == {} and set(fv.probes) == {("cls_attn", -2)}
    assert set(every.probes) == set(EVERY)
    assert torch.equal(plain.thumb, every.thumb) and torch.equal(plain.crops, every.crops)
    assert fv.probes["cls_attn", -2].shape == (4, model.cfg.vision.num_attention_heads, 17)
    assert torch.equal(every.probes["hidden", -2], model.vision(tiles.pixels)[-2])  # the feature layer
    with pytest.raises(ValueError, match="needs the tower probes"):
        globalcom2.compress(stage_inputs(model, [plain]), "fastervlm", 0.5)


@pytest.mark.parametrize("method", PEERS)
def test_cli_counts(capsys, checkpoints, model, wide, method):
    r = 0.25
    code = gen.main(["--model", str(checkpoints["hub"]), "--image", str(wide), "--prompt", "What is in the picture?",
                     "--max-new-tokens", "4", "--json", "--compressor", method, "--retention-ratio", str(r)])
    out, err = capsys.readouterr()
    assert code == 0, err
    counts = json.loads(out.strip().splitlines()[-1])["visual_tokens"]
    tiles = tile_image(load_image(str(wide)), model.cfg.grid_pinpoints, tiny.TILE)
    with torch.no_grad():
        expected, before = sequences(model, encode(model, [tiles], method), method, r)[0]
    assert counts == {"before": 16 + 2 * (12 + 1), "after": expected.shape[0]} and before == counts["before"]
    if method in ("fastervlm-paper", "visionzip-paper"):
        assert counts["after"] == 4 * 4  # T = round(16 * 0.25) = 4 tokens in each of the 4 tiles


@pytest.mark.parametrize("method", PEERS)
def test_visualize_cli(capsys, checkpoints, image_path, tmp_path, method):
    out = tmp_path / "kept.png"
    code = cli.main(["--model", str(checkpoints["hub"]), "--image", str(image_path), "--out", str(out),
                     "--compressor", method, "--retention-ratio", "0.5"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert f"{method}, visual tokens 52 -> " in stdout and out.exists()


@pytest.mark.parametrize("method", ["visionzip", "prumerge+"])
def test_draw_tints_merged_cells(method):
    image, _ = peer_case((2, 2), (112, 112), 4, seed=0)
    result = globalcom2.compress([image], method, 0.5)[0]
    colour = (200, 120, 60)
    picture = vis.draw(Image.new("RGB", (112, 112), colour), (2, 2), (112, 112), 56, image.thumb_scores, result,
                       method, 0.5, area=image.area, after=tokens(image, result).shape[0])
    left, top, right, bottom = picture.info["panels"]["canvas"]
    px = np.asarray(picture, dtype=np.float32)
    ys = top + ((np.arange(8) + 0.5) * (bottom - top) / 8).astype(int)
    xs = left + ((np.arange(8) + 0.5) * (right - left) / 8).astype(int)
    cells = px[np.ix_(ys, xs)]  # (8, 8, 3)
    keep, merge = result.crop_keep.numpy(), result.crop_merge.numpy()
    assert (~keep).any() and (merge[~keep] >= 0).all()  # every dropped cell went into a token here
    assert (np.abs(cells[keep] - colour).max(-1) <= 2).all()
    tint = np.asarray(colour) * (1 - vis.MERGE_TINT) + vis.MERGE_COLOURS[merge[~keep] % len(vis.MERGE_COLOURS)] * vis.MERGE_TINT
    assert (np.abs(cells[~keep] - tint).max(-1) <= 2).all()


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_dtype(method, dtype):
    image, _ = peer_case((3, 1), (1000, 333), 6, seed=2, dtype=dtype)
    out = globalcom2.compress([image], method, 0.25)[0]
    assert tokens(image, out).dtype == dtype and torch.isfinite(tokens(image, out).float()).all()
    ref_image = peer_case((3, 1), (1000, 333), 6, seed=2)[0]
    ref = globalcom2.compress([ref_image], method, 0.25)[0]
    # the [CLS] attention is float32 whatever the tower's dtype: the same tokens are kept, the same count emitted
    assert torch.equal(out.crop_keep, ref.crop_keep) and torch.equal(out.thumb_keep, ref.thumb_keep)
    assert tokens(image, out).shape[0] == tokens(ref_image, ref).shape[0]


@pytest.mark.parametrize("method", PEERS)
def test_batch_equals_one_at_a_time_and_is_deterministic(method):
    images = [peer_case(g, s, 6, seed=k)[0] for k, (g, s) in enumerate([((2, 2), (640, 480)), ((1, 3), (300, 1280))])]
    batch = globalcom2.compress(images, method, 0.1)
    for image, b in zip(images, batch):
        one = globalcom2.compress([image], method, 0.1)[0]
        assert torch.equal(tokens(image, b), tokens(image, one)) and torch.equal(b.crop_keep, one.crop_keep)


def test_visionzip_needs_the_projector():
    image, _ = peer_case((2, 1), (200, 100), 4, seed=0)
    image.project = None
    with pytest.raises(ValueError, match="project"):
        globalcom2.compress([image], "visionzip", 0.5)


def extras(method, out, C):
    """Tokens of the default layout with no grid position: VisionZip's [CLS] and contextual tokens of every
    crop, PruMerge+'s extra token of every tile (the thumbnail's kept tokens are counted in thumb_keep)."""
    if method == "visionzip":
        return C * (1 + globalcom2.visionzip.visionzip_split(8)[1])
    return 1 + C if method == "prumerge+" else 0


@pytest.mark.parametrize("method", PEERS)
def test_empty_crops_and_no_valid_area(method):
    """1 x 3 grids of wide images: top and bottom crops all padding (900 x 500), or no valid row at all
    (900 x 200). The published selection runs on every tile; the default drops what lies in padding."""
    for size, n_rows in (((900, 500), 2), ((900, 200), 0)):
        image, _ = peer_case((1, 3), size, 4, seed=1)
        out = globalcom2.compress([image], method, 0.5)[0]
        assert torch.isfinite(tokens(image, out)).all()
        if method.endswith("-paper"):
            if method.startswith(("fastervlm", "visionzip")):
                assert tokens(image, out).shape[0] == 4 * 8  # T = 8 in each tile
            elif method == "prumerge+-paper":  # no unpadding: every tile's tokens and its extra token
                assert tokens(image, out).shape[0] == len(out.thumb_keep) + int(out.crop_keep.sum()) + 4
            else:  # hired-paper: what its (transposed) unpadding leaves, no newlines
                assert tokens(image, out).shape[0] == len(out.thumb_keep) + int(out.crop_keep.sum())
        else:
            assert not (out.crop_keep & ~area_mask(image.area, out.crop_keep.shape, 'cpu')).any()
            expected = len(out.thumb_keep) + int(out.crop_keep.sum()) + n_rows + extras(method, out, 3)
            if method == "visionzip":
                expected = 8 + int(out.crop_keep.sum()) + n_rows + extras(method, out, 3)  # thumbnail: T tokens
            assert tokens(image, out).shape[0] == expected


ACCELERATORS = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if ok]


@pytest.mark.skipif(not ACCELERATORS, reason="no accelerator")
@pytest.mark.parametrize("method", PEERS)
def test_accelerator_matches_cpu(method):
    for k, (grid, size) in enumerate([((2, 2), (640, 480)), ((3, 1), (1000, 333)), ((1, 2), (300, 1280))]):
        for side in (6, 24):
            image, _ = peer_case(grid, size, side, seed=k)
            on_cpu = globalcom2.compress([image], method, 0.25)[0]
            cpu_image = peer_case(grid, size, side, seed=k)[0]
            dev = ACCELERATORS[0]
            image.thumb, image.crops, image.newline = image.thumb.to(dev), image.crops.to(dev), image.newline.to(dev)
            image.probes = {need: p.to(dev) for need, p in image.probes.items()}
            out = globalcom2.compress([image], method, 0.25)[0]
            assert tokens(image, out).device.type == dev
            assert torch.equal(out.crop_keep.cpu(), on_cpu.crop_keep) and torch.equal(out.thumb_keep.cpu(), on_cpu.thumb_keep)
            torch.testing.assert_close(tokens(image, out).cpu(), tokens(cpu_image, on_cpu))  # merging sums may round differently
