"""LLaMA / Vicuna decoder taking `inputs_embeds`, with a static preallocated KV cache. Mistral, Yi and
Qwen2 run on it too: Qwen2 is the same block with biases on q, k, v (`TextConfig.qkv_bias`).

Parameter names follow transformers' `LlamaModel` (`embed_tokens`, `layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .schedule import Between, Stage, apply_stage, check_schedule


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in float32 whatever the weights' dtype, as transformers does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# False in a PyTorch built without oneDNN: Linear is then plain nn.Linear and `pack_linears` packs nothing
ONEDNN = torch.backends.mkldnn.is_available()
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's CPU matmul takes in a packed layout


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose weight `pack` may lay out in oneDNN's blocked
    format for inference on the CPU; `forward` then calls oneDNN's matmul on it.

    Why: a decode step reads every weight once for one row (or a few), so its speed is how fast the
    kernel streams the matrix, and oneDNN's kernel on its own packed layout streams it far faster than
    F.linear on the plain one (5632 x 2048, one row, 2 threads, weights not in cache, on an AMD EPYC with
    AVX512-BF16: bfloat16 40-42 GB/s against 28; float32 42-45 against 22, MKL's; 8 rows 33-39 against
    12-25; docs/speed.md). Prefill-sized inputs are as fast or faster (512 float32 rows: 2.2x there). The
    numbers: bfloat16's equal F.linear's bit for bit (F.linear in bfloat16 already is oneDNN's, on the
    plain layout), float32's are oneDNN's sums instead of MKL's (about 1e-6 relative). Packing needs
    inference: oneDNN's op has no derivative. Compiled graphs call it as the custom op
    minillava::packed_linear.
    """

    packed = False  # a flag of the module, not read off the weight: torch.compile's fake weight is no mkldnn tensor

    def pack(self):
        """Lay the weight out as oneDNN's matmul reads it (an opaque CPU tensor of the same shape and dtype)."""
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None), requires_grad=False)
        self.packed = True

    def unpack(self):
        """The plain (N, K) weight back, numbers unchanged."""
        self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)
        self.packed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            matmul = torch.ops.minillava.packed_linear if torch.compiler.is_compiling() else packed_linear
            return matmul(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ a weight (N, K) packed by `Linear.pack`, plus bias: (..., N)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# the same for torch.compile: inductor cannot lower oneDNN's op on the opaque packed weight, but calls a
# custom op as it is (an extern kernel), fusing what lies between
torch.library.custom_op("minillava::packed_linear", packed_linear, mutates_args=())
torch.library.register_fake("minillava::packed_linear",
                            lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))


def packable(model: nn.Module) -> list[tuple[str, Linear]]:
    """The Linears of `model` that `pack_linears` packs: on the CPU, float32 or bfloat16, not packed yet,
    and the weight not shared with another module (a tied lm_head is also the embedding table, which
    must stay plain). Empty without oneDNN."""
    if not ONEDNN:
        return []
    uses: dict[int, int] = {}  # parameters by where their data starts: tied ones may be two Parameters of one tensor
    for _, p in model.named_parameters(remove_duplicate=False):
        if not p.is_mkldnn:
            uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, Linear) and not m.packed and m.weight.device.type == "cpu"
            and m.weight.dtype in PACKED_DTYPES and uses[m.weight.data_ptr()] == 1]


