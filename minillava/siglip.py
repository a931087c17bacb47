"""SigLIP vision tower (LLaVA-OneVision's so400m): image tiles -> hidden states, no [CLS] token.

Parameter names follow transformers' `SiglipVisionModel.vision_model`, as clip.py's follow CLIP's. The
encoder layers are CLIP's (clip.py: LayerNorm, attention with biases, an MLP; SigLIP's activation is
gelu_pytorch_tanh, from the config); what differs is the embedding: a patch convolution with a bias,
one learned position per patch, no [CLS] and no LayerNorm before the layers. The released OneVision
towers keep 26 of so400m's 27 layers and LLaVA reads the last one's output whole ("full"), before
`post_layernorm`; the attention-pooling head is absent (`vision_use_head` false).
"""

from __future__ import annotations

import torch
from torch import nn

from .anyres import SIGLIP_MEAN, SIGLIP_STD
from .clip import Encoder, Tower
from .config import VisionConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, D, side, side)
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (N, P, D), patches row-major


class SiglipTower(Tower):
    """SigLIP ViT without its pooling head: hidden states of P = side * side patch tokens per tile."""

    has_cls = False
    mean, std = SIGLIP_MEAN, SIGLIP_STD  # 0.5 each: LLaVA-NeXT's siglip_encoder.py SigLipImageProcessor

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        # Loaded so that checkpoints load strictly; LLaVA reads the layers' output, before this norm.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixels)  # (N, P, D)
