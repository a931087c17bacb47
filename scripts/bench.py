"""Side-by-side benchmark of minillava against transformers, and GlobalCom2's theoretical savings.

    python scripts/bench.py                 # full run: real CLIP ViT-L/14-336, a ~1B decoder (20-30 min, 2 cores)
    python scripts/bench.py --quick         # CI smoke: small shapes, about a minute; its ratios mean nothing
    python scripts/bench.py --out DIR       # where bench.md, bench.json and bench.png go (default bench_results/)

One process, one run (only the loading measurement runs in a fresh subprocess). Every comparison
calls each side once to warm it up, then alternates the sides (A, B, A, B, ...) and reports medians.
Weights are random (seeded) at the plan's shapes, and both sides of a comparison share the very same
weight tensors. The rows and targets are those of issue 4 (rows 12-13, weight-only int8 / int4: issue
21; rows 14a-c, llama.cpp at the same weight widths: issue 29); the theoretical table recomputes the GlobalCom2 paper's efficiency figures (LLaVA-NeXT-7B on MME)
the way LLM-Viewer counts them.

This file is the command and the run: the sections in their order (`run_sections`), then the report.
What each section measures, and how the results become rows, bench.md, bench.json and bench.png, lives
in scripts/benchkit/, one module a concept, measuring apart from reporting (its docstring lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))  # benchkit/, also when a test loads this file by its path

import torch  # noqa: E402

from benchkit import report  # noqa: E402
from benchkit.batch import bench_batch_decode, bench_batch_eval  # noqa: E402
from benchkit.compressor import bench_compressor  # noqa: E402
from benchkit.contention import WATCH  # noqa: E402
from benchkit.decode import bench_decode  # noqa: E402
from benchkit.decoders import as_loaded, build_decoders, decoder_params, text_params  # noqa: E402
from benchkit.fmt import fmt_dict  # noqa: E402
from benchkit.image import test_image  # noqa: E402
from benchkit.llamacpp import bench_llamacpp  # noqa: E402
from benchkit.loading import bench_loading  # noqa: E402
from benchkit.machine import loadavg, machine_facts  # noqa: E402
from benchkit.plan import CLIP_L336, PINPOINTS, PROMPT_TOKENS, Plan, make_plan  # noqa: E402
from benchkit.prefill import bench_prefill  # noqa: E402
from benchkit.quant import bench_quant, bench_quant_loading  # noqa: E402
from benchkit.theory import theory  # noqa: E402
from benchkit.tokens import image_token_counts  # noqa: E402
from benchkit.vision import bench_vision  # noqa: E402
from minillava.anyres import tile_image  # noqa: E402
from minillava.config import VisionConfig  # noqa: E402

# Reached through this module by tests/test_bench.py (`bench.<name>`), scripts/cuda_check.py and
# scripts/profile_decode.py (`from bench import ...`).
from benchkit.decoders import STUB_VISION, clone_as, decoder_weight_bytes  # noqa: E402,F401
from benchkit.machine import bare_copy  # noqa: E402,F401
from benchkit.plan import RATIOS, decoder_1b  # noqa: E402,F401
from benchkit.row import check  # noqa: E402,F401
from benchkit.theory import PAPER_7B, solve_tokens  # noqa: E402,F401
from benchkit.timing import alternate, median  # noqa: E402,F401
from minillava.flops import LLAVA_7B, LlmSpec, kv_cache_bytes, prefill_flops  # noqa: E402,F401


SECTIONS = ("loading", "vision", "compression", "prefill", "decode", "batch", "batchdecode", "quant",
            "llamacpp")  # batch: rows 10-11b; batchdecode: 11a, 11b only; llamacpp: 14a-c (the llamacpp extra)


def run_sections(plan: Plan, r: dict, sections, log) -> None:
    """The measurements, in an order that keeps memory low: loading (a subprocess) first, then the tower,
    the compressor and the theory, then the decoders. Each section's results land in `r` when it ends."""
    if "loading" in sections:
        r["loading"] = bench_loading(plan, log)
        gc.collect()

    image = test_image()
    tiles = tile_image(image, PINPOINTS, CLIP_L336.image_size)  # 5 tiles, grid (2, 2)
    real_scores = None
    if "vision" in sections:
        pixels = tiles.pixels[: plan.tiles]
        if plan.vision.image_size != CLIP_L336.image_size:
            pixels = torch.nn.functional.interpolate(pixels, size=plan.vision.image_size, mode="bilinear")
        r["vision"] = bench_vision(plan, pixels.contiguous(), log)
        if r["vision"]["scores"].shape == (5, 576) and plan.vision == CLIP_L336:
            real_scores = r["vision"]["scores"]
        gc.collect()

    if real_scores is not None:
        scores, scores_note = real_scores, "[CLS] scores of our random-weight CLIP-L/336 on the synthetic 672 x 672 image"
    else:
        scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
        scores_note = "seeded random N(0, 1) scores (no real-size tower in this run)"
    counts = image_token_counts(scores[0], scores[1:], tiles.grid, tiles.size)
    r["token_counts"] = counts
    if "compression" in sections:
        r["compressor"] = {"samples": bench_compressor(scores, tiles.grid, tiles.size, plan.repeats["compress"]),
                           "scores_note": scores_note}
    r["theory"] = theory(counts, PROMPT_TOKENS, scores_note)

    if "batch" in sections:
        r["batch_eval"] = bench_batch_eval(plan, log)
        gc.collect()
    if {"prefill", "decode", "batch", "batchdecode"} & set(sections):
        t0 = time.perf_counter()
        ours, hf = build_decoders(plan.text)
        as_loaded(ours)  # ours as the commands run it: its matrices packed for oneDNN (a copy of its own)
        n_params = decoder_params(ours)
        r["models_decoder_params"] = n_params
        log(f"built the decoders ({n_params:,} parameters; embeddings and norms shared) in {time.perf_counter() - t0:.1f} s")
        if "prefill" in sections:
            lengths = {"r0.25": PROMPT_TOKENS + counts["globalcom2@0.25"], "uncompressed": PROMPT_TOKENS + counts["none"]}
            r["prefill"] = bench_prefill(plan, ours, hf, lengths, log)
        if "decode" in sections:
            r["decode"] = bench_decode(plan, ours, hf, log)
        if "batch" in sections or "batchdecode" in sections:
            r["batch_decode"] = bench_batch_decode(plan, ours, hf, log)
        del ours, hf
        gc.collect()
    if "quant" in sections:  # last: its four decoders need the memory the others held
        r["quant_loading"] = bench_quant_loading(plan, log)
        r["quant"] = bench_quant(plan, log)
        gc.collect()
    if "llamacpp" in sections:  # last too: three of ours and three llama.cpp models at once
        r["llamacpp"] = bench_llamacpp(plan, log)
        gc.collect()


