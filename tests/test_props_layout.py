"""Properties of the image geometry over every tiling a config may describe and every image size
(tests/strategies.py): where AnyRes puts the image, the unpadded area, OneVision's downscale, the
packed sequence's length, and FastV's map from sequence positions back to the grid (`on_grid`).

Pure functions of sizes: thousands of cases a second, so these run many examples.
"""

import torch
from hypothesis import strategies as st

from globalcom2.layout import area_mask, crop_extents
from minillava.anyres import canvas_placement
from minillava.layout import (crop_grid, downscaled_size, grid_share, on_grid, pack, sequence_places, unpad_area,
                              uncompressed_length)
from tests.strategies import Geometry, budgets, check, geometries, sizes

SIZES = sizes(max_side=1_000_000, max_pixels=1 << 40)  # only arithmetic: any size


def image_case(geometry, size):
    """The crop grid AnyRes picks for `size` and its unpadded area, as the model computes them."""
    (width, height), box = canvas_placement(size, geometry.pinpoints)
    grid = (width // geometry.tile, height // geometry.tile)
    return grid, box, unpad_area(grid, size, geometry.side)


def placement(geometry, size):
    (width, height), (left, top, w, h) = canvas_placement(size, geometry.pinpoints)
    assert (width, height) in geometry.pinpoints
    assert 1 <= w <= width and 1 <= h <= height and (w == width or h == height)  # one side fills it
    assert 0 <= left <= width - w and 0 <= top <= height - h  # on the canvas, centred


@budgets(1000, campaign=10_000)
def test_the_resized_image_lies_on_its_canvas(n):
    check(placement, n, geometry=geometries(), size=SIZES)


def area(geometry, size):
    grid, _, (top, bottom, left, right) = image_case(geometry, size)
    H, W = grid[1] * geometry.side, grid[0] * geometry.side
    assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
    assert (top, bottom) == (0, H) or (left, right) == (0, W)  # padded on two opposite sides at most
    assert top == H - bottom or left == W - right  # centred
    rows, cols = crop_extents((top, bottom, left, right), grid, geometry.side)
    assert rows.sum() * cols.sum() == (bottom - top) * (right - left)


@budgets(1000, campaign=10_000)
def test_the_unpadded_area_is_a_centred_rectangle_of_the_grid(n):
    check(area, n, geometry=geometries(), size=SIZES)


def downscale(geometry, size):
    """OneVision's downscaled grid: never larger, never empty where the area is not (issue 32), and the
    crops' share of it in (0, 1] (what the stage divides its budget by)."""
    _, _, a = image_case(geometry, size)
    h, w = a[1] - a[0], a[3] - a[2]
    h2, w2 = downscaled_size(a, geometry.side, geometry.max_tiles)
    assert 0 <= h2 <= h and 0 <= w2 <= w
    assert (h2 == 0) == (h == 0) and (w2 == 0) == (w == 0)
    assert 0 < grid_share(a, geometry.side, geometry.max_tiles) <= 1


@budgets(1000, campaign=10_000)
def test_the_downscale_keeps_every_side_that_has_a_token(n):
    # found by this test: 1 x 2 tiles of one token under anyres_max_1 downscaled a 1 x 1 image's column away
    smallest = dict(geometry=Geometry(side=1, patch=1, grids=((1, 2),), max_tiles=1), size=(1, 1))
    check(downscale, n, geometry=geometries(downscales=True), size=SIZES, explicit=[smallest])


def sequence(geometry, size, seed):
    """The uncompressed sequence: `pack` gives uncompressed_length tokens; `sequence_places` names each
    one (thumbnail, a cell of the unpadded area, a newline per row), and `on_grid` maps any kept subset
    back to valid, distinct places: every kept thumbnail and grid token has exactly one."""
    grid, _, a = image_case(geometry, size)
    side, max_tiles, P, D = geometry.side, geometry.max_tiles, geometry.side ** 2, 2
    C = grid[0] * grid[1]
    if C * P > 1 << 16:  # the grid's tensors, not only its sizes: keep an example small
        return
    g = torch.Generator().manual_seed(seed)
    crops, thumb = torch.randn(C, P, D, generator=g), torch.randn(P, D, generator=g)
    newline = torch.randn(D, generator=g)
    size2 = downscaled_size(a, side, max_tiles)
    tokens = pack(thumb, crop_grid(crops, grid), a, newline, size=size2 if max_tiles else None)
    n = uncompressed_length(a, side, max_tiles)
    assert tokens.shape == (n, D)
    places = sequence_places(grid, a, side, max_tiles)
    assert places.shape == (n,) and int((places == -1).sum()) == size2[0]
    kept = torch.randperm(n, generator=g)[: int(torch.randint(0, n + 1, (1,), generator=g))].sort().values
    thumb_keep, crop_keep = on_grid(kept, grid, a, side, max_tiles)
    valid = area_mask(a, (grid[1] * side, grid[0] * side), "cpu")
    assert crop_keep.shape == valid.shape and not (crop_keep & ~valid).any()
    assert thumb_keep.unique().numel() == thumb_keep.numel() and bool(((thumb_keep >= 0) & (thumb_keep < P)).all())
    assert len(thumb_keep) + int(crop_keep.sum()) == int((places[kept] >= 0).sum())


@budgets(500, campaign=5000)
def test_every_sequence_position_maps_to_one_valid_place(n):
    check(sequence, n, geometry=geometries(), size=sizes(max_side=20_000), seed=st.integers(0, 2**16))
