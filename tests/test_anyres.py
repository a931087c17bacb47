"""AnyRes tiling: parity with transformers' LLaVA-NeXT processor, resolution choice, image loading.

Finding (original LLaVA vs transformers): the pixel pipeline is the same in both (PIL bicubic for
the canvas resize and the thumbnail, zero padding centred with the odd pixel on the far side,
uint8 -> float64 * 1/255 -> float32, normalise in float32), so with the same pinpoints our tiles
match transformers' bit for bit. Two differences remain, and we follow the original LLaVA:
- Pinpoint order. Both ship the literal list [[336,672],[672,336],...], read as (w, h) by the
  original and as (h, w) by transformers. Images that fit inside 336 x 336 score the same on
  336x672 and 672x336 (effective pixels are capped at the original count, waste is equal),
  so the first entry in the list wins: a tall 1 x 2 grid in the original, a wide 2 x 1 grid in
  transformers. See test_tie_between_first_pinpoints_follows_original_llava.
- Alpha. transformers' convert_to_rgb composites transparency onto white; LLaVA calls
  .convert("RGB"), which drops alpha. Parity is checked on RGB noise, so it is not affected.
"""

import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from minillava.anyres import CLIP_MEAN, CLIP_STD, Tiles, select_best_resolution, tile_image
from minillava.trust import ImageError, load_image

V16_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # LLaVA-1.6, read as (w, h)
HF_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # same literal list, read as (h, w)
HF_AS_WH = [(w, h) for h, w in HF_PINPOINTS]  # transformers' canvases, in our (w, h) convention

SIZES = [(1, 1), (64, 2000), (2000, 64), (337, 336), (800, 500), (1500, 1490), (336, 672), (1000, 333), (673, 1)]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_user_error(excinfo, name: str):
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert name in message, message


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=HF_PINPOINTS,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


# --- parity with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("width,height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_tiles_match_transformers(hf_processor, width, height):
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    image = noise_image(width, height)
    expected = hf_processor(image, return_tensors="np")["pixel_values"][0]  # (1 + n, 3, 336, 336)
    tiles = tile_image(image, HF_AS_WH)

    assert tiles.size == (width, height)
    gw, gh = tiles.grid
    best_h, best_w = hf_select((height, width), HF_PINPOINTS)
    assert (gw, gh) == (best_w // 336, best_h // 336)
    assert get_anyres_image_grid_shape((height, width), HF_PINPOINTS, 336) == (gh, gw)  # (rows, cols)

    assert tiles.pixels.dtype == torch.float32
    assert tuple(tiles.pixels.shape) == expected.shape == (1 + gw * gh, 3, 336, 336)
    per_tile = np.abs(tiles.pixels.numpy() - expected).reshape(len(expected), -1).max(axis=1)
    assert per_tile.max() <= 1e-6, f"{width}x{height}: max abs diff per tile {per_tile.tolist()}"


def test_tie_between_first_pinpoints_follows_original_llava():
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    image = noise_image(300, 200)  # fits in 336 x 336: 336x672 and 672x336 tie
    assert tile_image(image, V16_PINPOINTS).grid == (1, 2)  # original LLaVA: first entry is 336 wide, 672 tall
    assert get_anyres_image_grid_shape((200, 300), HF_PINPOINTS, 336) == (1, 2)  # transformers: 1 row, 2 columns
    assert tile_image(image, HF_AS_WH).grid == (2, 1)


# --- tiling invariants ---------------------------------------------------------------------------


def test_crops_are_row_major_and_padding_is_black():
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], dtype=np.uint8)
    quadrants = np.repeat(np.repeat(colours, 336, axis=0), 336, axis=1)  # (672, 672, 3): 2 x 2 blocks
    tiles = tile_image(Image.fromarray(quadrants), V16_PINPOINTS)
    assert tiles.grid == (2, 2)

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (tiles.pixels[1:] * std + mean) * 255  # (4, 3, 336, 336), back to 0..255
    for crop, colour in zip(pixels, colours.reshape(4, 3)):
        centre = crop[:, 100:236, 100:236].reshape(3, -1)
        assert torch.allclose(centre, torch.tensor(colour, dtype=torch.float32).view(3, 1), atol=1e-3)

    strip = tile_image(Image.new("RGB", (100, 10), (255, 255, 255)), V16_PINPOINTS)  # padded top and bottom
    assert strip.grid == (1, 2)
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1)
    assert torch.allclose(strip.pixels[1, :, :10].reshape(3, -1), black, atol=1e-5)


