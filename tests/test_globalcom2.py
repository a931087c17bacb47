"""Tests of the GlobalCom2 compression stage: hand-worked cases, references written here, invariants.

Features encode their own position so an emitted sequence can be read back: a thumbnail token is
[1, row, col] (row, col in the thumbnail), a crop token [0, y, x] (its true place in the H x W crop
grid) and the newline [-1, -1, -1].
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from globalcom2 import STAGE_METHODS, ImageFeatures, compress, compress_image
from globalcom2.layout import area_mask
from globalcom2.peers import PEERS
from minillava.layout import uncompressed_length, unpad_area
from tests.peers_cases import tokens

# GlobalCom2's methods; the peers are tested in tests/test_peers*.py, the NAME-attn and NAME-sim variants
# (the same algorithms with another token score) in tests/test_scores.py
OWN = [m for m in STAGE_METHODS if m not in PEERS and not m.endswith(("-attn", "-sim"))]

NEWLINE = torch.tensor([-1.0, -1.0, -1.0])
NL = "NL"


def position_features(grid, side):
    """Thumbnail (P, 3) and crops (C, P, 3) whose values are their own positions."""
    gw, gh = grid
    P = side * side
    pos = torch.arange(P)
    thumb = torch.stack([torch.ones(P), pos // side, pos % side], dim=1).float()
    crops = torch.zeros(gw * gh, P, 3)
    for c in range(gw * gh):
        crops[c, :, 1] = (c // gw) * side + pos // side
        crops[c, :, 2] = (c % gw) * side + pos % side
    return thumb, crops


def read_back(tokens, side):
    """Decode an emitted sequence: ("T", thumbnail position), (y, x) for a crop token, or NL."""
    out = []
    for kind, a, b in tokens.float().tolist():
        if kind == 1:
            out.append(("T", int(a) * side + int(b)))
        elif kind == -1:
            out.append(NL)
        else:
            out.append((int(a), int(b)))
    return out


def valid(image):
    """The unpadded area as an (H, W) mask."""
    gw, gh = image.grid
    side = math.isqrt(image.thumb.shape[0])
    return area_mask(image.area, (gh * side, gw * side), image.thumb.device)


def random_image(grid, size, side, seed, dtype=torch.float32):
    """Position-encoding features with random (tie-free) [CLS] scores."""
    gen = torch.Generator().manual_seed(seed)
    gw, gh = grid
    thumb, crops = position_features(grid, side)
    return ImageFeatures(
        thumb=thumb.to(dtype),
        crops=crops.to(dtype),
        thumb_scores=torch.randn(side * side, generator=gen) * 3,
        crop_scores=torch.randn(gw * gh, side * side, generator=gen) * 3,
        grid=grid,
        size=size,
        area=unpad_area(grid, size, side),
        newline=NEWLINE.to(dtype),
    )


# (grid, size) pairs: square, wide, tall, very wide/tall, 3 x 1, 1 x 3, and a 3 x 2 grid whose first
# crop column is all padding (the published piece walk then never advances its row offset).
CASES = [
    ((2, 2), (100, 100)),
    ((2, 2), (100, 60)),
    ((2, 2), (60, 100)),
    ((2, 2), (1000, 333)),
    ((2, 1), (640, 300)),
    ((1, 2), (313, 640)),
    ((3, 1), (1000, 301)),
    ((1, 3), (250, 900)),
    ((1, 3), (900, 500)),
    ((3, 2), (40, 100)),
    ((2, 2), (777, 501)),
]
SIDES = (4, 6)


def all_cases():
    return [(grid, size, side, seed) for seed, (grid, size) in enumerate(CASES) for side in SIDES]


# ---------------------------------------------------------------------------------------------
# The hand-worked case: side 4 (P = 16), grid 2 x 2 (H = W = 8), a wide image (100 x 60), r = 0.5.
#
# Unpad: 100/60 > 8/8, new_h = int(60 * 8/100) = int(4.8) = 4, pad = (8 - 4) // 2 = 2: grid rows
# 2..5 valid, all 8 columns. Crops 0, 1 show their tile rows 2, 3; crops 2, 3 their tile rows 0, 1.
# N_c = 8 for every crop.
#
# Thumbnail scores (a permutation of 0..15):
#     15 14  3  2
#     13 12  1  0
#      4  5  8  9
#      6  7 10 11
# Step 1: k0 = int(16 * 0.5) = 8, descending: 15@0 14@1 13@4 12@5 11@15 10@14 9@11 8@10.
# Step 2: regions are the 2 x 2 quadrants, s = [54, 6, 22, 38]; (s - 54)/10 = [0, -4.8, -3.2, -1.6];
#   e = [1, .0082297, .0407622, .2018965], sum 1.2508885 (+1e-8);
#   p = [.7994318, .0065791, .0325866, .1614025], mean(p) = .25;
#   scale = .5 * (1 + p - .25) = [.7747159, .3782896, .3912933, .4557012];
#   k_c = int(8 * scale) = [int(6.20), int(3.03), int(3.13), int(3.65)] = [6, 3, 3, 3].
# Step 3.4: the valid area is 4 x 8; the map's rows are kept (4 -> 4) and each row of 4 becomes 8:
#   [t0, .75t0+.25t1, .25t0+.75t1, .75t1+.25t2, .25t1+.75t2, .75t2+.25t3, .25t2+.75t3, t3].
#   Map rows 0-1 go to crops 0, 1 (2 rows each), rows 2-3 to crops 2, 3:
#   row 0: 15  14.75 14.25 11.25 | 5.75 2.75 2.25 2       row 2: 4 4.25 4.75 5.75 | 7.25 8.25 8.75 9
#   row 1: 13  12.75 12.25  9.25 | 3.75  .75  .25 0       row 3: 6 6.25 6.75 7.75 | 9.25 10.25 10.75 11
#   so, by valid index v (raster order over the crop's valid 2 x 4), the global order is
#   crop 0: v0 v1 v2 v4 v5 v6 v3 v7;  crop 1: v0 v4 v1 v2 v3 ...;  crops 2, 3: v7 v6 v5 v4 v3 ...
# Local scores: 100 on every padded position (must be ignored); on the valid ones a single 1
# (crop 0 at v7, crop 2 at v0, crop 3 at v3) and 0 elsewhere; crop 1 all 0 (norm floored: 0).
#   After normalisation the single 1 adds 1 to its token, more than any gap of the normalised
#   global scores (all positive, each < 1), so that token ranks first, then the global order:
#   crop 0 keeps v7 + v0 v1 v2 v4 v5 -> tile positions 8 9 10 12 13 15 -> grid (2,0)(2,1)(2,2)(3,0)(3,1)(3,3)
#   crop 1 keeps v0 v4 v1            -> tile 8 12 9   -> grid (2,4)(3,4)(2,5)
#   crop 2 keeps v0 + v7 v6          -> tile 0 7 6    -> grid (4,0)(5,3)(5,2)
#   crop 3 keeps v3 + v7 v6          -> tile 3 7 6    -> grid (4,7)(5,7)(5,6)
# Step 4, globalcom2: rows 2..5 in raster order, a newline after each.
# globalcom2-paper: crops 0, 1 have their kept valid indices placed in tile slots v (rows 0-1 of
#   the tile = grid rows 0-1 instead of 2-3); crops 2, 3 are unchanged (v = true position); a
#   newline after each of the 8 grid rows. Grid rows 2, 3, 6, 7 then hold only their newline.
# ---------------------------------------------------------------------------------------------

HAND_THUMB_SCORES = [15, 14, 3, 2, 13, 12, 1, 0, 4, 5, 8, 9, 6, 7, 10, 11]
HAND_THUMB_KEEP = [0, 1, 4, 5, 15, 14, 11, 10]
HAND_SCALES = [0.7747159, 0.3782896, 0.3912933, 0.4557012]
HAND_CROP_KEEP = {
    0: [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 3)],
    1: [(2, 4), (2, 5), (3, 4)],
    2: [(4, 0), (5, 2), (5, 3)],
    3: [(4, 7), (5, 6), (5, 7)],
}
HAND_THUMB = [("T", p) for p in HAND_THUMB_KEEP]
HAND_GLOBALCOM2 = HAND_THUMB + [
    (2, 0), (2, 1), (2, 2), (2, 4), (2, 5), NL,
    (3, 0), (3, 1), (3, 3), (3, 4), NL,
    (4, 0), (4, 7), NL,
    (5, 2), (5, 3), (5, 6), (5, 7), NL,
]  # fmt: skip
HAND_PAPER = HAND_THUMB + [
    (2, 0), (2, 1), (2, 2), (2, 4), (2, 5), NL,  # grid row 0: crop 0 slots 0-2, crop 1 slots 0-1
    (3, 0), (3, 1), (3, 3), (3, 4), NL,  # grid row 1: crop 0 slots 4, 5, 7, crop 1 slot 4
    NL,  # grid row 2: padding in truth, empty slots here
    NL,  # grid row 3
    (4, 0), (4, 7), NL,
    (5, 2), (5, 3), (5, 6), (5, 7), NL,
    NL,  # grid row 6: padding
    NL,  # grid row 7: padding
]  # fmt: skip
HAND_NONE = [("T", p) for p in range(16)] + [
    item for y in range(2, 6) for item in [(y, x) for x in range(8)] + [NL]
]


def hand_image():
    thumb, crops = position_features((2, 2), 4)
    crop_scores = torch.full((4, 16), 100.0)  # padded positions: must be ignored
    crop_scores[0, 8:] = 0
    crop_scores[0, 15] = 1  # v7
    crop_scores[1, 8:] = 0
    crop_scores[2, :8] = 0
    crop_scores[2, 0] = 1  # v0
    crop_scores[3, :8] = 0
    crop_scores[3, 3] = 1  # v3
    return ImageFeatures(
        thumb=thumb,
        crops=crops,
        thumb_scores=torch.tensor(HAND_THUMB_SCORES, dtype=torch.float32),
        crop_scores=crop_scores,
        grid=(2, 2),
        size=(100, 60),
        area=unpad_area((2, 2), (100, 60), 4),
        newline=NEWLINE,
    )


def test_unpad_area_by_hand():
    assert unpad_area((2, 2), (100, 60), 4) == (2, 6, 0, 8)
    assert unpad_area((2, 2), (60, 100), 4) == (0, 8, 2, 6)
    assert unpad_area((2, 2), (100, 100), 4) == (0, 8, 0, 8)
    # 672 x 672 grid of a 1000 x 333 image: new_h = int(333 * 48/1000) = int(15.984) = 15, pad 16
    assert unpad_area((2, 2), (1000, 333), 24) == (16, 32, 0, 48)


def test_hand_worked_case():
    image = hand_image()
    none, ours, paper = (compress([image], m, 0.5)[0] for m in ("none", "globalcom2", "globalcom2-paper"))

    assert read_back(tokens(image, none), 4) == HAND_NONE
    assert uncompressed_length(image.area, 4) == 16 + 4 * 9

    for result in (ours, paper):
        assert result.thumb_keep.tolist() == HAND_THUMB_KEEP
        assert result.crop_ratio.tolist() == pytest.approx(HAND_SCALES, abs=1e-6)
        kept = {tuple(p) for p in result.crop_keep.nonzero().tolist()}
        assert kept == {p for ps in HAND_CROP_KEEP.values() for p in ps}
        assert valid(image).nonzero()[:, 0].unique().tolist() == [2, 3, 4, 5]
    assert read_back(tokens(image, ours), 4) == HAND_GLOBALCOM2
    assert read_back(tokens(image, paper), 4) == HAND_PAPER


def test_hand_worked_paper_placement_tall():
    """Column padding: the published placement packs each crop's valid 4 x 2 block into its tile rows.

    Size 60 x 100: new_w = int(60 * 8/100) = 4, pad 2, grid columns 2..5 valid. Crop 0 shows tile
    columns 2, 3, so its valid tokens v0..v7 are grid (0,2)(0,3)(1,2)(1,3)(2,2)(2,3)(3,2)(3,3); with
    every token kept, the paper code puts v0..v3 in tile row 0 and v4..v7 in tile row 1. Crop 1
    shows tile columns 0, 1 (grid columns 4, 5), likewise.
    """
    image = hand_image()
    image.size = (60, 100)
    image.area = unpad_area(image.grid, image.size, 4)
    paper = compress_image(image, "globalcom2-paper", 0.5, scales=[1.0] * 4)

    def block(y, x):  # the two true rows y, y+1 of a valid 2-column block starting at column x
        return [(y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)]

    expected = HAND_THUMB + (
        block(0, 2) + block(0, 4) + [NL]
        + block(2, 2) + block(2, 4) + [NL]
        + [NL, NL]
        + block(4, 2) + block(4, 4) + [NL]
        + block(6, 2) + block(6, 4) + [NL]
        + [NL, NL]
    )  # fmt: skip
    assert read_back(tokens(image, paper), 4) == expected

    ours = compress_image(image, "globalcom2", 0.5, scales=[1.0] * 4)
    assert read_back(tokens(image, ours), 4) == HAND_THUMB + [
        item for y in range(8) for item in [(y, x) for x in range(2, 6)] + [NL]
    ]


# ---------------------------------------------------------------------------------------------
# References written here, independent of the package.
# ---------------------------------------------------------------------------------------------


def reference_pack(thumb, crops, grid, size, newline, side):
    """transformers' `pack_image_features` for one image (with LLaVA's int() truncation in unpad)."""
    gw, gh = grid
    w0, h0 = size
    feature = crops.view(gh, gw, side, side, -1)
    feature = feature.permute(4, 0, 2, 1, 3).contiguous()  # (D, gh, side, gw, side)
    feature = feature.flatten(1, 2).flatten(2, 3)  # (D, H, W)
    H, W = feature.shape[1:]
    if w0 / h0 > W / H:
        pad = (H - int(h0 * (W / w0))) // 2
        feature = feature[:, pad : H - pad, :]
    else:
        pad = (W - int(w0 * (H / h0))) // 2
        feature = feature[:, :, pad : W - pad]
    feature = torch.cat((feature, newline[:, None, None].expand(*feature.shape[:-1], 1)), dim=-1)
    feature = feature.flatten(1, 2).transpose(0, 1)
    return torch.cat((thumb, feature), dim=0)


def reference_scales(thumb_scores, grid, r):
    """Step 2 with Python loops and floats."""
    gw, gh = grid
    side = math.isqrt(len(thumb_scores))
    ph, pw = max(side // gh, 1), max(side // gw, 1)
    sums = [0.0] * (gw * gh)
    for idx, score in enumerate(thumb_scores.tolist()):
        i, j = divmod(idx, side)
        sums[min(i // ph, gh - 1) * gw + min(j // pw, gw - 1)] += score
    e = [math.exp((s - max(sums)) / 10) for s in sums]
    p = [x / (sum(e) + 1e-8) for x in e]
    return [min(r * (1 + x - sum(p) / len(p)), 1.0) for x in p]


def reference_paper(image, r):
    """The published algorithm as docs/globalcom2.md states it (steps 1-4), with loops, per crop and per token."""
    P, D = image.thumb.shape
    side = math.isqrt(P)
    gw, gh = image.grid
    H, W = gh * side, gw * side
    w0, h0 = image.size
    order = sorted(range(P), key=lambda i: -image.thumb_scores[i].item())
    out = [image.thumb[i] for i in order[: int(P * r)]]
    scales = reference_scales(image.thumb_scores, image.grid, r)

    valid = [[False] * W for _ in range(H)]
    if w0 / h0 > W / H:
        pad = (H - int(h0 * (W / w0))) // 2
        for y in range(pad, H - pad):
            valid[y] = [True] * W
    else:
        pad = (W - int(w0 * (H / h0))) // 2
        for y in range(H):
            for x in range(pad, W - pad):
                valid[y][x] = True
    rows = [y for y in range(H) if any(valid[y])]
    cols = [x for x in range(W) if any(valid[y][x] for y in range(H))]
    cur_h, cur_w = len(rows), len(cols)

    dims, tokens = [], []  # per crop: (w_c, h_c); its valid (tile position) list in raster order
    for c in range(gw * gh):
        y0, x0 = (c // gw) * side, (c % gw) * side
        pos = [p for p in range(side * side) if valid[y0 + p // side][x0 + p % side]]
        tokens.append(pos)
        h_c = len({p // side for p in pos})
        w_c = len({p % side for p in pos})
        dims.append((w_c, h_c))

    resized = F.interpolate(
        image.thumb_scores.float().view(1, 1, side, side), size=(cur_h, cur_w), mode="bilinear", align_corners=False
    )[0, 0]
    pieces, row_at = [], 0
    for i in range(gh):
        col_at = 0
        for j in range(gw):
            w_c, h_c = dims[i * gw + j]
            pieces.append(resized[row_at : row_at + h_c, col_at : col_at + w_c].flatten())
            col_at += w_c
        row_at += dims[i * gw][1]

    placed = torch.zeros(gw * gh, P, D, dtype=image.crops.dtype)
    occupied = [[False] * P for _ in range(gw * gh)]
    for c in range(gw * gh):
        local = image.crop_scores[c, tokens[c]].float()
        score = F.normalize(local, dim=0) + F.normalize(pieces[c], dim=0)
        k = int(len(tokens[c]) * scales[c])
        for v in torch.topk(score, k).indices.tolist():
            placed[c, v] = image.crops[c, tokens[c][v]]
            occupied[c][v] = True

    for y in range(H):
        for x in range(W):
            c, slot = (y // side) * gw + x // side, (y % side) * side + x % side
            if occupied[c][slot]:
                out.append(placed[c, slot])
        out.append(image.newline)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Invariants on many shapes.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,size,side,seed", all_cases())
def test_none_is_pack_image_features(grid, size, side, seed):
    gen = torch.Generator().manual_seed(seed)
    gw, gh = grid
    P, D = side * side, 5
    image = ImageFeatures(
        thumb=torch.randn(P, D, generator=gen),
        crops=torch.randn(gw * gh, P, D, generator=gen),
        thumb_scores=torch.randn(P, generator=gen),
        crop_scores=torch.randn(gw * gh, P, generator=gen),
        grid=grid,
        size=size,
        area=unpad_area(grid, size, side),
        newline=torch.randn(D, generator=gen),
    )
    result = compress([image], "none")[0]
    expected = reference_pack(image.thumb, image.crops, grid, size, image.newline, side)
    assert torch.equal(tokens(image, result), expected)
    assert uncompressed_length(image.area, side) == len(expected)
    assert result.thumb_keep.tolist() == list(range(P))
    assert torch.equal(result.crop_keep, valid(image))


@pytest.mark.parametrize("grid,size,side,seed", all_cases())
def test_unit_scales_give_none(grid, size, side, seed):
    image = random_image(grid, size, side, seed)
    none = compress_image(image, "none")
    for r in (1.0, 0.3):
        ours = compress_image(image, "globalcom2", r, scales=[1.0] * (grid[0] * grid[1]))
        k0 = int(side * side * r)
        assert torch.equal(tokens(image, ours)[k0:], tokens(image, none)[side * side :])
        assert torch.equal(ours.crop_keep, valid(image))


@pytest.mark.parametrize("grid,size,side,seed", all_cases())
def test_paper_mode_matches_reference(grid, size, side, seed):
    image = random_image(grid, size, side, seed)
    for r in (1.0, 0.5, 0.25, 0.1):
        result = compress_image(image, "globalcom2-paper", r)
        assert torch.equal(tokens(image, result), reference_paper(image, r))


@pytest.mark.parametrize("method", [m for m in OWN if m != "none"])
@pytest.mark.parametrize("r", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_kept_counts(method, r):
    for grid, size, side, seed in all_cases():
        image = random_image(grid, size, side, seed)
        result = compress_image(image, method, r, seed=seed)
        P = side * side
        assert len(result.thumb_keep) == int(P * r)
        expected_ratios = [r] * (grid[0] * grid[1]) if method in ("uniform", "random") else reference_scales(image.thumb_scores, grid, r)
        assert result.crop_ratio.tolist() == pytest.approx(expected_ratios, rel=1e-12)
        per_crop = valid(image).view(grid[1], side, grid[0], side).transpose(1, 2).reshape(-1, P)  # (C, P)
        keep = result.crop_keep.view(grid[1], side, grid[0], side).transpose(1, 2).reshape(-1, P)
        for c in range(grid[0] * grid[1]):
            n_c = int(per_crop[c].sum())
            assert int(keep[c].sum()) == int(n_c * result.crop_ratio[c].item())
        assert not (result.crop_keep & ~valid(image)).any()
        assert torch.isfinite(tokens(image, result)).all()


@pytest.mark.parametrize("method", ["globalcom2", "uniform", "local-only", "global-only", "random"])
def test_corrected_layout(method):
    """Kept crop tokens at their true places, raster order, a newline closing each unpadded row."""
    for grid, size, side, seed in all_cases():
        image = random_image(grid, size, side, seed)
        for r in (0.5, 0.1):
            result = compress_image(image, method, r, seed=seed)
            rows = valid(image).any(dim=1).nonzero()[:, 0].tolist()
            expected = [("T", p) for p in result.thumb_keep.tolist()]
            for y in rows:
                expected += [(y, x) for x in result.crop_keep[y].nonzero()[:, 0].tolist()] + [NL]
            assert read_back(tokens(image, result), side) == expected


def test_both_modes_select_the_same():
    for grid, size, side, seed in all_cases():
        image = random_image(grid, size, side, seed)
        for r in (1.0, 0.25):
            ours = compress_image(image, "globalcom2", r)
            paper = compress_image(image, "globalcom2-paper", r)
            assert torch.equal(ours.thumb_keep, paper.thumb_keep)
            assert torch.equal(ours.crop_keep, paper.crop_keep)
            assert torch.equal(ours.crop_ratio, paper.crop_ratio)
            ours_tokens = Counter(t for t in read_back(tokens(image, ours), side) if t != NL)
            paper_tokens = Counter(t for t in read_back(tokens(image, paper), side) if t != NL)
            assert ours_tokens == paper_tokens
            assert read_back(tokens(image, paper), side).count(NL) == grid[1] * side


@pytest.mark.parametrize("method", OWN)
def test_batch_equals_one_at_a_time(method):
    images = [random_image(grid, size, side, seed) for grid, size, side, seed in all_cases()[::3]]
    batch = compress(images, method, 0.25, seed=7)
    for image, together in zip(images, batch):
        alone = compress([image], method, 0.25, seed=7)[0]
        assert torch.equal(tokens(image, together), tokens(image, alone))
        assert torch.equal(together.thumb_keep, alone.thumb_keep)
        assert torch.equal(together.crop_keep, alone.crop_keep)


@pytest.mark.parametrize("ratio", [0.0, -0.25, 1.0001, 2, float("nan"), float("inf"), "half"])
def test_ratio_outside_range_is_refused(ratio):
    image = hand_image()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        compress([image], "globalcom2", ratio)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError) as error:
        compress([hand_image()], "globalcom3")
    assert all(m in str(error.value) for m in STAGE_METHODS)


def test_shape_mismatch_is_refused():
    image = hand_image()
    image.grid = (3, 1)
    with pytest.raises(ValueError, match="crops"):
        compress([image], "globalcom2", 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", OWN)
def test_low_precision_features(dtype, method):
    for grid, size, side, seed in all_cases()[:8]:
        image = random_image(grid, size, side, seed)
        low = random_image(grid, size, side, seed, dtype=dtype)
        expected = compress_image(image, method, 0.25, seed=seed)
        result = compress_image(low, method, 0.25, seed=seed)
        assert tokens(low, result).dtype == dtype
        assert torch.equal(tokens(low, result).float(), tokens(image, expected))  # positions are exact in 16 bits
        # scores in the same low precision: runs, keeps the same counts, stays finite
        low.thumb_scores, low.crop_scores = low.thumb_scores.to(dtype), low.crop_scores.to(dtype)
        result = compress_image(low, method, 0.25, seed=seed)
        assert tokens(low, result).dtype == dtype and torch.isfinite(tokens(low, result).float()).all()
        assert len(result.thumb_keep) == len(expected.thumb_keep)


def test_random_is_seeded():
    image = random_image((2, 2), (777, 501), 6, 0)
    a = compress_image(image, "random", 0.3, seed=1)
    b = compress_image(image, "random", 0.3, seed=1)
    c = compress_image(image, "random", 0.3, seed=2)
    assert torch.equal(tokens(image, a), tokens(image, b))
    assert not torch.equal(a.crop_keep, c.crop_keep)
    assert a.thumb_keep.tolist() == sorted(a.thumb_keep.tolist())  # raster order
    # independent of the scores: only the seed decides
    image.crop_scores = -image.crop_scores
    assert torch.equal(tokens(image, compress_image(image, "random", 0.3, seed=1)), tokens(image, a))


def test_ties_are_broken_by_raster_order():
    image = hand_image()
    image.thumb_scores = torch.zeros(16)
    image.crop_scores = torch.zeros(4, 16)
    result = compress_image(image, "globalcom2", 0.5)
    assert result.thumb_keep.tolist() == list(range(8))
    # equal sums: every scale is exactly r, k_c = 4: the first 4 valid tokens of each crop
    assert result.crop_ratio.tolist() == [0.5] * 4
    kept = result.crop_keep.nonzero().tolist()
    assert kept == [[2, x] for x in range(8)] + [[4, x] for x in range(8)]


def test_empty_crops_and_zero_budgets():
    """A 1 x 3 grid of a wide image: the top and bottom crops are all padding (N_c = 0)."""
    image = random_image((1, 3), (900, 500), 4, 3)
    assert unpad_area((1, 3), (900, 500), 4) == (5, 7, 0, 4)  # new_h = int(500 * 4/900) = 2, pad 5
    for method in OWN:
        for r in (1.0, 0.05):  # at 0.05: k0 = 0 and every k_c = 0
            result = compress_image(image, method, r, seed=1)
            assert torch.isfinite(tokens(image, result)).all()
            assert not (result.crop_keep & ~valid(image)).any()
            if r < 0.1 and method != "none":
                n_rows = 12 if method == "globalcom2-paper" else 2
                assert read_back(tokens(image, result), 4) == [NL] * n_rows


def test_no_valid_area():
    """An extreme aspect ratio leaves no valid row (new_h = int(200 * 4/900) = 0): nothing to keep."""
    image = random_image((1, 3), (900, 200), 4, 3)
    assert unpad_area((1, 3), (900, 200), 4) == (6, 6, 0, 4)
    for method in OWN:
        result = compress_image(image, method, 0.5, seed=1)
        assert not result.crop_keep.any()
        crop_part = read_back(tokens(image, result), 4)[len(result.thumb_keep) :]
        assert crop_part == ([NL] * 12 if method == "globalcom2-paper" else [])


ACCELERATORS = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if ok]


@pytest.mark.skipif(not ACCELERATORS, reason="no accelerator")
@pytest.mark.parametrize("method", OWN)
def test_accelerator_matches_cpu(method):
    for grid, size, side, seed in all_cases()[:8]:
        image = random_image(grid, size, side, seed)
        on_cpu = compress_image(image, method, 0.25, seed=seed)
        moved = ImageFeatures(
            *(t.to(ACCELERATORS[0]) for t in (image.thumb, image.crops, image.thumb_scores, image.crop_scores)),
            grid=image.grid,
            size=image.size,
            area=image.area,
            newline=image.newline.to(ACCELERATORS[0]),
        )
        result = compress_image(moved, method, 0.25, seed=seed)
        assert tokens(moved, result).device.type == ACCELERATORS[0]
        assert torch.equal(tokens(moved, result).cpu(), tokens(image, on_cpu))
