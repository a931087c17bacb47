"""Tensor parallelism of the decoder over N processes (torch.distributed), gpt-fast's tp.py way.

Why: LLaVA-1.6-34B needs 69.5 GB and OneVision-72B 146.4 GB in 16 bits; data parallelism gives every
process the whole model, so a model one GPU cannot hold needs its matrices split. Each of N ranks holds:

    attention  q_proj rows of its H/N query heads (B, T, D) -> (B, H/N, T, hd); k_proj, v_proj rows of its
               Hkv/N key/value heads when N divides Hkv, else (Hkv divides N) of the one head its query
               heads read, that head replicated on N/Hkv ranks; o_proj the matching columns: (B, T, H/N hd)
               -> a partial (B, T, D), summed over the ranks by one all-reduce
    KV cache   its own key/value heads only (Decoder.setup_cache reads `Attention.kv_heads`)
    MLP        gate_proj, up_proj rows of its F/N hidden units; down_proj the matching columns, one all-reduce
    the rest   whole on every rank: embedding, norms, lm_head (the simplest: after each all-reduce every
               rank holds the same residual stream, so every rank computes the same logits and samples the
               same token; no broadcast), and the vision tower, projector and compressor (a few percent of
               the weights, and deterministic: every rank lays out the same prompt)

A pruning stage inside the decoder (FastV, PyramidDrop) ranks tokens by attention averaged over *all*
heads. `Decoder.query_key` is the one place a stage reads queries and keys; here it gathers every rank's
heads, in rank order (= head order), so each rank scores with one process's q and k and keeps the same
tokens. Gathered q and k (not all-reduced partial means): the mean over heads is then summed in one
process's order, so the top-k sees one process's numbers, ties included.

A bias of o_proj / down_proj (none in the released models) is added on rank 0 only, so the sum adds it once.
The model files are not changed: `shard_model` swaps in smaller modules, sets the head counts and adds the
all-reduce as forward hooks on Attention and MLP (funcol: also traceable by torch.compile).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from .config import TextConfig
from . import quant
from .quant import QuantizedLinear, Spec
from .trust import ConfigError

# Our parameter names of the split tensors (a bare Decoder's too, without "llm.")
SPLIT = re.compile(r"(llm\.)?layers\.\d+\.(self_attn\.(?P<attn>[qkvo])_proj|mlp\.(?P<mlp>gate|up|down)_proj)"
                   r"\.(?P<part>weight|bias|scales|scales_and_zeros)")
ROWS, COLS = "rows", "cols"  # a column-parallel layer's outputs are split; a row-parallel layer's inputs


class LaunchError(ConfigError):
    """A launch that cannot run: --tensor-parallel without torchrun, a world that does not factor, or an N
    the decoder does not split into. The same on every rank: rank 0 says it, the others exit quietly."""


@dataclass(frozen=True)
class Shard:
    """This process's place: rank `rank` of `size` tensor-parallel ranks, talking over `group`
    (None: no collectives, for computing shapes, e.g. on the meta device)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None


def start(n: int, device_type: str) -> tuple[Shard | None, torch.device | None]:
    """Join torchrun's world as one of `n` tensor-parallel ranks: (shard, this rank's device), or
    (None, None) for n = 1. The world must be exactly n processes (generate; the eval's D x N worlds
    are minillava/eval/distributed.py's). nccl between GPUs, gloo on the CPU."""
    if n < 1:
        raise LaunchError(f"--tensor-parallel must be at least 1, got {n}")
    if n == 1:
        return None, None
    world = int(os.environ.get("WORLD_SIZE", 0))
    if world == 0:
        raise LaunchError(f"--tensor-parallel {n} runs on {n} processes: launch it with "
                          f"torchrun --nproc-per-node {n} -m minillava.generate ...")
    if world != n:
        raise LaunchError(f"--tensor-parallel {n} under torchrun with {world} processes: they must be equal")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Shard(rank, n, dist.group.WORLD), device


def speaks(shard: Shard | None) -> bool:
    """Whether this process prints: one process, or rank 0 of a launch (every rank fails the same way)."""
    return (shard.rank if shard else int(os.environ.get("RANK", 0))) == 0


def stop(shard: Shard | None):
    if shard is not None and dist.is_initialized():
        dist.destroy_process_group()


