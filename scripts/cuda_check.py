"""Trust an install on a GPU: one command, one table, a non-zero exit on any failure (issue 12).

    python scripts/cuda_check.py                      # on CUDA, float16; a few minutes on one H100
    python scripts/cuda_check.py --out check.json     # the table's rows as JSON too
    python scripts/cuda_check.py --device cpu --quick # every check on the CPU at small sizes (the test)
    python scripts/cuda_check.py --only compile       # one check (gpu-tests, greedy, compile, batch, decoder, quantize)

Checks, each a row (check | result | pass/fail | detail):
 1. gpu-tests   the tests that skip without CUDA, through pytest in a subprocess
 2. greedy      greedy ids of a tiny random checkpoint vs transformers' generate, float16
 3. compile     --compile (CUDA graphs on CUDA) answers 20 questions: no compile and no CUDA graph
                recording after warm-up, ids equal to eager
 4. batch       generate_batch at batch 1 vs 8 on the shipped tiny model: questions/s, same answers
 5. prefill, decode   our decoder vs transformers' LlamaForCausalLM (sdpa) at LLaVA-1.6-7B's shapes,
                a few layers, random weights, float16: prefill seconds and decode tokens/s, A/B
                alternated, medians
 6. int8, int4  weight-only quantization (--quantize): the shipped tiny model's greedy answers against
                its 16-bit answers, and decode tokens/s at LLaVA-1.6-7B's widths against 16-bit (eager,
                and compiled on CUDA), A/B alternated, medians
Speed is judged on CUDA only (rows 4 and 5 on a CPU check that the code runs and agrees).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device machine has no network

import torch  # noqa: E402

from bench import alternate, build_decoders, clone_as, median  # noqa: E402
from minillava.batch import generate_batch  # noqa: E402
from minillava.config import TextConfig  # noqa: E402
from minillava.eval import synthetic  # noqa: E402
from minillava.generate import (  # noqa: E402
    CACHE_BUCKET, TokenReader, compile_steps, generate, load, prefill, sample, warm_up,
)
from minillava.quant import Spec, quantize_model  # noqa: E402
from minillava.tokenizer import build_prompt  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The tests that skip without an accelerator (grep -rn "cuda.is_available\|ACCELERATORS" tests/; the
# one in test_generate.py is the reverse: it runs only without CUDA).
GPU_TESTS = ("tests/test_globalcom2.py::test_accelerator_matches_cpu",)
# Greedy ids may part from transformers' at a near-tie: two float16 implementations sum in different
# orders, so their logits differ by a few float16 ulps per layer (an ulp is 2e-3 at |logit| 2 to 4).
# A divergence passes when transformers' own logit gap between its pick and ours is below TIE_GAP,
# about 25 ulps there: larger than such rounding, far smaller than the gap between a random model's
# top two logits (tenths). A gap above it means a real difference.
TIE_GAP = 0.05
QUESTION = "What is in the picture?"
TINY_MODEL = "llava-next-tiny-scenes"  # shipped in weights/


@dataclass
class Sizes:
    greedy_tokens: int = 32
    questions: int = 20  # the compile check's, one at a time
    answer_tokens: int = 8  # the tiny scenes model answers a digit; 8 leaves room past EOS
    batch_questions: int = 32
    repeats: int = 5
    big: TextConfig = field(default_factory=lambda: TextConfig(  # LLaVA-1.6-7B's decoder, 4 of its 32 layers
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
        num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5))
    prefill_tokens: int = 2900  # a 672 x 672 image uncompressed and its prompt
    decode_tokens: int = 64


QUICK = Sizes(greedy_tokens=12, answer_tokens=4, batch_questions=16, repeats=2, prefill_tokens=300, decode_tokens=8,
              big=TextConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5))


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    tmp: Path  # a scratch directory, removed at the end


@dataclass
class Row:
    check: str
    result: str
    ok: bool
    detail: str = ""


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """A side for bench.alternate: seconds of one call of `fn`, the device's queue drained on both ends."""

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    return run


# ---------------------------------------------------------------------------------------------------
# 1. The GPU-only tests


