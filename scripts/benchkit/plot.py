"""bench.png: each row's ratio on a log axis with its target, then the theoretical TFLOPs per ratio."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .plan import RATIOS
from .row import Row


def plot(r: dict, rows: list[Row], path: Path) -> None:
    """A PNG: each row's ratio on a log axis with its target, then the theoretical TFLOPs per ratio."""
    width, left, right = 1200, 430, 60
    bar_h, top = 30, 70
    theory_rows = r.get("theory", {}).get("rows", [])
    height = top + bar_h * len(rows) + 60 + (330 if theory_rows else 0)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small = _font(12)
    title = "minillava vs transformers: ours / theirs (log scale)"
    if not r["plan"]["representative"]:
        title += "  -- QUICK MODE, NOT REPRESENTATIVE"
    draw.text((20, 20), title, fill="black", font=_font(18))
    lo, hi = -3.0, 1.0  # log10 range of the axis

    def x_of(value: float) -> float:
        v = min(max(math.log10(max(value, 1e-9)), lo), hi)
        return left + (v - lo) / (hi - lo) * (width - left - right)

    axis_y = top + bar_h * len(rows) + 5
    for e in range(int(lo), int(hi) + 1):
        x = x_of(10.0**e)
        draw.line((x, top - 5, x, axis_y), fill=(225, 225, 225))
        draw.text((x - 12, axis_y + 4), f"{10.0**e:g}", fill="black", font=small)
    for i, row in enumerate(rows):
        y = top + i * bar_h
        label = f"{row.key}  {row.what.split(' (')[0]}"
        draw.text((10, y + 8), label if len(label) <= 60 else label[:57] + "...", fill="black", font=small)
        if row.ratio is not None and math.isfinite(row.ratio):
            colour = {True: (60, 170, 90), False: (210, 60, 60), None: (150, 150, 150)}[row.passed]
            draw.rectangle((left, y + 6, x_of(row.ratio), y + bar_h - 6), fill=colour)
        op, bound = row.target.split()
        tx = x_of(float(bound))
        if row.ratio is not None and math.isfinite(row.ratio):
            draw.text((max(x_of(row.ratio), tx) + 8, y + 8), f"{row.ratio:.3g}", fill="black", font=small)
        draw.line((tx, y + 2, tx, y + bar_h - 2), fill="black", width=3)
        draw.text((tx - 18, y - 2), op, fill="black", font=small)
    if theory_rows:
        y0 = axis_y + 40
        draw.text((20, y0), "Theoretical prefill TFLOPs, 672 x 672 image (LLM only; paper's 7B figures in black)",
                  fill="black", font=_font(16))
        base, plot_h = y0 + 280, 230
        peak = max(t["tflops"] for t in theory_rows) * 1.1
        group_w = (width - 160) / len(RATIOS)
        for j, ratio in enumerate(RATIOS):
            gx = 100 + j * group_w
            for k, (name, colour) in enumerate([("LLaVA-NeXT-7B", (70, 110, 200)), ("LLaVA-NeXT-13B", (230, 150, 50))]):
                t = next(t for t in theory_rows if t["model"] == name and t["r"] == ratio)
                x = gx + k * 55
                h = t["tflops"] / peak * plot_h
                draw.rectangle((x, base - h, x + 45, base), fill=colour)
                draw.text((x, base - h - 15), f"{t['tflops']:.1f}", fill="black", font=small)
                if "paper_tflops" in t:
                    py = base - t["paper_tflops"] / peak * plot_h
                    draw.line((x - 4, py, x + 49, py), fill="black", width=3)
            draw.text((gx + 30, base + 6), f"r = {ratio:g}", fill="black", font=small)
        draw.line((90, base, width - 40, base), fill="black")
        draw.rectangle((width - 260, y0 + 30, width - 245, y0 + 45), fill=(70, 110, 200))
        draw.text((width - 238, y0 + 30), "7B (ours)", fill="black", font=small)
        draw.rectangle((width - 260, y0 + 52, width - 245, y0 + 67), fill=(230, 150, 50))
        draw.text((width - 238, y0 + 52), "13B (ours)", fill="black", font=small)
        draw.line((width - 262, y0 + 82, width - 243, y0 + 82), fill="black", width=3)
        draw.text((width - 238, y0 + 74), "paper, 7B", fill="black", font=small)
    img.save(path)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()