def test_pinpoints_must_be_multiples_of_the_tile():
    with pytest.raises(ValueError) as excinfo:
        tile_image(noise_image(10, 10), [(336, 672), (500, 336)])
    assert_user_error(excinfo, "(500, 336)")


def test_tile_image_converts_other_modes():
    tiles = tile_image(Image.new("L", (40, 30), 255), V16_PINPOINTS)
    assert isinstance(tiles, Tiles)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(tiles.pixels[0].mean(dim=(1, 2)), white, atol=1e-5)


# --- select_best_resolution ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,pinpoints,best",
    [
        ((800, 500), V16_PINPOINTS, (672, 672)),  # most effective pixels
        ((2000, 64), V16_PINPOINTS, (1008, 336)),
        ((64, 2000), V16_PINPOINTS, (336, 1008)),
        ((100, 100), V16_PINPOINTS, (336, 672)),  # all tie on pixels, first two on waste: list order
        ((100, 100), [(672, 336), (336, 672)], (672, 336)),
        ((100, 100), [(672, 672), (336, 336)], (336, 336)),  # tie on pixels: smaller waste wins
        ((1000, 1000), [(336, 336), (1008, 1008)], (1008, 1008)),
    ],
)
def test_select_best_resolution(size, pinpoints, best):
    assert select_best_resolution(size, pinpoints) == best


# --- load_image ----------------------------------------------------------------------------------


def _palette_image() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 = red
    image.info["transparency"] = 1
    return image


MODES = {  # name: (image, file suffix, expected RGB of pixel (0, 0))
    "L": (Image.new("L", (4, 4), 200), "png", (200, 200, 200)),
    "LA": (Image.new("LA", (4, 4), (200, 0)), "png", (200, 200, 200)),  # alpha dropped, as LLaVA does
    "P": (_palette_image(), "png", (255, 0, 0)),
    "RGBA": (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "png", (10, 20, 30)),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "tiff", (255, 0, 0)),
    "I;16 white": (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), "png", (255, 255, 255)),
    "I;16 mid": (Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16)), "png", (128, 128, 128)),
    "1": (Image.new("1", (4, 4), 1), "png", (255, 255, 255)),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_loads_as_rgb(tmp_path, name):
    image, suffix, expected = MODES[name]
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    assert Image.open(path).mode == name.split()[0]
    loaded = load_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (4, 4)
    assert loaded.getpixel((0, 0)) == expected


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (0, 128, 255)).save(path, exif=exif)
    assert load_image(str(path)).size == (20, 40)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.png")
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\nat all\n")
    with pytest.raises(ImageError) as excinfo:
        load_image(str(path))
    assert_user_error(excinfo, str(path))


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    noise_image(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ImageError) as excinfo:
        load_image(str(path))
    assert_user_error(excinfo, str(path))


def test_decompression_bomb_fails_at_open(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 8000)).save(path)  # 96 M pixels: PIL only warns (limit 89 M, error at 2x)
    assert path.stat().st_size < 100_000

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as excinfo:
        load_image(str(path))
    assert_user_error(excinfo, str(path))
    assert "too large" in str(excinfo.value)


def test_decompression_bomb_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    noise_image(100, 100).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 > 2 * 1000: PIL raises, not warns
    with pytest.raises(ImageError) as excinfo:
        load_image(str(path))
    assert_user_error(excinfo, str(path))


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path on 127.0.0.1 from a background thread; yields the base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_from_url(tmp_path, http_root):
    image = noise_image(30, 20, seed=1)
    image.save(tmp_path / "noise.png")
    loaded = load_image(f"{http_root}/noise.png")
    assert loaded.size == (30, 20)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_url_not_found(http_root):
    url = f"{http_root}/missing.png"
    with pytest.raises(ImageError) as excinfo:
        load_image(url)
    assert_user_error(excinfo, url)
    assert "404" in str(excinfo.value)
