"""Rows 4 and 6: greedy decode, ours (compile_steps) against transformers' generate, and the bare copy."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from minillava.generate import CACHE_BUCKET, Steps, TokenReader, compile_steps, prefill, sample
from minillava.model import Llava

from .contention import watched
from .decoders import decoder_weight_bytes, random_embeds
from .fmt import fmt_dict
from .machine import bare_copy
from .plan import Plan
from .timing import alternate


@torch.inference_mode()
def bench_decode(plan: Plan, ours: Llava, hf, log) -> dict:
    """Row 4 (greedy decode tokens/s, ours with compile_steps vs transformers' generate) and row 6 (bytes/s)."""
    prompt, n = plan.decode_prompt, plan.new_tokens
    cache = -(-(prompt + n) // CACHE_BUCKET) * CACHE_BUCKET  # as generate() sizes it
    ours.llm.setup_cache(1, cache)
    steps, compile_s, compile_error = Steps(), None, None
    if plan.compile:
        t0 = time.perf_counter()
        try:
            steps = compile_steps(ours)
            token, pos = torch.zeros(1, 1, dtype=torch.long), torch.tensor([prompt])
            for _ in range(3):
                steps.decode(ours, token, pos)
            compile_s = time.perf_counter() - t0
            log(f"compiled the decode step in {compile_s:.1f} s")
        except Exception as e:  # a broken toolchain must not sink the whole run: fall back to eager, say so
            compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            steps = Steps()
            log(f"torch.compile failed, decoding eagerly: {compile_error}")
    embeds = random_embeds(hf, prompt, seed=1)
    positions = torch.arange(prompt, prompt + n)
    ids: dict[str, list[int]] = {}

    def ours_decode(decode: Callable, key: str) -> Callable[[], float]:
        """generate()'s loop without tokenizer: prefill, then n - 1 decode steps; times the decode steps."""

        def run() -> float:
            reader = TokenReader(ours.device, n)
            next_id = sample(prefill(ours, embeds), 0.0, 1.0, None)
            reader.start(0, next_id)
            out = [reader.read(0)]
            t0 = time.perf_counter()
            for step in range(n - 1):
                logits = decode(ours, next_id.view(1, 1), positions[step : step + 1])
                next_id = sample(logits, 0.0, 1.0, None)
                reader.start(step + 1, next_id)
                out.append(reader.read(step + 1))
            elapsed = time.perf_counter() - t0
            ids[key] = out
            return elapsed

        return run

    class Clock:
        """A transformers streamer that only notes when each new token arrives."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            if value.numel():  # the first call carries the (empty) prompt ids
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def hf_decode() -> float:
        clock = Clock()
        out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, prompt, dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                          top_k=None, pad_token_id=0, eos_token_id=2, streamer=clock)
        ids["hf"] = out[0, -n:].tolist()
        return clock.times[-1] - clock.times[0]  # from the first new token (out of the prefill) to the last

    with watched("copy"):
        copy = bare_copy(plan.copy_bytes, plan.repeats["copy"])
    sides = {"ours": ours_decode(steps.decode, "ours"), "hf": hf_decode}
    if steps.compiled:  # the eager step too, for what compiling buys (no target)
        sides["ours_eager"] = ours_decode(Steps().decode, "ours_eager")
    samples = alternate(sides, plan.repeats["decode"], label="decode")
    with watched("copy"):
        copy += bare_copy(plan.copy_bytes, plan.repeats["copy"])
    log(f"decode samples (s for {n - 1} tokens): {fmt_dict(samples)}")
    return {"samples": samples, "tokens_timed": n - 1, "compile_s": compile_s, "compile_error": compile_error,
            "compiled": steps.compiled, "copy_bytes_per_s": copy, "same_ids": ids.get("ours") == ids.get("hf"),
            "weight_bytes": decoder_weight_bytes(ours), "cache_length": cache}
