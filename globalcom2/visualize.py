"""Draw what a compressor kept: the thumbnail, its [CLS] score map, and the high-resolution crops.

    python -m minillava.apps.visualize --model DIR_OR_HUB_ID --image PATH --out kept.png [--retention-ratio 0.25]

One PNG, drawn with PIL only:
    top       method, r and the token counts: thumbnail, crops, newlines, total before -> after; a legend
    thumbnail as the model sees it (the whole image squashed to one tile), dropped tokens dimmed
    scores    the thumbnail's [CLS] score map with a colour bar (and, for the guided methods, the
              regions whose summed score sets each crop's budget)
    canvas    the AnyRes canvas (the image resized and centred on black exactly as the tiles are cut),
              crop boundaries, the padding that unpadding removes hatched, dropped tokens dimmed, and
              each crop's retention ratio and kept/valid count
Methods that merge tokens (VisionZip, PruMerge+) tint each merged position with the colour of the token
it went into (one colour per merged token), on the thumbnail and on the canvas. FastV, which prunes
inside the decoder by the prompt's attention, needs `--prompt`: the picture shows the image tokens its
layers from K on keep (read from their KV cache after the prefill).
InternVL (`tiling="closest-ratio"`, docs/internvl.md): the canvas is the image squashed onto the crop grid
(no padding), the thumbnail is labelled as the sequence's last tile, the counts have no newline, and a
one-tile image is its thumbnail alone (no canvas); each cell is one token, a 2 x 2 pixel-shuffled group.
Thumbnail and scores stand in a column left of the canvas, or side by side above it for a grid of one
row. Small tiles are blown up by a whole factor (a 56 px tile shows as 336 px); 336 px tiles are 1:1.

`draw` takes plain inputs and returns a PIL image, so this module, like the rest of the package,
imports nothing from the model; the command that loads a model to draw is minillava/apps/visualize.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .layout import area_mask
from .stage import Compressed

GUIDED = ("globalcom2", "globalcom2-paper", "local-only", "global-only",  # budgets set by the thumbnail map
          *(f"{m}-{s}" for m in ("globalcom2", "local-only", "global-only") for s in ("attn", "sim")))

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
DIM = 0.25  # a dropped token keeps this much of its pixels ...
DIM_TO = np.array([40, 40, 48], dtype=np.float32)  # ... and is pulled towards this
HATCH = (np.array([95, 95, 95], dtype=np.float32), np.array([30, 30, 30], dtype=np.float32))  # padding stripes
KEPT_RIM = (255, 255, 255)
MERGE_TINT = 0.6  # a merged token's cell takes this much of its merged token's colour
MERGE_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                          [0, 128, 128], [170, 110, 40]], dtype=np.float32)  # cycled over merged tokens
CROP_LINE = (255, 150, 0)
GRID_ALPHA = 0.22  # patch grid lines: this much white over the picture

# A viridis-like ramp: five anchors of matplotlib's viridis, linear in between.
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3) on the viridis-like ramp."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(RAMP) - 1)
    low = np.minimum(x.astype(np.int64), len(RAMP) - 2)
    t = (x - low)[..., None]
    return np.rint(RAMP[low] * (1 - t) + RAMP[low + 1] * t).astype(np.uint8)


def font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at `size` px (Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow, or no FreeType
        return ImageFont.load_default()


def anyres_canvas(image: Image.Image, grid: tuple[int, int], size: tuple[int, int], tile: int) -> Image.Image:
    """The high-resolution canvas the crops are cut from, as `minillava.anyres.tile_image` builds it:
    the image resized (bicubic, aspect kept) so one side fills (gw*tile, gh*tile), centred on black."""
    (gw, gh), (w0, h0) = grid, size
    width, height = gw * tile, gh * tile
    if width / w0 < height / h0:
        new_w, new_h = width, min(math.ceil(h0 * width / w0), height)
    else:
        new_w, new_h = min(math.ceil(w0 * height / h0), width), height
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC),
                 ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def _cells(n_pixels: int, n_cells: int) -> np.ndarray:
    """The token cell of each pixel along one axis, (n_pixels,)."""
    return np.arange(n_pixels) * n_cells // n_pixels


def _edges(n_pixels: int, n_cells: int) -> np.ndarray:
    """Pixel positions where a new cell starts (the inner cell boundaries)."""
    return np.flatnonzero(np.diff(_cells(n_pixels, n_cells))) + 1


def _shade(
    picture: Image.Image, keep: np.ndarray, valid: np.ndarray | None = None, stripe: int = 6, outline: int = 1,
    merged: np.ndarray | None = None,
) -> Image.Image:
    """Dim the pixels of dropped token cells, tint merged ones, hatch the invalid (padding) ones, rim the
    kept ones where they border dropped ones (`outline` px), and draw the patch grid.

    keep, valid: (rows, cols) bool token masks laid over the whole picture; merged: (rows, cols) int, the
    merged token each cell went into (any id, one colour per id), -1 where none."""
    px = np.asarray(picture, dtype=np.float32).copy()  # (h, w, 3)
    h, w = px.shape[:2]
    rows, cols = _cells(h, keep.shape[0]), _cells(w, keep.shape[1])
    dropped = ~keep[np.ix_(rows, cols)]  # (h, w)
    if merged is not None:
        into = merged[np.ix_(rows, cols)]  # (h, w)
        tint = dropped & (into >= 0)
        colour = MERGE_COLOURS[into[tint] % len(MERGE_COLOURS)]
        px[tint] = px[tint] * (1 - MERGE_TINT) + colour * MERGE_TINT
        dropped &= into < 0
    px[dropped] = px[dropped] * DIM + DIM_TO * (1 - DIM)
    if valid is not None:
        pad = ~valid[np.ix_(rows, cols)]
        yy, xx = np.mgrid[:h, :w]
        light = ((xx + yy) // stripe) % 2 == 0
        px[pad & light], px[pad & ~light] = HATCH
    # a light rim inside kept cells where they meet dropped ones: kept dark cells stay readable (outline 0: none)
    kept = ~dropped
    inner = kept.copy()
    for s in range(1, outline + 1):
        inner[s:] &= kept[:-s]
        inner[:-s] &= kept[s:]
        inner[:, s:] &= kept[:, :-s]
        inner[:, :-s] &= kept[:, s:]
    px[kept & ~inner] = KEPT_RIM
    for edge in _edges(h, keep.shape[0]):
        px[edge] = px[edge] * (1 - GRID_ALPHA) + 255 * GRID_ALPHA
    for edge in _edges(w, keep.shape[1]):
        px[:, edge] = px[:, edge] * (1 - GRID_ALPHA) + 255 * GRID_ALPHA
    return Image.fromarray(np.rint(px).astype(np.uint8))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fnt, pad: int = 4):
    """White text on a dark box whose top-left corner is xy."""
    x, y = xy
    _, _, right, bottom = draw.textbbox((x + pad, y + pad), text, font=fnt)
    draw.rectangle((x, y, right + pad, bottom + pad), fill=(0, 0, 0, 170))
    draw.text((x + pad, y + pad), text, font=fnt, fill=(255, 255, 255, 255))


def _wrap(draw: ImageDraw.ImageDraw, parts: list[str], fnt, width: int, sep: str = "  ·  ") -> list[str]:
    """Join `parts` with `sep` into as few lines as fit in `width` pixels (a part is never split)."""
    lines = [parts[0]]
    for part in parts[1:]:
        candidate = lines[-1] + sep + part
        if draw.textlength(candidate, font=fnt) <= width:
            lines[-1] = candidate
        else:
            lines.append(part)
    return lines


def _number(x: float) -> str:
    return f"{x:.3g}"


@dataclass
class Style:
    """Sizes of one picture, from the size of a tile on screen."""

    zoom: int  # small tiles are blown up by this whole factor (nearest), so cells stay sharp squares
    T: int  # a tile on screen, px
    f: int  # text size
    line: int  # text line height
    margin: int
    gap: int  # between panels
    thick: int  # crop boundaries, budget regions
    rim: int  # rim of kept cells

    @classmethod
    def for_tile(cls, tile: int, side: int) -> Style:
        zoom = max(1, 360 // tile)  # a 56 px tile shows as 336 px, a 336 px one 1:1
        T = tile * zoom
        f = min(max(T // 21, 13), 22)
        return cls(zoom, T, f, round(f * 1.35), f, 2 * f, max(2, T // 110), max(1, T // side // 20))

    @property
    def small(self):
        return font(self.f)

    @property
    def big(self):
        return font(round(self.f * 1.3))


def draw(
    image: Image.Image,
    grid: tuple[int, int],
    size: tuple[int, int],
    tile: int,
    thumb_scores,
    result: Compressed,
    method: str,
    ratio: float,
    *,
    area: tuple[int, int, int, int],
    after: int,
    seed: int | None = None,
    note: str = "",
    score_label: str = "thumbnail [CLS] score",
    downscaled: tuple[int, int] | None = None,
    tiling: str = "anyres",
) -> Image.Image:
    """The picture of one compressed image.

    image: the original PIL image; grid (gw, gh) and size (w0, h0) as AnyRes gave them; tile: the
    tile side in pixels; thumb_scores (P,): the thumbnail's token scores (`score_label` names them); result: what
    `globalcom2.compress` returned for this image with `method` and `ratio`; area: the unpadded
    rectangle of the crop grid (top, bottom, left, right); after: the image's token count as the
    decoder gets it. `seed` is shown for the
    random method, `note` (e.g. "scores are synthetic") is added under the title. `downscaled` (h', w'):
    the uncompressed sequence's grid; where the model shrinks the unpadded crop grid to it before its
    decoder (LLaVA-OneVision), the counts are of that sequence and a compressor's crops' ratio
    r * h'w'/(hw) (`ImageFeatures.grid_share`) is shown beside r. None: the unpadded grid itself.
    `tiling` "closest-ratio" (InternVL, docs/internvl.md): the canvas is the image squashed onto the grid
    (no padding), the thumbnail is the sequence's last tile, no newline; grid (0, 0) is a one-tile image,
    its thumbnail alone, drawn without a canvas.
    The returned image's `info["panels"]` gives the box of each picture in it (thumbnail, scores, canvas),
    `info["text"]` its title and count lines.
    """
    gw, gh = grid
    squash = tiling == "closest-ratio"  # InternVL: crops squashed, thumbnail last, no newline
    keep = result.crop_keep.detach().cpu().numpy().astype(bool)  # (H, W)
    scores = torch.as_tensor(thumb_scores).detach().float().cpu().numpy().reshape(-1)
    # the tile's token side: from the crop masks, or (InternVL's one-tile image has none) the thumbnail's scores
    side = math.isqrt(scores.size) if squash else keep.shape[0] // gh
    P, C = side * side, gw * gh
    if keep.shape != (gh * side, gw * side):
        raise ValueError(f"crop masks of shape {keep.shape} do not fit grid {grid}")
    # InternVL squashes the image onto the whole grid: every cell is the image's (model.encode_images' area)
    valid = np.ones(keep.shape, bool) if squash else area_mask(area, keep.shape, "cpu").numpy()  # (H, W)
    if scores.size != P:
        raise ValueError(f"{scores.size} thumbnail scores for {P} tokens per tile")
    thumb_keep = np.zeros(P, dtype=bool)
    thumb_keep[result.thumb_keep.detach().cpu().numpy()] = True
    ratios = result.crop_ratio.detach().cpu().numpy().reshape(-1)
    st = Style.for_tile(tile, side)
    T, f, line, M, G = st.T, st.f, st.line, st.margin, st.gap
    small = st.small

    def zoomed(picture: Image.Image) -> Image.Image:
        return picture.resize((picture.width * st.zoom, picture.height * st.zoom), Image.Resampling.NEAREST)

    squashed = image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)  # the thumbnail tile
    merges = result.thumb_merge is not None and result.crop_merge is not None
    thumb_merge = result.thumb_merge.detach().cpu().numpy().reshape(side, side) if merges else None
    crop_merge = result.crop_merge.detach().cpu().numpy() if merges else None  # (H, W)
    thumb = _shade(zoomed(squashed), thumb_keep.reshape(side, side), outline=st.rim, merged=thumb_merge)
    if squash:  # minillava/anyres.py `_closest_ratio_tiles`: the image resized onto the grid, aspect not kept
        high = image.convert("RGB").resize((max(gw, 1) * tile, max(gh, 1) * tile), Image.Resampling.BICUBIC)
    else:
        high = anyres_canvas(image, grid, size, tile)
    canvas = _shade(zoomed(high), keep, valid, outline=st.rim, merged=crop_merge) if C else None

    # Texts.
    k_thumb, k_crops, n_valid = int(thumb_keep.sum()), int((keep & valid).sum()), int(valid.sum())
    k_pad = int((keep & ~valid).sum())  # padding tokens kept: only the -paper peers emit them
    rows, cols = downscaled or (int(valid.any(1).sum()), int(valid.any(0).sum()))  # the uncompressed grid
    before = (1 + C) * P if squash else P + rows * (cols + 1)  # uncompressed: every tile / thumbnail, rows + newlines
    shrunk = downscaled is not None and rows * cols != n_valid
    n_merged = n_absorbing = 0
    if merges:  # merged tokens of their own (VisionZip's contextual), and kept tokens others went into (PruMerge+)
        into = np.union1d(thumb_merge[thumb_merge >= 0], crop_merge[crop_merge >= 0])
        own = np.union1d(thumb_merge[thumb_keep.reshape(side, side)], crop_merge[keep])  # a kept token's place
        n_absorbing = len(np.intersect1d(into, own[own >= 0]))
        n_merged = len(into) - n_absorbing
    family = "InternVL" if squash else "LLaVA-NeXT"
    name = {"none": f"none (uncompressed {family})", "globalcom2": "GlobalCom2"}.get(method, method)
    if method == "random" and seed is not None:
        name += f" (seed {seed})"
    title = f"{name},  r = {_number(1.0 if method == 'none' else ratio)}"
    if shrunk and method != "none":  # the crops' budget is r of the downscaled grid's tokens
        title += f" (crops {_number(ratio * rows * cols / n_valid)}: the grid is {rows}x{cols} uncompressed)"
    crops = (f"crops {n_valid} tokens downscaled to {rows}x{cols} = {rows * cols}" if shrunk and method == "none"
             else f"crops {k_crops}/{n_valid} kept (padding excluded)")
    if shrunk and method == "none":  # the decoder's sequence is the downscaled grid, not the canvas drawn
        k_crops = rows * cols
    if squash:  # InternVL's sequence: the crops' kept tokens, then the thumbnail's; nothing else (no newline)
        counts = [*([f"crops {k_crops}/{n_valid} kept"] if C else []), f"thumbnail {k_thumb}/{P} kept"
                  + (" (the image as one tile: no crop)" if not C else ""),
                  f"visual tokens {before} -> {after} ({100 * after / before:.0f}%)"]
    else:
        counts = [
        f"thumbnail {k_thumb}/{P} kept",
        crops,
        *([f"{k_pad} padding tokens kept"] if k_pad else []),
        *([*([f"{n_merged} merged tokens"] if n_merged else []),
           *([f"{n_absorbing} kept tokens with merges"] if n_absorbing else []),
           f"{after - k_thumb - k_crops - k_pad - n_merged} newlines, [CLS] and extra tokens"]
          if merges else [f"{after - k_thumb - k_crops - k_pad} newlines"]),
        f"visual tokens {before} -> {after} ({100 * after / before:.0f}%)",
        ]
    canvas_label = [f"{'the image squashed onto' if squash else 'high-resolution canvas'} {gw * tile}x{gh * tile} px",
                    f"{gw}x{gh} crops of {tile} px", f"{side}x{side} tokens each"]
    # where the thumbnail sits in the decoder's sequence: LLaVA-NeXT's first, InternVL's after the crops
    thumb_name = ("the image as one tile (its thumbnail alone)" if not C else f"thumbnail (tile {C + 1}, after the "
                  "crops)") if squash else "thumbnail (as the model sees it)"

    # Layout. Grids of one row put the thumbnail and the score map side by side above the canvas;
    # taller grids put them in a column left of it.
    below = gh <= 1  # one row, or InternVL's one tile (no canvas: thumbnail and scores side by side only)
    width = M + (max(2 * T + G, gw * T) if below else T + G + gw * T) + M
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    count_lines = _wrap(scratch, counts, small, width - 2 * M)
    canvas_lines = _wrap(scratch, canvas_label, small, gw * T, sep=", ")
    thumb_lines = _wrap(scratch, [thumb_name, f"{k_thumb}/{P} kept"], small, T, sep=": ")
    top = M + round(f * 1.7) + line * (len(count_lines) + bool(note) + 1) + f // 2  # title, counts, note, legend
    score_h = line + T + f // 2 + f + line + (line if method in GUIDED else 0)  # label, map, bar, notes
    if below:
        head = line * len(thumb_lines)
        thumb_xy, score_xy = (M, top + head), (M + T + G, top + head - line)
        canvas_top = top + max(head + T, head - line + score_h) + f
    else:
        head = line * max(len(thumb_lines), len(canvas_lines))
        thumb_xy, score_xy = (M, top + head), (M, top + head + T + f)
        canvas_top = top
    canvas_xy = (M if below else M + T + G, canvas_top + (line * len(canvas_lines) if below else head))
    height = max(score_xy[1] + score_h, canvas_xy[1] + gh * T if C else 0) + M

    fig = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(fig)
    y = M
    d.text((M, y), title, font=st.big, fill=INK)
    y += round(f * 1.7)
    for text in count_lines:
        d.text((M, y), text, font=small, fill=INK)
        y += line
    if note:
        d.text((M, y), note, font=small, fill=(180, 40, 40))
        y += line
    _legend(fig, (M, y), st, merges, padding=not squash)

    _text_lines(d, (thumb_xy[0], thumb_xy[1] - line * len(thumb_lines)), thumb_lines, small, line)
    fig.paste(thumb, thumb_xy)
    _score_panel(fig, score_xy, scores.reshape(side, side), grid if method in GUIDED and C else None, st,
                 score_label)  # a one-tile image has no crop, so no budget region
    if C:
        _text_lines(d, (canvas_xy[0], canvas_xy[1] - line * len(canvas_lines)), canvas_lines, small, line)
        fig.paste(canvas, canvas_xy)
        fig = _crop_marks(fig, canvas_xy, keep, valid, ratios, grid, st)
    fig.info["text"] = [title, *counts]
    fig.info["panels"] = {  # where each picture sits, as PIL boxes (left, top, right, bottom)
        "thumbnail": (*thumb_xy, thumb_xy[0] + T, thumb_xy[1] + T),
        "scores": (score_xy[0], score_xy[1] + line, score_xy[0] + T, score_xy[1] + line + T),
        **({"canvas": (*canvas_xy, canvas_xy[0] + gw * T, canvas_xy[1] + gh * T)} if C else {}),
    }
    return fig


def _text_lines(d: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str], fnt, line: int):
    for n, text in enumerate(lines):
        d.text((xy[0], xy[1] + n * line), text, font=fnt, fill=INK)


def _legend(fig: Image.Image, xy: tuple[int, int], st: Style, merges: bool = False, padding: bool = True):
    """One row: what kept, dropped, merged and padding cells (`padding`: InternVL has none) and crop boundaries
    look like."""
    d, small, sw = ImageDraw.Draw(fig), st.small, st.f
    x, y = xy
    two = np.empty((sw, sw, 3), np.uint8)  # a swatch of two colours, to show the dimming on both
    two[: sw // 2], two[sw // 2 :] = (200, 120, 60), (60, 140, 200)
    for text, patch in [
        ("kept token", Image.fromarray(two)),
        ("dropped token (dimmed)", _shade(Image.fromarray(two), np.zeros((1, 1), bool))),
        *([("merged (colour of its token)", _shade(Image.fromarray(two), np.zeros((1, 2), bool), merged=np.array([[0, 3]])))]
          if merges else []),
        *([("padding (never a token)",
            _shade(Image.new("RGB", (sw, sw)), np.ones((1, 1), bool), np.zeros((1, 1), bool), 3))] if padding else []),
    ]:
        fig.paste(patch, (x, y + 2))
        d.rectangle((x, y + 2, x + sw - 1, y + sw + 1), outline=MUTED)
        d.text((x + sw + st.f // 3, y), text, font=small, fill=INK)
        x += sw + st.f // 3 + round(d.textlength(text, font=small)) + st.f
    d.line((x, y + sw // 2 + 2, x + sw, y + sw // 2 + 2), fill=CROP_LINE, width=st.thick)
    d.text((x + sw + st.f // 3, y), "crop boundary", font=small, fill=INK)


def _score_panel(fig: Image.Image, xy: tuple[int, int], scores: np.ndarray, regions, st: Style, label: str):
    """Label, the (side, side) score map as a heat map, a colour bar with the range under it, and, if
    `regions` is a grid, the regions of docs/globalcom2.md, step 2.1, whose summed scores set the crop budgets."""
    d, small, T, f, line = ImageDraw.Draw(fig), st.small, st.T, st.f, st.line
    x, y = xy
    side = scores.shape[0]
    d.text((x, y), label, font=small, fill=INK)
    y += line
    low, high = float(scores.min()), float(scores.max())
    span = high - low if high > low else 1.0
    fig.paste(Image.fromarray(colormap((scores - low) / span)).resize((T, T), Image.Resampling.NEAREST), (x, y))
    if regions is not None:
        gw, gh = regions
        ph, pw = max(side // gh, 1), max(side // gw, 1)
        for i in range(1, gh):
            d.line((x, y + i * ph * T // side, x + T - 1, y + i * ph * T // side), fill=(255, 255, 255), width=st.thick)
        for j in range(1, gw):
            d.line((x + j * pw * T // side, y, x + j * pw * T // side, y + T - 1), fill=(255, 255, 255), width=st.thick)
    y += T + f // 2
    fig.paste(Image.fromarray(colormap(np.linspace(0, 1, T)[None, :].repeat(f, 0))), (x, y))
    d.rectangle((x, y, x + T - 1, y + f - 1), outline=MUTED)
    y += f + 2
    d.text((x, y), f"low {_number(low)}", font=small, fill=INK)
    hi_text = f"{_number(high)} high"
    d.text((x + T - d.textlength(hi_text, font=small), y), hi_text, font=small, fill=INK)
    if regions is not None:
        d.text((x, y + line), "white lines: one budget region per crop", font=small, fill=MUTED)


def _crop_marks(fig: Image.Image, xy: tuple[int, int], keep, valid, ratios, grid, st: Style) -> Image.Image:
    """Crop boundaries on the canvas at `xy`, each crop's ratio and kept/valid count, padding labels."""
    gw, gh = grid
    T, side, small = st.T, keep.shape[0] // gh, st.small
    cx, cy = xy
    d = ImageDraw.Draw(fig)
    for i in range(gh + 1):
        yy = min(cy + i * T, cy + gh * T - 1)
        d.line((cx, yy, cx + gw * T - 1, yy), fill=CROP_LINE, width=st.thick)
    for j in range(gw + 1):
        xx = min(cx + j * T, cx + gw * T - 1)
        d.line((xx, cy, xx, cy + gh * T - 1), fill=CROP_LINE, width=st.thick)

    overlay = Image.new("RGBA", fig.size, (0, 0, 0, 0))  # labels on translucent boxes
    o = ImageDraw.Draw(overlay)
    for c in range(gw * gh):
        i, j = divmod(c, gw)
        cells = np.s_[i * side : (i + 1) * side, j * side : (j + 1) * side]
        k_c, n_c = int((keep & valid)[cells].sum()), int(valid[cells].sum())
        text = f"r={ratios[c]:.3f}  {k_c}/{n_c}" if n_c else "all padding"
        _label(o, (cx + j * T + st.thick + 2, cy + i * T + st.thick + 2), text, small)
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    if len(rows) and len(cols):
        cell = T / side
        bands = [(0, 0, gw * T, rows[0] * cell), (0, (rows[-1] + 1) * cell, gw * T, gh * T),
                 (0, 0, cols[0] * cell, gh * T), ((cols[-1] + 1) * cell, 0, gw * T, gh * T)]  # x0, y0, x1, y1
        tw = o.textlength("padding", font=small)
        for x0, y0, x1, y1 in bands:
            if x1 - x0 >= tw + 12 and y1 - y0 >= st.f + 12:
                _label(o, (round(cx + (x0 + x1 - tw) / 2) - 4, round(cy + (y0 + y1 - st.f) / 2) - 4), "padding", small)
    return Image.alpha_composite(fig.convert("RGBA"), overlay).convert("RGB")
