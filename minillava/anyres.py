"""AnyRes tiling for LLaVA-NeXT: load an image, pick a grid resolution, cut it into CLIP-sized tiles.

An image of size (w0, h0) becomes 1 + gw*gh tiles of tile x tile pixels: a thumbnail of the whole
image, then the crops of a (gw*tile, gh*tile) canvas, row-major. Sizes and pinpoints are (width,
height) throughout, as in the original LLaVA code (transformers uses (height, width)). The pixel
arithmetic follows the original `llava/mm_utils.py` and the CLIP image processor step for step
(PIL bicubic resizes, uint8 -> float64 * 1/255 -> float32, normalise in float32), so the tiles
match theirs exactly.
"""

import io
import math
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from http.client import HTTPException

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import open_regular

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """A user-facing image problem (missing, unreadable, not an image, too large).

    str(e) is one line naming the file/URL and what to do."""


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line, for ImageError messages."""
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


# Image formats PIL may read, everywhere an image is opened (files, URLs, MMBench's base64 cells).
# Plain raster formats decoded inside Pillow (libpng, libjpeg, libwebp, libtiff, its own C code):
# what benchmarks ship (COCO, GQA, TextVQA, VizWiz, MME: JPEG; ScienceQA, MM-Vet: PNG) and what a
# user may hand to `generate` ("JPEG" also opens MPO, a camera JPEG carrying a second picture).
# Anything else is refused before decoding: above all EPS/PS/PDF, which PIL renders by running
# Ghostscript (an interpreter of a programming language) on the file, and the rarely used
# plugins nobody here needs the attack surface of.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # PPM: also PGM, PBM, PNM

# Limits of one download: the whole exchange (DNS, connect, redirects, headers, body) within
# URL_DEADLINE_S seconds, and at most URL_MAX_BYTES of body. 64 MiB is 10 times a 24-megapixel
# JPEG; a server trickling bytes or sending an endless body is stopped by one or the other.
URL_DEADLINE_S = 60.0
URL_MAX_BYTES = 64 * 2**20
_CHUNK = 256 * 1024


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib alone also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl} refused: only http(s) is followed",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, stop: threading.Event) -> bytes:
    """The body behind `url`, read in chunks; stops (OSError) past URL_MAX_BYTES or once `stop` is set."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "minillava"})
    with opener.open(request, timeout=URL_DEADLINE_S) as response:  # per socket operation; the total is _fetch's
        length = response.headers.get("Content-Length", "").strip()
        length = int(length) if length.isdigit() else None
        if length is not None and length > URL_MAX_BYTES:
            raise OSError(f"the server announces {length} bytes, more than the limit of {URL_MAX_BYTES}")
        body = bytearray()
        while not stop.is_set():
            chunk = response.read1(_CHUNK)  # read1: whatever has arrived, so a trickle still returns here
            if not chunk:
                if length is not None and len(body) != length:  # read1, unlike read, does not check this
                    raise OSError(f"the connection closed after {len(body)} of {length} bytes")
                return bytes(body)
            body += chunk
            if len(body) > URL_MAX_BYTES:
                raise OSError(f"the body is larger than the limit of {URL_MAX_BYTES} bytes")
    raise OSError("stopped")


def _fetch(url: str) -> bytes:
    """Download the bytes behind an http(s) URL within URL_DEADLINE_S and URL_MAX_BYTES; every failure,
    a malformed URL included, is an ImageError naming the URL.

    The download runs in a daemon thread that this one waits for at most URL_DEADLINE_S: a socket
    timeout bounds each read, not their sum, and name resolution has no timeout at all. A thread
    given up on stops at its next chunk (it holds at most URL_MAX_BYTES meanwhile).
    """
    hint = "check the URL and your network"
    try:
        if any(c.isspace() or not c.isprintable() for c in url):  # urllib would drop some, http.client refuse others
            raise ValueError("it contains a space or a control character")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http(s)://host/...")
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as e:
        raise ImageError(f"cannot download image {url}: malformed URL ({_one_line(e)}); {hint}") from None
    result, stop = {}, threading.Event()

    def run():
        try:
            result["data"] = _download(url, stop)
        except BaseException as e:  # handed to the waiting thread, which sorts it out
            result["error"] = e

    worker = threading.Thread(target=run, name=f"download {url}", daemon=True)
    worker.start()
    worker.join(URL_DEADLINE_S)
    if worker.is_alive():
        stop.set()
        raise ImageError(f"cannot download image {url}: no complete answer within {URL_DEADLINE_S:g} s; {hint}")
    error = result.get("error")
    if isinstance(error, (OSError, HTTPException, ValueError)):  # URLError/HTTPError and timeouts are OSErrors
        raise ImageError(f"cannot download image {url}: {_one_line(error)}; {hint}") from error
    if error is not None:
        raise error
    return result["data"]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way LLaVA does (`.convert("RGB")`), except 16-bit grayscale.

    Alpha is dropped, not composited: LLaVA feeds `.convert("RGB")` to the model, so transparent pixels
    keep whatever colour they store (transformers' processor composites onto white instead).
    PIL would clip 16-bit values ("I;16*", and "I", which older Pillow uses for 16-bit PNGs) at 255,
    turning almost every pixel white, so those are scaled 0..65535 -> 0..255 first.
    "F" is left to PIL, which reads it as 0..255.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values / 257), 0, 255).astype(np.uint8)  # 65535 / 257 = 255
        image = Image.fromarray(gray, mode="L")
    return image.convert("RGB")


