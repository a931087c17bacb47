"""Theoretical cost (LLM-Viewer's method: matmul FLOPs of every layer, multiply-add = 2 FLOPs); the counting
functions are minillava/flops.py's, which `python -m minillava.eval` uses per question. Prefill TFLOPs and
KV-cache MB of LLaVA-NeXT-7B and 13B at every ratio, next to the GlobalCom2 paper's, and why they differ."""

from __future__ import annotations

import globalcom2
from minillava.flops import (LLAVA_7B, LLAVA_13B, LlmSpec, kv_cache_bytes, layered_prefill_flops, prefill_flops, tile_flops,
                             tower_flops)
from minillava.schedule import build, token_counts

from .plan import CLIP_L336, PROMPT_NOTE, RATIOS


PAPER_7B = {1.0: (41.7, 1536.0), 0.25: (9.6, 377.0), 0.1: (3.8, 151.0)}  # r: (prefill TFLOPs, KV MB), docs/globalcom2.md, "The paper's headline results"
PAPER_TOKENS_100 = 576 + 4 * 576  # thumbnail + 2 x 2 crops, without the 48 newline tokens


def solve_tokens(spec: LlmSpec, flops: float) -> float:
    """The token count whose prefill_flops (full attention) equals `flops`: the inverse, by bisection."""
    lo, hi = 0.0, 1e6
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prefill_flops(spec, mid)["total"] < flops else (lo, mid)
    return (lo + hi) / 2


def theory(counts: dict[str, int], prompt_tokens: int, scores_note: str) -> dict:
    """Prefill TFLOPs and fp16 KV-cache MB of LLaVA-NeXT-7B and 13B at every ratio, next to the paper's."""
    rows = []
    for spec in (LLAVA_7B, LLAVA_13B):
        tower = tower_flops(CLIP_L336, 5, spec.hidden)
        for r in RATIOS:
            image = counts["none"] if r == 1.0 else counts[f"globalcom2@{r:g}"]
            tokens = prompt_tokens + image
            flops = prefill_flops(spec, tokens)
            row = {
                "model": spec.name, "r": r, "image_tokens": image, "tokens": tokens,
                "tflops": flops["total"] / 1e12, "tflops_causal": prefill_flops(spec, tokens, causal=True)["total"] / 1e12,
                "kv_mb": kv_cache_bytes(spec, tokens) / 1e6,
                "tower_projector_tflops": (tower["tower"] + tower["projector"]) / 1e12,
            }
            paper_tokens = round(r * PAPER_TOKENS_100)
            row["paper_assumption_tokens"] = paper_tokens
            row["tflops_at_paper_tokens"] = prefill_flops(spec, paper_tokens)["total"] / 1e12
            row["kv_mb_at_paper_tokens"] = kv_cache_bytes(spec, paper_tokens) / 1e6
            if spec is LLAVA_7B and r in PAPER_7B:
                p_tflops, p_mb = PAPER_7B[r]
                row.update(paper_tflops=p_tflops, paper_kv_mb=p_mb,
                           rel_tflops=row["tflops"] / p_tflops - 1, rel_kv=row["kv_mb"] / p_mb - 1,
                           implied_tokens_flops=solve_tokens(spec, p_tflops * 1e12),
                           implied_tokens_kv=p_mb * 1e6 / kv_cache_bytes(spec, 1))
            rows.append(row)
    return {"rows": rows, "explanation": explain(rows, counts, prompt_tokens), "prompt_note": PROMPT_NOTE,
            "scores_note": scores_note, "counts": counts, "decoder": decoder_rows(counts["none"], prompt_tokens),
            "tower": tower_rows(prompt_tokens)}


def decoder_rows(image: int, prompt_tokens: int) -> list[dict]:
    """The methods that prune inside the decoder (globalcom2/methods.py), each at every r < 1: the uncompressed
    image enters the prefill and every layer is counted at what the method's schedule leaves it
    (minillava/schedule.py `layer_lengths`, the count `python -m minillava.eval` makes per question); the
    image share the last layers see, and the share averaged over the layers."""
    rows = []
    for spec in (LLAVA_7B, LLAVA_13B):
        for method in (m for m, entry in globalcom2.METHODS.items() if entry.place == globalcom2.DECODER):
            for r in (r for r in RATIOS if r < 1.0):
                stages = build(method, 0, image, r, spec.layers)
                per_layer, mlp = token_counts(stages, image, spec.layers)  # a merge inside a layer: its MLP after
                tflops = layered_prefill_flops(spec, [prompt_tokens + n for n in per_layer],
                                               [prompt_tokens + n for n in mlp]) / 1e12
                rows.append({"model": spec.name, "method": method, "r": r, "tflops": tflops,
                             "last_share": per_layer[-1] / image, "mean_share": sum(per_layer) / (image * spec.layers),
                             "stage_layers": [stage.layer for stage in stages]})
    return rows


