"""CLIP vision tower: image tiles -> hidden states, [CLS] token first.

Parameter names follow transformers' `CLIPVisionModel.vision_model` so the key table in weights.py
stays a list of prefixes. LLaVA-NeXT reads one hidden state (the penultimate layer's output, without
[CLS]); a compressor that reads attention gets a layer's [CLS] query and keys from `query_key` and
computes its scores itself (globalcom2/probes.py).

The encoder layers and the walk through them (`Tower`) are shared with SigLIP (siglip.py), whose
layers are CLIP's with another activation; the towers differ in their embeddings only. InternViT
(internvit.py) reuses the walk and the attention, adding layer scale, its norms and q/k norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .anyres import CLIP_MEAN, CLIP_STD
from .config import VisionConfig
from .schedule import Between, Stage, apply_stage, check_schedule


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
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=cfg.qkv_bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        return x.reshape(n, t, self.heads, self.head_dim).transpose(1, 2)  # (N, heads, T, hd)

    def query(self, h: torch.Tensor) -> torch.Tensor:
        """The queries (N, heads, T, hd) of the normed input h (N, T, D) (InternViT norms them first)."""
        return self.split(self.q_proj(h))

    def key(self, h: torch.Tensor) -> torch.Tensor:
        """The keys (N, heads, T, hd) of the normed input h (N, T, D)."""
        return self.split(self.k_proj(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, D): every token attends to every token of its tile."""
        q, k, v = self.query(x), self.key(x), self.split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        return self.out_proj(out.transpose(1, 2).flatten(2))

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
        return self.feed(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's first half: x plus its attention (a stage `inside` the layer reads this)."""
        return x + self.self_attn(self.layer_norm1(x))

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's second half: x plus its MLP."""
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig, layer: type[nn.Module] = EncoderLayer):
        super().__init__()
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.num_hidden_layers))


class Tower(nn.Module):
    """What CLIP and SigLIP share: an embedding (the subclass's `embed`), the encoder layers, and the
    hidden states read off them. `has_cls`: whether every tile's tokens begin with a [CLS] token (CLIP
    yes, SigLIP no); the P patch tokens follow it in raster order either way. `mean` and `std`: the
    normalisation its tiles are given (minillava/model.py `Llava.tile`)."""

    has_cls: bool
    mean: tuple[float, float, float]  # the tiles' normalisation (pixels in [0, 1]): (x - mean) / std per channel
    std: tuple[float, float, float]

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.cfg = cfg

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, S, S) -> hidden state 0, (N, has_cls + P, D)."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, layers=(-2,), schedule: Sequence[Stage] = ()) -> dict[int, torch.Tensor]:
        """Tiles (N, 3, S, S) -> {i: hidden state i, (N, has_cls + P, D), [CLS] first if any} for each i
        of `layers`.

        Transformers' `hidden_states` indexing: 0 is the embeddings (CLIP's after pre_layrnorm), i the
        output of layer i, negative from the end (-1 the last layer's output, -2 the penultimate one's:
        LLaVA-NeXT's feature layer). Keys are as asked. Layers past the deepest state asked are not run.
        `schedule`: a method's stages between the layers (minillava/schedule.py `Stage`): the layers from a
        stage's K on see only the tokens it keeps (or merged), so the hidden states from K on hold T' tokens.
        A stage `inside` layer K (token merging: globalcom2/ficoco.py) runs between K's attention and its MLP,
        so hidden state K + 1 on holds T' tokens; it reads K's input (`previous_input`) and the stream after
        K's attention (`x`).
        """
        n_layers = len(self.encoder.layers)
        if not all(-n_layers - 1 <= i <= n_layers for i in layers):
            raise ValueError(f"hidden states {tuple(layers)} asked of a tower with {n_layers} layers (0 .. {n_layers})")
        check_schedule(schedule, n_layers)
        stages = {stage.layer: stage for stage in schedule}
        wanted = {i % (n_layers + 1) for i in layers}
        x = layer_input = self.embed(pixels)  # (N, has_cls + P, D)
        states = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            stage = stages.get(i - 1)
            if stage is not None and getattr(stage, "inside", False):  # inside layer i - 1 (python index)
                layer_input, x = x, layer.attend(x)
                x, _ = apply_stage(stage, Between(layer_input, x, self.layer_query_key))
                x = layer.feed(x)
            else:
                if stage is not None:  # before layer i - 1 (python index): keep what the stage keeps
                    x, _ = apply_stage(stage, Between(layer_input, x, self.layer_query_key))
                layer_input = x  # for a stage that reads this layer's attention
                x = layer(x)
            if i in wanted:  # only what was asked stays alive
                states[i] = x
        return {i: states[i % (n_layers + 1)] for i in layers}

    def layer_query_key(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query and key (N, heads, T, hd) of encoder layer `layer` for its input x (N, T, D): what
        a pruning stage reads of a layer's attention (minillava/schedule.py `Between`), without running it."""
        block = self.encoder.layers[layer]
        attn, h = block.self_attn, block.layer_norm1(x)
        return attn.query(h), attn.key(h)

    def query_key(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The [CLS] query (N, heads, 1, hd) and every key (N, heads, T, hd) of encoder layer `layer`
        (python index: -1 the last) for its input x (N, T, D), hidden state `layer % n_layers`: what an
        attention probe reads (globalcom2/probes.py), without running the layer. One query row: never
        the T x T matrix. (For a layer the tower ran, its own [CLS] query came out of a projection of
        every row: equal to this one up to float rounding.) A tower without [CLS] has no such query."""
        if not self.has_cls:
            raise ValueError(f"a {self.cfg.model_type} tower has no [CLS] token, so no [CLS] query to read")
        block = self.encoder.layers[layer]
        attn, h = block.self_attn, block.layer_norm1(x)
        return attn.query(h[:, :1]), attn.key(h)


class ClipTower(Tower):
    """CLIP ViT. `forward` returns what LLaVA-NeXT and GlobalCom2 need from it, and no more."""

    has_cls = True
    mean, std = CLIP_MEAN, CLIP_STD  # its image normalisation (CLIP's image processor)

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, as in CLIP
        self.encoder = Encoder(cfg)
        # Loaded so that checkpoints load strictly; LLaVA never uses the pooled output.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(pixels))  # (N, 1 + P, D)
