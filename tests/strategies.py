"""Generated inputs for the property tests (hypothesis): model geometries, images of any size and colour
mode the loader reads, retention ratios, and the two budgets every property runs under.

A property test runs twice (`budgets`, `check`): in the default suite derandomized with a few examples
(the profile of tests/conftest.py), and as a longer random campaign under `-m slow` (the documented
command of docs/trust.md, "Property tests").
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from minillava.trust import IMAGE_FORMATS, decode_image

CAMPAIGN_EXAMPLES = 1000  # per property in the slow campaign, unless the test names fewer


@dataclass(frozen=True)
class Budget:
    examples: int
    random: bool  # the campaign's: new random examples every run; else derandomized (tests/conftest.py)


def budgets(default: int, campaign: int = CAMPAIGN_EXAMPLES):
    """Parametrize a property test over its budgets (its argument `n`, a Budget): `default` derandomized
    examples in the default run, and a random campaign of `campaign` examples under `-m slow`."""
    return pytest.mark.parametrize("n", [
        pytest.param(Budget(default, False), id="default"),
        pytest.param(Budget(campaign, True), id="campaign", marks=pytest.mark.slow)])


def check(prop, n: Budget, explicit=(), **strategies):
    """Run the property `prop` (a function of keyword arguments) on `n` examples drawn from `strategies`,
    after the `explicit` ones (dicts of its arguments: the smallest failing examples hypothesis found,
    kept as regressions)."""
    test = given(**strategies)(prop)
    for kwargs in explicit:
        test = example(**kwargs)(test)
    settings(max_examples=n.examples, derandomize=not n.random)(test)()


@dataclass(frozen=True)
class Geometry:
    """How a model tiles: `side` patches of `patch` px per tile side, AnyRes canvases of `grids`
    (gw, gh) tiles, and OneVision's anyres_max (`max_tiles`; None: never downscaled)."""

    side: int
    patch: int
    grids: tuple[tuple[int, int], ...]
    max_tiles: int | None

    @property
    def tile(self) -> int:
        return self.side * self.patch

    @property
    def pinpoints(self) -> list[tuple[int, int]]:
        return [(gw * self.tile, gh * self.tile) for gw, gh in self.grids]


@st.composite
def geometries(draw, downscales: bool | None = None, max_side: int = 6, max_grid: int = 8) -> Geometry:
    """Tile geometries a config.json may describe (small, so a tiny model runs them in milliseconds):
    `downscales` True gives an anyres_max, False none, None either."""
    side = draw(st.integers(1, max_side))
    patch = draw(st.integers(1, 8))
    grids = draw(st.lists(st.tuples(st.integers(1, max_grid), st.integers(1, max_grid)), min_size=1, max_size=6,
                          unique=True))
    wants = draw(st.booleans()) if downscales is None else downscales
    max_tiles = draw(st.integers(1, 12)) if wants else None
    return Geometry(side, patch, tuple(grids), max_tiles)


@st.composite
def sizes(draw, max_side: int = 100_000, max_pixels: int = 1 << 20) -> tuple[int, int]:
    """Image sizes (w, h) from 1 x 1 to max_side a side, any aspect ratio (1 x 100000 included), at most
    max_pixels in all so that an example stays fast."""
    long = draw(log_uniform(max_side))  # as many strips and icons as photos
    short = draw(log_uniform(max(1, min(long, max_pixels // long))))
    return (long, short) if draw(st.booleans()) else (short, long)


@st.composite
def log_uniform(draw, most: int) -> int:
    """An integer in [1, most], each octave [2^k, 2^(k+1)) about as likely as another."""
    k = draw(st.integers(0, most.bit_length() - 1))
    return draw(st.integers(1 << k, min(most, (2 << k) - 1)))


# (mode, format) pairs Pillow writes and the loader (trust.decode_image) reads back: every colour mode
# the allowed formats decode to (1, L, LA, P, PA, RGB, RGBA, CMYK, I;16, I, F, LAB, and through JPEG YCbCr)
MODES = [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"),
         ("I;16", "PNG"), ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("YCbCr", "JPEG"), ("P", "GIF"),
         ("RGB", "BMP"), ("1", "BMP"), ("RGBA", "WEBP"), ("RGB", "PPM"), ("L", "PPM"), ("1", "PPM"),
         ("I", "TIFF"), ("F", "TIFF"), ("CMYK", "TIFF"), ("LAB", "TIFF"), ("PA", "TIFF"), ("I;16B", "TIFF")]
assert {f for _, f in MODES} == set(IMAGE_FORMATS)


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    """An RGB noise picture of `size` (w, h)."""
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(image: Image.Image, mode: str, fmt: str) -> bytes | None:
    """`image` converted to `mode` and written as `fmt`; None where Pillow cannot write it (JPEG's and
    WEBP's 65535 and 16383 px a side, GIF's 65535: not a file a user can have)."""
    try:
        converted = image.convert("L").convert(mode) if mode.startswith(("I;16", "LAB", "PA")) else image.convert(mode)
    except ValueError:
        converted = Image.new(mode, image.size)
    out = io.BytesIO()
    try:
        converted.save(out, format=fmt)
    except (OSError, ValueError, struct.error):  # struct.error: a side past a 16-bit header field
        return None
    return out.getvalue()


@st.composite
def images(draw, max_side: int = 100_000, max_pixels: int = 1 << 20) -> Image.Image:
    """A picture as the loader hands it to the model: noise of a generated size, written in a colour
    mode and format the loader accepts and decoded by it (`trust.decode_image`: upright RGB). Sizes a
    format cannot hold are rejected (`assume`)."""
    size = draw(sizes(max_side, max_pixels))
    mode, fmt = draw(st.sampled_from(MODES))
    data = encoded(noise(size, draw(st.integers(0, 2**16))), mode, fmt)
    assume(data is not None)
    return decode_image(io.BytesIO(data), f"a generated {mode} {fmt}")


def ratios():
    """Retention ratios in (0, 1]: the ends (the smallest float, 1) as likely as the middle."""
    return st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.1, 1e-9, 5e-324]),
                     st.floats(0.0, 1.0, exclude_min=True, allow_subnormal=True))
