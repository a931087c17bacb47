"""LLaVA-NeXT, LLaVA-OneVision and InternVL: vision tower -> projector -> the image's token sequence -> spliced
into the prompt -> decoder. OneVision (docs/onevision.md) is the same model with a SigLIP tower (siglip.py, no
[CLS]), a Qwen2 decoder (llama.py with q, k, v biases) and its crop grid downscaled when large
(`cfg.anyres_max`, layout.py `downscaled_size`). InternVL (docs/internvl.md): an InternViT tower
(internvit.py), each 2 x 2 patches one token (pixel shuffle) before a projector with a LayerNorm first, the
Qwen2 decoder, its tiles laid out one after another, the thumbnail last, no newline.

An image's way through it (minillava/generate.py `generate` runs it for one question):
    PIL -> Llava.tile (anyres.tile_image, the tower's normalisation) -> (1 + crops) tiles
        -> the tower (`TOWERS`: clip.py, siglip.py): the hidden states of every tile
        -> Projector: the feature layer (CLIP: -2 without [CLS]), into the decoder's width
        -> layout.pack: the thumbnail's tokens, then the crop grid unpadded, a newline closing each row
           (a compressor, minillava/compression.py, decides which of them are kept; a tower method's
           merged tiles, which form no grid, go tile by tile: layout.merged_sequence)
        -> spliced between the prompt's text embeddings -> Decoder prefill -> decode loop
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .anyres import Tiles, tile_image
from .clip import ClipTower, Tower
from .config import LlavaConfig
from .layout import (compressed_sequence, crop_grid, downscaled_size, merged_sequence, pack, tile_sequence,
                     unpad_area, uncompressed_length)
from .internvit import InternVitTower, pixel_shuffle
from .llama import Decoder, Linear
from .siglip import SiglipTower


class Projector(nn.Module):
    """mlp2x_gelu: Linear, GELU (exact), Linear. InternVL's `mlp1` puts a LayerNorm first (`norm`)."""

    def __init__(self, vision_dim: int, text_dim: int, bias: bool = True, norm: bool = False):
        super().__init__()
        if norm:  # nn.LayerNorm's default eps, as InternVL's mlp1 and transformers' InternVLMultiModalProjector
            self.layer_norm = nn.LayerNorm(vision_dim)
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x) if self.norm else x)))


@dataclass
class Encoded:
    """One image through the tower and the projector."""

    thumb: torch.Tensor  # (P, D) projected thumbnail tokens, raster order, P = side * side
    crops: torch.Tensor  # (gw*gh, P, D) projected crop tokens, crops row-major, each in raster order
    grid: tuple[int, int]  # (gw, gh) columns, rows of crops
    size: tuple[int, int]  # (w0, h0) original image size in pixels
    area: tuple[int, int, int, int]  # (top, bottom, left, right) the unpadded part of the crop grid
    probes: dict = field(default_factory=dict)  # {name: (1 + gw*gh, ...)} what a compressor asked of the tower,
    # the thumbnail's row first
    merged: bool = False  # a tower method changed the tiles' token count: thumb (T', D), crops (C, T', D),
    # no longer side x side grids (laid out tile by tile: layout.py `merged_sequence`)


# The vision towers by VisionConfig.model_type; each carries its own normalisation (`mean`, `std`) and says
# whether its tokens begin with [CLS] (`has_cls`). A family names the towers it is released with
# (config.py `FAMILIES`).
TOWERS: dict[str, type[Tower]] = {"clip": ClipTower, "siglip": SiglipTower, "internvit": InternVitTower}