def tower_rows(prompt_tokens: int, tiles: int = 5) -> list[dict]:
    """The methods that merge inside the vision tower (FiCoCo-V), each at every r < 1 it can run on LLaVA's
    CLIP-L/336 (read at layer -2): the tower's TFLOPs for the `tiles` tiles of a 672 x 672 image, each layer at
    what the schedule leaves it (attention before, MLP after its merge; the layers up to the feature layer,
    the count `python -m minillava.eval` makes, eval/efficiency.py `tile_flops`) beside the whole tower's, and
    the LLM's for the tokens the tiles give (merged tiles one after another, no newlines)."""
    rows, v = [], CLIP_L336
    patches, layers = (v.image_size // v.patch_size) ** 2, v.num_hidden_layers - 1  # feature layer -2
    whole = tiles * tile_flops(v, [1 + patches] * layers) / 1e12
    for method in (m for m, entry in globalcom2.METHODS.items() if entry.place == globalcom2.TOWER):
        for r in (r for r in RATIOS if r < 1.0):
            try:
                stages = globalcom2.tower_schedule(method, r, patches, v.num_hidden_layers, -2, True)
            except ValueError:  # more than a layer can merge (docs/methods.md)
                continue
            attention, mlp = token_counts(stages, 1 + patches, layers)
            image = tiles * (mlp[-1] - 1)  # LLaVA's feature select drops each tile's first token
            for spec in (LLAVA_7B, LLAVA_13B):
                rows.append({"model": spec.name, "method": method, "r": r, "image_tokens": image,
                             "tower_tflops": tiles * tile_flops(v, attention, mlp) / 1e12, "whole_tower_tflops": whole,
                             "llm_tflops": prefill_flops(spec, prompt_tokens + image)["total"] / 1e12})
    return rows


def explain(rows: list[dict], counts: dict[str, int], prompt_tokens: int) -> list[str]:
    """Why our 7B figures differ from the paper's, worked out from the numbers themselves."""
    paper = [r for r in rows if "paper_tflops" in r]
    lines = [
        "Counting: matmul FLOPs with a multiply-add as 2 FLOPs, attention over the full T x T square (LLM-Viewer; "
        "a causal kernel needs about half of that part: column 'causal'), lm_head for the last position only, "
        "LLM only (the CLIP tower and projector on 5 tiles are the separate column, about "
        f"{rows[0]['tower_projector_tflops']:.1f} TFLOPs for 7B, not in the LLM figure). KV cache: K and V of every "
        "layer in fp16 (2 bytes), MB = 10^6 bytes.",
        f"Our token count T = {prompt_tokens} text tokens + the image's tokens from our AnyRes + globalcom2 "
        f"(uncompressed: {counts['none']} = 576 thumbnail + 48 x 48 crop grid + 48 newlines; at r < 1 globalcom2 keeps "
        "int(576 r) thumbnail tokens, int(N_c scale_c) of each crop and all 48 newlines; r = 1 is the uncompressed "
        f"model: globalcom2 itself at r = 1 keeps {counts['globalcom2@1']} because some crop scales fall below 1).",
    ]
    for r in paper:
        lines.append(
            f"r = {r['r']:g}: the paper's {r['paper_tflops']} TFLOPs need T = {r['implied_tokens_flops']:.0f} tokens "
            f"under this count, its {r['paper_kv_mb']:g} MB need T = {r['implied_tokens_kv']:.0f} "
            f"(r x 2880 = {r['r'] * PAPER_TOKENS_100:.0f}); we have T = {r['tokens']}: "
            f"{r['rel_tflops']:+.1%} TFLOPs, {r['rel_kv']:+.1%} KV. At T = r x 2880 our formula gives "
            f"{r['tflops_at_paper_tokens']:.1f} TFLOPs ({r['tflops_at_paper_tokens'] / r['paper_tflops'] - 1:+.1%}) "
            f"and {r['kv_mb_at_paper_tokens']:.0f} MB ({r['kv_mb_at_paper_tokens'] / r['paper_kv_mb'] - 1:+.1%})."
        )
    off = [r for r in paper if abs(r["rel_tflops"]) > 0.10 or abs(r["rel_kv"]) > 0.10]
    match = all(abs(r["tflops_at_paper_tokens"] / r["paper_tflops"] - 1) < 0.02 for r in paper)
    if match:
        lines.append(
            "So the paper's FLOPs are LLM-Viewer's count for T = r x 2880 visual tokens: the 576 thumbnail and 4 x 576 "
            "crop tokens scaled by r, with no text tokens and no newline tokens, multiply-add = 2, full T x T "
            "attention, LLM only, and its 25% and 10% KV figures follow from the same T at 2 bytes per value."
        )
    kv100 = next((r for r in paper if r["r"] == 1.0), None)
    if kv100 and abs(kv100["implied_tokens_kv"] - PAPER_TOKENS_100) > 20:
        lines.append(
            f"The paper's 100% KV figure ({kv100['paper_kv_mb']:g} MB = {kv100['implied_tokens_kv']:.0f} tokens) does not "
            f"fit its own 100% FLOPs ({kv100['implied_tokens_flops']:.0f} tokens); it is close to the "
            f"{counts['none']} image tokens of uncompressed LLaVA-NeXT with newlines (or 1.5 GiB = 3072 tokens if MiB)."
        )
    for r in off:
        extra = r["tokens"] - r["paper_assumption_tokens"]
        lines.append(
            f"r = {r['r']:g} differs by more than 10% because our T has {extra} more tokens than r x 2880 = "
            f"{r['paper_assumption_tokens']}: {prompt_tokens} text tokens and 48 newline tokens that compression does "
            f"not remove (plus per-crop int() rounding: {r['image_tokens']} image tokens); a fixed ~{prompt_tokens + 48} "
            "tokens weigh more the fewer visual tokens are kept. Counted like the paper, the figures agree (above)."
        )
    return lines
