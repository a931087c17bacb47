"""Rows 10 and 11: batching, the synthetic eval at several --batch-size and batched decode steps."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from minillava.generate import CACHE_BUCKET, Steps, decode_one_token, prefill, sample
from minillava.model import Llava

from .decoders import clone_as, random_embeds
from .fmt import fmt_dict
from .plan import Plan
from .timing import alternate


def bench_batch_eval(plan: Plan, log, model_name: str = "llava-next-tiny-scenes") -> dict:
    """Row 10: questions/s of `minillava.eval synthetic` (the shipped tiny model, globalcom2 r = 0.25, the
    task's own max_new_tokens) at each of plan.batch_sizes. Each side answers the same first
    `batch_questions` held-out questions through the eval's own loop (runner.answered: the scenes of the
    next batch are made in a thread while this batch is tiled, encoded, compressed and answered), the
    model loaded once, no file written."""
    from minillava.eval import runner
    from minillava.eval.tasks import TASKS
    from minillava.generate import load

    task = TASKS["synthetic"]
    questions = task.load(None, None, None)[: plan.batch_questions]
    model, tokenizer = load(model_name)
    settings = {"max_new_tokens": task.max_new_tokens}
    answers: dict[int, list[str]] = {}

    def side(size: int) -> Callable[[], float]:
        args = argparse.Namespace(compressor="globalcom2", retention_ratio=0.25, seed=0, batch_size=size)

        def run() -> float:
            t0 = time.perf_counter()
            done = runner.answered(args, task, questions, settings, model, tokenizer, Steps())
            answers[size] = [getattr(r, "text", repr(r)) for _, r in done]
            return time.perf_counter() - t0

        return run

    samples = alternate({f"batch{b}": side(b) for b in plan.batch_sizes}, plan.repeats["batch"], label="batch_eval")
    log(f"synthetic eval samples (s for {len(questions)} questions): {fmt_dict(samples)}")
    first = answers[plan.batch_sizes[0]]
    return {"samples": samples, "questions": len(questions), "same_answers": all(a == first for a in answers.values())}


BATCH_DTYPES = ("bfloat16", "float32")  # row 11a, row 11b


@torch.inference_mode()
def bench_batch_decode(plan: Plan, ours: Llava, hf, log, sizes=(1, 8), dtypes=BATCH_DTYPES) -> dict:
    """Rows 11a and 11b: greedy decode tokens/s (all rows' tokens) at batch 1 and 8, eager steps (a compiled
    step would compile once per batch size), in bfloat16 and float32, all four sides alternated in one
    run: every row the same prompt, so every row's ids must equal batch 1's. The prefill is not timed;
    the n - 1 decode steps are. Also the kernels' own ratio: every linear layer a step reads (blocks and
    lm_head, our Linear as the step calls it) applied to 1 and to 8 rows, nothing else: what the step's
    ratio would be if attention, norms and sampling were free."""
    prompt, n = plan.decode_prompt, plan.new_tokens
    cache = -(-(prompt + n) // CACHE_BUCKET) * CACHE_BUCKET
    models = {name: ours if getattr(torch, name) == ours.dtype else clone_as(ours, getattr(torch, name)) for name in dtypes}
    ids: dict[str, list[list[int]]] = {}
    prefilled = {}  # (dtype, batch size): (each layer's cache, first ids). A prefill costs b x a long decode:
    # done once per side; rerunning the steps rewrites the same slots, and the mask hides the later ones

    def side(name: str, b: int) -> Callable[[], float]:
        model = models[name]
        embeds = random_embeds(hf, prompt, seed=1).to(model.dtype)

        def run() -> float:
            layers = model.llm.layers
            if (name, b) not in prefilled:
                model.llm.setup_cache(b, cache)
                first = sample(prefill(model, embeds.expand(b, -1, -1)), 0.0, 1.0, None)
                prefilled[name, b] = [layer.self_attn.cache for layer in layers], first
            caches, next_id = prefilled[name, b]
            for layer, kv in zip(layers, caches):
                layer.self_attn.cache = kv
            positions = torch.arange(prompt, prompt + n).expand(b, -1)
            out = [next_id.tolist()]
            t0 = time.perf_counter()
            for step in range(n - 1):
                next_id = sample(decode_one_token(model, next_id.view(b, 1), positions[:, step : step + 1]), 0.0, 1.0, None)
                out.append(next_id.tolist())
            elapsed = time.perf_counter() - t0
            ids[f"{name}_batch{b}"] = [list(row) for row in zip(*out)]
            return elapsed

        return run

    def kernels(name: str, b: int) -> Callable[[], float]:
        model = models[name]
        linears = [m for m in [*model.llm.modules(), model.lm_head] if isinstance(m, torch.nn.Linear)]
        x = {m: torch.randn(b, 1, m.weight.shape[1], dtype=m.weight.dtype) for m in linears}  # (B, 1, D) as a step

        def run() -> float:  # seconds per step's worth of products
            t0 = time.perf_counter()
            for _ in range(KERNEL_PASSES):
                for m in linears:
                    m(x[m])
            return (time.perf_counter() - t0) / KERNEL_PASSES

        return run

    sides = {f"{name}_batch{b}": side(name, b) for name in dtypes for b in sizes}
    sides.update({f"{name}_kernels{b}": kernels(name, b) for name in dtypes for b in sizes})
    samples = alternate(sides, plan.repeats["decode"], label="batch_decode")
    log(f"batched decode samples (s for {n - 1} steps; kernels: s per step): {fmt_dict(samples)}")
    same = {name: all(row == ids[f"{name}_batch{sizes[0]}"][0] for b in sizes for row in ids[f"{name}_batch{b}"])
            for name in dtypes}
    return {"samples": samples, "steps_timed": n - 1, "sizes": list(sizes), "dtypes": list(dtypes), "same_ids": same,
            "cache_length": cache}


KERNEL_PASSES = 3  # a step's products per timed call of the kernels' side