class Llava(nn.Module):
    """A LLaVA-family model of any of config.py's FAMILIES (LLaVA-NeXT, LLaVA-OneVision): tower, projector,
    the image's token sequence, decoder."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision: Tower = TOWERS[cfg.vision.model_type](cfg.vision)
        self.shuffle = cfg.patch_group > 1  # InternVL: 2 x 2 patches per token (internvit.pixel_shuffle)
        width = cfg.vision.hidden_size * cfg.patch_group**2
        self.projector = Projector(width, cfg.text.hidden_size, cfg.projector_bias, norm=self.shuffle)
        if not cfg.family_spec.tile_by_tile:  # InternVL closes no row: it has no newline vector
            self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))
        self.llm = Decoder(cfg.text)
        # llama.Linear: on the CPU load_model packs it for oneDNN as the decoder's (the largest matrix a step reads)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.linear_2.weight.dtype  # not lm_head's: a quantized lm_head holds integers (minillava/quant.py)

    @property
    def newline(self) -> torch.Tensor:
        """The image_newline vector (D,); zeros for InternVL, which has none and never places one."""
        if self.cfg.family_spec.tile_by_tile:
            return torch.zeros(self.cfg.text.hidden_size, device=self.device, dtype=self.dtype)
        return self.image_newline

    def tile(self, image) -> Tiles:
        """A PIL image as this model's tiles: its pinpoints and tile size, its family's tiling, its tower's
        normalisation (`TOWERS`: CLIP's mean and std; SigLIP's 0.5; InternViT's ImageNet ones)."""
        return tile_image(image, self.cfg.grid_pinpoints, self.cfg.vision.image_size, self.vision.mean, self.vision.std,
                          self.cfg.family_spec.tiling)

    def encode_images(self, tiles: list[Tiles], layers=(), probe: Callable | None = None, schedule=()) -> list[Encoded]:
        """All tiles of all images through the tower and projector in one batch, split back per image.

        `schedule`: a tower method's stages (minillava/schedule.py, between or inside the tower's layers,
        minillava/compression.py `tower_schedule`), applied to every tile; where they change the tiles'
        token count the `Encoded` is `merged`.

        `layers`: more hidden states of the tower to compute, for `probe`, a function of all tiles'
        hidden states ({i: (N, has_cls + P, Dv)}) to {name: (N, ...)} (a compressor's scores, computed by the
        compression stage: minillava/compression.py), split per image into `Encoded.probes`.
        """
        pixels = torch.cat([t.pixels for t in tiles]).to(self.device, self.dtype)  # (sum tiles, 3, S, S)
        select = self.cfg.vision_feature_layer
        states = self.vision(pixels, (select, *layers), schedule)
        # (sum tiles, P, D): CLIP's [CLS] dropped (LLaVA-NeXT's "default"); SigLIP's tokens whole ("full");
        # InternViT's [CLS] dropped and each 2 x 2 patches one token (P = side^2 / 4)
        features = states[select][:, int(self.vision.has_cls):]
        features = self.projector(pixel_shuffle(features) if self.shuffle else features)
        probes = probe(states) if probe is not None else {}
        side, tile_by_tile = self.cfg.token_side, self.cfg.family_spec.tile_by_tile
        merged = features.shape[1] != side * side
        out, start = [], 0
        for t in tiles:
            n = t.pixels.shape[0]
            # the thumbnail first, then the crops row-major, wherever the family put its thumbnail
            order = torch.tensor([t.thumb, *(i for i in range(n) if i != t.thumb)], device=features.device) + start
            mine = features[order]  # (1 + C, P, D)
            # InternVL squashes the image onto its grid: no padding, the whole grid shows the image
            area = (0, t.grid[1] * side, 0, t.grid[0] * side) if tile_by_tile else unpad_area(t.grid, t.size, side)
            out.append(Encoded(mine[0], mine[1:], t.grid, t.size, area,
                               {k: p[order.to(p.device)] for k, p in probes.items()}, merged))
            start += n
        return out

    def image_tokens(self, image: Encoded, kept=None) -> torch.Tensor:
        """One image's token sequence for the decoder, (T, D): LLaVA-NeXT's uncompressed one, or what a
        compressor `kept` (globalcom2.Compressed) laid out the same way; a `-paper` method's published
        sequence as it made it."""
        if image.merged:  # a tower method's shorter tiles: no grid left to unpad, downscale or close by newlines
            return merged_sequence(image.thumb, image.crops)
        if self.cfg.family_spec.tile_by_tile:  # InternVL: the crops one after another, then the thumbnail
            if kept is None:
                return tile_sequence(image.thumb, image.crops, image.grid)
            return tile_sequence(kept.head, image.crops, image.grid, kept.crop_keep)
        if kept is None:  # a family that downscales (OneVision): the unpadded grid downscaled when large
            size = downscaled_size(image.area, self.cfg.token_side, self.cfg.anyres_max)
            return pack(image.thumb, crop_grid(image.crops, image.grid), image.area, self.image_newline,
                        size=size if self.cfg.family_spec.downscales else None)
        # a compressor's choice on the full-resolution grid, packed there (layout.py)
        return compressed_sequence(kept, image.crops, image.grid, image.area, self.newline)

    def uncompressed_length(self, image: Encoded) -> int:
        """Tokens of `image_tokens(image)`: with OneVision's downscale, fewer than the full-resolution grid
        a compressor selects on holds (`image.crops`' unpadded h x w and h newlines, plus P); InternVL's
        (1 + C) P, no newline."""
        if self.cfg.family_spec.tile_by_tile:
            return (1 + len(image.crops)) * image.thumb.shape[0]
        return uncompressed_length(image.area, self.cfg.token_side, self.cfg.anyres_max)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def embed(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.embed_tokens(ids)

    def prompt_embeds(self, chunks: list[list[int]], images: list[torch.Tensor]) -> torch.Tensor:
        """Text chunks with image token sequences between them: (1, T, D) decoder input.

        `chunks` has one more entry than `images`: chunk 0, image 0, chunk 1, ...
        """
        if len(chunks) != len(images) + 1:
            raise ValueError(f"{len(chunks)} text chunks for {len(images)} images: expected one more chunk than images")
        parts = [self.embed(chunks[0])]
        for image, chunk in zip(images, chunks[1:]):
            parts += [image.to(self.dtype), self.embed(chunk)]
        return torch.cat(parts)[None]
