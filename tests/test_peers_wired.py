"""HiRED and PruMerge+ wired as compressors: through the tiny model, the `-paper` names emit exactly the
pure functions' published sequences, and the default names place the same selection on the true grid."""

import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2.hired import hired_keep, hired_on_grid, hired_paper_sequence
from globalcom2.layout import area_mask, to_grid
from globalcom2.prumerge import prumerge_merge, prumerge_paper_sequence, prumerge_plus
from minillava.anyres import tile_image
from minillava.compression import encode, stage_inputs
from minillava.layout import unpad_area
from minillava.trust import load_image
from minillava.weights import load_model
from tests import tiny
from tests.peers_cases import peer_case, tokens

SIZES = [(150, 90), (300, 60), (60, 300), (100, 100), (112, 50)]  # 2 x 1, 3 x 1 and 1 x 3 padded, 2 x 2, ...


@pytest.fixture(scope="module")
def images(checkpoints, image_path, tmp_path_factory):
    """The tiny model and its ImageFeatures (every probe) for pictures of several shapes."""
    model = load_model(checkpoints["hub"])
    picture = Image.open(image_path)
    folder = tmp_path_factory.mktemp("shapes")
    tiles = []
    for w, h in SIZES:
        path = folder / f"{w}x{h}.png"
        picture.resize((w, h)).save(path)
        tiles.append(tile_image(load_image(str(path)), model.cfg.grid_pinpoints, tiny.TILE))
    every = tuple(dict.fromkeys(n for m in globalcom2.METHODS for n in globalcom2.needs(m)))
    with torch.no_grad():
        return model, stage_inputs(model, encode(model, tiles, "none", extra=every))


def by_id(result):
    """The tokens a merge map names (globalcom2.Compressed): the published sequence's rows, or else the
    head, the grid cells and the tail one after the other."""
    if result.sequence is not None:
        return result.sequence
    return torch.cat([result.head, result.grid.flatten(0, 1), result.tail])


def valid(image):
    side = int(image.thumb.shape[0] ** 0.5)
    return area_mask(image.area, (image.grid[1] * side, image.grid[0] * side), "cpu")


def true_layout(image, thumb_tokens, crop_tokens, crop_keep, tail):
    """The reference LLaVA-NeXT layout, written plainly: the thumbnail part, then the unpadded crop grid row
    by row (each kept position's token, a newline closing the row), then `tail`.
    crop_tokens (H, W, D), crop_keep (H, W) bool."""
    side = int(image.thumb.shape[0] ** 0.5)
    top, bottom, left, right = unpad_area(image.grid, image.size, side)
    rows = []
    for y in range(top, bottom):
        rows += [crop_tokens[y, x] for x in range(left, right) if crop_keep[y, x]] + [image.newline]
    return torch.stack([*thumb_tokens, *rows, *tail])


@pytest.mark.parametrize("r", [0.5, 0.25, 0.1])
def test_hired_through_the_model(images, r):
    model, features = images
    for image in features:
        keep = hired_keep(image.probes["cls_attn", 0], image.probes["cls_attn", -2], r)
        tiles = torch.cat([image.thumb[None], image.crops])  # (1 + C, P, D)
        paper = globalcom2.compress([image], "hired-paper", r)[0]
        assert torch.equal(tokens(image, paper), hired_paper_sequence(tiles, keep, image.grid, image.size))

        out = globalcom2.compress([image], "hired", r)[0]
        thumb_keep, crop_keep = hired_on_grid(keep, image.grid, image.area)
        assert torch.equal(out.thumb_keep, thumb_keep) and torch.equal(out.crop_keep, crop_keep)
        side = int(image.thumb.shape[0] ** 0.5)
        grid_tokens = to_grid(image.crops, image.grid, side)  # (H, W, D)
        expected = true_layout(image, image.thumb[thumb_keep], grid_tokens, crop_keep, [])
        assert torch.equal(tokens(image, out), expected)
        assert torch.equal(out.crop_ratio, keep[1:].sum(1).double() / keep.shape[1])


