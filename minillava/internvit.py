"""InternViT (InternVL2.5/3's tower): image tiles -> hidden states, [CLS] first; and InternVL's pixel shuffle.

InternViT is a ViT as CLIP's (clip.py: the same walk through the layers, `Tower`, the same attention and
MLP) with three differences, after OpenGVLab's modeling_intern_vit.py (`InternVisionEncoderLayer`) and
transformers' modeling_internvl.py (`InternVLVisionLayer`):
- layer scale: each half of a layer adds `lambda * f(norm(x))`, lambda a learned vector per channel;
- the 6B tower (InternVL3-38B/78B) normalises with RMSNorm instead of LayerNorm and RMS-normalises the
  queries and keys over the whole width before the head split (`qk_norm`); its q, k, v have no biases;
- the embedding: a patch convolution with a bias, a [CLS] token, a learned position per token, no norm
  before the layers. InternVL reads the last layer's output (select_layer -1) without [CLS].

Parameter names are clip.py's (encoder.layers.N.self_attn.q_proj, layer_norm1, ...) with transformers'
`lambda_1` / `lambda_2` and embedding names; weights.py maps both published layouts onto them.

`pixel_shuffle` (downsample_ratio 0.5) merges each 2 x 2 patches into one token of 4x the width: the
32 x 32 patches of a 448 px tile become 16 x 16 = 256 tokens, which the projector (model.py, with its
LayerNorm) brings to the decoder's width.
"""

from __future__ import annotations

import torch
from torch import nn

from .anyres import IMAGENET_MEAN, IMAGENET_STD
from .clip import MLP, Attention, Encoder, EncoderLayer, Tower
from .config import VisionConfig
from .llama import RMSNorm

NORMS = {"layer_norm": nn.LayerNorm, "rms_norm": RMSNorm}


class InternAttention(Attention):
    """CLIP's attention; the 6B tower RMS-normalises q and k over the whole width before the head split."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.qk_norm = cfg.qk_norm

    def query(self, h: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(h)
        return self.split(self.q_norm(q) if self.qk_norm else q)

    def key(self, h: torch.Tensor) -> torch.Tensor:
        k = self.k_proj(h)
        return self.split(self.k_norm(k) if self.qk_norm else k)


class InternLayer(EncoderLayer):
    """An encoder layer with layer scale: x + lambda_1 * attn(norm1(x)), then + lambda_2 * mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig):
        nn.Module.__init__(self)
        self.layer_norm1 = NORMS[cfg.norm_type](cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = InternAttention(cfg)
        self.layer_norm2 = NORMS[cfg.norm_type](cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.lambda_1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lambda_1 * self.self_attn(self.layer_norm1(x))

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lambda_2 * self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embeddings = nn.Parameter(torch.empty(1, cfg.patches_per_side**2 + 1, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        conv = self.patch_embeddings.projection
        x = conv(pixels.to(conv.weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, D), patches row-major
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embeddings  # (N, 1 + P, D)


class InternVitTower(Tower):
    """InternViT: hidden states of [CLS] + P patch tokens per tile (448 px, 32 x 32 patches of 14 px)."""

    has_cls = True
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # InternVL's build_transform: T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, InternLayer)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixels)  # (N, 1 + P, D)


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """Patch tokens (N, side * side, D), raster order -> (N, side/2 * side/2, 4 D): token (i, j) is the
    concatenation of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1). This is what InternVL's
    `pixel_shuffle(x, 0.5)` with ps_version v2 computes (its two view/permute steps, the second swapping
    height and width back), written as one reshape."""
    n, p, d = x.shape
    side = round(p**0.5)
    x = x.reshape(n, side // 2, 2, side // 2, 2, d)  # (N, i, dy, j, dx, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, p // 4, 4 * d)  # (N, i, j, dy, dx, D) -> (N, P/4, 4D)
