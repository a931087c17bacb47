"""AnyRes tiling for LLaVA-NeXT and LLaVA-OneVision, and InternVL's dynamic tiling: pick a grid
resolution for an image, cut it into tower-sized tiles. OneVision's anyres_max_9 tiles exactly so, on its pinpoints (384 x 384 ... 2304 x 2304,
up to 6 x 6 crops) and with SigLIP's normalisation; its difference, the downscale of a large grid, is in
the packing (layout.py).

An image of size (w0, h0) becomes 1 + gw*gh tiles of tile x tile pixels: a thumbnail of the whole
image, then the crops of a (gw*tile, gh*tile) canvas, row-major. Sizes and pinpoints are (width,
height) throughout, as in the original LLaVA code (transformers uses (height, width)). The pixel
arithmetic follows the original `llava/mm_utils.py` and the CLIP image processor step for step
(PIL bicubic resizes, uint8 -> float64 * 1/255 -> float32, normalise in float32), so the tiles
match theirs exactly. Images are opened and decoded by `trust.load_image`.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # LLaVA-OneVision's SigLIP (llava-hf preprocessor_config.json)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternVL's (internvl_chat's dataset.py, the model cards' build_transform)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
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


def closest_grid(size: tuple[int, int], grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """InternVL's choice of (columns, rows) for a (w0, h0) image (its `find_closest_aspect_ratio`, in
    internvl_chat's dataset.py and the model cards): the grid whose aspect ratio is closest to the image's;
    on an exact tie a later grid (more crops) wins while the image has more than half the pixels of its
    canvas. `grids` in InternVL's order (config.internvl_grids)."""
    (w0, h0), area = size, size[0] * size[1]
    aspect, best, best_diff = w0 / h0, (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
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
    pixels: torch.Tensor  # (1 + gw*gh, 3, tile, tile) float32, normalised: the thumbnail at `thumb`, the crops
    # row-major around it
    grid: tuple[int, int]  # (gw, gh): columns, rows of crops; (0, 0) for InternVL's single tile (no crop)
    size: tuple[int, int]  # (w0, h0): original image size
    thumb: int = 0  # the thumbnail's index among the tiles (LLaVA-NeXT and OneVision: first; InternVL: last;
    # config.Family)


def tile_image(
    image: Image.Image,
    pinpoints: list[tuple[int, int]],
    tile: int = 336,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    tiling: str = "anyres",
) -> Tiles:
    """Turn an image into LLaVA-NeXT's model input: a thumbnail plus the crops of its best-fit canvas.

    The image is resized (bicubic, aspect kept) to fill the best pinpoint, centred on a black canvas
    (odd leftover pixel on the far side) and cut into tile x tile crops; the thumbnail is the whole
    image squashed to tile x tile.

    `tiling` "closest-ratio" (InternVL's `dynamic_preprocess`): the pinpoints are its grids times the tile,
    the grid is `closest_grid`'s, the image is squashed (bicubic, aspect not kept, no padding) onto it and
    cut row-major; the thumbnail (the image squashed to one tile) comes after the crops, and where the grid
    is one crop that crop is the thumbnail itself: one tile, `grid` (0, 0).
    """
    bad = [p for p in pinpoints if p[0] % tile or p[1] % tile or p[0] <= 0 or p[1] <= 0]
    if bad:
        raise ValueError(f"pinpoints must be positive multiples of the tile size {tile}; got {bad}")
    if image.mode != "RGB":
        image = to_rgb(image)
    w0, h0 = image.size
    if w0 == 0 or h0 == 0:
        raise ValueError(f"cannot tile an empty image of size {w0}x{h0}")

    if tiling == "closest-ratio":
        return _closest_ratio_tiles(image, pinpoints, tile, mean, std)
    (width, height), (left, top, new_w, new_h) = canvas_placement((w0, h0), pinpoints)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), (left, top))

    gw, gh = width // tile, height // tile
    crops = np.asarray(canvas).reshape(gh, tile, gw, tile, 3)  # (rows, tile, cols, tile, 3)
    crops = crops.transpose(0, 2, 1, 3, 4).reshape(gh * gw, tile, tile, 3)  # row-major crops
    thumbnail = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC))[None]  # (1, tile, tile, 3)
    pixels = np.concatenate([thumbnail, crops])  # (1 + gw*gh, tile, tile, 3) uint8
    return Tiles(pixels=_normalise(pixels, mean, std), grid=(gw, gh), size=(w0, h0))


def _closest_ratio_tiles(image: Image.Image, pinpoints: list[tuple[int, int]], tile: int, mean, std) -> Tiles:
    """InternVL's tiles (`tile_image` with tiling "closest-ratio"): crops row-major, then the thumbnail."""
    gw, gh = closest_grid(image.size, [(w // tile, h // tile) for w, h in pinpoints], tile)
    canvas = np.asarray(image.resize((gw * tile, gh * tile), Image.Resampling.BICUBIC))
    crops = canvas.reshape(gh, tile, gw, tile, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, tile, tile, 3)
    if gw * gh == 1:  # the one crop is the whole image squashed to a tile: the thumbnail, no crop
        return Tiles(pixels=_normalise(crops, mean, std), grid=(0, 0), size=image.size, thumb=0)
    thumbnail = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC))[None]  # (1, tile, tile, 3)
    pixels = np.concatenate([crops, thumbnail])  # (gw*gh + 1, tile, tile, 3) uint8
    return Tiles(pixels=_normalise(pixels, mean, std), grid=(gw, gh), size=image.size, thumb=gw * gh)
