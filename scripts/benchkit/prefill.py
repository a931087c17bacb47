"""Rows 3, 5 and 7: prefill, ours against transformers at each length (and the bare matmul), and ours at the
image's compressed and uncompressed token counts."""

from __future__ import annotations

import time

import torch

from minillava.generate import compile_steps, prefill
from minillava.model import Llava

from .contention import watched
from .decoders import random_embeds
from .fmt import fmt_dict
from .machine import bare_matmul
from .plan import Plan
from .timing import alternate, wall


@torch.inference_mode()
def bench_prefill(plan: Plan, ours: Llava, hf, compressed_lengths: dict[str, int], log) -> dict:
    """Rows 3 and 5 (ours vs transformers at each prefill length, and the bare matmul), row 7 (ours at the
    real token counts of the image, compressed vs not)."""
    lengths = list(plan.prefill_lengths) + list(compressed_lengths.values())
    ours.llm.setup_cache(1, max(lengths))  # one cache for all: a prefill writes positions 0 .. T-1
    embeds = {t: random_embeds(hf, t, seed=t) for t in lengths}

    def ours_side(t, run=prefill):
        return wall(lambda: run(ours, embeds[t]))

    def hf_side(t):  # a cache is filled as ours does; logits of the last position only, as ours
        return wall(lambda: hf(inputs_embeds=embeds[t], use_cache=True, logits_to_keep=1).logits)

    short = plan.prefill_lengths[0]
    parity = (prefill(ours, embeds[short]) - hf(inputs_embeds=embeds[short], logits_to_keep=1).logits[:, -1]).abs().max().item()
    with watched("matmul"):
        matmul = bare_matmul(plan.matmul_n, plan.repeats["matmul"])
    # Warm-up: each side once at the shortest length (the longer calls run the same kernels).
    ours_side(short)()
    hf_side(short)()
    compiled, compile_s, compile_error = None, None, None
    if plan.compile:  # also the --compile path: compile_steps' prefill (dynamic shapes), no target of its own
        t0 = time.perf_counter()
        try:
            compiled = compile_steps(ours).prefill
            for t in plan.prefill_lengths:  # the first call compiles; the others must not recompile
                compiled(ours, embeds[t])
            compile_s = time.perf_counter() - t0
            log(f"compiled the prefill (dynamic=True) and ran it once per length in {compile_s:.1f} s")
        except Exception as e:
            compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            compiled = None
            log(f"torch.compile of the prefill failed: {compile_error}")
    samples = {}
    longest = max(plan.prefill_lengths)
    for t in plan.prefill_lengths:  # shorter prompts are cheap: more rounds (up to 2x) for the same noise
        repeats = plan.repeats["prefill"] * min(2, max(1, round(longest / t)))
        sides = {f"ours_{t}": ours_side(t), f"hf_{t}": hf_side(t)}
        if compiled is not None:
            sides[f"ours_compiled_{t}"] = ours_side(t, compiled)
        samples.update(alternate(sides, repeats, warmup=False, label="prefill"))
    log(f"prefill samples (s): {fmt_dict(samples)}")
    with watched("matmul"):
        matmul += bare_matmul(plan.matmul_n, plan.repeats["matmul"])
    # Row 7: same function, already warm; compressed and uncompressed alternated.
    row7 = alternate({name: ours_side(t) for name, t in compressed_lengths.items()}, plan.repeats["compressed"],
                     warmup=False, label="compressed")
    log(f"compressed prefill samples (s): {fmt_dict(row7)}")
    return {"samples": samples, "matmul_flops": matmul, "parity_logits": parity, "row7": row7,
            "row7_lengths": compressed_lengths, "compile_s": compile_s, "compile_error": compile_error}