def test_prumerge_through_the_model(images):
    model, features = images
    for image in features:
        sel = prumerge_plus(image.probes["cls_attn", -1], image.probes["keys", -1])
        raw = image.probes["hidden", -2][:, 1:]
        with torch.no_grad():
            published = model.projector(prumerge_paper_sequence(sel, raw))
            paper = globalcom2.compress([image], "prumerge+-paper", 0.25)[0]
            out = globalcom2.compress([image], "prumerge+", 0.25)[0]
            merged, extra = prumerge_merge(sel, raw)
            merged, extra = model.projector(merged), model.projector(extra)  # (N, L, D), (N, D)
        torch.testing.assert_close(tokens(image, paper), published, rtol=0, atol=1e-6)  # the projector's rows batched apart
        assert torch.equal(paper.thumb_keep, sel.order[0, : sel.count[0]])

        # The default: the same merged tokens, each at its kept position's true place.
        N, P = sel.kept.shape
        side = int(P**0.5)
        at = torch.zeros(N, P, merged.shape[-1])
        for t in range(N):
            for i in range(int(sel.count[t])):
                at[t, sel.order[t, i]] = merged[t, i]
        thumb_keep = sel.kept[0].nonzero()[:, 0]
        crop_keep = to_grid(sel.kept[1:], image.grid, side)
        in_area = valid(image)
        expected = true_layout(image, [*at[0, thumb_keep], extra[0]], to_grid(at[1:], image.grid, side),
                               crop_keep & in_area, list(extra[1:]))
        torch.testing.assert_close(tokens(image, out), expected, rtol=0, atol=1e-6)
        assert torch.equal(out.thumb_keep, thumb_keep) and torch.equal(out.crop_keep, crop_keep & in_area)
        # every position in a kept token's cluster is shown as merged into a kept token (in the default
        # layout: if that token is emitted, i.e. not in padding), the kept ones into their own
        member = to_grid((sel.weights > 0).any(1)[1:], image.grid, side)
        assert torch.equal(paper.crop_merge >= 0, member)
        assert not (out.crop_merge[~member] >= 0).any()
        for result in (out, paper):  # each kept crop position's place is its own merged token
            place = result.crop_merge[result.crop_keep]
            torch.testing.assert_close(by_id(result)[place], to_grid(at[1:], image.grid, side)[result.crop_keep],
                                       rtol=0, atol=1e-6)


def test_prumerge_ignores_the_ratio():
    image, _ = peer_case((2, 2), (640, 480), 6, seed=3)
    a, b = (globalcom2.compress([image], "prumerge+", r)[0] for r in (1.0, 0.1))
    assert torch.equal(tokens(image, a), tokens(image, b))


@pytest.mark.parametrize("method", ["prumerge+", "prumerge+-paper"])
def test_a_tile_without_outliers(method):
    """Uniform [CLS] attention in crop 1: no outlier (the published code divides by zero); the tile keeps
    position 0, merged with its neighbours, and its extra token."""
    image, _ = peer_case((2, 1), (150, 90), 6, seed=4)
    image.probes["cls_attn", -1][1] = 1 / 37
    out = globalcom2.compress([image], method, 0.5)[0]
    assert torch.isfinite(tokens(image, out)).all()
    crop0 = out.crop_keep[:, :6]  # (6, 6) crop 0 (the grid's left crop)
    if method == "prumerge+-paper":  # padding positions included
        assert crop0.nonzero().tolist() == [[0, 0]]
    else:
        assert crop0.sum() <= 1 and not (crop0 & ~valid(image)[:, :6]).any()


def test_hired_merges_nothing_and_r_1_keeps_everything():
    image, _ = peer_case((1, 2), (300, 1280), 6, seed=5)
    full = globalcom2.compress([image], "hired", 1.0)[0]
    none = globalcom2.compress([image], "none")[0]
    assert torch.equal(tokens(image, full), tokens(image, none)) and full.crop_merge is None


def test_seed_outside_the_generators_range_is_refused():
    image, _ = peer_case((2, 1), (150, 90), 4, seed=0)
    assert tokens(image, globalcom2.compress([image], "random", 0.5, seed=2**63 - 1)[0]).shape[0] > 0
    for seed in (-1, 2**63, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63 - 1\]"):
            globalcom2.compress([image], "random", 0.5, seed=seed)
