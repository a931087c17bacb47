"""LLaVA-NeXT: vision tower -> projector -> compression stage -> packing into the prompt -> decoder.

An image's way through it:
    PIL -> anyres.tile_image -> (1 + crops) tiles
        -> VisionTower: features of layer -2 and [CLS] scores of the last layer, per tile
        -> Projector: features into the decoder's width
        -> globalcom2.compress: the image's token sequence (method "none" = uncompressed LLaVA-NeXT)
        -> spliced between the prompt's text embeddings -> Decoder prefill -> decode loop
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import globalcom2

from .anyres import Tiles
from .clip import VisionTower
from .config import LlavaConfig
from .llama import Decoder


class Projector(nn.Module):
    """mlp2x_gelu: Linear, GELU (exact), Linear."""

    def __init__(self, vision_dim: int, text_dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class LlavaNext(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.projector_bias)
        self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))
        self.llm = Decoder(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, tiles: list[Tiles], needs=None) -> list[globalcom2.ImageFeatures]:
        """All tiles of all images through the tower and projector in one batch, split back per image.

        `needs`: the tower probes the compression method will use, `globalcom2.needs(method)`. None (what
        callers that do not know the method pass) gives every method's, `globalcom2.ALL_NEEDS`: all of them
        come out of the tower's one pass at the cost of one [CLS] attention row.
        """
        needs = globalcom2.ALL_NEEDS if needs is None else tuple(needs)
        pixels = torch.cat([t.pixels for t in tiles]).to(self.device, self.dtype)  # (sum tiles, 3, S, S)
        features, scores, probes = self.vision(pixels, self.cfg.vision_feature_layer, needs)
        features = self.projector(features)  # (sum tiles, P, D)
        out, start = [], 0
        for t in tiles:
            n = t.pixels.shape[0]
            out.append(
                globalcom2.ImageFeatures(
                    thumb=features[start],
                    crops=features[start + 1 : start + n],
                    thumb_scores=scores[start],
                    crop_scores=scores[start + 1 : start + n],
                    grid=t.grid,
                    size=t.size,
                    newline=self.image_newline,
                    probes={need: p[start : start + n] for need, p in probes.items()},
                    project=self.projector,
                )
            )
            start += n
        return out

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
