"""LLaMA / Vicuna decoder taking `inputs_embeds`, with a static preallocated KV cache.

Parameter names follow transformers' `LlamaModel` (`embed_tokens`, `layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in float32 whatever the weights' dtype, as transformers does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_table(head_dim: int, length: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of every position, (2, length, head_dim) float32, rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, hd)
    return torch.stack([emb.cos(), emb.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos, sin (T, hd). The first half of each head pairs with the second half."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated to the full length so shapes never change."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, hd) at positions `input_pos` (T,); return the whole cache."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = k, v  # a prefill from position 0: the new keys are all there is, causal order
        if mask is not None and self.cache is None:
            raise RuntimeError("decoding past position 0 needs a KV cache: call Decoder.setup_cache first")
        if self.cache is not None:
            cache_k, cache_v = self.cache.update(input_pos, k, v)
            if mask is not None:
                k_all, v_all = cache_k, cache_v
        if self.kv_heads != self.heads:
            k_all = k_all.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v_all = v_all.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, input_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The language model: embeddings -> blocks -> norm -> lm_head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.register_buffer("causal", torch.empty(0, dtype=torch.bool), persistent=False)

    def setup_cache(self, batch: int, length: int, device=None, dtype=None):
        """Allocate the KV cache for `length` positions, and the RoPE and mask tables that go with it."""
        param = self.embed_tokens.weight
        device, dtype = device or param.device, dtype or param.dtype
        self.setup_rope(length, device)
        for layer in self.layers:
            attn = layer.self_attn
            attn.cache = KVCache(batch, attn.kv_heads, length, attn.head_dim, dtype, device)
        self.causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))

    def setup_rope(self, length: int, device=None):
        """RoPE table for `length` positions and no cache: enough for full-sequence (`prefill=True`)
        passes such as training."""
        for layer in self.layers:
            layer.self_attn.cache = None
        self.rope = rope_table(self.cfg.head_dim, length, self.cfg.rope_theta, device or self.embed_tokens.weight.device)

    @property
    def cache_length(self) -> int:
        return self.causal.shape[0]

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Hidden states after the final norm, (B, T, D), for `embeds` (B, T, D) at positions `input_pos` (T,).

        `prefill`: the positions are 0 .. T-1, so attention is plain causal over the new tokens (no
        mask over the whole cache). Otherwise each query sees the cache up to its own position.
        """
        cos, sin = self.rope[:, input_pos]  # (T, hd) each
        mask = None if prefill else self.causal[input_pos][None, None]  # (1, 1, T, cache length)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.norm(x)