def load_image(source: str) -> Image.Image:
    """Open a local path or an http(s) URL as an upright (EXIF-rotated) RGB image.

    Every problem with the file (missing, not a regular file, not an image in IMAGE_FORMATS,
    truncated, over PIL's pixel limit) or the download is raised as ImageError, so callers can show
    the message as is.
    """
    source = os.fspath(source)
    if source.startswith(("http://", "https://")):
        return decode_image(io.BytesIO(_fetch(source)), source)
    with open_regular(source, ImageError, "image file") as f:
        return decode_image(f, source)


def decode_image(fp, source: str) -> Image.Image:
    """Decode an image from a binary file object, reading only IMAGE_FORMATS, as an upright RGB image;
    every failure is an ImageError naming `source` (a path, URL or a phrase such as "the image of ...")."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as image:
                image.load()  # PIL is lazy: decode now so truncation is caught here
                return _to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"image too large: {source}: {_one_line(e)}; downscale it first "
            "(or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image, or not in a format read here: {source}; pass a PNG, JPEG, WEBP, "
                         "GIF, BMP, TIFF or PPM file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            f"cannot read image {source} ({_one_line(e)}); the file may be damaged: re-save or re-download it"
        ) from e


def select_best_resolution(size: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """Pick the pinpoint (W, H) that shows the (w0, h0) image at the most pixels, then wastes the least.

    Effective pixels are those of the image scaled to fit the pinpoint, capped at the original count
    (upscaling adds nothing); ties keep the first pinpoint in list order.
    """
    w0, h0 = size
    best, best_effective, best_waste = None, 0, math.inf
    for width, height in pinpoints:
        scale = min(width / w0, height / h0)
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = width * height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(width), int(height)), effective, waste
    if best is None:
        raise ValueError(f"no usable pinpoint for an image of size {size} among {pinpoints}")
    return best


def _fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size (w, h) of the image scaled, aspect kept, so one side fills target and the other fits in it."""
    (w0, h0), (width, height) = size, target
    scale_w, scale_h = width / w0, height / h0
    if scale_w < scale_h:
        return width, min(math.ceil(h0 * scale_w), height)
    return min(math.ceil(w0 * scale_h), width), height


def canvas_placement(size: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where AnyRes puts a (w0, h0) image: the canvas (width, height), its best pinpoint, and the box
    (left, top, w, h) the resized image fills on it, centred (odd leftover pixel on the far side)."""
    width, height = select_best_resolution(size, pinpoints)
    new_w, new_h = _fit_size(size, (width, height))
    return (width, height), ((width - new_w) // 2, (height - new_h) // 2, new_w, new_h)


def _normalise(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), rescaled and normalised exactly as CLIP's processor does."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


@dataclass
class Tiles:
    pixels: torch.Tensor  # (1 + gw*gh, 3, tile, tile) float32, normalised; 0 = thumbnail, then crops row-major
    grid: tuple[int, int]  # (gw, gh): columns, rows of crops
    size: tuple[int, int]  # (w0, h0): original image size


def tile_image(
    image: Image.Image,
    pinpoints: list[tuple[int, int]],
    tile: int = 336,
    mean=CLIP_MEAN,
    std=CLIP_STD,
) -> Tiles:
    """Turn an image into LLaVA-NeXT's model input: a thumbnail plus the crops of its best-fit canvas.

    The image is resized (bicubic, aspect kept) to fill the best pinpoint, centred on a black canvas
    (odd leftover pixel on the far side) and cut into tile x tile crops; the thumbnail is the whole
    image squashed to tile x tile.
    """
    bad = [p for p in pinpoints if p[0] % tile or p[1] % tile or p[0] <= 0 or p[1] <= 0]
    if bad:
        raise ValueError(f"pinpoints must be positive multiples of the tile size {tile}; got {bad}")
    if image.mode != "RGB":
        image = _to_rgb(image)
    w0, h0 = image.size
    if w0 == 0 or h0 == 0:
        raise ValueError(f"cannot tile an empty image of size {w0}x{h0}")

    (width, height), (left, top, new_w, new_h) = canvas_placement((w0, h0), pinpoints)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), (left, top))

    gw, gh = width // tile, height // tile
    crops = np.asarray(canvas).reshape(gh, tile, gw, tile, 3)  # (rows, tile, cols, tile, 3)
    crops = crops.transpose(0, 2, 1, 3, 4).reshape(gh * gw, tile, tile, 3)  # row-major crops
    thumbnail = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC))[None]  # (1, tile, tile, 3)
    pixels = np.concatenate([thumbnail, crops])  # (1 + gw*gh, tile, tile, 3) uint8
    return Tiles(pixels=_normalise(pixels, mean, std), grid=(gw, gh), size=(w0, h0))
