"""The test image: a deterministic synthetic picture whose tiles the vision tower and the token counts use."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw


IMAGE_SIZE = (672, 672)  # the image whose token counts rows 7 and the theoretical table use: grid 2 x 2


def test_image(size=IMAGE_SIZE) -> Image.Image:
    """A deterministic synthetic picture: a gradient with a few shapes (the scores only need some structure)."""
    w, h = size
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    rgb = torch.stack([x, y, (1 - x) * y]) * 255  # (3, h, w)
    image = Image.fromarray(rgb.permute(1, 2, 0).to(torch.uint8).numpy(), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.1, h * 0.1, w * 0.4, h * 0.4), fill=(220, 30, 30))
    draw.rectangle((w * 0.55, h * 0.2, w * 0.9, h * 0.45), fill=(30, 30, 220))
    draw.polygon([(w * 0.2, h * 0.9), (w * 0.45, h * 0.55), (w * 0.7, h * 0.9)], fill=(20, 160, 40))
    draw.text((w * 0.6, h * 0.7), "GlobalCom2", fill=(0, 0, 0))
    return image
