"""The CPU's int8 / int4 one-row (and few-row) products alone, cold, in GB/s of the bytes each reads
(issue 29, item 2; docs/speed.md "Decode at the memory limit").

Each kernel multiplies `--rows` rows against one matrix after another of a set of random ones (at least 8,
and at least --cold-mib of them together, more than the 32 MiB L3 here), so the weights come from memory
as in a decode step; GB/s = (weight + scales bytes, as `QuantizedLinear` packs them) / time per matrix,
the best of --repeats rounds, the kernels alternated round by round in one process. Side by side:

    int8         aten._weight_int8pack_mm, what `QuantizedLinear` runs (bfloat16 activations)
    int8-warm    the same on one matrix again and again (in cache): what the kernel does when memory is
                 not what limits it
    int8-onednn  onednn.qlinear_pointwise (uint8 x int8 -> float32, the weight pre-packed by
                 onednn.qlinear_prepack) with each activation row as two uint8 rows, a coarse one and its
                 residual (error <= max|x| / (127 * 508) an element), recombined in float32; the split
                 and the recombination are timed with it: `quant.onednn_int8_matmul`, what `QuantizedLinear` runs
                 from 2^22 numbers (kernel int8onednn).
    int4, int4-warm   aten._weight_int4pack_mm_for_cpu, group size --group

    python scripts/int_kernels.py --threads 1,2 --rows 1,8        # every width below; ~10 minutes on 2 cores
    python scripts/int_kernels.py --step --threads 1               # whole decode steps instead (below)

--step: one decode step of bench.py's 0.95B random decoder (row 12: prompt 128, 31 steps, eager, greedy) in
bfloat16, in int8 with `_weight_int8pack_mm` everywhere (before issue 29's change) and in int8 as
`QuantizedLinear` chooses now, alternated in one process; ms a step and its share of the bare copy's rate.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit.machine import bare_copy as copy_samples  # noqa: E402

from minillava import quant  # noqa: E402
from minillava.quant import QuantizedLinear, Spec, onednn_int8_matmul  # noqa: E402

SHAPES = "5632x2048,2048x5632,2048x2048,32000x2048,11008x4096,4096x11008,4096x4096"  # 0.95B, then the 7B's


def bare_copy() -> float:
    """Bytes/s of a 1 GiB copy, read + written (scripts/benchkit/machine.py), the best of 5."""
    return max(copy_samples(1 << 30, 5))


@contextlib.contextmanager
def int8pack_only():
    """int8 layers packed meanwhile take `_weight_int8pack_mm` whatever their size (no matrix has 2^62 numbers)."""
    keep, quant.ONEDNN_INT8_MIN = quant.ONEDNN_INT8_MIN, 1 << 62
    try:
        yield
    finally:
        quant.ONEDNN_INT8_MIN = keep


def layer(n: int, k: int, spec: Spec, g: torch.Generator) -> QuantizedLinear:
    """A packed QuantizedLinear (bfloat16) with random storage-form tensors (speed does not depend on them),
    int8 on `_weight_int8pack_mm` whatever its size (the oneDNN packing is made beside it, in `main`)."""
    with int8pack_only():
        return _layer(n, k, spec, g)


def _layer(n: int, k: int, spec: Spec, g: torch.Generator) -> QuantizedLinear:
    m = QuantizedLinear(k, n, False, spec, torch.bfloat16, "cpu")
    if spec.bits == 8:
        m.weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        m.scales = (torch.rand(n, generator=g) * 0.01 + 1e-3).bfloat16()
    else:
        m.weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        m.scales_and_zeros = (torch.rand(k // spec.group_size, n, 2, generator=g) * 0.01).bfloat16()
    m.pack()
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="N x K of each matrix, comma-separated")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="1,8")
    p.add_argument("--kernels", default="int8,int8-warm,int8-onednn,int4,int4-warm")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cold-mib", type=int, default=128)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--step", action="store_true", help="whole decode steps, int8 before / after (see above)")
    p.add_argument("--rounds", type=int, default=5, help="--step: rounds of 31 steps each side")
    a = p.parse_args()
    if a.step:
        return steps([int(t) for t in a.threads.split(",")], a.rounds)
    kernels = a.kernels.split(",")
    g = torch.Generator().manual_seed(0)
    load = lambda: open("/proc/loadavg").read().split()[0]  # noqa: E731
    copies = {}
    for th in map(int, a.threads.split(",")):
        torch.set_num_threads(th)
        copies[th] = bare_copy()
    print("bare copy: " + ", ".join(f"{t} thread(s) {c / 1e9:.1f} GB/s" for t, c in copies.items()) + f" (load {load()})")
    print("| N x K | threads | rows | load | " + " | ".join(kernels) + " |")
    print("|---" * (4 + len(kernels)) + "|")
    for shape in a.shapes.split(","):
        n, k = map(int, shape.split("x"))
        sets = {}
        for bits in sorted({8 if name.startswith("int8") else 4 for name in kernels}, reverse=True):
            spec = Spec(8) if bits == 8 else Spec(4, a.group)
            first = layer(n, k, spec, g)
            nbytes = first.weight.numel() * first.weight.element_size() + first.kernel_scales.numel() * first.kernel_scales.element_size()
            count = max(8, math.ceil((a.cold_mib << 20) / nbytes))
            sets[bits] = [first] + [layer(n, k, spec, g) for _ in range(count - 1)], nbytes
        if "int8-onednn" in kernels:
            for m in sets[8][0]:
                m.onednn = torch.ops.onednn.qlinear_prepack(m.weight, None)
                m.scales32 = m.kernel_scales.float()
            zero = torch.zeros(1, dtype=torch.long)
        for th in map(int, a.threads.split(",")):
            torch.set_num_threads(th)
            for rows in map(int, a.rows.split(",")):
                x = torch.randn(rows, k, generator=g).bfloat16()
                calls = {}
                for name in kernels:
                    ls, _ = sets[8 if name.startswith("int8") else 4]
                    if name.endswith("-warm"):
                        ls = [ls[0]] * len(ls)
                    if name == "int8-onednn":
                        calls[name] = [lambda m=m: onednn_int8_matmul(x, m.onednn, m.scales32, zero) for m in ls]
                    elif name.startswith("int8"):
                        calls[name] = [lambda m=m: torch.ops.aten._weight_int8pack_mm(x, m.weight, m.kernel_scales) for m in ls]
                    else:
                        calls[name] = [lambda m=m: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.weight, a.group, m.kernel_scales) for m in ls]
                best = dict.fromkeys(kernels, math.inf)
                for _ in range(a.repeats):
                    for name, fns in calls.items():
                        fns[0](), fns[1]()
                        t0 = time.perf_counter()
                        for f in fns:
                            f()
                        best[name] = min(best[name], (time.perf_counter() - t0) / len(fns))
                cells = [f"{sets[8 if nm.startswith('int8') else 4][1] / best[nm] / 1e9:.1f} ({best[nm] * 1e3:.3f} ms)" for nm in kernels]
                print(f"| {shape} | {th} | {rows} | {load()} | " + " | ".join(cells) + " |", flush=True)
        del sets


def steps(threads: list[int], rounds: int):
    """--step (the module docstring)."""
    import gc

    from benchkit.decoders import build_decoders, clone_as
    from benchkit.plan import decoder_1b
    from benchkit.quant import step_bytes

    from minillava.generate import decode_one_token, prefill, sample
    from minillava.quant import quantize_model

    text = decoder_1b()
    torch.manual_seed(0)
    ours, hf = build_decoders(text)
    del hf
    models = {"bfloat16": clone_as(ours, torch.bfloat16)}
    with int8pack_only():
        models["int8, int8pack"] = quantize_model(clone_as(ours, torch.bfloat16), Spec(8))
    models["int8, now"] = quantize_model(clone_as(ours, torch.bfloat16), Spec(8))
    del ours
    gc.collect()
    prompt, n = 128, 32
    ids_in = torch.randint(3, text.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1))

    def run(model) -> float:
        model.llm.setup_cache(1, 256)
        next_id = sample(prefill(model, model.embed(ids_in)[None]), 0.0, 1.0, None)
        t0 = time.perf_counter()
        for step in range(n - 1):
            next_id = sample(decode_one_token(model, next_id.view(1, 1), torch.tensor([prompt + step])), 0.0, 1.0, None)
        return (time.perf_counter() - t0) / (n - 1)

    for th in threads:
        torch.set_num_threads(th)
        copy = bare_copy()
        for m in models.values():
            run(m)
        best = dict.fromkeys(models, math.inf)
        for _ in range(rounds):
            for name, m in models.items():
                best[name] = min(best[name], run(m))
        copy = max(copy, bare_copy())
        print(f"{th} thread(s), bare copy {copy / 1e9:.1f} GB/s, load {open('/proc/loadavg').read().split()[0]}")
        for name, m in models.items():
            b = step_bytes(m)
            print(f"  {name:16s} {best[name] * 1e3:7.1f} ms a step; reads {b / 1e9:.3f} GB: {b / best[name] / copy:.2f} of the copy's rate")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
