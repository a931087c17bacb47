"""CLIP vision tower: image tiles -> patch features of one layer, plus GlobalCom2's [CLS] scores.

Parameter names follow transformers' `CLIPVisionModel.vision_model` so the key table in weights.py
stays a list of prefixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2 + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, D, side, side)
        x = x.flatten(2).transpose(1, 2)  # (N, P, D), patches row-major
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, 1 + P, D)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.heads, self.head_dim).transpose(1, 2)  # (N, heads, T, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(x)), self.split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (N, T, D)

    def cls_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Head-mean pre-softmax attention logits of the [CLS] query against every key, (N, T).

        Only the [CLS] row: one query against T keys, never the T x T matrix. Computed in float32.
        """
        q = self.split(self.q_proj(x[:, :1])).float()  # (N, heads, 1, hd)
        k = self.split(self.k_proj(x)).float()  # (N, heads, T, hd)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(self.head_dim)  # (N, heads, T)
        return logits.mean(dim=1)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """CLIP ViT. `forward` returns what LLaVA-NeXT and GlobalCom2 need from it, and no more."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, as in CLIP
        self.encoder = Encoder(cfg)
        # Loaded so that checkpoints load strictly; LLaVA never uses the pooled output.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, feature_layer: int = -2):
        """Tiles (N, 3, S, S) -> (features, scores).

        features: (N, P, D) hidden state `feature_layer` (transformers' `hidden_states` indexing:
            0 is the embeddings after pre_layrnorm, i the output of layer i, -2 the penultimate layer's
            output), without the [CLS] token.
        scores: (N, P) float32 [CLS] scores of GlobalCom2: in the LAST layer, the head-mean pre-softmax
            logits of the [CLS] query against each patch key (the [CLS] column dropped).
        """
        layers = self.encoder.layers
        n_layers = len(layers)
        select = feature_layer % (n_layers + 1)
        x = self.pre_layrnorm(self.embeddings(pixels))  # (N, 1 + P, D)
        features = x if select == 0 else None
        for i, layer in enumerate(layers[:-1], start=1):
            x = layer(x)
            if i == select:
                features = x
        last = layers[-1]
        scores = last.self_attn.cls_scores(last.layer_norm1(x))[:, 1:]  # input of the last layer
        if features is None:  # feature_layer == -1: the last layer's output is needed after all
            features = last(x)
        return features[:, 1:], scores
