"""Trust an install on a GPU: the one script a lent GPU runs first (issues 12, 30). One table, one summary
line to paste into a note, a non-zero exit on any failure.

    python scripts/cuda_check.py                      # on CUDA; about 10 minutes on one H100
    python scripts/cuda_check.py --out check.json     # the table's rows as JSON too
    python scripts/cuda_check.py --device cpu --quick # every check on the CPU at small sizes (the tests)
    python scripts/cuda_check.py --only decoders,sampling   # some checks: see CHECKS

Checks, each one or more rows (check | result | pass/fail | detail). Every row can fail; each check runs
in its own try, its traceback goes to stderr, and the device is synchronised after it, so an
asynchronous CUDA error is blamed on the check that queued it, not on a later one.
 1. gpu-tests   the tests that skip without an accelerator, through pytest in a subprocess
 2. decoders    greedy ids against transformers' generate for each decoder kind: LLaMA (MHA), Mistral
                (grouped KV heads), Qwen2 (LLaVA-OneVision: q/k/v biases, grouped KV heads), in float16 and
                bfloat16 on CUDA; a padded batch of 3 gives each question's own ids; the default dtype
                each checkpoint gets on this GPU
 3. attention   llama.attend with grouped KV heads and a mask (a padded prefill, a decode step) on the
                backends that are not the math kernel alone, against float64 math; the peak memory of
                a OneVision-7B padded prefill of 8 prompts (the math kernel's scores would take GBs)
 4. sampling    generate.draw's ids against torch.multinomial's for the same generator on the device, and
                `sample` under CUDA's sync debug mode "error" (a host synchronisation raises)
 5. compile     the README's --compile command (the tiny model, one question at a time, 512 answer
                tokens): warm-up on the first question, then no compile and no CUDA graph recording over
                the questions, ids equal to eager
 6. compile-batch   --compile with long prompts (no compression) at batch 8: warm-up on the first
                batch, none after over two batches, ids equal to eager
 7. batch       generate_batch at batch 1 vs 8 on the shipped tiny model: questions/s, same answers
 8. prefill, decode   our decoder vs transformers' LlamaForCausalLM (sdpa) at LLaVA-1.6-7B's shapes, a
                few layers, random weights: prefill seconds and decode tokens/s, A/B alternated, medians
 9. int8-layer, int4-layer   one quantized linear at LLaVA-1.6-7B's MLP widths against F.linear in float32
                of its dequantized storage form, at 1 to 2,048 rows (large activations: float16 overflow
                shows); int4's packing unpacked (quant.unpack_tinygemm) equals its storage form; times
                against the 16-bit F.linear, and tinygemm against dequantize-and-matmul around TINYGEMM_ROWS
10. int8, int4  the shipped tiny model's greedy answers against its 16-bit answers, and decode tokens/s at
                LLaVA-1.6-7B's widths against 16-bit, eager and compiled
11. second-gpu  with two GPUs: the tiny model on cuda:1 while cuda:0 is current answers as on cuda:0
12. tensor-parallel  with two GPUs: tests/tp_worker.py under torchrun on 2 ranks over nccl (its CPU twin,
                tests/test_tensor_parallel.py, runs it on gloo): each decoder kind split in two answers
                with one GPU's greedy ids, one question and a batch of three, logits within TP_TOL
Speed is judged on CUDA only.
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
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device machine has no network

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import alternate, build_decoders, clone_as, median  # noqa: E402
from minillava import llama  # noqa: E402
from minillava.batch import generate_batch, warm_up  # noqa: E402
from minillava.config import TextConfig  # noqa: E402
from minillava.eval import synthetic  # noqa: E402
from minillava.generate import (  # noqa: E402
    CACHE_BUCKET, Steps, TokenReader, compile_steps, default_dtype, draw, generate, load, prefill, sample,
)
from minillava.quant import (  # noqa: E402
    TINYGEMM_ROWS, QuantizedLinear, Spec, dequantize, quantize_model, unpack_tinygemm,
)
from minillava.weights import resolve_model  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The tests that skip without an accelerator (grep -rn "cuda.is_available\|ACCELERATORS" tests/; the
# ones in test_generate.py and test_cuda_check.py are the reverse: they run only without CUDA).
GPU_TESTS = ("tests/test_globalcom2.py::test_accelerator_matches_cpu", "tests/test_peers.py::test_accelerator_matches_cpu")
# Greedy ids may part from transformers' at a near-tie: two 16-bit implementations sum in different
# orders, so their logits differ by a few ulps per layer (float16's ulp is 2e-3 at |logit| 2 to 4,
# bfloat16's 1.6e-2). A divergence passes when transformers' own logit gap between its pick and ours is
# below TIE_GAP, about 25 ulps there: larger than such rounding, far smaller than the gap between a
# random model's top two logits (tenths). A gap above it means a real difference. float32: no excuse.
TIE_GAP = {torch.float16: 0.05, torch.bfloat16: 0.4, torch.float32: 1e-4}
QUESTION = "What is in the picture?"
TINY_MODEL = "llava-next-tiny-scenes"  # shipped in weights/
README_MAX_NEW_TOKENS = 512  # python -m minillava.generate's default, what the README's --compile command runs


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
    # OneVision-7B's attention (Qwen2-7B: 28 query heads on 4 KV heads of 128), a padded batch of 8
    attention: tuple = (8, 28, 4, 128, 2048)  # batch, heads, KV heads, head size, prompt tokens
    layer: tuple = (4096, 11008)  # the quantized linear's input and output widths (LLaVA-1.6-7B's MLP)
    layer_rows: tuple = (1, 8, TINYGEMM_ROWS, TINYGEMM_ROWS + 1, 256, 1024, 2048)


QUICK = Sizes(greedy_tokens=12, questions=6, answer_tokens=4, batch_questions=16, repeats=2, prefill_tokens=300,
              decode_tokens=8, attention=(3, 8, 2, 32, 96), layer=(256, 512), layer_rows=(1, TINYGEMM_ROWS + 1),
              big=TextConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5))


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype  # of the checks with one dtype
    dtypes: tuple  # of the checks run in each 16-bit dtype (decoders, attention)
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


def guarded(name: str, device: torch.device, fn) -> list[Row]:
    """fn()'s rows, the device synchronised before they count (an asynchronous CUDA error of fn surfaces
    here, in its own row); an exception becomes one failed row and its traceback goes to stderr."""
    try:
        rows = fn()
        sync(device)
        return rows
    except Exception as e:  # a broken install must still give the table, with this row failed
        print(f"--- {name} failed:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        message = " ".join(str(e).split())
        return [Row(name, "error", False, f"{type(e).__name__}: {message[:300]} (traceback on stderr)")]


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
# 2. Greedy ids against transformers, per decoder kind and dtype


def tiny_checkpoints(tmp: Path) -> dict:
    """The three decoder kinds as tiny random checkpoints (tests/tiny.py), each with transformers' model
    of the same weights: kind -> (transformers' model, checkpoint dir, image placeholder id)."""
    from tests import tiny

    sp = tiny.train_tokenizer(tmp / "tokenizer.model")
    mha = tiny.hf_model(seed=0)
    gqa = tiny.hf_family_model(tiny.mistral_text_config(), seed=1)
    qwen = tiny.ov_hf_model(seed=0)
    return {
        "mha": (mha, tiny.save_checkpoint(mha, tmp / "mha", "hub", sp), tiny.IMAGE_TOKEN),
        "gqa": (gqa, tiny.save_mistral_checkpoint(gqa, tmp / "gqa", "hub", sp), tiny.IMAGE_TOKEN),
        "qwen2": (qwen, tiny.save_ov_checkpoint(qwen, tmp / "qwen2", "hub",
                                                tiny.train_qwen_tokenizer(tmp / "qwen-tokenizer.json")),
                  tiny.OV_IMAGE_TOKEN),
    }


def noise(w: int, h: int, seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@torch.inference_mode()
def greedy_row(run: Run, kind: str, hf, ckpt: Path, placeholder: int, dtype: torch.dtype) -> list[Row]:
    """tests/test_generate.py::test_greedy_ids_equal_transformers on the device in `dtype`, on two images (a
    2 x 1 and a 1 x 2 crop grid): transformers is given our prompt ids with the image placeholder."""
    import copy

    device, n = run.device, run.sizes.greedy_tokens
    hf = copy.deepcopy(hf).to(device, dtype)  # the float32 original stays for the next dtype
    ours, tok = load(str(ckpt), device, dtype)
    worst, notes, ok = 0.0, [], True
    for w, h in ((150, 90), (90, 150)):
        image = noise(w, h, 7)
        answer = generate(ours, tok, image, QUESTION, max_new_tokens=n)  # uncompressed
        mine = answer.token_ids
        before, after = tok.encode_question(QUESTION)
        ids = torch.tensor([before + [placeholder] * answer.visual_tokens["before"] + after], device=device)
        out = hf.generate(input_ids=ids, pixel_values=ours.tile(image).pixels[None].to(device, dtype),
                          image_sizes=torch.tensor([[h, w]], device=device), max_new_tokens=n, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
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
        ok = ok and gap < TIE_GAP[dtype]
        notes.append(f"{w}x{h}: first divergence at token {k}, transformers' gap {gap:.4f}")
    result = "ids equal" if all("equal" in x for x in notes) else f"near-tie divergence (gap {worst:.4f})"
    return [Row(f"greedy {kind} {name_of(dtype)}", result if ok else "ids differ", ok,
                "vs transformers generate; " + "; ".join(notes) + f"; a divergence passes at a gap < {TIE_GAP[dtype]}")]


@torch.inference_mode()
def padded_row(run: Run, kind: str, ckpt: Path) -> list[Row]:
    """A left-padded batch of 3 (prompts of three lengths: the padded prefill's mask, then the cached
    steps' mask) gives each question the ids it gets alone. float32: the batch path is shape logic,
    and float32 leaves no near-tie to excuse."""
    device, n = run.device, run.sizes.greedy_tokens
    ours, tok = load(str(ckpt), device, torch.float32)
    items = [(noise(150, 90, 1), QUESTION), (noise(90, 150, 2), "Describe the image in detail."),
             (noise(120, 120, 3), "Is there a cat?")]
    batch = [r.token_ids for r in generate_batch(ours, tok, items, "none", 1.0, n)]
    alone = [generate(ours, tok, im, q, "none", 1.0, n).token_ids for im, q in items]
    same = sum(a == b for a, b in zip(batch, alone))
    return [Row(f"padded {kind}", f"{same}/3 rows = alone", same == 3,
                f"generate_batch of 3 prompts of lengths {[len(tok.encode_question(q)[1]) for _, q in items]} "
                f"(text after the image) and three image sizes, float32, {n} tokens")]


def dtype_row(run: Run, qwen2: Path) -> list[Row]:
    """generate.default_dtype on this device: the shipped tiny model (saved in float16) gets float16; a
    OneVision checkpoint saved in bfloat16 gets bfloat16 where the GPU has it natively, else float32
    (on the CPU both float32: they fit)."""
    import shutil

    saved_bf16 = shutil.copytree(qwen2, run.tmp / "saved-bfloat16")  # its config.json to say bfloat16
    config = json.loads((qwen2 / "config.json").read_text())
    (saved_bf16 / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    got = {"float16": default_dtype(resolve_model(TINY_MODEL), run.device), "bfloat16": default_dtype(saved_bf16, run.device)}
    if run.device.type == "cuda":
        native = torch.cuda.get_device_capability(run.device)[0] >= 8 or bool(torch.version.hip)
        want = {"float16": torch.float16, "bfloat16": torch.bfloat16 if native else torch.float32}
    else:
        want = {"float16": torch.float32, "bfloat16": torch.float32}
    return [Row("default dtype", ", ".join(f"saved {k} -> {name_of(v)}" for k, v in got.items()), got == want,
                f"generate.default_dtype on {run.device}; expected " + ", ".join(name_of(v) for v in want.values()))]


def check_decoders(run: Run) -> list[Row]:
    kinds = tiny_checkpoints(run.tmp)
    rows = guarded("default dtype", run.device, lambda: dtype_row(run, kinds["qwen2"][1]))
    for kind, (hf, ckpt, placeholder) in kinds.items():
        for dtype in run.dtypes:
            rows += guarded(f"greedy {kind} {name_of(dtype)}", run.device,
                            lambda: greedy_row(run, kind, hf, ckpt, placeholder, dtype))
        if kind != "mha":  # grouped KV heads: the padded prefill and the cached steps' masked attention
            rows += guarded(f"padded {kind}", run.device, lambda: padded_row(run, kind, ckpt))
    return rows


# ---------------------------------------------------------------------------------------------------
# 3. Attention with grouped KV heads and a mask


def reference_attention(q, k, v, mask):
    """F.scaled_dot_product_attention's documented math (its docstring), in float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def padded_inputs(device, dtype, b, h, kv, hd, t, s=None):
    """q, k, v and a mask: a padded prefill of b prompts of t, t - 5, t - 11 ... tokens (s None), or one
    decode step over s cached slots, each row having filled a different number."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(b, h, 1 if s else t, hd, generator=g, device=device).to(dtype)
    k, v = (torch.randn(b, kv, s or t, hd, generator=g, device=device).to(dtype) for _ in range(2))
    lengths = torch.tensor([max(t - 6 * i, 1) for i in range(b)], device=device)
    if s is None:
        pos = (torch.arange(t, device=device)[None, :] - (t - lengths)[:, None]).clamp(min=llama.PAD)
        return q, k, v, llama.prefill_mask(pos)
    return q, k, v, (torch.arange(s, device=device)[None, None, :] <= lengths[:, None, None])[:, None]


@torch.inference_mode()
def check_attention(run: Run) -> list[Row]:
    """llama.attend on the device. On CUDA every call must run on a backend other than the math kernel
    alone (flash, memory-efficient, cuDNN: sdpa_kernel given those raises "No available kernel"
    otherwise), as the fix of issue 30 claims, and match float64 math; the peak memory of a
    OneVision-7B-sized padded prefill stays far below the B x H x T x T float32 scores the math kernel
    would write."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, (b, h, kv, hd, t) = run.device, run.sizes.attention
    cuda = device.type == "cuda"
    def fast():  # a fresh context each time (sdpa_kernel's is a one-use generator)
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])

    rows = []
    for dtype in run.dtypes:
        def one(dtype=dtype):
            tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dtype]
            errors = {}
            for what, s in (("prefill", None), ("decode", 3 * t // 2)):
                q, k, v, mask = padded_inputs(device, dtype, 3, h, kv, hd, t // 4 + 7, s and s // 4)
                with fast() if cuda else nullcontext():
                    out = llama.attend(q, k, v, mask, prefill=s is None)
                errors[what] = (out.double() - reference_attention(q, k, v, mask)).abs().max().item()
            peak = ""
            ok = all(e < tol for e in errors.values())
            if cuda:  # the whole size, memory measured
                q, k, v, mask = padded_inputs(device, dtype, b, h, kv, hd, t)
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                with fast():
                    llama.attend(q, k, v, mask, prefill=True)
                sync(device)
                used, scores = torch.cuda.max_memory_allocated(device) - base, b * h * t * t * 4
                ok = ok and used < scores / 4
                peak = (f"; batch {b}, {h} heads on {kv}, {t} tokens padded: peak {used / 2**20:.0f} MiB "
                        f"(the math kernel's scores alone: {scores / 2**20:.0f} MiB; < a quarter required)")
            return [Row(f"attention {name_of(dtype)}", "max error " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()),
                        ok, f"grouped KV heads ({h} on {kv}) with a mask, against float64 math (< {tol})"
                        + ("; backends: flash, memory-efficient, cuDNN only" if cuda else "; the CPU's enable_gqa call")
                        + peak)]

        rows += guarded(f"attention {name_of(dtype)}", device, one)
    return rows


# ---------------------------------------------------------------------------------------------------
# 4. Sampling without a host synchronisation


@torch.inference_mode()
def check_sampling(run: Run) -> list[Row]:
    device, n, cuda = run.device, 100, run.device.type == "cuda"
    same = 0
    for seed in range(n):
        logits = 3 * torch.randn(4, 32064, generator=torch.Generator(device).manual_seed(seed), device=device)
        probs = torch.softmax(logits.double(), -1)
        if seed % 2:
            probs[:, 16000:] = 0  # as a nucleus cut leaves them
        want = torch.multinomial(probs, 1, generator=torch.Generator(device).manual_seed(n + seed)).squeeze(-1)
        same += torch.equal(draw(probs, torch.Generator(device).manual_seed(n + seed)), want)
    synced, ok = "not checked on cpu", same == n
    if cuda:  # CUDA warns of every synchronising call in this mode (torch.cuda.set_sync_debug_mode)
        import warnings

        g = torch.Generator(device).manual_seed(0)
        logits = torch.randn(8, 32064, device=device)
        counts = {}
        for top_p in (1.0, 0.9):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    for _ in range(5):
                        sample(logits, 0.7, top_p, g)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            counts[top_p] = sum("synchroniz" in str(w.message) for w in caught)
        ok = ok and not any(counts.values())
        synced = ", ".join(f"top_p {p}: {c}" for p, c in counts.items())
    return [Row("sampling", f"{same}/{n} draws = torch.multinomial", ok,
                f"ids of generate.draw and torch.multinomial(probs, 1) from the same generator state on {device}; "
                f"host synchronisations in 5 sample() calls at temperature 0.7 (none allowed): {synced}")]


# ---------------------------------------------------------------------------------------------------
# 5, 6. --compile answers questions without compiling again


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



def compiled_rows(name: str, device: torch.device, warm, after, warm_s: float, skips: int, same: int, total: int,
                  caches: set, what: str) -> list[Row]:
    """The row of a compile check: nothing compiled or recorded after the warm-up, one KV-cache length,
    the compiled ids equal to eager, and on CUDA CUDA graphs really run (recorded at warm-up, none skipped)."""
    recorded = warm.events.get("CUDAGRAPH_RECORDING", 0)
    new = sum(after.events.values())
    ok = new == 0 and after.graphs == 0 and same == total and len(caches) == 1
    if device.type == "cuda":  # reduce-overhead's CUDA graphs must really run
        ok = ok and skips == 0 and recorded > 0
    detail = (f"{what}; warm-up {warm_s:.1f}s: {warm.events.get('DYNAMO', 0)} dynamo compiles, {recorded} CUDA graph "
              f"recordings; after it: {after.events.get('DYNAMO', 0)} compiles, "
              f"{after.events.get('CUDAGRAPH_RECORDING', 0)} recordings, {after.graphs} new dynamo graphs, "
              f"{skips} cudagraph skips; cache lengths {sorted(caches)}; ids equal to eager {same}/{total}")
    result = f"{after.events.get('DYNAMO', 0)} compiles, {after.events.get('CUDAGRAPH_RECORDING', 0)} recordings"
    return [Row(name, result + " after warm-up", ok, detail)]


def check_compile(run: Run) -> list[Row]:
    """The README's `generate --compile` on the shipped tiny model, one question at a time, globalcom2
    r = 0.25, 512 answer tokens (the CLI's default): compile_steps and warm_up on the first question, as
    the CLI does; then none of the questions compiles or records anything."""
    from torch._dynamo.utils import counters

    device, sizes, n = run.device, run.sizes, README_MAX_NEW_TOKENS
    items = synthetic_items(sizes.questions)
    model, tok = load(TINY_MODEL, device, run.dtype)
    eager = [generate(model, tok, im, q, "globalcom2", 0.25, n).token_ids for im, q in items]
    skips0 = counters["inductor"]["cudagraph_skips"]
    with CompileCounter() as warm:
        steps = compile_steps(model)
        warm_s = warm_up(model, steps, tok, items[:1], "globalcom2", 0.25, n)
    caches = set()
    with CompileCounter() as after:
        compiled = []
        for im, q in items:
            compiled.append(generate(model, tok, im, q, "globalcom2", 0.25, n, steps=steps).token_ids)
            caches.add(model.llm.cache_length)
    same = sum(a == b for a, b in zip(compiled, eager))
    return compiled_rows("compile", device, warm, after, warm_s, counters["inductor"]["cudagraph_skips"] - skips0, same,
                         len(items), caches, f"{len(items)} questions, max_new_tokens {n}")


def check_compile_batch(run: Run) -> list[Row]:
    """--compile at batch 8 with long prompts (no compression: every visual token), as the eval runner
    runs it: warm-up on the first batch, then two batches without a compile or a recording."""
    from torch._dynamo.utils import counters

    device, sizes, b = run.device, run.sizes, 8
    items = synthetic_items(2 * b)
    batches = [items[:b], items[b:]]
    model, tok = load(TINY_MODEL, device, run.dtype)
    eager = [r.token_ids for batch in batches for r in generate_batch(model, tok, batch, "none", 1.0, sizes.answer_tokens)]
    skips0 = counters["inductor"]["cudagraph_skips"]
    with CompileCounter() as warm:
        steps = compile_steps(model)
        warm_s = warm_up(model, steps, tok, batches[0], "none", 1.0, sizes.answer_tokens)
    caches, compiled = set(), []
    with CompileCounter() as after:
        for batch in batches:
            compiled += [r.token_ids for r in generate_batch(model, tok, batch, "none", 1.0, sizes.answer_tokens,
                                                             steps=steps)]
            caches.add(model.llm.cache_length)
    same = sum(a == b for a, b in zip(compiled, eager))
    visual = [r.visual_tokens["after"] for batch in batches for r in generate_batch(model, tok, batch, "none", 1.0, 1)]
    return compiled_rows("compile-batch", device, warm, after, warm_s, counters["inductor"]["cudagraph_skips"] - skips0,
                         same, len(items), caches, f"2 batches of {b} prompts holding {min(visual)} to {max(visual)} "
                         f"visual tokens each (uncompressed), answers of up to {sizes.answer_tokens} tokens")


# ---------------------------------------------------------------------------------------------------
# 7. Batch 1 vs 8


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
# 8. Prefill and decode against transformers at LLaVA-1.6-7B's shapes


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
# 9, 10. Weight-only int8 / int4


def layer_ms(device: torch.device, fn, repeats: int = 20) -> float:
    """Milliseconds of one call of fn, the mean of `repeats` after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats * 1e3


@torch.inference_mode()
def layer_row(run: Run, spec: Spec) -> list[Row]:
    """One quantized linear at LLaVA-1.6-7B's MLP widths, built as --quantize builds it (quantized on the
    device, packed for its kernel), against F.linear in float32 of its storage form dequantized (the
    reference written from the format, not from the kernels). Activations of 40 x randn make outputs of
    tens to hundreds: past 516 x a row's largest weight, where a float16 sum of raw int8 integers
    overflows. On CUDA: int4's packing unpacked equals the storage form; times against the 16-bit F.linear,
    and for int4 tinygemm against dequantize-and-matmul at each row count (the choice by TINYGEMM_ROWS
    must be within 25% of the faster)."""
    from minillava.quant import quantize

    device, dtype, (k, n) = run.device, run.dtype, run.sizes.layer
    cuda = device.type == "cuda"
    g = torch.Generator(device).manual_seed(0)
    w = (0.02 * torch.randn(n, k, generator=g, device=device)).to(dtype)
    storage = quantize(w, spec, dtype)  # what QuantizedLinear.from_weight packs
    layer = QuantizedLinear.from_weight(w, spec)
    ref_weight = dequantize(storage, spec, torch.float32)
    tol = 2e-2 if spec.bits == 4 or dtype == torch.bfloat16 else 5e-3  # tinygemm computes in bfloat16
    errors, notes, ok = {}, [f"kernel {layer.kernel}"], True
    for rows in run.sizes.layer_rows:
        x = 40 * torch.randn(rows, k, generator=g, device=device)
        ref = F.linear(x, ref_weight)
        y = layer(x.to(dtype))
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        errors[rows] = err
        ok = ok and bool(y.isfinite().all()) and err < tol
    if cuda and spec.bits == 4:
        same = torch.equal(unpack_tinygemm(layer.weight), storage["weight"])
        ok = ok and same
        notes.append("unpack_tinygemm(packing) " + ("= storage form" if same else "DIFFERS from the storage form"))
    if cuda:
        times = []
        for rows in run.sizes.layer_rows:
            x = torch.randn(rows, k, generator=g, device=device).to(dtype)
            t16, tq = layer_ms(device, lambda: F.linear(x, w)), layer_ms(device, lambda: layer(x))
            entry = f"{rows} rows {tq:.3f} vs {t16:.3f} ms"
            if spec.bits == 4:  # both of int4's paths, whatever TINYGEMM_ROWS chooses
                tiny_ms = layer_ms(device, lambda: torch.ops.aten._weight_int4pack_mm(
                    x.to(torch.bfloat16), layer.weight, spec.group_size, layer.scales_and_zeros))
                deq_ms = layer_ms(device, lambda: F.linear(x, dequantize(
                    {"weight": unpack_tinygemm(layer.weight), "scales_and_zeros": layer.scales_and_zeros}, spec, dtype)))
                chosen = tiny_ms if rows <= TINYGEMM_ROWS else deq_ms
                ok = ok and chosen <= 1.25 * min(tiny_ms, deq_ms)
                entry += f" (tinygemm {tiny_ms:.3f}, dequantize {deq_ms:.3f})"
            times.append(entry)
        notes.append("times, quantized vs 16-bit: " + "; ".join(times))
    worst = max(errors.values())
    return [Row(f"int{spec.bits}-layer", f"max rel. error {worst:.1e}", ok,
                f"{k} -> {n}, {name_of(dtype)}, rows {list(errors)}: errors "
                + ", ".join(f"{e:.1e}" for e in errors.values()) + f" (< {tol}); " + "; ".join(notes))]


@torch.inference_mode()
def check_quantize(run: Run) -> list[Row]:
    """int8 and int4 against the 16-bit model. Layers: `layer_row`. Answers: the shipped tiny model
    (int4 group 64: its widths are 192 and 512) on the compile check's synthetic questions, globalcom2
    r = 0.25, greedy; 90% equal to 16-bit's required (docs/speed.md: 496 to 500 of 500 in float32).
    Speed: the decoder check's random decoder at LLaVA-1.6-7B's widths (FFN rounded up to a multiple of
    128 and the vocabulary to one of 16, as int4 needs: quant.Spec.check), batch 1, 64-token prompt, eager
    steps and (on CUDA) compile_steps' decode; on CUDA int8 compiled and int4 (eager and compiled) must
    decode faster than 16-bit (int8 eager is dequantize-and-matmul: not judged, minillava/quant.py)."""
    device, sizes = run.device, run.sizes
    rows = guarded("int8-layer", device, lambda: layer_row(run, Spec(8)))
    rows += guarded("int4-layer", device, lambda: layer_row(run, Spec(4, 128)))
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
    for name in specs:
        same = sum(a == b for a, b in zip(answers[name], answers["16-bit"]))
        eager = tps[name] / tps["16-bit"]
        compiled = tps[f"{name} compiled"] / tps["16-bit compiled"] if cuda else None
        ok = same >= 0.9 * len(items)
        if cuda:
            ok = ok and compiled > 1.0 and (name == "int8" or eager > 1.0)
        speed = f"{eager:.2f}x eager" + (f", {compiled:.2f}x compiled" if cuda else "")
        rows.append(Row(name, f"{same}/{len(items)} answers = 16-bit; {speed}", ok,
                        f"tiny model, {len(items)} synthetic questions, greedy ids equal to the 16-bit model's: {same} "
                        f"(>= 90% required); decode tokens/s at width {text.hidden_size}, FFN {text.intermediate_size}, "
                        f"{text.num_hidden_layers} layers, vocab {text.vocab_size}: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in tps.items() if k.split()[0] in ("16-bit", name))
                        + (f"; compiled in {compile_s[name]:.0f}s; faster than 16-bit required (compiled"
                           + (", and eager" if name == "int4" else "") + ")" if cuda else "; speed not judged")
                        + f"; ids of {n} decode steps equal 16-bit's: "
                        f"{sum(a == b for a, b in zip(ids[name], ids['16-bit']))}/{n}"))
    return rows


# ---------------------------------------------------------------------------------------------------
# 11. A second GPU


@torch.inference_mode()
def check_second_gpu(run: Run) -> list[Row]:
    """The tiny model on cuda:1 while cuda:0 stays current (no set_device: what a library caller may do):
    greedy, sampled and batched answers equal to those on cuda:0. TokenReader's event must follow the
    model's device for the ids to be read after their copy lands."""
    device = run.device
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return [Row("second-gpu", "not run: one GPU", True, "needs two CUDA devices")]
    torch.cuda.set_device(0)
    items = synthetic_items(4)
    answers = {}
    for index in (0, 1):
        model, tok = load(TINY_MODEL, torch.device("cuda", index), run.dtype)
        greedy = [generate(model, tok, im, q, "globalcom2", 0.25, run.sizes.answer_tokens).token_ids for im, q in items]
        sampled = [generate(model, tok, im, q, "none", 1.0, 16, temperature=0.9, top_p=0.9, seed=3).token_ids
                   for im, q in items]
        batched = [r.token_ids for r in generate_batch(model, tok, items, "globalcom2", 0.25, run.sizes.answer_tokens)]
        answers[index] = (greedy, sampled, batched)
        del model
    current = torch.cuda.current_device()
    ok = answers[0] == answers[1] and current == 0
    return [Row("second-gpu", "cuda:1 = cuda:0" if answers[0] == answers[1] else "cuda:1 DIFFERS", ok,
                f"{len(items)} questions greedy, sampled (T 0.9, top_p 0.9, seed 3) and as a batch; current device {current}")]


# ---------------------------------------------------------------------------------------------------
# 12. Tensor parallelism over two GPUs

# float32 on both sides; the parts' matrix products have other shapes than the whole's, so cuBLAS may pick
# other kernels (another summation order) besides the all-reduce's: a looser bound than the CPU test's 1e-5
TP_TOL = 1e-4
# the int8 / int4 cases (names ending -int8 / -int4): their matmuls run in bfloat16, so each rank's partial
# product is rounded before the all-reduce; tests/test_tensor_parallel.py's TOL_QUANTIZED (measured 0.047)
TP_TOL_QUANTIZED = 0.1


def check_tensor_parallel(run: Run) -> list[Row]:
    """Two GPUs: `tensor_parallel_row` on nccl. Otherwise a row saying why it did not run."""
    if run.device.type != "cuda" or torch.cuda.device_count() < 2:
        why = "one GPU" if run.device.type == "cuda" else "on the CPU"
        return [Row("tensor-parallel", f"not run: {why}", True,
                    "needs two CUDA devices (nccl); tests/test_tensor_parallel.py runs the same worker on gloo")]
    return [tensor_parallel_row(run, "cuda")]


def tensor_parallel_row(run: Run, device_type: str) -> Row:
    """torchrun --nproc-per-node 2 tests/tp_worker.py on `device_type` (cuda: nccl, cuda:0 and cuda:1; cpu:
    gloo, for the tests): every case's greedy ids of the split model equal the whole model's on both ranks,
    alone and in a batch, logits within TP_TOL; the detail gives the largest difference and the weight
    bytes each rank holds against the whole model's."""
    from tests.tp_worker import build_cases
    from tests import tiny

    cases = build_cases(run.tmp / "tp", tiny.train_tokenizer(run.tmp / "tp-tokenizer.model"))
    (run.tmp / "tp-cases.json").write_text(json.dumps(cases))
    image = run.tmp / "tp-image.png"
    noise(150, 90, 7).save(image)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "tp_worker.py"), str(run.tmp / "tp-cases.json"), str(image), str(run.tmp), device_type]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        last = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        return Row("tensor-parallel", "error", False, f"torchrun exited {proc.returncode}: {last}")
    ranks = [json.loads((run.tmp / f"rank{r}.json").read_text()) for r in range(2)]
    pairs, diff, qdiff = [], 0.0, 0.0  # (one process's ids, a rank's), the largest logit differences on either
    for p in ranks:                    # rank: of the float cases, of the quantized ones
        for key, r in p.items():
            pairs += [(r["ids"], r["tp_ids"])] + ([(r["batch_ids"], r["tp_batch_ids"])] if "batch_ids" in r else [])
            if "-int" in key.split("/")[0]:
                qdiff = max(qdiff, r["logit_diff"], r.get("batch_logit_diff", 0.0))
            else:
                diff = max(diff, r["logit_diff"], r.get("batch_logit_diff", 0.0))
    same = sum(a == b for a, b in pairs)
    share = max(r["tp_bytes"] / r["bytes"] for p in ranks for r in p.values())
    backend = "nccl" if device_type == "cuda" else "gloo"
    ok = same == len(pairs) and diff <= TP_TOL and qdiff <= TP_TOL_QUANTIZED
    return Row("tensor-parallel", f"{same}/{len(pairs)} ids = one process", ok,
               f"2 ranks over {backend}; {len(ranks[0])} checkpoint x method cases ({', '.join(c['name'] for c in cases)}), "
               f"alone and some in batches of 3; logits within {diff:.1e} (bound {TP_TOL:g}), quantized within "
               f"{qdiff:.1e} (bound {TP_TOL_QUANTIZED:g}); each rank holds <= "
               f"{share:.0%} of the decoder's weight bytes (embedding and head whole)")

CHECKS = {"gpu-tests": check_gpu_tests, "decoders": check_decoders, "attention": check_attention,
          "sampling": check_sampling, "compile": check_compile, "compile-batch": check_compile_batch,
          "batch": check_batch, "decoder": check_decoder, "quantize": check_quantize,
          "second-gpu": check_second_gpu, "tensor-parallel": check_tensor_parallel}
# rows: decoders: greedy KIND DTYPE and padded KIND; attention: one per dtype; decoder: prefill and decode;
# quantize: int8-layer, int4-layer, int8, int4


def table(rows: list[Row]) -> str:
    cells = [("check", "result", "pass/fail", "detail")] + [(r.check, r.result, "pass" if r.ok else "FAIL", r.detail)
                                                            for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(" | ".join([*(c[i].ljust(widths[i]) for i in range(3)), c[3]]) for c in cells)


def summary(rows: list[Row], seconds: float, facts: str) -> str:
    """The one line to paste into a note."""
    failed = [r.check for r in rows if not r.ok]
    return (f"cuda_check: {len(rows) - len(failed)}/{len(rows)} passed"
            + (f" (FAILED: {', '.join(failed)})" if failed else "") + f" in {seconds:.0f}s on {facts}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/cuda_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default); cpu runs every check on the CPU, speed not judged")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: the checks of one dtype in float16 on cuda (the tiny model's and LLaVA-1.6's "
                   "saved dtype), the decoder kinds and attention in float16 and bfloat16; float32 on cpu (float16 "
                   "matrix products are emulated on most CPUs: minutes instead of seconds)")
    p.add_argument("--quick", action="store_true", help="small sizes (a decoder of width 256, short answers): "
                   "a smoke run of the script itself")
    p.add_argument("--only", type=lambda s: s.split(","), default=list(CHECKS), metavar="CHECK[,CHECK]",
                   help=f"run only these checks, of {', '.join(CHECKS)}")
    p.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if unknown := [c for c in args.only if c not in CHECKS]:
        p.error(f"unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def facts_of(device: torch.device, dtypes: tuple, quick: bool) -> str:
    where = "cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = (f"{torch.cuda.get_device_name(device)} (sm {major}.{minor}, {torch.cuda.device_count()} GPU(s), "
                 f"CUDA {torch.version.cuda})")
    return (f"{where}, {'+'.join(name_of(d) for d in dtypes)}, torch {torch.__version__}"
            f"{', quick sizes' if quick else ''}")


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
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("float16" if cuda else "float32")]
    dtypes = (dtype,) if args.dtype or not cuda else (torch.float16, torch.bfloat16)
    facts = facts_of(device, dtypes, args.quick)
    print(f"cuda_check on {facts}", file=sys.stderr)
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(device, dtype, dtypes, sizes, Path(tmp))
        for name in args.only:
            t1 = time.perf_counter()
            rows += guarded(name, device, lambda: CHECKS[name](run))
            print(f"{name} done in {time.perf_counter() - t1:.1f}s", file=sys.stderr)
    print(table(rows))
    line = summary(rows, time.perf_counter() - t0, facts)
    print(line)
    if args.out is not None:
        payload = {"device": facts, "dtype": name_of(dtype), "quick": args.quick, "summary": line,
                   "rows": [r.__dict__ for r in rows]}
        tmp_out = args.out.with_name(args.out.name + ".tmp")
        try:
            tmp_out.write_text(json.dumps(payload, indent=1))
            os.replace(tmp_out, args.out)
        except OSError as e:
            print(f"error: cannot write {args.out}: {e.strerror}", file=sys.stderr)
            return 1
    return 1 if any(not r.ok for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
