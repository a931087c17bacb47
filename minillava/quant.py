"""Weight-only int8 and int4 linear layers: what a quantized weight is, how it is made, stored and multiplied.

A decode step at batch 1 reads every weight once, so its speed is bytes-bound: int8 reads half the bytes
of 16-bit weights, int4 a quarter. Only the weights are quantized; activations stay in the model's dtype.
The decoder's linear layers and lm_head are quantized (`QUANTIZED`): what a decode step reads. Not the
vision tower (0.30B parameters, once per image, and the [CLS] attention the compressors rank by comes from
it), nor the projector: 21M parameters, 0.3% of a 7B's bytes, run once per image on ~2,900 tokens (about
5% of the image's FLOPs, none of a decode step's reads), so quantizing it would save 21-32 MB and no
measurable time; nor the embedding (one row read per token) or the norms.

Storage form (the quantized checkpoint, python -m minillava.apps.quantize; the same on every device):
    int8  weight (N, K) int8, w[n, k] ~= weight[n, k] * scales[n]          (per output channel, symmetric)
    int4  weight (N, K/2) uint8: byte j of row n holds q[n, 2j] in its high nibble, q[n, 2j+1] in its low
          (the input layout of aten._convert_weight_to_int4pack); scales_and_zeros (K/G, N, 2):
          w[n, k] ~= (q[n, k] - 8) * s[k // G, n, 0] + s[k // G, n, 1]     (group-wise, asymmetric, G = group size)
This is gpt-fast's scheme (quantize.py: `dynamically_quantize_per_channel`, `get_group_qparams`,
`group_quantize_tensor_from_qparams`), written here in our own terms.

In memory, `QuantizedLinear.pack` turns the storage form into what the device's kernel reads (`KERNELS`).
The int4 kernels take rows in blocks (the CPU's packs 16 rows together, CUDA's tinygemm 8): a linear whose
output width is no multiple of 16 (InternVL3's head, 151,674 rows) gets zero rows up to the next multiple of
16 in its kernel's packing only, and its outputs are sliced back. The stored form keeps the true N, so a
checkpoint is the same whichever device reads it, and one written before this rule loads as it did.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .trust import ConfigError, show

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm (CUDA) accepts; the CPU kernel takes the same
# Without --group-size: the largest group size up to this one that divides every quantized width (`Spec.fit`).
# 128 is gpt-fast's default and the one the accuracy was measured at (docs/speed.md); 256, which also divides
# every LLaVA-1.6 decoder, halves the scales' resolution, so it is taken only when asked for.
DEFAULT_GROUP_SIZE = 128
METHOD = "minillava-weight-only"  # quantization_config.quant_method of our checkpoints (transformers refuses it: not its format)
# Our parameter names of the quantized linears: the decoder's projections and lm_head.
# (A bare Decoder's, without "llm.", too: the benchmarks and tests quantize one with `quantize_model`.)
QUANTIZED = re.compile(r"((llm\.)?layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head)")
ROWS = 1024  # weights are quantized and packed this many output rows at a time, so no whole float32 copy is made
INT4_ROW_BLOCK = 16  # the int4 kernels' rows are padded to a multiple of this (the CPU kernel's block; CUDA's 8 divides it)


@dataclass(frozen=True)
class Spec:
    """How the weights are quantized: 8 or 4 bits; int4's group size (None for int8, and for int4 before
    `fit` chooses it for a model's widths)."""

    bits: int
    group_size: int | None = None

    @classmethod
    def of(cls, bits: int | None, group_size: int | None = None) -> Spec | None:
        """The Spec of a bits / group size choice (--quantize / --bits and --group-size of our CLIs, the
        lmms-eval model_args): None without bits; int4's group size None unless given (`fit` chooses it
        once the model's widths are known). ValueError for a group size without 4 bits (each caller words
        it for its own flags)."""
        if group_size is not None and bits != 4:
            raise ValueError("a group size goes with 4 bits")
        if bits is None:
            return None
        return cls(8) if bits == 8 else cls(4, group_size)

    @property
    def chosen(self) -> bool:
        """False for int4 whose group size is still to be chosen (`fit`)."""
        return self.bits != 4 or self.group_size is not None

    def fit(self, widths) -> Spec:
        """This spec with int4's group size chosen for a model whose quantized linears have the input
        `widths` (`input_widths`): the largest of GROUP_SIZES up to DEFAULT_GROUP_SIZE that divides every
        one (128 on every LLaVA-1.6 decoder, 64 on the tiny model's 192 and 512). A spec already chosen
        is returned as it is (an explicit --group-size is checked by `check`, one line if it does not divide)."""
        if self.chosen:
            return self
        fits = [g for g in GROUP_SIZES if g <= DEFAULT_GROUP_SIZE and all(w % g == 0 for w in widths)]
        if not fits:
            raise ConfigError(f"int4 needs input widths divisible by {GROUP_SIZES[0]}, but the decoder's are "
                              f"{', '.join(map(str, sorted(set(widths))))}: use --quantize int8")
        return Spec(4, max(fits))

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f" (group size {self.group_size or 'to be chosen'})" if self.bits == 4 else "")

    def config_entry(self) -> dict:
        """config.json's quantization_config of a checkpoint quantized this way."""
        return {"quant_method": METHOD, "bits": self.bits, "group_size": self.group_size}

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Storage shapes of a linear's tensors, by suffix, for weight (n, k)."""
        if self.bits == 8:
            return {"weight": (n, k), "scales": (n,)}
        return {"weight": (n, k // 2), "scales_and_zeros": (k // self.group_size, n, 2)}

    def check(self, name: str, n: int, k: int):
        """ConfigError if linear `name` of weight (n, k) cannot be quantized this way."""
        if self.bits == 4 and k % self.group_size:
            fits = [g for g in GROUP_SIZES if k % g == 0]
            raise ConfigError(f"int4 groups of {self.group_size} inputs need input widths divisible by "
                              f"{self.group_size}, but {name} has {k} inputs: "
                              + (f"use --group-size {max(fits)}" if fits else "use --quantize int8"))
        # Any output width is taken: the int4 kernels' rows in blocks of 16 are padded in memory (`QuantizedLinear.pack`).


def input_widths(text, ranks: int = 1) -> set[int]:
    """The input widths of the linears QUANTIZED in a decoder of TextConfig `text`, as each of `ranks`
    tensor-parallel processes holds them (o_proj and down_proj are split along their inputs:
    minillava/tensor_parallel.py): the hidden size (q, k, v, gate, up, lm_head), the heads' width (o_proj)
    and the MLP's (down_proj)."""
    return {text.hidden_size, text.num_attention_heads * text.head_dim // ranks, text.intermediate_size // ranks}


def chosen_note(spec: Spec) -> str:
    """The line that says which group size `Spec.fit` chose."""
    return (f"note: --quantize {spec.name}: the largest group size up to {DEFAULT_GROUP_SIZE} that divides "
            "every quantized width (--group-size G to choose)")


def parse_spec(raw) -> Spec | None:
    """The Spec of config.json's quantization_config (None when absent), every field checked."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"quantization_config must be a JSON object, got {show(raw)}")
    if raw.get("quant_method") != METHOD:
        raise ConfigError(f"quantization_config.quant_method {show(raw.get('quant_method'))}: only {METHOD!r} "
                          "(written by python -m minillava.apps.quantize) is supported")
    unknown = sorted(set(raw) - {"quant_method", "bits", "group_size"})
    if unknown:
        raise ConfigError(f"quantization_config has unknown key {show(unknown[0])}")
    bits, group = raw.get("bits"), raw.get("group_size")
    if type(bits) is not int or bits not in BITS:
        raise ConfigError(f"quantization_config.bits must be 8 or 4, got {show(bits)}")
    if bits == 8 and group is not None:
        raise ConfigError(f"quantization_config.group_size must be null for 8 bits, got {show(group)}")
    if bits == 4 and (type(group) is not int or group not in GROUP_SIZES):
        raise ConfigError(f"quantization_config.group_size must be one of {GROUP_SIZES} for 4 bits, got {show(group)}")
    return Spec(bits, group)


# --- quantizing ---------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> weight (N, K) int8, scales (N,) in `scale_dtype`: symmetric per output row,
    the row's largest magnitude to 127. The integers are rounded against the scales as stored."""
    weight = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    for i in range(0, w.shape[0], ROWS):
        rows = w[i : i + ROWS].float()
        s = (rows.abs().amax(dim=1) / 127).clamp(min=1e-10).to(scale_dtype)  # a zero row keeps a usable scale
        weight[i : i + ROWS] = torch.round(rows / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
        scales[i : i + ROWS] = s
    return weight, scales


def quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> weight (N, K/2) uint8 (nibbles, the module docstring's layout), scales_and_zeros
    (K/G, N, 2) in `scale_dtype`: each group of G inputs of a row maps [min, max] onto 0..15."""
    n, k = w.shape
    weight = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    sz = torch.empty(k // group, n, 2, dtype=scale_dtype, device=w.device)
    for i in range(0, n, ROWS):
        rows = w[i : i + ROWS].float()
        r = rows.shape[0]
        g = rows.view(r, k // group, group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (r, K/G)
        scales = ((hi - lo).clamp(min=1e-6) / 15).to(scale_dtype)
        zeros = (lo + scales.float() * 8).to(scale_dtype)  # the value of q = 8, as gpt-fast stores it
        low = zeros.float() - scales.float() * 8  # the value of q = 0, from the stored numbers
        q = torch.round((g - low[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8).view(r, k)
        weight[i : i + ROWS] = q[:, 0::2] << 4 | q[:, 1::2]
        sz[:, i : i + ROWS] = torch.stack([scales, zeros], dim=-1).transpose(0, 1)
    return weight, sz


def quantize(w: torch.Tensor, spec: Spec, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A linear's weight (N, K) in its storage form: {"weight": ..., "scales" or "scales_and_zeros": ...}."""
    if spec.bits == 8:
        weight, scales = quantize_int8(w, scale_dtype)
        return {"weight": weight, "scales": scales}
    weight, sz = quantize_int4(w, spec.group_size, scale_dtype)
    return {"weight": weight, "scales_and_zeros": sz}


def unpack_int4(weight: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 nibbles -> (N, K) uint8 in 0..15."""
    return torch.stack([weight >> 4, weight & 15], dim=-1).view(weight.shape[0], -1)


def dequantize(tensors: dict[str, torch.Tensor], spec: Spec, dtype: torch.dtype) -> torch.Tensor:
    """The storage form back to a (N, K) weight in `dtype`."""
    if spec.bits == 8:
        return (tensors["weight"].to(dtype) * tensors["scales"].to(dtype)[:, None])
    q = unpack_int4(tensors["weight"])
    n, k = q.shape
    sz = tensors["scales_and_zeros"].to(dtype)  # (K/G, N, 2)
    s, z = sz[..., 0].t()[:, :, None], sz[..., 1].t()[:, :, None]  # (N, K/G, 1)
    return ((q.view(n, k // spec.group_size, -1).to(dtype) - 8) * s + z).view(n, k)


# --- the layer ----------------------------------------------------------------------------------------

# Which matmul each device uses, chosen by measurement (docs/speed.md; scripts/benchkit/quant.py `quant_kernels`).
# CPU: PyTorch's packed kernels. One 5632 x 2048 matrix, one row, bf16 activations, 2 threads: int8
#   `_weight_int8pack_mm` 0.81 ms and int4 `_weight_int4pack_mm_for_cpu` 0.38 ms against bf16 F.linear's
#   1.59 ms (issue 21's table); dequantize-and-matmul is slower than bf16 itself (it reads the integers,
#   then writes and reads a 16-bit copy). With bf16 activations the packed kernels stay ahead at any row
#   count (512 rows: 0.55x and 0.44x F.linear's time). With float32 activations they are no fast kernels
#   at all, even for one row (issue 29, an AMD EPYC with AVX512-BF16, one thread, 5632 x 2048: int8 36.8 ms
#   and int4 103 ms against 0.83 and 0.42 ms with bf16 activations; 64 rows: 325 / 989 ms dequantized
#   against 70 / 76 ms), so float32 activations are cast to bf16 around them, as CUDA's float16 around
#   tinygemm: the result differs from float32 activations by bf16's rounding of the inputs (relative
#   2^-9 each; tests/test_quantize.py holds a layer to 4e-3 of its output's norm), next to the 8- or 4-bit
#   weights' own error. The kernels take the scales in the activations' dtype: a float32 model's get a
#   bf16 copy (`kernel_scales`, N or K/G x N x 2 numbers).
# CUDA: int4 is aten._weight_int4pack_mm (tinygemm, gpt-fast's int4 path) for up to TINYGEMM_ROWS rows (decode
#   steps); it takes bf16 activations only, so float16 ones are cast around it. For more rows (a prefill) it is
#   slower than dequantizing and multiplying (torchao/prototype/hqq/README.md, 4096 x 4096, A6000: 128 rows
#   0.25 ms against 0.27, 256 rows 0.52 against 0.33, 1,024 rows 2.20 against 0.51), so those rows get the
#   weight back from the kernel's own packing (`unpack_tinygemm`: no second copy is kept) and F.linear.
#   int8 is dequantize-and-matmul (`int8_matmul`): the weight scaled in the activations' dtype, then F.linear;
#   under torch.compile with inductor's coordinate_descent_tuning (set for the CUDA decode step, as gpt-fast
#   does: generate.compile_steps) a one-row product becomes a fused reduction that reads the int8 weight
#   (torch/_inductor/decomposition.py `mm`); eager, it is correct but not faster than 16-bit.
#   scripts/cuda_check.py measures both.
# Anything else (MPS, ...): dequantize-and-matmul, correct everywhere.
KERNELS = {("cpu", 8): "int8pack", ("cpu", 4): "int4pack_cpu", ("cuda", 4): "int4pack_cuda"}
TINYGEMM_ROWS = 128  # most rows sent to CUDA's int4 kernel; more are dequantized (see above)
# CPU int8, weights of at least ONEDNN_INT8_MIN numbers: "int8onednn" instead of "int8pack" (issue 29; docs/speed.md,
#   scripts/int_kernels.py). `_weight_int8pack_mm` is no compute limit on one row (one 5632 x 2048 matrix again and
#   again, in cache: 40 GB/s on one thread) but reads memory at 13-16 GB/s (cold, one thread, copy 23-36 GB/s):
#   it walks 4 rows of the weight at once, 16 bytes of each per step. oneDNN's uint8 x int8 matmul, the weight
#   pre-packed in its own layout (onednn.qlinear_prepack), reads it at 21-28 GB/s in the same runs (1.4-1.9x),
#   8 rows 1.7-2.5x as fast. It takes integer activations, so each row x goes in as two uint8 rows: a = round(x / s),
#   s = max|x| / 127, and its residual round((x / s - a) * 254); the float32 outputs are recombined as
#   s * y_a + s / 254 * y_r (`onednn_int8_matmul`). The activation is then exact to max|x| / (127 * 508) an
#   element, finer than bf16's rounding of all but the row's smallest numbers: against the dequantized
#   weight in float64, 5632 x 2048, bf16 activations 1.66e-3 of the output's norm as `_weight_int8pack_mm`
#   (both round the output to bf16), float32 ones 3.5e-5 where the bf16 cast gave 2.4e-3 (tests/test_quantize.py).
#   Its split and recombination cost ~45 us a call, more than a small matrix saves (512 x 512: 54 against
#   8 us; 2048 x 2048 even warm, faster cold), hence the size. Taken only where a probe of the worst case is
#   exact (`onednn_int8_exact`): oneDNN's int8 guide says CPUs without VNNI sum pairs of uint8 x int8 products
#   in saturating int16. The packed weight is an opaque oneDNN tensor that torch.compile cannot trace:
#   compiled graphs call the same function as the custom op minillava::int8_onednn.
ONEDNN_INT8_MIN = 1 << 22


def onednn_int8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ the int8 weight in oneDNN's packing (onednn.qlinear_prepack of the (N, K) int8 weight) with
    per-row float32 `scales` (N,), `zero` one 0 (its zero point): (M, N) in x's dtype. Each row goes in as two
    uint8 rows (zero point 128), its coarse integers and their residual (KERNELS' note)."""
    m = x.shape[0]
    x32 = x.float()
    s = (x32.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # a zero row: s tiny, all 0
    u = x32 / s  # in [-127, 127]
    a = u.round()
    q = torch.cat([a, (u - a).mul_(254).round_()]).add_(128).to(torch.uint8)  # residual in [-127, 127] too
    y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, scales, zero, None, 1.0, 0, torch.float32, "none", [], "")
    return torch.addcmul(y[m:] * (s / 254), y[:m], s).to(x.dtype)


# the same for torch.compile, which cannot trace the opaque packed weight (QuantizedLinear.forward)
torch.library.custom_op("minillava::int8_onednn", onednn_int8_matmul, mutates_args=())
torch.library.register_fake("minillava::int8_onednn", lambda x, packed, scales, zero: x.new_empty(x.shape[0], scales.shape[0]))


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's uint8 x int8 matmul is here, and exact on the worst case: every activation at
    255 against weights of 127 and -127 (without VNNI, pairs of products summed in int16 saturate at 32767)."""
    try:
        w = torch.full((16, 64), 127, dtype=torch.int8)
        w[1::2] = -127
        x = torch.full((1, 64), 3.0)  # a = 127 for every input: the uint8 255
        y = onednn_int8_matmul(x, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(16), torch.zeros(1, dtype=torch.long))
        return torch.allclose(y, x @ w.float().t(), rtol=1e-4, atol=0)  # saturated: off by half
    except (RuntimeError, AttributeError, NotImplementedError):  # no oneDNN, or no int8 matmul in it
        return False


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ the int8 weight (N, K) with per-row scales (N,), dequantize-and-matmul: CUDA's int8
    form (and any device's without a kernel of its own).

    16-bit activations: the weight is scaled before the sum (one kernel: int8 times the scales promotes
    to their dtype). gpt-fast's form, F.linear(x, weight.to(dtype)) * scales, sums x against the raw
    integers first: in float16 that sum overflows once an output exceeds 65504 / 127, about 516 times its
    row's largest weight (tests/test_cuda_paths.py). float32 keeps that form: no overflow in its range,
    and the CPU's float32 numbers stay as they were."""
    if x.dtype == torch.float32:
        return F.linear(x, weight.to(x.dtype)) * scales
    return F.linear(x, weight * scales.to(x.dtype)[:, None])


def unpack_tinygemm(packed: torch.Tensor) -> torch.Tensor:
    """CUDA's int4 packing (aten._convert_weight_to_int4pack, (N/8, K/(16 T), 32, T/2) int32 for T inner
    k-tiles) back to the storage form (N, K/2) uint8 it was made from: the inverse of the kernel
    `matrix_to_m16n8k16_Bint4_layout` (aten/src/ATen/native/cuda/int4mm.cu), pure tensor operations.

    That kernel's lane t of tile (n-tile, outer k-tile) reads row n = 8 n-tile + t // 4 and, for its
    inner k-tiles 2i and 2i+1, the bytes c + {0, 4, 8, 12} + t % 4 of that row (c = 16 (outer T/2 + i)),
    v0..v3, and packs their nibbles into one int32 as, from the lowest: v0 high, v1 high, v2 high,
    v3 high, v0 low, v1 low, v2 low, v3 low. Read as 4 little-endian bytes (every CUDA GPU, and x86 and
    ARM hosts, are little-endian) that int32 is b0 = v0H | v1H << 4, b1 = v2H | v3H << 4,
    b2 = v0L | v1L << 4, b3 = v2L | v3L << 4. scripts/cuda_check.py checks this against the kernel."""
    n_tiles, outer, lanes, half = packed.shape
    b = packed.contiguous().view(torch.uint8).view(n_tiles, outer, lanes // 4, 4, half, 4)  # lane t = 4 (t // 4) + t % 4
    b0, b1, b2, b3 = b.unbind(-1)
    v = torch.stack([(b0 & 15) << 4 | (b2 & 15), (b0 & 0xF0) | b2 >> 4,
                     (b1 & 15) << 4 | (b3 & 15), (b1 & 0xF0) | b3 >> 4], dim=-1)  # v0..v3: (n-tile, outer, t//4, t%4, i, j)
    # row 8 n-tile + t // 4; byte 16 (outer T/2 + i) + 4 j + t % 4
    return v.permute(0, 2, 1, 4, 5, 3).reshape(n_tiles * lanes // 4, outer * half * 16)


def int4_cuda_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, spec: "Spec") -> torch.Tensor:
    """x (M, K) @ the int4 weight in CUDA's packing: tinygemm for up to TINYGEMM_ROWS rows (bfloat16
    activations; float16 ones cast around it), else the weight dequantized from the packing and F.linear."""
    # under torch.compile's dynamic prefill this is a guard: a prompt on the other side of it compiles once more
    if x.shape[0] <= TINYGEMM_ROWS:
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, spec.group_size,
                                                  scales_and_zeros).to(x.dtype)
    weight = dequantize({"weight": unpack_tinygemm(packed), "scales_and_zeros": scales_and_zeros}, spec, x.dtype)
    return F.linear(x, weight)


class QuantizedLinear(nn.Module):
    """nn.Linear with a weight-only quantized weight: (..., K) in the model's dtype -> (..., N).

    Built (on the meta device) with the storage form's buffers, filled by load_state_dict, then `pack`ed
    for its device's kernel once the tensors are in place."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: Spec, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.kernel, self.packed = "dequant", False
        for suffix, shape in spec.shapes(out_features, in_features).items():
            kind = {"weight": torch.int8 if spec.bits == 8 else torch.uint8}.get(suffix, dtype)
            self.register_buffer(suffix, torch.empty(shape, dtype=kind, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, spec: Spec, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """The layer of a float weight (N, K) (and bias (N,)), in its dtype, packed for its device."""
        n, k = weight.shape
        layer = cls(k, n, bias is not None, spec, weight.dtype, "meta")
        for suffix, t in quantize(weight, spec, weight.dtype).items():
            setattr(layer, suffix, t)
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        layer.pack()
        return layer

    @torch.no_grad()
    def pack(self):
        """Turn the storage form into the device kernel's (see KERNELS), once; the storage form is dropped."""
        if self.packed:
            return
        self.packed, device = True, self.weight.device
        self.kernel = KERNELS.get((device.type, self.spec.bits), "dequant")
        if self.kernel == "int8pack" and self.weight.numel() >= ONEDNN_INT8_MIN and onednn_int8_exact():
            # oneDNN's packing replaces the weight (KERNELS' note); `weight` stays a plain tensor, empty, for
            # whoever checks where it is (weights.load_model hands the file's pages back once it moves)
            self.kernel = "int8onednn"
            self.register_buffer("packed_weight", torch.ops.onednn.qlinear_prepack(self.weight, None), persistent=False)
            self.register_buffer("kernel_scales", self.scales.float(), persistent=False)
            self.register_buffer("zero", torch.zeros(1, dtype=torch.long), persistent=False)
            self.weight = self.weight.new_empty(0)
            return
        if self.kernel == "int8pack" and self.weight.data_ptr() % 64:
            # a stored int8 weight is a view of the checkpoint's mapped file, at whatever offset its header
            # gave it: the bf16-activation kernel reads it with 64-byte vector loads, and crashed there
            # (segmentation fault, tests/test_quantize.py's written checkpoint) where its own copy does not.
            # load_model hands the file's pages back once the weight is replaced.
            self.weight = self.weight.clone()
        pad = -self.out_features % INT4_ROW_BLOCK
        if pad and self.kernel in ("int4pack_cpu", "int4pack_cuda"):
            # the kernels refuse a row count off their block (module docstring): zero rows (q = 0 and a zero
            # scale and zero, so every padded output is 0) are appended here only, sliced off in `forward`. The
            # copy is one weight's, once (InternVL3-8B's head: 272 MB of nibbles), freed as the packing replaces it.
            w, sz = self.weight, self.scales_and_zeros
            self.weight = torch.cat([w, w.new_zeros(pad, w.shape[1])])
            self.scales_and_zeros = torch.cat([sz, sz.new_zeros(sz.shape[0], pad, 2)], dim=1)
        if self.kernel in ("int8pack", "int4pack_cpu"):  # bf16 activations (see KERNELS): their scales in bf16
            scales = self.scales if self.spec.bits == 8 else self.scales_and_zeros
            self.register_buffer("kernel_scales", scales if scales.dtype != torch.float32 else scales.bfloat16(),
                                 persistent=False)
        if self.kernel == "int4pack_cpu":  # the CPU op takes (N, K) int32 in 0..15; packed per block of rows
            self.weight = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_int4(self.weight[i : i + ROWS]).to(torch.int32), 1) for i in range(0, self.weight.shape[0], ROWS)])
        elif self.kernel == "int4pack_cuda":  # takes the storage form as it is; 4-D int32 tiles out
            tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)  # K % 32 is assured by the group size
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), tiles)
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        kernel = self.kernel
        if kernel == "int8onednn":
            matmul = torch.ops.minillava.int8_onednn if torch.compiler.is_compiling() else onednn_int8_matmul
            y = matmul(x.contiguous(), self.packed_weight, self.kernel_scales, self.zero)
        elif kernel in ("int8pack", "int4pack_cpu"):  # float32 activations through the kernels in bf16 (see KERNELS)
            a = (x.to(self.kernel_scales.dtype) if x.dtype == torch.float32 else x).contiguous()
            if kernel == "int8pack":
                y = torch.ops.aten._weight_int8pack_mm(a, self.weight, self.kernel_scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.weight, self.spec.group_size, self.kernel_scales)
            y = y.to(x.dtype)
        elif kernel == "int4pack_cuda":
            y = int4_cuda_matmul(x, self.weight, self.scales_and_zeros, self.spec)
        elif self.spec.bits == 8:
            y = int8_matmul(x, self.weight, self.scales)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        if y.shape[-1] != self.out_features:  # an int4 kernel's padded rows (`pack`): sliced off, made contiguous
            y = y[:, : self.out_features].contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The int4 weight (N, K) in `dtype`, from the storage form (a layer without a kernel of its own)."""
        return dequantize({"weight": self.weight, "scales_and_zeros": self.scales_and_zeros}, self.spec, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}, kernel={self.kernel}"


def swap_linears(model: nn.Module, spec: Spec, make=None) -> list[str]:
    """Replace every linear named by QUANTIZED (our parameter names, without .weight) with `make(linear)`,
    by default an empty QuantizedLinear on the same device (filled by load_state_dict); the names
    replaced. Each is checked (`Spec.check`) before any is replaced."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and QUANTIZED.fullmatch(name)]
    for name in names:
        old = model.get_submodule(name)
        spec.check(name, old.out_features, old.in_features)
    make = make or (lambda old: QuantizedLinear(old.in_features, old.out_features, old.bias is not None, spec,
                                                old.weight.dtype, old.weight.device))
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(model.get_submodule(name)))
    return names


def quantize_model(model: nn.Module, spec: Spec) -> nn.Module:
    """Quantize a model already in memory, in place (benchmarks, tests; the commands quantize while
    loading): the same weights as `load_model(..., quantize=spec)` gives in the model's dtype."""

    def make(old: nn.Linear) -> QuantizedLinear:  # a CPU model from load_model may hold its weights in
        weight = old.weight.to_dense() if old.weight.is_mkldnn else old.weight  # oneDNN's layout (llama.Linear.pack)
        return QuantizedLinear.from_weight(weight, spec, old.bias)

    swap_linears(model, spec, make)
    return model