def kv_range(heads: int, kv_heads: int, shard: Shard) -> tuple[int, int]:
    """[first, end) of the key/value heads this rank holds: its Hkv/N, or the one its query heads read."""
    if kv_heads % shard.size == 0:
        per = kv_heads // shard.size
        return shard.rank * per, (shard.rank + 1) * per
    first = shard.rank * (heads // shard.size) // (heads // kv_heads)  # the kv head of its first query head
    return first, first + 1


def check(cfg: TextConfig, n: int, spec: Spec | None = None):
    """LaunchError (one line) unless the decoder splits `n` ways (and its quantized shards keep int4's groups)."""
    h, kv, f = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if h % n:
        raise LaunchError(f"--tensor-parallel {n} does not divide the decoder's {h} attention heads")
    if kv % n and n % kv:
        raise LaunchError(f"--tensor-parallel {n} neither divides the decoder's {kv} key/value heads nor is a "
                          f"multiple of them")
    if f % n:
        raise LaunchError(f"--tensor-parallel {n} does not divide the decoder's MLP width {f}")
    if spec is not None and spec.bits == 4:  # int4 groups run along the inputs: a row-parallel shard must hold whole groups
        for name, k in (("o_proj", h * cfg.head_dim), ("down_proj", f)):
            if (k // n) % spec.group_size:
                fits = [g for g in quant.GROUP_SIZES if (h * cfg.head_dim // n) % g == 0 and (f // n) % g == 0]
                raise LaunchError(f"int4 groups of {spec.group_size} do not divide {name}'s {k // n} inputs per rank "
                                  f"at --tensor-parallel {n}: use " + (f"--group-size {max(fits)}" if fits else
                                                                       "--quantize int8 or fewer ranks"))
        # a shard's output rows need no check: the int4 kernels' padding to 16 rows (quant.QuantizedLinear.pack)
        # takes any width


def split_of(name: str, cfg: TextConfig, shard: Shard) -> tuple[str, int, int] | None:
    """How parameter or buffer `name` (ours: llm.layers.0.self_attn.q_proj.weight, ...) is split: (ROWS or
    COLS, first, end) in units of the float weight's outputs or inputs; None for a whole one."""
    m = SPLIT.fullmatch(name)
    if m is None:
        return None
    r, n, hd = shard.rank, shard.size, cfg.head_dim
    if m["attn"] in ("q", "o"):
        per = cfg.num_attention_heads // n * hd
        return (ROWS if m["attn"] == "q" else COLS), r * per, (r + 1) * per
    if m["attn"] in ("k", "v"):
        first, end = kv_range(cfg.num_attention_heads, cfg.num_key_value_heads, shard)
        return ROWS, first * hd, end * hd
    per = cfg.intermediate_size // n
    return (COLS if m["mlp"] == "down" else ROWS), r * per, (r + 1) * per


def local(name: str, t: torch.Tensor, cfg: TextConfig, shard: Shard, spec: Spec | None = None) -> torch.Tensor:
    """This rank's part of tensor `name` (its full form `t`: a float weight or bias, or a quantized storage
    form of `spec`, quant.py's layouts): a view where the part is contiguous (rows), else a copy."""
    split = split_of(name, cfg, shard)
    if split is None:
        return t
    side, first, end = split
    part = name.rsplit(".", 1)[1]
    if part == "bias":  # (N,) outputs: a row-split layer's part; a column-split layer's bias counts once, on rank 0
        return t[first:end] if side == ROWS else (t if shard.rank == 0 else torch.zeros_like(t))
    if side == ROWS:  # outputs: dim 0 of every form but int4's scales_and_zeros (K/G, N, 2)
        return t[:, first:end] if part == "scales_and_zeros" else t[first:end]
    if part == "scales":  # int8's per-output scales: the columns share them
        return t
    if part == "scales_and_zeros":  # int4: whole groups of inputs (`check`)
        return t[first // spec.group_size : end // spec.group_size]
    if t.dtype == torch.uint8 and spec is not None and spec.bits == 4:  # two inputs a byte
        first, end = first // 2, end // 2
    return t[:, first:end].contiguous()


def quantize_local(name: str, w: torch.Tensor, cfg: TextConfig, shard: Shard, spec: Spec, dtype: torch.dtype,
                   move=lambda t: t) -> dict[str, torch.Tensor]:
    """This rank's storage form of the float weight `w` (N, K) of linear `name` (ending .weight), the numbers
    one process's quantization gives, split; `move` takes the float part to the device that quantizes.
    Rows: only this rank's rows are read (a row's numbers do not depend on the others). Columns: int4's
    groups lie inside the part (`check`), so only its columns are read; int8's scale is the whole row's
    largest magnitude, so the whole matrix is quantized (one matrix's int8 at a time) and its columns kept."""
    split = split_of(name, cfg, shard)
    module = name.removesuffix(".weight")
    if split is None or split[0] == ROWS or spec.bits == 4:  # lm_head: whole
        return quant.quantize(move(local(name, w, cfg, shard)), spec, dtype)
    return {k: local(f"{module}.{k}", t, cfg, shard, spec) for k, t in quant.quantize(move(w), spec, dtype).items()}


def gathered_query_key(query_key, group):
    """Decoder.query_key over every rank's heads: (B, H, T, hd) each, in head order (see the module docstring)."""
    n = dist.get_world_size(group)

    def query_key_all(i, x, cos, sin):
        q, k = query_key(i, x, cos, sin)  # (B, H/N, T, hd) each: this rank's heads
        # gathered along dim 0 (what funcol gathers), then the ranks' heads side by side: (B, N H/N, T, hd)
        return tuple(torch.cat(funcol.all_gather_single(t.contiguous(), 0, group).wait().chunk(n), dim=1) for t in (q, k))
    return query_key_all


def _all_reduce(group):
    return lambda _module, _args, out: funcol.all_reduce(out, "sum", group).wait()


def _narrowed(old: nn.Module, name: str, cfg: TextConfig, shard: Shard) -> nn.Module:
    """A module of old's kind holding this rank's part of old's tensors (on old's device, meta included)."""
    split = split_of(name + ".weight", cfg, shard)
    side, first, end = split
    out_f, in_f = (end - first, old.in_features) if side == ROWS else (old.out_features, end - first)
    if isinstance(old, QuantizedLinear):  # not loaded yet: load_model fills it with `local` parts of the storage form
        if old.weight.device.type != "meta":
            raise ConfigError("a quantized model is split while loading (weights.load_model(..., shard=...)), "
                              "not after: its packed weights cannot be sliced")
        dtype = next(t.dtype for k, t in old.named_buffers() if k != "weight")
        new = QuantizedLinear(in_f, out_f, old.bias is not None, old.spec, dtype, "meta")
    else:
        new = type(old)(in_f, out_f, bias=old.bias is not None, device="meta", dtype=old.weight.dtype)
        # a copy, so that the whole matrix is freed (the loader's parts of a mapped file are views instead)
        new.weight = nn.Parameter(local(name + ".weight", old.weight, cfg, shard).clone(), requires_grad=False)
    if old.bias is not None:
        new.bias = nn.Parameter(local(name + ".bias", old.bias, cfg, shard).clone(), requires_grad=False)
    return new


def shard_model(model: nn.Module, shard: Shard) -> nn.Module:
    """Split `model`'s decoder (a Llava or a bare Decoder, float or a not yet loaded QuantizedLinear model on
    the meta device) for `shard`, in place: see the module docstring. Returns the model."""
    decoder = getattr(model, "llm", model)
    cfg: TextConfig = decoder.cfg
    check(cfg, shard.size)
    prefix = "llm." if decoder is not model else ""
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))):
            where = f"{prefix}layers.{i}.{'self_attn' if parent is attn else 'mlp'}"
            for child in names:
                setattr(parent, child, _narrowed(getattr(parent, child), f"{where}.{child}", cfg, shard))
        first, end = kv_range(cfg.num_attention_heads, cfg.num_key_value_heads, shard)
        attn.heads, attn.kv_heads, attn.cache = cfg.num_attention_heads // shard.size, end - first, None
        if shard.group is not None:
            attn.register_forward_hook(_all_reduce(shard.group))
            mlp.register_forward_hook(_all_reduce(shard.group))
    if shard.group is not None:
        decoder.query_key = gathered_query_key(decoder.query_key, shard.group)
    return model