def pack_linears(model: nn.Module) -> int:
    """`Linear.pack` every packable Linear of an inference model (see `packable`); how many were packed."""
    layers = packable(model)
    for _, m in layers:
        m.pack()
    return len(layers)


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears` (to train, or to read the weights); how many were unpacked."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.packed]
    for m in layers:
        m.unpack()
    return len(layers)


def rope_table(head_dim: int, length: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of every position, (2, length, head_dim) float32, rotate-half layout, the first half
    of sin negated (the sign rotate-half gives those products: `apply_rope`)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, hd)
    sin = emb.sin()
    sin[:, : head_dim // 2].neg_()
    return torch.stack([emb.cos(), sin])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos, sin (T, hd) of `rope_table`. The first half of each head pairs with the
    second half: transformers' x * cos + cat(-x2, x1) * sin, the sign in the table (x2 * -s is (-x2) * s
    exactly), so no negation per call."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


EMPTY = torch.iinfo(torch.long).max  # position of a slot not written yet: after every query, so masked
PAD = -1  # position of a left-padding token in a per-row `input_pos`: attended to by no query


def same_device(a: torch.device, b: torch.device) -> bool:
    """a == b, where a device without an index (`cuda`) stands for the current one."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else None
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


class KVCache(nn.Module):
    """Keys and values preallocated to `length` slots so shapes never change, and the position each slot
    holds, per batch row. A query attends to the slots whose position is at most its own, so the mask of
    a step is (B, T, length), built from this one position table: linear in the length, never
    length x length.

    Slots fill in order and are shared by the rows: slot = position - `skipped`, where `skipped` (B,)
    counts the prompt positions this row's layer does not hold: the tokens a decoder-side method's
    stages dropped before this layer (FastV's image tokens, in its layers from K on; 0 everywhere else);
    negative for a left-padded row (it starts later in the slots).
    Left padding aligns every row's last prompt token on the same slot, so a decode step writes one slot
    for all rows.
    """

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full((batch, length), EMPTY, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("skipped", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        # how far this layer's positions lie below the prompt's: 0, but after a stage that renumbers the
        # kept tokens (PyramidDrop), by what the stages dropped; a decode step at position p is at p - shift here
        self.register_buffer("shift", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)

    def prefill(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Start afresh with the prompt's k, v (B, H, T, hd) at positions `input_pos` ((T,) shared by the
        rows, or (B, T) per row, PAD for padding), ascending, in slots 0 .. T-1; each row's prompt ends
        at its input_pos[..., -1]."""
        t = k.shape[2]
        self.k[:, :, :t] = k
        self.v[:, :, :t] = v
        self.pos.fill_(EMPTY)
        self.pos[:, :t] = torch.where(input_pos < 0, EMPTY, input_pos)  # padding: never attended to
        self.skipped.copy_(input_pos[..., -1] + 1 - t)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, hd) of the positions `input_pos` ((T,) or (B, T)) that follow the prompt;
        return the cache's keys and values (B, H, S, hd) and the mask (B, 1, T, S), True where a query
        may look: S = every slot, or in eager steps on the CPU the slots up to the last one written."""
        input_pos = input_pos.expand(self.pos.shape[0], -1)  # (B, T)
        slots = input_pos[0] - self.skipped[0]  # the same slots in every row (see the class docstring)
        end = self.pos.shape[1]
        if k.device.type == "cpu" and not torch.compiler.is_compiling():
            # Slots fill in order, so every slot after the last one written holds a later position (or
            # none) and is masked for every query: leave them out. Attention's cost is linear in the
            # slots it reads, and a cache sized for the longest answer is mostly empty early on (the
            # bench's batch-8 step in bfloat16: 16% of it attention over the whole cache, half of it
            # empty). Compiled steps keep the whole cache (static shapes, CUDA graphs), and so does
            # CUDA, where reading `end` on the host would wait for the device at every layer.
            listed = slots.tolist()
            end = max(listed) + 1
            if listed[0] >= 0 and listed == list(range(listed[0], end)):  # consecutive (a decode step's one slot): written as
                slots = slice(listed[0], end)  # a slice, a plain copy, not advanced indexing's index_put
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        self.pos[:, slots] = input_pos
        mask = self.pos[:, None, :end] <= input_pos[:, :, None]  # (B, T, S)
        return self.k[:, :, :end], self.v[:, :, :end], mask[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias  # Qwen2: biases on q, k, v only
        self.q_proj = Linear(d, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(d, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(d, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.heads * self.head_dim, d, bias=bias)
        self.cache: KVCache | None = None

    def qk(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, hd) and keys (B, Hkv, T, hd) of x (B, T, D), rotated to their positions."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x, cos, sin, input_pos, prefill: bool):
        """x (B, T, D) at positions `input_pos` ((T,) shared by the rows, or (B, T) per row with PAD for
        left padding) -> (B, T, D). cos, sin: (T, hd) or (B, 1, T, hd).

        `prefill`: the prompt, causal among its own tokens, which start the cache afresh. Otherwise the
        new tokens attend to the whole cache."""
        b, t, _ = x.shape
        q, k = self.qk(x, cos, sin)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        k_all, v_all, mask = k, v, None  # a prefill: the new keys are all there is, causal order
        if prefill and input_pos.dim() == 2:  # per-row positions: causal by position, padding masked
            mask = prefill_mask(input_pos)
        if self.cache is None and not prefill:
            raise RuntimeError("decoding past the prompt needs a KV cache: call Decoder.setup_cache first")
        if self.cache is not None:
            if prefill:
                self.cache.prefill(input_pos, k, v)
            else:
                k_all, v_all, mask = self.cache.update(input_pos, k, v)
        out = attend(q, k_all, v_all, mask, prefill)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)


ENABLE_GQA_DEVICES = ("cpu",)  # where `attend` passes enable_gqa (the CPU's numbers as they were); a test empties it


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, prefill: bool) -> torch.Tensor:
    """Attention of queries (B, H, T, hd) over keys and values (B, Hkv, S, hd), Hkv dividing H (grouped
    KV heads: Mistral, Yi, Qwen2), with a mask (B, 1, T, S) (True: may look) or causal without one.

    On the CPU: F.scaled_dot_product_attention with enable_gqa, as before, but an eager step of one query
    position (decoding) in 16 bits or of several rows runs `one_token_attention` (faster there; the
    kernel's numbers to float rounding; float32 batch 1, the default, keeps its numbers).

    Elsewhere enable_gqa is never passed: torch documents GQA on CUDA "only for Flash_attention and math
    kernel" (F.scaled_dot_product_attention's docstring, torch 2.13), and a mask rules out flash, so every
    masked step (each decode step, a padded batch's prefill) would fall to the math kernel, which writes B x
    H x T x S scores (48 GB for a OneVision batch of 8 prompts). Instead a prefill repeats its keys and
    values to the query heads (the prompt's own, small next to its scores), and a cached step folds each key
    head's query heads into its query rows (`grouped_attention`), so any backend the GPU has (flash,
    memory-efficient, cuDNN) may take the call. The numbers are enable_gqa's: the same rows against the same
    keys (tests/test_cuda_paths.py)."""
    groups = q.shape[1] // k.shape[1]
    if (q.device.type in ENABLE_GQA_DEVICES and not prefill and q.shape[2] == 1 and mask is not None
            and not torch.compiler.is_compiling()
            and (q.dtype != torch.float32 or q.shape[0] > 1)):  # float32 at one row: the kernel is as fast
        return one_token_attention(q, k, v, mask)
    if groups == 1 or q.device.type in ENABLE_GQA_DEVICES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=groups > 1)
    if prefill:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # enable_gqa's order
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return grouped_attention(q, k, v, mask)


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A cached step's attention for one query position on the CPU, written out: scores, softmax, sum of
    values. q (B, H, 1, hd), k, v (B, Hkv, S, hd), mask (B, 1, 1, S) -> (B, H, 1, hd).

    Why not F.scaled_dot_product_attention: for one query its CPU kernel (flash attention, blocked for
    long queries) costs more than the products themselves, most in 16 bits: bfloat16 at 32 heads, 144
    slots, one thread, 0.56 ms a layer against 0.10 ms here; float32 batch 8 1.0 against 0.75 ms; float32
    batch 1 0.03-0.06 ms either way, the kernel 5-10 us ahead, so `attend` keeps it there (docs/speed.md,
    "Decode at the memory limit"). The numbers are that kernel's to float rounding
    (tests/test_llama_mask.py): all in float32, as its accumulators are, and rounded once to the model's
    dtype at the end. Grouped KV heads as `grouped_attention` folds them: query head h reads key head h // G."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    rows = q.reshape(b, kv, h // kv, d).float() * d ** -0.5  # (B, Hkv, G, hd): key head j's G query heads
    scores = torch.where(mask, rows @ k.float().transpose(-1, -2), -math.inf)  # (B, Hkv, G, S)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(v.dtype).view(b, h, 1, d)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention with grouped KV heads, without enable_gqa and without repeating k and v: query
    head h reads key head h // G (G = H / Hkv, enable_gqa's repeat_interleave), so the G query heads of
    a key head become G x T query rows of one head, each with its own row of the mask.
    q (B, H, T, hd), k, v (B, Hkv, S, hd), mask (B, 1, T, S) -> (B, H, T, hd)."""
    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    rows = q.reshape(b, kv, g * t, d)  # row j * T + i: query head kv * G + j at position i
    mask = mask.expand(b, 1, t, s)[:, :, None].expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask)  # (B, Hkv, G T, hd)
    return out.reshape(b, h, t, d)


def prefill_mask(input_pos: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) mask of a left-padded prompt at per-row positions (B, T), PAD where padding: a query
    sees the keys at or before its position; padding keys are seen by no query; a padding query sits at
    position 0 and sees its row's first token, so no softmax row is empty (an empty one is NaN, and
    NaN times a zero weight would reach the real rows through the padding's values)."""
    keys = torch.where(input_pos < 0, EMPTY, input_pos)
    return (keys[:, None, :] <= input_pos.clamp(min=0)[:, :, None])[:, None]


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = Linear(d, f, bias=bias), Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, input_pos, prefill: bool):
        return self.feed(self.attend(x, cos, sin, input_pos, prefill))

    def attend(self, x, cos, sin, input_pos, prefill: bool):
        """The block's first half: x plus its attention (a stage `inside` the block reads this)."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, prefill)

    def feed(self, x):
        """The block's second half: x plus its MLP."""
        return x + self.mlp(self.post_attention_layernorm(x))


def prune(stage: Stage, between: Between, source: torch.Tensor, length: int, shift: int):
    """What a decoder stage leaves (minillava/schedule.py `apply_stage`): the tokens x (B, T', D), the prompt
    positions they hold (`source`, -1 for an added token), the positions the next layers put them at (kept,
    or renumbered 0 .. T'-1 for a stage that says `renumber`) and the shift of those layers' decode steps
    below the prompt's positions (what the stages dropped, from a `length`-position prompt, once renumbered)."""
    x, index = apply_stage(stage, between)
    source, input_pos = source[index].masked_fill(index < 0, -1), between.input_pos[index]
    if getattr(stage, "renumber", False):  # the positions a prompt of this length has
        input_pos = torch.arange(x.shape[1], device=x.device)
        shift = length - x.shape[1]  # a prefill's positions are 0 .. T-1
    return x, source, input_pos, shift


class Decoder(nn.Module):
    """The language model: embeddings -> blocks -> norm -> lm_head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.renumbered = False  # the last prefill's schedule renumbered positions (each layer's KVCache.shift)
        self.kept: torch.Tensor | None = None  # the prompt positions the last layers kept, after a schedule

    def setup_cache(self, batch: int, length: int, device=None, dtype=None, layer_lengths: list[int] | None = None):
        """Allocate the KV cache for positions 0 .. `length`-1, and the RoPE table that goes with it.
        `layer_lengths`: slots per layer, `length` each by default (a schedule's pruned layers hold fewer:
        minillava/schedule.py).
        Memory is linear in the length: no length x length mask."""
        param = self.embed_tokens.weight
        device, dtype = torch.device(device or param.device), dtype or param.dtype
        # Buffers of the same shape are kept, not reallocated: a compiled decode step's CUDA graph reads
        # them at fixed addresses, so new ones every question would re-record it. KVCache.prefill starts
        # a kept cache afresh (every slot's position reset), so nothing of the last question is seen.
        if self.rope.shape[1:2] != (length,) or not same_device(self.rope.device, device):
            self.rope = rope_table(self.cfg.head_dim, length, self.cfg.rope_theta, device)
        for layer, slots in zip(self.layers, layer_lengths or [length] * len(self.layers), strict=True):
            attn, shape = layer.self_attn, (batch, layer.self_attn.kv_heads, slots, layer.self_attn.head_dim)
            old = attn.cache
            if old is None or old.k.shape != shape or old.k.dtype != dtype or not same_device(old.k.device, device):
                attn.cache = KVCache(batch, attn.kv_heads, slots, attn.head_dim, dtype, device)

    def setup_rope(self, length: int, device=None):
        """RoPE table for `length` positions and no cache: enough for full-sequence (`prefill=True`)
        passes such as training."""
        for layer in self.layers:
            layer.self_attn.cache = None
        self.rope = rope_table(self.cfg.head_dim, length, self.cfg.rope_theta, device or self.embed_tokens.weight.device)

    @property
    def cache_length(self) -> int:
        """Slots of the (first layer's) KV cache: the positions it can hold; 0 without a cache."""
        cache = self.layers[0].self_attn.cache
        return 0 if cache is None else cache.k.shape[2]

    def positions(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions (T,) -> (T, hd) each, or of per-row positions (B, T) -> (B, 1, T, hd), in
        the model's dtype: rounded once here, not by `apply_rope` in every layer (the same numbers)."""
        cos, sin = self.rope[:, input_pos.clamp(min=0)].to(self.embed_tokens.weight.dtype)
        return (cos, sin) if input_pos.dim() == 1 else (cos[:, None], sin[:, None])  # broadcast over heads

    def query_key(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's queries and keys for its input x (B, T, D) at the positions of cos, sin: (B, H, T, hd)
        each, the key heads repeated to the query heads (GQA). What a pruning stage reads of a layer's
        attention, without running it."""
        layer = self.layers[i]
        attn = layer.self_attn
        q, k = attn.qk(layer.input_layernorm(x), cos, sin)
        return q, k.repeat_interleave(attn.heads // attn.kv_heads, dim=1)

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, prefill: bool = False,
                schedule: Sequence[Stage] = ()) -> torch.Tensor:
        """Hidden states after the final norm, (B, T, D), for `embeds` (B, T, D) at positions `input_pos`:
        (T,) shared by every row, or (B, T) per row, PAD (-1) for a left-padding token (prefill only).

        `prefill`: the positions are 0 .. T-1, so attention is plain causal over the new tokens (no
        mask over the whole cache). Otherwise each query sees the cache up to its own position.
        `schedule` (a prefill of positions shared by the rows): a decoder-side method's stages
        (globalcom2/methods.py), each before its layer K, layers ascending; the layers from K on see and
        cache only what the stage keeps (or its merged tokens there), so the result is (B, T', D), at the
        positions it keeps, or renumbered 0 .. T'-1 for a stage that says `renumber` (PyramidDrop), whose
        layers then decode at p - what was dropped (`KVCache.shift`). A stage `inside` layer K (FiCoCo-L)
        runs between K's attention and its MLP: K's cache holds what entered it, its MLP and the layers
        after see what the stage keeps. minillava/schedule.py derives each layer's cache length from the
        same stages.
        """
        check_schedule(schedule, len(self.layers), prefill and input_pos.dim() == 1)
        if prefill:
            self.renumbered = any(getattr(stage, "renumber", False) for stage in schedule)
        stages = {stage.layer: stage for stage in schedule}
        cos, sin = self.positions(input_pos)
        x = layer_input = embeds
        source, shift, shifts = input_pos, 0, []  # the prompt positions x holds; each layer's KVCache.shift
        for i, layer in enumerate(self.layers):
            stage = stages.get(i)
            inside = getattr(stage, "inside", False)
            if stage is not None and not inside:  # before layer i
                between = Between(layer_input, x, lambda j, h, c=cos, s=sin: self.query_key(j, h, c, s), input_pos, embeds)
                x, source, input_pos, shift = prune(stage, between, source, embeds.shape[1], shift)
                cos, sin = self.positions(input_pos)
            pos, c, s = input_pos, cos, sin
            if not prefill and self.renumbered:  # a decode step after a renumbering schedule: this layer's positions
                pos = input_pos - layer.self_attn.cache.shift[:, None]
                c, s = self.positions(pos)
            layer_input = x  # for a stage that reads this layer's attention
            shifts.append(shift)  # this layer's cache holds what entered it, a merge inside it included
            if inside:  # between layer i's attention and its MLP (FiCoCo-L: globalcom2/ficocol.py)
                x = layer.attend(x, c, s, pos, prefill)
                between = Between(layer_input, x, lambda j, h, c=c, s=s: self.query_key(j, h, c, s), input_pos, embeds)
                x, source, input_pos, shift = prune(stage, between, source, embeds.shape[1], shift)
                cos, sin = self.positions(input_pos)
                x = layer.feed(x)
            else:
                x = layer(x, c, s, pos, prefill)
        if prefill:  # what the last layers see, for the tools that show it (minillava/schedule.py `kept_positions`)
            self.kept = source if schedule else None
            for layer, n in zip(self.layers, shifts):
                if layer.self_attn.cache is not None:
                    layer.self_attn.cache.shift.fill_(n)
        return self.norm(x)