def check_gpu_tests(run: Run) -> list[Row]:
    """pytest in a subprocess, as a user would run it; on CUDA every test must pass, none skip."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""  # "7 passed in 1.2s"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary)}
    ok = proc.returncode == 0 and counts.get("passed", 0) + counts.get("skipped", 0) > 0
    if run.device.type == "cuda":
        ok = ok and counts.get("passed", 0) > 0 and not counts.get("skipped")
        detail = " ".join(GPU_TESTS)
    else:
        detail = "they skip without an accelerator, as expected here"
    if not ok:  # what pytest said last (a failed assertion, or "No module named pytest")
        last = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        detail = f"pytest exited {proc.returncode}: " + " | ".join(last)
    result = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary"
    return [Row("gpu-tests", result, ok, detail)]


# ---------------------------------------------------------------------------------------------------
# 2. Greedy ids against transformers, float16


def check_greedy(run: Run) -> list[Row]:
    """tests/test_generate.py::test_greedy_ids_equal_transformers in float16 on the device, on two images
    (a 2 x 1 and a 1 x 2 crop grid): transformers is given our prompt ids with the image placeholder."""
    import numpy as np
    from PIL import Image

    from minillava.anyres import tile_image
    from tests import tiny

    device, sizes = run.device, run.sizes
    hf = tiny.hf_model(seed=0)
    ckpt = tiny.save_checkpoint(hf, run.tmp / "tiny", "hub", tiny.train_tokenizer(run.tmp / "tokenizer.model"))
    hf = hf.to(device, run.dtype)
    ours, tok = load(str(ckpt), device, run.dtype)
    rng = np.random.default_rng(7)
    worst, notes, ok = 0, [], True
    for w, h in ((150, 90), (90, 150)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        answer = generate(ours, tok, image, QUESTION, max_new_tokens=sizes.greedy_tokens)  # uncompressed
        mine, chunks = answer.token_ids, tok.encode_prompt(build_prompt(QUESTION))
        n_image = answer.visual_tokens["after"]
        ids = torch.tensor([chunks[0] + [tiny.IMAGE_TOKEN] * n_image + chunks[1]], device=device)
        tiles = tile_image(image, [tuple(p) for p in tiny.PINPOINTS_WH], tiny.TILE)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, pixel_values=tiles.pixels[None].to(device, run.dtype),
                              image_sizes=torch.tensor([[h, w]], device=device), max_new_tokens=sizes.greedy_tokens,
                              do_sample=False, eos_token_id=2, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        theirs = out.sequences[0, ids.shape[1]:].tolist()
        if mine == theirs:
            notes.append(f"{w}x{h}: {len(mine)} ids equal")
            continue
        k = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        if k >= min(len(mine), len(theirs)):  # one stopped earlier (EOS) than the other: no tie to excuse it
            ok = False
            notes.append(f"{w}x{h}: lengths {len(mine)} vs {len(theirs)}")
            continue
        logits = out.logits[k][0].float()  # transformers' logits where the two part
        gap = (logits[theirs[k]] - logits[mine[k]]).item()
        worst = max(worst, gap)
        ok = ok and gap < TIE_GAP
        notes.append(f"{w}x{h}: first divergence at token {k}, transformers' gap {gap:.4f}")
    result = "ids equal" if all("equal" in n for n in notes) else f"near-tie divergence (gap {worst:.4f})"
    dtype = str(run.dtype).removeprefix("torch.")
    return [Row("greedy", result if ok else "ids differ", ok, f"{dtype} vs transformers generate; "
                + "; ".join(notes) + f"; a divergence passes at a gap < {TIE_GAP}")]


# ---------------------------------------------------------------------------------------------------
# 3. --compile answers questions without compiling again


class CompileCounter:
    """Counts compilation work as it happens, through torch._dynamo's compile-start callbacks
    (torch/_dynamo/callback.py): trigger DYNAMO fires in convert_frame.compile_inner each time dynamo
    traces a frame (a first compile or a recompile: a cache hit never reaches it), and CUDAGRAPH_RECORDING
    in cudagraph_trees.CUDAGraphTreeManager.record_function each time a CUDA graph is recorded,
    re-recordings included (a new shape, or a static input such as a KV cache buffer at a new address).
    A frame that reaches neither ran compiled code already made. Cross-checked with dynamo's own count
    of graphs (counters["stats"]["unique_graphs"]); counters["inductor"]["cudagraph_skips"] counts the
    compiled functions that run without CUDA graphs (a CPU tensor input, a mutated input...)."""

    def __init__(self):
        self.events: dict[str, int] = {}

    def _on(self, args):
        self.events[args.callback_trigger.name] = self.events.get(args.callback_trigger.name, 0) + 1

    def __enter__(self):
        from torch._dynamo.utils import counters

        self.counters = counters
        self.graphs0 = counters["stats"]["unique_graphs"]
        torch._dynamo.callback_handler.register_start_callback(self._on)
        return self

    def __exit__(self, *exc):
        torch._dynamo.callback_handler.remove_start_callback(self._on)
        self.graphs = self.counters["stats"]["unique_graphs"] - self.graphs0


def synthetic_items(n: int) -> list[tuple]:
    """(image, question) of the first n held-out synthetic scenes: 7 image sizes, varying token counts."""
    samples = [synthetic.sample(synthetic.DEFAULT_SEED, "test", i) for i in range(n)]
    return [(s.scene.image, synthetic.prompt(s.question)) for s in samples]


def check_compile(run: Run) -> list[Row]:
    """The shipped tiny model answers the questions eagerly, then compiled (compile_steps + warm_up, as
    `generate --compile`), one question at a time with globalcom2 r = 0.25: every prompt fits one cache
    bucket, so once warm nothing may compile or record again."""
    from torch._dynamo.utils import counters

    device, sizes = run.device, run.sizes
    items = synthetic_items(sizes.questions)
    model, tok = load(TINY_MODEL, device, run.dtype)
    eager = [generate(model, tok, im, q, "globalcom2", 0.25, sizes.answer_tokens).token_ids for im, q in items]
    skips0 = counters["inductor"]["cudagraph_skips"]
    with CompileCounter() as warm:
        steps = compile_steps(model)
        warm_s = warm_up(model, steps, compressor="globalcom2")
    caches = set()
    with CompileCounter() as after:
        compiled = []
        for im, q in items:
            compiled.append(generate(model, tok, im, q, "globalcom2", 0.25, sizes.answer_tokens, steps=steps).token_ids)
            caches.add(model.llm.cache_length)
    skips = counters["inductor"]["cudagraph_skips"] - skips0
    new = sum(after.events.values())
    same = sum(a == b for a, b in zip(compiled, eager))
    recorded = warm.events.get("CUDAGRAPH_RECORDING", 0)
    ok = new == 0 and after.graphs == 0 and same == len(items) and caches == {CACHE_BUCKET}
    if device.type == "cuda":  # reduce-overhead must really run CUDA graphs
        ok = ok and skips == 0 and recorded > 0
    detail = (f"warm-up {warm_s:.1f}s: {warm.events.get('DYNAMO', 0)} dynamo compiles, {recorded} CUDA graph "
              f"recordings; after it, over {len(items)} questions: {after.events.get('DYNAMO', 0)} compiles, "
              f"{after.events.get('CUDAGRAPH_RECORDING', 0)} recordings, {after.graphs} new dynamo graphs, "
              f"{skips} cudagraph skips; cache lengths {sorted(caches)}; ids equal to eager {same}/{len(items)}")
    result = f"{after.events.get('DYNAMO', 0)} compiles, {after.events.get('CUDAGRAPH_RECORDING', 0)} recordings"
    return [Row("compile", result + " after warm-up", ok, detail)]


# ---------------------------------------------------------------------------------------------------
# 4. Batch 1 vs 8


def check_batch(run: Run) -> list[Row]:
    device, sizes = run.device, run.sizes
    items = synthetic_items(sizes.batch_questions)
    model, tok = load(TINY_MODEL, device, run.dtype)
    answers: dict[int, list] = {}

    def side(b: int):
        def answer_all():
            out = []
            for i in range(0, len(items), b):
                out += generate_batch(model, tok, items[i : i + b], "globalcom2", 0.25, sizes.answer_tokens)
            answers[b] = [r.token_ids for r in out]

        return timed(device, answer_all)

    samples = alternate({1: side(1), 8: side(8)}, sizes.repeats, label="batch")
    qps = {b: len(items) / median(s) for b, s in samples.items()}
    same = answers[1] == answers[8]
    speedup = qps[8] / qps[1]
    ok = same and (speedup > 1.0 or device.type != "cuda")
    return [Row("batch", f"{speedup:.2f}x questions/s at batch 8", ok,
                f"{qps[1]:.1f} vs {qps[8]:.1f} questions/s ({len(items)} synthetic questions, {TINY_MODEL}); "
                f"answers {'identical' if same else 'DIFFER'}"
                + ("" if device.type == "cuda" else "; speed not judged on cpu"))]


# ---------------------------------------------------------------------------------------------------
# 5. Prefill and decode against transformers at LLaVA-1.6-7B's shapes


@torch.inference_mode()
def check_decoder(run: Run) -> list[Row]:
    """Ours and transformers' LlamaForCausalLM with the same random weights (bench.build_decoders) in
    float16. Prefill: last-position logits of `prefill_tokens` random embeddings, each side filling its
    cache. Decode: greedy, our compile_steps decode (CUDA graphs on CUDA) vs transformers' generate, the
    time from the first new token to the last, as scripts/bench.py row 4."""
    device, sizes = run.device, run.sizes
    text, t, n = sizes.big, sizes.prefill_tokens, sizes.decode_tokens
    with torch.device(device):  # transformers' init runs on the device: seconds instead of a minute
        ours, hf = build_decoders(text)
    ours.llm.setup_rope(1)  # build_decoders leaves the RoPE table on the meta device (setup_cache makes it)
    hf.to(device, run.dtype)
    ours.to(device, run.dtype)
    g = torch.Generator().manual_seed(0)
    embeds = hf.model.embed_tokens(torch.randint(3, text.vocab_size, (1, t), generator=g).to(device)).clone()

    def ours_prefill():
        ours.llm.setup_cache(1, t)
        return prefill(ours, embeds)

    hf_prefill = lambda: hf(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits[:, -1]  # noqa: E731
    a, b = ours_prefill().float(), hf_prefill().float()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    pre = alternate({"ours": timed(device, ours_prefill), "hf": timed(device, hf_prefill)}, sizes.repeats,
                    label="prefill")
    ratio = median(pre["ours"]) / median(pre["hf"])

    # decode: a prompt of 64 tokens, n new tokens
    prompt = embeds[:, :64]
    cache = -(-(64 + n) // CACHE_BUCKET) * CACHE_BUCKET  # as generate sizes it
    steps = compile_steps(ours)
    ours.llm.setup_cache(1, cache)
    token, pos = torch.zeros(1, 1, dtype=torch.long, device=device), torch.tensor([[64]], device=device)
    t0 = time.perf_counter()
    for _ in range(3):  # compile, then warm-up and recording of the CUDA graph (as generate.warm_up)
        steps.decode(ours, token, pos)
    sync(device)
    compile_s = time.perf_counter() - t0
    positions = torch.arange(64, 64 + n, device=device).view(n, 1, 1)  # each step's (1, 1) contiguous
    ids = {}

    def ours_decode() -> float:
        ours.llm.setup_cache(1, cache)
        reader = TokenReader(device, n)
        next_id = sample(prefill(ours, prompt), 0.0, 1.0, None)
        reader.start(0, next_id)
        out = reader.read(0)
        t0 = time.perf_counter()
        for step in range(n - 1):
            next_id = sample(steps.decode(ours, next_id.view(1, 1), positions[step]), 0.0, 1.0, None)
            reader.start(step + 1, next_id)
            out += reader.read(step + 1)
        ids["ours"] = out
        return time.perf_counter() - t0

    class Clock:  # a transformers streamer noting when each new token arrives (bench.py row 4)
        def __init__(self):
            self.times = []

        def put(self, value):
            if value.numel():
                sync(device)
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def hf_decode() -> float:
        clock = Clock()
        out = hf.generate(inputs_embeds=prompt, attention_mask=torch.ones(1, 64, dtype=torch.long, device=device),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                          top_k=None, pad_token_id=0, eos_token_id=2, streamer=clock)
        ids["hf"] = out[0, -n:].tolist()
        return clock.times[-1] - clock.times[0]

    dec = alternate({"ours": ours_decode, "hf": hf_decode}, sizes.repeats, label="decode")
    tps = {k: (n - 1) / median(v) for k, v in dec.items()}
    same = next((i for i, (x, y) in enumerate(zip(ids["ours"], ids["hf"])) if x != y), None)
    cuda = device.type == "cuda"
    shape = (f"{text.num_hidden_layers} layers of width {text.hidden_size}, {text.num_attention_heads} heads, "
             f"FFN {text.intermediate_size}, vocab {text.vocab_size}; transformers attention "
             f"{hf.config._attn_implementation}")
    judged = "" if cuda else "; speed not judged on cpu"
    return [
        Row("prefill", f"{ratio:.2f} ours/theirs time", rel < 0.02 and (ratio <= 1.1 or not cuda),
            f"{t} tokens: {median(pre['ours']) * 1e3:.1f} vs {median(pre['hf']) * 1e3:.1f} ms (target <= 1.1); "
            f"last logits max rel. difference {rel:.1e} (< 2e-2); {shape}{judged}"),
        Row("decode", f"{tps['ours'] / tps['hf']:.2f}x tokens/s", tps["ours"] >= tps["hf"] or not cuda,
            f"{n - 1} tokens after a 64-token prompt: {tps['ours']:.1f} vs {tps['hf']:.1f} tok/s (target >= 1x), "
            f"compiled in {compile_s:.1f}s; ids " + ("equal" if same is None else f"part at token {same} (not judged: "
            "float16 near-ties of a random model)") + judged),
    ]


# ---------------------------------------------------------------------------------------------------
# 6. Weight-only int8 / int4


@torch.inference_mode()
def check_quantize(run: Run) -> list[Row]:
    """int8 and int4 against the 16-bit model. Answers: the shipped tiny model (int4 group 64: its widths
    are 192 and 512) on the compile check's synthetic questions, globalcom2 r = 0.25, greedy. Speed: the
    decoder check's random decoder at LLaVA-1.6-7B's widths (FFN rounded up to a multiple of 128 and the
    vocabulary to one of 16, as int4 needs: quant.Spec.check), batch 1, 64-token prompt, eager steps and (on CUDA) compile_steps' decode."""
    device, sizes = run.device, run.sizes
    items = synthetic_items(sizes.questions)
    specs = {"int8": Spec(8), "int4": Spec(4, 64)}
    answers = {}
    for name, spec in {"16-bit": None, **specs}.items():
        model, tok = load(TINY_MODEL, device, run.dtype, quantize=spec)
        answers[name] = [generate(model, tok, im, q, "globalcom2", 0.25, sizes.answer_tokens).token_ids for im, q in items]
    big = sizes.big
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    text = TextConfig(**{**big.__dict__, "intermediate_size": up(big.intermediate_size, 128),
                         "vocab_size": up(big.vocab_size, 16)})
    with torch.device(device):
        ours, hf = build_decoders(text)
    del hf
    ours.llm.setup_rope(1)
    ours.to(device, run.dtype)
    models = {"16-bit": ours, "int8": quantize_model(clone_as(ours, run.dtype), Spec(8)),
              "int4": quantize_model(clone_as(ours, run.dtype), Spec(4, 128))}
    n, cuda = sizes.decode_tokens, device.type == "cuda"
    cache = -(-(64 + n) // CACHE_BUCKET) * CACHE_BUCKET
    prompt = torch.randint(3, text.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(64, 64 + n, device=device).view(n, 1, 1)
    ids, compile_s = {}, {}

    def side(name: str, steps) -> callable:
        model = models[name]

        def decode() -> float:
            model.llm.setup_cache(1, cache)
            next_id = sample(prefill(model, model.embed(prompt)[None]), 0.0, 1.0, None)
            out = [next_id]
            sync(device)
            t0 = time.perf_counter()
            for step in range(n - 1):
                next_id = sample(steps.decode(model, next_id.view(1, 1), positions[step]), 0.0, 1.0, None)
                out.append(next_id)
            sync(device)
            ids[name] = torch.cat(out).tolist()
            return time.perf_counter() - t0

        return decode

    from minillava.generate import Steps

    sides = {name: side(name, Steps()) for name in models}
    if cuda:  # int8's CUDA path is dequantize-and-matmul, which pays only compiled (minillava/quant.py KERNELS)
        for name, model in models.items():
            t0 = time.perf_counter()
            steps = compile_steps(model)
            model.llm.setup_cache(1, cache)
            for _ in range(3):
                steps.decode(model, torch.zeros(1, 1, dtype=torch.long, device=device), positions[0])
            sync(device)
            compile_s[name] = time.perf_counter() - t0
            sides[f"{name} compiled"] = side(name, steps)
    samples = alternate(sides, sizes.repeats, label="quantize")
    tps = {k: (n - 1) / median(v) for k, v in samples.items()}
    rows = []
    for name in specs:
        same = sum(a == b for a, b in zip(answers[name], answers["16-bit"]))
        ok = same >= 0.9 * len(items) if name == "int8" else True  # int4: reported (docs/speed.md has its accuracy)
        speed = f"{tps[name] / tps['16-bit']:.2f}x eager" + (
            f", {tps[name + ' compiled'] / tps['16-bit compiled']:.2f}x compiled" if cuda else "")
        rows.append(Row(name, f"{same}/{len(items)} answers = 16-bit; {speed}", ok,
                        f"tiny model, {len(items)} synthetic questions, greedy ids equal to the 16-bit model's: {same}"
                        + (" (>= 90% required)" if name == "int8" else " (reported)")
                        + f"; decode tokens/s at width {text.hidden_size}, FFN {text.intermediate_size}, "
                        f"{text.num_hidden_layers} layers, vocab {text.vocab_size}: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in tps.items() if k.split()[0] in ("16-bit", name))
                        + (f"; compiled in {compile_s[name]:.0f}s" if cuda else "; speed not judged")
                        + f"; ids of {n} decode steps equal 16-bit's: "
                        f"{sum(a == b for a, b in zip(ids[name], ids['16-bit']))}/{n}"))
    return rows


CHECKS = {"gpu-tests": check_gpu_tests, "greedy": check_greedy, "compile": check_compile, "batch": check_batch,
          "decoder": check_decoder, "quantize": check_quantize}  # decoder: two rows, prefill and decode; quantize: int8, int4


def table(rows: list[Row]) -> str:
    cells = [("check", "result", "pass/fail", "detail")] + [(r.check, r.result, "pass" if r.ok else "FAIL", r.detail)
                                                            for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(" | ".join([*(c[i].ljust(widths[i]) for i in range(3)), c[3]]) for c in cells)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/cuda_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default); cpu runs every check on the CPU, speed not judged")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default float16 on cuda (what generate uses there), float32 on cpu (float16 matrix "
                   "products are emulated on most CPUs: minutes instead of seconds)")
    p.add_argument("--quick", action="store_true", help="small sizes (a decoder of width 256, short answers): "
                   "a smoke run of the script itself")
    p.add_argument("--only", type=lambda s: s.split(","), default=list(CHECKS), metavar="CHECK[,CHECK]",
                   help=f"run only these checks, of {', '.join(CHECKS)}")
    p.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if unknown := [c for c in args.only if c not in CHECKS]:
        p.error(f"unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available here (torch "
              f"{torch.__version__}); run on a machine with an NVIDIA GPU, or pass --device cpu", file=sys.stderr)
        return 1
    if args.out is not None and args.out.is_dir():
        print(f"error: --out {args.out} is a directory; give a file name", file=sys.stderr)
        return 1
    device, sizes = torch.device(args.device), QUICK if args.quick else Sizes()
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    facts = (f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}, "
             f"torch {torch.__version__}{', quick sizes' if args.quick else ''}")
    print(f"cuda_check on {facts}", file=sys.stderr)
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(device, DTYPES[dtype], sizes, Path(tmp))
        for name in args.only:
            t1 = time.perf_counter()
            try:
                rows += CHECKS[name](run)
            except Exception as e:  # a broken install must still give the table, with this row failed
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                rows.append(Row(name, "error", False, f"{type(e).__name__}: {msg}"))
            print(f"{name} done in {time.perf_counter() - t1:.1f}s", file=sys.stderr)
    print(table(rows))
    failed = [r.check for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} passed in {time.perf_counter() - t0:.0f}s on {facts}")
    if args.out is not None:
        payload = {"device": facts, "dtype": dtype, "quick": args.quick, "rows": [r.__dict__ for r in rows]}
        tmp_out = args.out.with_name(args.out.name + ".tmp")
        try:
            tmp_out.write_text(json.dumps(payload, indent=1))
            os.replace(tmp_out, args.out)
        except OSError as e:
            print(f"error: cannot write {args.out}: {e.strerror}", file=sys.stderr)
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
