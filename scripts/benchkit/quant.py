"""Rows 12 and 13: weight-only int8 / int4 (minillava/quant.py): decode against float32 and bfloat16, each
kernel alone, and loading with --quantize int4."""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minillava.config import TextConfig
from minillava.generate import CACHE_BUCKET, decode_one_token, prefill, sample
from minillava.llama import Linear, pack_linears
from minillava.model import Llava
from minillava.quant import DEFAULT_GROUP_SIZE, QuantizedLinear, Spec, quantize_model

from .contention import watched
from .decoders import as_loaded, build_decoders, clone_as
from .fmt import fmt_dict
from .loading import run_loader, write_checkpoint
from .machine import bare_copy
from .plan import Plan
from .timing import alternate


QUANT_SIDES = ("float32", "bfloat16", "int8", "int4")


def quant_specs(text: TextConfig) -> dict[str, Spec]:
    """int8, and int4 in groups of 128 (the default), or of the largest size the widths allow (test shapes)."""
    group = max(g for g in (32, 64, DEFAULT_GROUP_SIZE) if text.hidden_size % g == 0 and text.intermediate_size % g == 0)
    return {"int8": Spec(8), "int4": Spec(4, group)}


def step_bytes(model: Llava) -> int:
    """Bytes of weights a decode step reads, quantized or not: every block's weights (and scales), the
    final norm, lm_head and one embedding row (the KV cache is not in a state_dict)."""
    llm = model.llm
    row = llm.embed_tokens.weight.shape[1] * llm.embed_tokens.weight.element_size()
    return sum(kernel_bytes(m) for m in (llm.layers, llm.norm, model.lm_head)) + row


def kernel_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s state_dict, plus the oneDNN-packed int8 weights its QuantizedLinears hold in
    their place (kernel int8onednn: not in a state_dict, whose `weight` is then empty; quant.KERNELS)."""
    tensors = [*module.state_dict().values(),
               *(m.packed_weight for m in module.modules() if getattr(m, "kernel", None) == "int8onednn")]
    return sum(t.numel() * t.element_size() for t in tensors)


def packed_layer(weight: torch.Tensor) -> Linear:
    """A bias-free llama.Linear holding `weight` (N, K), packed as load_model packs it on the CPU."""
    layer = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    pack_linears(layer)
    return layer


def quant_kernels(text: TextConfig, repeats: int) -> dict[str, dict]:
    """Each kernel alone on one row: an (MLP x width) matrix, eight different ones in turn so that none
    stays in cache (issue 21's table). {side: {"s": seconds per matrix (samples), "bytes": its bytes}}."""
    n, k = text.intermediate_size, text.hidden_size
    specs = quant_specs(text)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) * 0.02 for _ in range(8)]
    sides = {}
    for name in QUANT_SIDES:
        dtype = torch.float32 if name == "float32" else torch.bfloat16
        if name in specs:
            fns = [QuantizedLinear.from_weight(w.to(dtype), specs[name]) for w in weights]
            bytes_ = kernel_bytes(fns[0])
        else:  # llama.Linear as load_model leaves it on the CPU: packed for oneDNN
            fns = [packed_layer(w.to(dtype)) for w in weights]
            bytes_ = n * k * dtype.itemsize
        x = torch.randn(1, k, dtype=dtype)

        def run(fns=fns, x=x) -> float:
            t0 = time.perf_counter()
            for f in fns:
                f(x)
            return (time.perf_counter() - t0) / len(fns)

        sides[name] = (run, bytes_)
    samples = alternate({name: run for name, (run, _) in sides.items()}, repeats, label="quant_kernels")
    return {name: {"s": samples[name], "bytes": sides[name][1]} for name in QUANT_SIDES}


@torch.inference_mode()
def bench_quant(plan: Plan, log) -> dict:
    """Row 12: decode tokens/s at batch 1, eager, of the same random decoder in float32, bfloat16, int8 and
    int4 (group 128, bfloat16 activations), side by side; the bytes each step reads, the bare copy's
    bandwidth before and after, and each kernel alone (`quant_kernels`)."""
    prompt, n = plan.decode_prompt, plan.new_tokens
    cache = -(-(prompt + n) // CACHE_BUCKET) * CACHE_BUCKET
    t0 = time.perf_counter()
    ours, hf = build_decoders(plan.text)
    del hf
    models = {"float32": ours, "bfloat16": clone_as(ours, torch.bfloat16)}
    for name, spec in quant_specs(plan.text).items():
        models[name] = quantize_model(clone_as(ours, torch.bfloat16), spec)
        gc.collect()
    as_loaded(ours)  # last: the clones above read its plain tensors
    log(f"built the float32, bfloat16, int8 and int4 decoders in {time.perf_counter() - t0:.1f} s")
    ids_in = torch.randint(3, plan.text.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1))
    ids: dict[str, list[int]] = {}

    def side(name: str) -> Callable[[], float]:
        model = models[name]

        def run() -> float:
            model.llm.setup_cache(1, cache)
            next_id = sample(prefill(model, model.embed(ids_in)[None]), 0.0, 1.0, None)
            out = [int(next_id)]
            t0 = time.perf_counter()
            for step in range(n - 1):
                next_id = sample(decode_one_token(model, next_id.view(1, 1), torch.tensor([prompt + step])), 0.0, 1.0, None)
                out.append(int(next_id))
            elapsed = time.perf_counter() - t0
            ids[name] = out
            return elapsed

        return run

    with watched("copy"):
        copy = bare_copy(plan.copy_bytes, plan.repeats["copy"])
    samples = alternate({name: side(name) for name in QUANT_SIDES}, plan.repeats["decode"], label="quant")
    with watched("copy"):
        copy += bare_copy(plan.copy_bytes, plan.repeats["copy"])
    log(f"quantized decode samples (s for {n - 1} tokens): {fmt_dict(samples)}")
    kernels = quant_kernels(plan.text, plan.repeats["matmul"])
    log(f"kernels alone (s per matrix): {fmt_dict({k: v['s'] for k, v in kernels.items()})}")
    agree = {name: sum(a == b for a, b in zip(ids[name], ids["float32"])) for name in QUANT_SIDES}
    return {"samples": samples, "tokens_timed": n - 1, "copy_bytes_per_s": copy, "kernels": kernels,
            "bytes": {name: step_bytes(m) for name, m in models.items()}, "ids_equal_float32": agree,
            "ids_total": n}


def bench_quant_loading(plan: Plan, log) -> dict:
    """Row 13: peak RSS of loading the plan's float16 checkpoint with --quantize int4 (group 128, bfloat16),
    in a fresh process, against the bytes of the same checkpoint written quantized by minillava.apps.quantize
    (which also loads, as information)."""
    from minillava.apps.quantize import quantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        ckpt = write_checkpoint(plan, Path(tmp) / "ckpt")
        t0 = time.perf_counter()
        spec = quant_specs(plan.ckpt_text)["int4"]
        q4 = quantize_checkpoint(str(ckpt), Path(tmp) / "int4", spec)
        quantize_s = time.perf_counter() - t0
        result = {"ckpt_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
                  "int4_bytes": (q4 / "model.safetensors").stat().st_size, "quantize_s": quantize_s,
                  "while_loading": run_loader(ckpt, "bfloat16", plan.threads, f"4:{spec.group_size}"),
                  "quantized_ckpt": run_loader(q4, "bfloat16", plan.threads)}
    log(f"int4 loading: {fmt_dict(result)}")
    result["group_size"] = spec.group_size
    return result
