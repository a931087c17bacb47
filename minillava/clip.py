"""CLIP vision tower: image tiles -> patch features of one layer, plus GlobalCom2's [CLS] scores.

Parameter names follow transformers' `CLIPVisionModel.vision_model` so the key table in weights.py
stays a list of prefixes.

Probes: a compressor declares what else it needs from the tower as data, a tuple of (kind, layer)
pairs, `layer` a python index into the encoder layers (-2: the penultimate layer, whose output is
LLaVA's feature layer; -1: the last). The tower computes them in its one pass, only those asked:

    ("cls_attn", l)  (N, heads, 1 + P) float32: the post-softmax attention row of the [CLS] query in
                     layer l, every key including [CLS] (column 0); transformers' eager
                     `attentions[l][:, :, 0, :]`. One query row, never the T x T matrix.
    ("keys", l)      (N, 1 + P, D) tower dtype: layer l's k_proj output (input layer_norm1 of the
                     layer's input), before the head split, [CLS] row included.
    ("hidden", l)    (N, 1 + P, D) tower dtype: layer l's output, [CLS] row included (transformers'
                     `hidden_states[l + 1]`; l = -2 is LLaVA's feature layer `hidden_states[-2]`).
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


PROBE_KINDS = ("cls_attn", "keys", "hidden")


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
        return self.probed(x, ())[0]

    def probed(self, x: torch.Tensor, kinds) -> tuple[torch.Tensor, dict]:
        """(N, T, D) -> (N, T, D), and the probes of `kinds` ("cls_attn", "keys") from this pass."""
        keys = self.k_proj(x)  # (N, T, D)
        q, k, v = self.split(self.q_proj(x)), self.split(keys), self.split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        probes = self.probes(q[:, :, :1], k, keys, kinds) if kinds else {}
        return self.out_proj(out.transpose(1, 2).flatten(2)), probes

    def cls_logits(self, q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits of the [CLS] query against every key: (N, heads, 1, hd), (N, heads, T, hd)
        -> (N, heads, T) float32. Only the [CLS] row: one query against T keys."""
        return (q_cls.float() @ k.float().transpose(-1, -2)).squeeze(2) / math.sqrt(self.head_dim)

    def probes(self, q_cls: torch.Tensor, k: torch.Tensor, keys: torch.Tensor, kinds) -> dict:
        """{kind: tensor} for "cls_attn" (softmax of the [CLS] logits, float32) and "keys" (k_proj output)."""
        out = {}
        if "keys" in kinds:
            out["keys"] = keys
        if "cls_attn" in kinds:
            out["cls_attn"] = self.cls_logits(q_cls, k).softmax(dim=-1)  # (N, heads, T)
        return out

    def probe_only(self, x: torch.Tensor, kinds) -> dict:
        """The probes of a layer that need not run: only its [CLS] query and keys are computed."""
        keys = self.k_proj(x)
        return self.probes(self.split(self.q_proj(x[:, :1])), self.split(keys), keys, kinds)

    def cls_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Head-mean pre-softmax attention logits of the [CLS] query against every key, (N, T).

        Only the [CLS] row: one query against T keys, never the T x T matrix. Computed in float32.
        """
        return self.cls_logits(self.split(self.q_proj(x[:, :1])), self.split(self.k_proj(x))).mean(dim=1)


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
        return self.probed(x, ())[0]

    def probed(self, x: torch.Tensor, kinds) -> tuple[torch.Tensor, dict]:
        """(N, T, D) -> (N, T, D), and this layer's attention probes of `kinds`."""
        h, probes = self.self_attn.probed(self.layer_norm1(x), kinds)
        x = x + h
        return x + self.mlp(self.layer_norm2(x)), probes


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

    def forward(self, pixels: torch.Tensor, feature_layer: int = -2, needs=None):
        """Tiles (N, 3, S, S) -> (features, scores), and (features, scores, probes) when `needs` is given.

        features: (N, P, D) hidden state `feature_layer` (transformers' `hidden_states` indexing:
            0 is the embeddings after pre_layrnorm, i the output of layer i, -2 the penultimate layer's
            output), without the [CLS] token.
        scores: (N, P) float32 [CLS] scores of GlobalCom2: in the LAST layer, the head-mean pre-softmax
            logits of the [CLS] query against each patch key (the [CLS] column dropped).
        probes: {(kind, layer): tensor} for each pair of `needs` (see the module docstring), keyed as asked.
        """
        layers = self.encoder.layers
        n_layers = len(layers)
        select = feature_layer % (n_layers + 1)
        wanted = probe_plan(needs or (), n_layers)  # {layer index: kinds asked there}
        found = {}  # {(kind, layer index): tensor}
        x = self.pre_layrnorm(self.embeddings(pixels))  # (N, 1 + P, D)
        features = x if select == 0 else None
        for i, layer in enumerate(layers[:-1]):
            kinds = wanted.get(i, ())
            x, got = layer.probed(x, kinds)
            found.update({(kind, i): t for kind, t in got.items()})
            if "hidden" in kinds:
                found["hidden", i] = x
            if i + 1 == select:
                features = x
        last, i = layers[-1], n_layers - 1
        kinds = wanted.get(i, set())
        h = last.layer_norm1(x)  # input of the last layer
        scores = last.self_attn.cls_scores(h)[:, 1:]
        if select == n_layers or "hidden" in kinds:  # the last layer's output is needed after all
            x, got = last.probed(x, kinds)
            features = x if select == n_layers else features
            found["hidden", i] = x
        else:  # its probes need only its input: the [CLS] query and the keys
            got = last.self_attn.probe_only(h, kinds) if kinds else {}
        found.update({(kind, i): t for kind, t in got.items()})
        if needs is None:
            return features[:, 1:], scores
        return features[:, 1:], scores, {(kind, layer): found[kind, layer % n_layers] for kind, layer in needs}


def probe_plan(needs, n_layers: int) -> dict[int, set]:
    """{layer index: kinds asked there} from (kind, layer) pairs; refuses unknown kinds and layers."""
    plan = {}
    for kind, layer in needs:
        if kind not in PROBE_KINDS:
            raise ValueError(f"unknown tower probe {kind!r}; expected one of {', '.join(PROBE_KINDS)}")
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"probe layer {layer} is outside the tower's {n_layers} layers")
        plan.setdefault(layer % n_layers, set()).add(kind)
    return plan