def run(plan: Plan, out: Path, sections=SECTIONS, log=None) -> dict:
    """Run the plan's sections in order, write bench.md, bench.json and bench.png into `out`; the results."""
    log = log or (lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    torch.set_num_threads(plan.threads)
    out.mkdir(parents=True, exist_ok=True)
    WATCH.rounds = {}
    r: dict = {"plan": dataclasses.asdict(plan), "machine": machine_facts(), "contention": WATCH.rounds}
    log(f"{plan.name} run, {plan.threads} threads; machine: {fmt_dict(r['machine'])}")

    try:
        run_sections(plan, r, sections, log)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see main): keep what was measured
        r["interrupted"] = True
        log("interrupted: writing the rows measured so far")

    t = plan.text
    n_dec = r.get("models_decoder_params") or text_params(t)
    v_params = r.get("vision", {}).get("params")
    r["models"] = (
        f"vision tower {_tower_name(plan.vision)}" + (f" ({v_params / 1e6:.1f}M parameters)" if v_params else "")
        + f"; decoder LLaMA {t.num_hidden_layers} layers, width {t.hidden_size}, MLP {t.intermediate_size}, "
        f"{t.num_attention_heads} heads, vocab {t.vocab_size}"
        + (f" = {n_dec:,} parameters ({n_dec / 1e9:.2f}B, embedding and lm_head included)" if n_dec else "")
        + f"; checkpoint of row 9: the tower + that decoder + projector in {plan.ckpt_dtype}"
    )
    r["loadavg_end"] = loadavg()
    r["idle_waited_s"] = WATCH.waited_s
    r["run_s"] = time.perf_counter() - t_start
    text = report.write(r, out)
    print(text)
    log(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'} in {r['run_s'] / 60:.1f} min")
    return r


def _tower_name(v: VisionConfig) -> str:
    if v == CLIP_L336:
        return "CLIP ViT-L/14-336 (real size)"
    return (f"CLIP {v.num_hidden_layers} layers, width {v.hidden_size}, {v.image_size} px / {v.patch_size} px patches")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python scripts/bench.py",
        description="Benchmark minillava against transformers side by side (random weights at real shapes) and "
        "print GlobalCom2's theoretical prefill cost. Writes bench.md, bench.json and bench.png.",
    )
    p.add_argument("--quick", action="store_true",
                   help="small shapes (2-layer tower, 2 tiles, 2-layer decoder, short prompts): about a minute, for CI; "
                   "the ratios are not representative")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results", metavar="DIR",
                   help="output directory (default bench_results/ at the repository root; not tracked)")
    p.add_argument("--sections", default=",".join(SECTIONS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default all; rows of skipped sections are left out)")
    p.add_argument("--repeats", type=int, default=None, metavar="N", help="timed calls per side for every section")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: all cores)")
    p.add_argument("--no-compile", action="store_true", help="decode eagerly (row 4 then measures the eager step)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="on a shared machine: before each timed round wait up to S seconds until other processes take "
                   "less than 10%% of the CPU (default 0: do not wait; the share is reported either way)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = make_plan("quick" if args.quick else "full")
    if args.repeats:
        plan.repeats = {k: args.repeats for k in plan.repeats}
    if args.threads:
        plan.threads = args.threads
    if args.no_compile:
        plan.compile = False
    WATCH.idle_wait_s = args.wait_idle
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # a killed run still writes what it measured
    results = run(plan, args.out, tuple(args.sections.split(",")))
    return 1 if results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
