"""Side-by-side benchmark of minillava against transformers, and GlobalCom2's theoretical savings.

    python scripts/bench.py                 # full run: real CLIP ViT-L/14-336, a ~1B decoder (20-30 min, 2 cores)
    python scripts/bench.py --quick         # CI smoke: small shapes, about a minute; its ratios mean nothing
    python scripts/bench.py --out DIR       # where bench.md, bench.json and bench.png go (default bench_results/)

One process, one run (only the loading measurement runs in a fresh subprocess). Every comparison
calls each side once to warm it up, then alternates the sides (A, B, A, B, ...) and reports medians.
Weights are random (seeded) at the plan's shapes, and both sides of a comparison share the very same
weight tensors. The rows and targets are those of issue 4 (rows 12-13, weight-only int8 / int4: issue
21); the theoretical table recomputes the GlobalCom2 paper's efficiency figures (LLaVA-NeXT-7B on MME)
the way LLM-Viewer counts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import globalcom2  # noqa: E402
from minillava.anyres import tile_image  # noqa: E402
from minillava.clip import ClipTower  # noqa: E402
from minillava.config import KNOWN_TOWERS, LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from minillava.flops import LLAVA_7B, LLAVA_13B, LlmSpec, kv_cache_bytes, prefill_flops, tower_flops  # noqa: E402,F401
from minillava.generate import CACHE_BUCKET, Steps, TokenReader, compile_steps, decode_one_token, prefill, sample  # noqa: E402
from minillava.layout import compressed_sequence, uncompressed_length, unpad_area  # noqa: E402
from minillava.model import Llava  # noqa: E402
from minillava.quant import DEFAULT_GROUP_SIZE, QuantizedLinear, Spec, quantize_model  # noqa: E402

CLIP_L336 = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]
PINPOINTS = LlavaConfig().grid_pinpoints  # LLaVA-1.6's, (width, height)
IMAGE_SIZE = (672, 672)  # the image whose token counts rows 7 and the theoretical table use: grid 2 x 2
PROMPT_TOKENS = 64  # text tokens of an MME prompt around the image (see PROMPT_NOTE)
PROMPT_NOTE = (
    "text tokens: 64, an estimate of an MME prompt in LLaVA's vicuna_v1 template: BOS + system sentence "
    "(~35 pieces) + 'USER:' / newline / ' ASSISTANT:' (~8) + a question such as 'Is there a dog in this image? "
    "Please answer yes or no.' (~15), rounded up"
)
RATIOS = (1.0, 0.75, 0.5, 0.25, 0.1)
COMPRESS_DIM = 4096  # projected feature width of LLaVA-NeXT-7B: what the compressor moves around
GB = 1e9


# ---------------------------------------------------------------------------------------------------
# The plan: shapes and repeat counts of one run


@dataclass
class Plan:
    name: str  # "full" or "quick"
    representative: bool  # False: the ratios say nothing about speed (smoke test shapes)
    vision: VisionConfig  # the tower of rows 1, 2 and 8
    tiles: int  # tiles per tower call (5 = thumbnail + 2 x 2 crops)
    text: TextConfig  # the decoder of rows 3-7
    prefill_lengths: tuple[int, ...]  # prompt lengths of row 3
    decode_prompt: int  # prompt length before the decode of row 4
    new_tokens: int  # tokens generated per decode run (the first comes out of the prefill)
    repeats: dict[str, int]  # timed calls per side after the warm-up, per section
    matmul_n: int  # side of the bare matmul of row 5
    copy_bytes: int  # size of the bare copy of row 6
    ckpt_vision: VisionConfig  # the checkpoint of row 9
    ckpt_text: TextConfig
    ckpt_shards: int = 4
    ckpt_dtype: str = "float16"
    load_float32: bool = True  # also load the checkpoint into float32 (reported apart, no target)
    compile: bool = True  # torch.compile the decode step (row 4) and, as extra information, the prefill (row 3)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    batch_questions: int = 64  # synthetic questions answered per side of row 10
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # --batch-size of the sides of row 10 (rows 11a, 11b: 1 and 8)


def decoder_1b() -> TextConfig:
    """LLaMA at width 2048, 16 layers, MLP 5632, 32 heads, vocab 32000: 0.95B parameters."""
    return TextConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def make_plan(name: str) -> Plan:
    if name == "full":
        return Plan(
            name="full", representative=True, vision=CLIP_L336, tiles=5, text=decoder_1b(),
            prefill_lengths=(700, 2900), decode_prompt=128, new_tokens=32,
            repeats={"vision": 3, "prefill": 3, "compressed": 3, "decode": 5, "matmul": 10, "copy": 10, "compress": 20,
                     "batch": 3},
            matmul_n=2048, copy_bytes=1 << 30, ckpt_vision=CLIP_L336, ckpt_text=decoder_1b(),
        )
    if name == "quick":
        small = TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                           num_attention_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5)
        return Plan(
            name="quick", representative=False, vision=dataclasses.replace(CLIP_L336, num_hidden_layers=2), tiles=2,
            text=small, prefill_lengths=(64, 256), decode_prompt=32, new_tokens=8,
            repeats={"vision": 2, "prefill": 2, "compressed": 2, "decode": 2, "matmul": 5, "copy": 5, "compress": 5,
                     "batch": 1},
            matmul_n=1024, copy_bytes=1 << 26,
            ckpt_vision=dataclasses.replace(CLIP_L336, num_hidden_layers=2), ckpt_text=small, ckpt_shards=2,
            batch_questions=16, batch_sizes=(1, 8, 16),
        )
    raise ValueError(f"unknown plan {name!r}")


# ---------------------------------------------------------------------------------------------------
# Timing helpers


def median(xs) -> float:
    return statistics.median(xs)


class CpuWatch:
    """How much of the machine's CPU other processes take while we time something (a shared machine adds
    noise that alternating sides only partly cancels), and optionally waiting for a quiet machine.

    Others' share = (busy CPU time of the whole machine from /proc/stat, steal included, minus this
    process's own CPU time) / (wall time x cores)."""

    def __init__(self):
        self.rounds: dict[str, list[float]] = {}  # label -> others' share during each alternation round
        self.idle_wait_s = 0.0  # wait up to this long before each round for others' share < IDLE_SHARE
        self.waited_s = 0.0

    IDLE_SHARE = 0.1

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is already in user): all but idle, iowait
        busy = (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def share(self, start, end) -> float:
        if start is None or end is None or end[0] <= start[0]:
            return float("nan")
        others = (end[1] - start[1]) - (end[2] - start[2])
        return max(others, 0.0) / ((end[0] - start[0]) * (os.cpu_count() or 1))

    def wait_idle(self, log=None) -> None:
        deadline = time.perf_counter() + self.idle_wait_s
        while time.perf_counter() < deadline:
            start = self._read()
            time.sleep(2.0)
            busy = self.share(start, self._read())
            if not busy > self.IDLE_SHARE:  # NaN (no /proc) counts as quiet
                return
            self.waited_s += 2.0
            if log:
                log(f"waiting for a quiet machine: other processes use {busy:.0%} of the CPU")


WATCH = CpuWatch()


class watched:
    """Context: note the share of the CPU other processes took during the block in WATCH.rounds[label]."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.start = WATCH._read()

    def __exit__(self, *exc):
        WATCH.rounds.setdefault(self.label, []).append(WATCH.share(self.start, WATCH._read()))


def alternate(sides: dict[str, Callable[[], float]], repeats: int, warmup: bool = True,
              label: str = "") -> dict[str, list[float]]:
    """Call each side once (warm-up, not kept), then A, B, A, B, ... `repeats` times; seconds per call.

    Each side returns the seconds it measured itself (so a side can leave its own set-up out). The share
    of the CPU other processes took during each round (A and B) is kept in WATCH.rounds[label]."""
    if warmup:
        for run in sides.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        if WATCH.idle_wait_s:
            WATCH.wait_idle()
        start = WATCH._read()
        for name, run in sides.items():
            samples[name].append(run())
        WATCH.rounds.setdefault(label or ",".join(sides), []).append(WATCH.share(start, WATCH._read()))
    return samples


def wall(fn: Callable) -> Callable[[], float]:
    """A side that times a whole call of `fn`."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_facts() -> dict:
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_1min_at_start": loadavg(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bare_matmul(n: int, repeats: int, dtype=torch.float32) -> list[float]:
    """FLOP/s of `torch.matmul` of two n x n matrices, one sample per call (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        out.append(2 * n**3 / (time.perf_counter() - t0))
    return out


def bare_copy(nbytes: int, repeats: int) -> list[float]:
    """Bytes/s of `dst.copy_(src)` counting read + written bytes (2 x size, the STREAM 'copy' convention;
    the write-allocate read the CPU may add is not counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        out.append(2 * src.nbytes / (time.perf_counter() - t0))
    return out


# ---------------------------------------------------------------------------------------------------
# Theoretical cost (LLM-Viewer's method: matmul FLOPs of every layer, multiply-add = 2 FLOPs); the counting
# functions are minillava/flops.py's, which `python -m minillava.eval` uses per question

PAPER_7B = {1.0: (41.7, 1536.0), 0.25: (9.6, 377.0), 0.1: (3.8, 151.0)}  # r: (prefill TFLOPs, KV MB), docs/globalcom2.md, "The paper's headline results"
PAPER_TOKENS_100 = 576 + 4 * 576  # thumbnail + 2 x 2 crops, without the 48 newline tokens


def solve_tokens(spec: LlmSpec, flops: float) -> float:
    """The token count whose prefill_flops (full attention) equals `flops`: the inverse, by bisection."""
    lo, hi = 0.0, 1e6
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prefill_flops(spec, mid)["total"] < flops else (lo, mid)
    return (lo + hi) / 2


def image_token_counts(thumb_scores: torch.Tensor, crop_scores: torch.Tensor, grid, size) -> dict[str, int]:
    """Visual tokens of one image after our globalcom2 at each ratio (r = 1: uncompressed, method none).

    Only the scores matter for the counts; the features are 8-wide stand-ins."""
    g = torch.Generator().manual_seed(0)
    p = thumb_scores.shape[0]
    side = math.isqrt(p)
    image = globalcom2.ImageFeatures(
        thumb=torch.randn(p, 8, generator=g), crops=torch.randn(len(crop_scores), p, 8, generator=g),
        thumb_scores=thumb_scores.float(), crop_scores=crop_scores.float(), grid=grid, size=size,
        area=unpad_area(grid, size, side), newline=torch.zeros(8),
    )
    counts = {"none": uncompressed_length(image.area, side)}
    for r in RATIOS:
        counts[f"globalcom2@{r:g}"] = packed(image, globalcom2.compress_image(image, "globalcom2", r)).shape[0]
    return counts


def packed(image: globalcom2.ImageFeatures, kept: globalcom2.Compressed) -> torch.Tensor:
    """The token sequence the model feeds the decoder for what a compressor kept (minillava/layout.py)."""
    return compressed_sequence(kept, image.crops, image.grid, image.area, image.newline)


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
            "scores_note": scores_note, "counts": counts}


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


# ---------------------------------------------------------------------------------------------------
# Test image


def test_image(size=IMAGE_SIZE) -> Image.Image:
    """A deterministic synthetic picture: a gradient with a few shapes (the scores only need some structure)."""
    w, h = size
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    rgb = torch.stack([x, y, (1 - x) * y]) * 255  # (3, h, w)
    image = Image.fromarray(rgb.permute(1, 2, 0).to(torch.uint8).numpy(), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.1, h * 0.1, w * 0.4, h * 0.4), fill=(220, 30, 30))
    draw.rectangle((w * 0.55, h * 0.2, w * 0.9, h * 0.45), fill=(30, 30, 220))
    draw.polygon([(w * 0.2, h * 0.9), (w * 0.45, h * 0.55), (w * 0.7, h * 0.9)], fill=(20, 160, 40))
    draw.text((w * 0.6, h * 0.7), "GlobalCom2", fill=(0, 0, 0))
    return image


# ---------------------------------------------------------------------------------------------------
# Rows 1, 2: the vision tower


def hf_clip(cfg: VisionConfig, attn: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_cfg = CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_channels=cfg.num_channels, layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
    )
    return CLIPVisionModel._from_config(hf_cfg, attn_implementation=attn).eval().requires_grad_(False)


@torch.inference_mode()
def bench_vision(plan: Plan, pixels: torch.Tensor, log) -> dict:
    """Our tower (features of layer -2 + [CLS] scores) against transformers' CLIP, same weights, float32."""
    torch.manual_seed(0)
    hf = hf_clip(plan.vision, "sdpa")
    eager = hf_clip(plan.vision, "eager")
    eager.load_state_dict(hf.state_dict(), strict=True, assign=True)  # share hf's tensors
    with torch.device("meta"):
        ours = ClipTower(plan.vision)
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True, assign=True)
    ours.eval()

    n_layers = len(ours.encoder.layers)

    def run_ours():  # the feature layer and GlobalCom2's [CLS] scores, as generate computes them
        x = ours(pixels, (-2,))[-2]  # the last layer's input
        scores = globalcom2.tower_probes((globalcom2.SCORE_PROBE,), {n_layers - 1: x}, ours.query_key, n_layers)
        return x[:, 1:], scores[globalcom2.SCORE_PROBE][:, 1:]

    def run_hf():  # what transformers' LLaVA-NeXT does: all hidden states, take -2
        return hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]

    def run_eager():  # what the published GlobalCom2 code does: eager attention, every layer's maps
        out = eager(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        return out.hidden_states[-2][:, 1:], out.attentions[-1][:, :, 0, 1:].mean(1)  # [CLS] row, last layer

    warm = {}
    t0 = time.perf_counter()
    features, scores = run_ours()
    warm["ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = run_hf()
    warm["hf_sdpa"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_eager, _ = run_eager()
    warm["hf_eager_attn"] = time.perf_counter() - t0
    log(f"vision warm-up (s): {_fmt_dict(warm)}")
    parity = {"features_vs_hf": (features - ref).abs().max().item(),
              "features_vs_hf_eager": (features - ref_eager).abs().max().item(),
              "feature_scale": ref.abs().max().item()}
    del ref, ref_eager
    samples = alternate({"ours": wall(run_ours), "hf_sdpa": wall(run_hf), "hf_eager_attn": wall(run_eager)},
                        plan.repeats["vision"], warmup=False, label="vision")
    log(f"vision samples (s): {_fmt_dict(samples)}")
    params = sum(p.numel() for p in ours.parameters())
    return {"samples": samples, "warmup_s": warm, "parity": parity, "scores": scores.clone(), "params": params,
            "tiles": pixels.shape[0]}


# ---------------------------------------------------------------------------------------------------
# Rows 3-7: the decoder


STUB_VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14)  # the decoder benchmarks never call the tower


def build_decoders(text: TextConfig):
    """transformers' LlamaForCausalLM with random weights, and our Llava whose decoder and lm_head are
    the very same tensors (so only one copy is in memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = Llava(LlavaConfig(vision=STUB_VISION, text=text))
    for module in (ours.vision, ours.projector):
        module.to_empty(device="cpu")
        for p in module.parameters():
            p.data.zero_()
    ours.image_newline = torch.nn.Parameter(torch.zeros(text.hidden_size), requires_grad=False)
    llm_state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k.startswith("model.")}
    ours.llm.load_state_dict(llm_state, strict=True, assign=True)
    ours.lm_head.weight = hf.lm_head.weight
    ours.eval().requires_grad_(False)
    return ours, hf


def decoder_weight_bytes(model: Llava) -> int:
    """Bytes of weights a decode step reads: every block, the final norm, lm_head and one embedding row."""
    llm = model.llm
    blocks = sum(p.numel() * p.element_size() for p in llm.layers.parameters())
    norm = llm.norm.weight.numel() * llm.norm.weight.element_size()
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    row = llm.embed_tokens.weight.shape[1] * llm.embed_tokens.weight.element_size()
    return blocks + norm + head + row


def decoder_params(model: Llava) -> int:
    return sum(p.numel() for p in model.llm.parameters()) + model.lm_head.weight.numel()


def text_params(t: TextConfig) -> int:
    """Parameters of the decoder `t` describes (embedding, blocks, final norm, untied lm_head)."""
    d, hd = t.hidden_size, t.head_dim
    attn = d * t.num_attention_heads * hd * 2 + d * t.num_key_value_heads * hd * 2
    block = attn + 3 * d * t.intermediate_size + 2 * d
    return 2 * t.vocab_size * d + t.num_hidden_layers * block + d


def random_embeds(hf, length: int, seed: int) -> torch.Tensor:
    """(1, length, D) rows of the embedding table for random ids: the decoder input of a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, hf.config.vocab_size, (1, length), generator=g)
    with torch.inference_mode():
        return hf.model.embed_tokens(ids).clone()


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
    log(f"prefill samples (s): {_fmt_dict(samples)}")
    with watched("matmul"):
        matmul += bare_matmul(plan.matmul_n, plan.repeats["matmul"])
    # Row 7: same function, already warm; compressed and uncompressed alternated.
    row7 = alternate({name: ours_side(t) for name, t in compressed_lengths.items()}, plan.repeats["compressed"],
                     warmup=False, label="compressed")
    log(f"compressed prefill samples (s): {_fmt_dict(row7)}")
    return {"samples": samples, "matmul_flops": matmul, "parity_logits": parity, "row7": row7,
            "row7_lengths": compressed_lengths, "compile_s": compile_s, "compile_error": compile_error}


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
    log(f"decode samples (s for {n - 1} tokens): {_fmt_dict(samples)}")
    return {"samples": samples, "tokens_timed": n - 1, "compile_s": compile_s, "compile_error": compile_error,
            "compiled": steps.compiled, "copy_bytes_per_s": copy, "same_ids": ids.get("ours") == ids.get("hf"),
            "weight_bytes": decoder_weight_bytes(ours), "cache_length": cache}


# ---------------------------------------------------------------------------------------------------
# Rows 10 and 11: batching


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
    log(f"synthetic eval samples (s for {len(questions)} questions): {_fmt_dict(samples)}")
    first = answers[plan.batch_sizes[0]]
    return {"samples": samples, "questions": len(questions), "same_answers": all(a == first for a in answers.values())}


BATCH_DTYPES = ("bfloat16", "float32")  # row 11a, row 11b


def in_dtype(ours: Llava, dtype: torch.dtype) -> Llava:
    """A copy of `ours` with every weight in `dtype` (built on the meta device, so the copy is the only new
    memory)."""
    with torch.device("meta"):
        copy = Llava(ours.cfg)
    copy.load_state_dict({k: v.to(dtype) for k, v in ours.state_dict().items()}, strict=True, assign=True)
    return copy.eval().requires_grad_(False)


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
    models = {name: ours if getattr(torch, name) == ours.dtype else in_dtype(ours, getattr(torch, name)) for name in dtypes}
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
    log(f"batched decode samples (s for {n - 1} steps; kernels: s per step): {_fmt_dict(samples)}")
    same = {name: all(row == ids[f"{name}_batch{sizes[0]}"][0] for b in sizes for row in ids[f"{name}_batch{b}"])
            for name in dtypes}
    return {"samples": samples, "steps_timed": n - 1, "sizes": list(sizes), "dtypes": list(dtypes), "same_ids": same,
            "cache_length": cache}


KERNEL_PASSES = 3  # a step's products per timed call of the kernels' side


# ---------------------------------------------------------------------------------------------------
# Rows 12 and 13: weight-only int8 / int4 (minillava/quant.py)

QUANT_SIDES = ("float32", "bfloat16", "int8", "int4")


def quant_specs(text: TextConfig) -> dict[str, Spec]:
    """int8, and int4 in groups of 128 (the default), or of the largest size the widths allow (test shapes)."""
    group = max(g for g in (32, 64, DEFAULT_GROUP_SIZE) if text.hidden_size % g == 0 and text.intermediate_size % g == 0)
    return {"int8": Spec(8), "int4": Spec(4, group)}


def clone_as(model: Llava, dtype: torch.dtype) -> Llava:
    """A second model of `model`'s config with its tensors in `dtype` (shared where already so)."""
    with torch.device("meta"):
        out = Llava(model.cfg)
    out.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, strict=True, assign=True)
    return out.eval().requires_grad_(False)


def step_bytes(model: Llava) -> int:
    """Bytes of weights a decode step reads, quantized or not: every block's weights (and scales), the
    final norm, lm_head and one embedding row (the KV cache is not in a state_dict)."""
    llm = model.llm
    tensors = [*llm.layers.state_dict().values(), *llm.norm.state_dict().values(), *model.lm_head.state_dict().values()]
    row = llm.embed_tokens.weight.shape[1] * llm.embed_tokens.weight.element_size()
    return sum(t.numel() * t.element_size() for t in tensors) + row


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
            bytes_ = sum(t.numel() * t.element_size() for t in fns[0].state_dict().values())
        else:
            ws = [w.to(dtype) for w in weights]
            fns = [lambda x, w=w: torch.nn.functional.linear(x, w) for w in ws]
            bytes_ = ws[0].numel() * ws[0].element_size()
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
    log(f"quantized decode samples (s for {n - 1} tokens): {_fmt_dict(samples)}")
    kernels = quant_kernels(plan.text, plan.repeats["matmul"])
    log(f"kernels alone (s per matrix): {_fmt_dict({k: v['s'] for k, v in kernels.items()})}")
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
    log(f"int4 loading: {_fmt_dict(result)}")
    result["group_size"] = spec.group_size
    return result


# ---------------------------------------------------------------------------------------------------
# Row 8: the compressor


def bench_compressor(scores: torch.Tensor, grid, size, repeats: int) -> list[float]:
    """Seconds of globalcom2 at r = 0.25 on one image: real shapes (P = 576 per tile), D = 4096 features."""
    g = torch.Generator().manual_seed(0)
    p = scores.shape[1]
    image = globalcom2.ImageFeatures(
        thumb=torch.randn(p, COMPRESS_DIM, generator=g), crops=torch.randn(len(scores) - 1, p, COMPRESS_DIM, generator=g),
        thumb_scores=scores[0], crop_scores=scores[1:], grid=grid, size=size, area=unpad_area(grid, size, math.isqrt(p)),
        newline=torch.randn(COMPRESS_DIM, generator=g),
    )
    run = wall(lambda: packed(image, globalcom2.compress([image], "globalcom2", 0.25)[0]))  # keep, then lay out
    return alternate({"compress": run}, repeats, label="compress")["compress"]


# ---------------------------------------------------------------------------------------------------
# Row 9: loading


CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from minillava.quant import Spec
from minillava.weights import load_model

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

torch.set_num_threads(int(sys.argv[4]))
dtype = getattr(torch, sys.argv[3])
before = status()["VmRSS"]
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
bits, _, group = (sys.argv[5] if len(sys.argv) > 5 else "").partition(":")  # "4:128", "8", or nothing
model = load_model(sys.argv[2], "cpu", dtype, Spec(int(bits), int(group) if group else None) if bits else None)
load_s = time.perf_counter() - t0
after_load = status()
step = 4096
touched = 0.0
with torch.inference_mode():
    for p in [*model.parameters(), *model.buffers()]:  # one value per page of every weight (quantized ones are buffers)
        if p.is_meta:  # the RoPE table, made by setup_cache
            continue
        flat = p.detach().reshape(-1)
        touched += float(flat[:: max(step // p.element_size(), 1)].float().sum())
after_touch = status()
print(json.dumps({
    "rss_before": before, "hwm_reset": reset, "load_s": load_s,
    "hwm_load": after_load["VmHWM"], "rss_after_load": after_load["VmRSS"],
    "hwm_touch": after_touch["VmHWM"], "rss_after_touch": after_touch["VmRSS"],
    "model_bytes": sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()] if not p.is_meta),
    "dtype": str(model.dtype),
}))
"""


def write_checkpoint(plan: Plan, out: Path) -> Path:
    """A random LLaVA-NeXT checkpoint in transformers' hub layout, sharded safetensors in plan.ckpt_dtype."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from tests import tiny

    v, t = plan.ckpt_vision, plan.ckpt_text
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                       image_size=v.image_size, patch_size=v.patch_size),
        text_config=LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                                rms_norm_eps=t.rms_norm_eps),
        image_grid_pinpoints=[[h, w] for w, h in PINPOINTS],
    )
    dtype = getattr(torch, plan.ckpt_dtype)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(cfg)
    model = model.to(dtype).to_empty(device="cpu")  # allocated once, in the checkpoint's dtype
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    tokenizer = tiny.train_tokenizer(out.parent / "tokenizer.model")
    tiny.save_checkpoint(model, out, "hub", tokenizer, shards=plan.ckpt_shards)
    del model
    gc.collect()
    return out


def run_loader(ckpt: Path, dtype: str, threads: int, quantize: str = "") -> dict:
    """Load `ckpt` with minillava.weights.load_model in a fresh interpreter (`quantize`: "4:128", "8" or
    "" for none); its RSS figures (bytes)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ckpt), dtype, str(threads), quantize],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_loading(plan: Plan, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        t0 = time.perf_counter()
        ckpt = write_checkpoint(plan, Path(tmp) / "ckpt")
        files = sorted(ckpt.glob("*.safetensors"))
        ckpt_bytes = sum(f.stat().st_size for f in files)
        log(f"wrote a {ckpt_bytes / GB:.2f} GB {plan.ckpt_dtype} checkpoint ({len(files)} shards) in "
            f"{time.perf_counter() - t0:.1f} s")
        result = {"ckpt_bytes": ckpt_bytes, "shards": len(files), "dtype": plan.ckpt_dtype,
                  "own_dtype": run_loader(ckpt, plan.ckpt_dtype, plan.threads)}
        log(f"load in {plan.ckpt_dtype}: {_fmt_dict(result['own_dtype'])}")
        if plan.load_float32 and plan.ckpt_dtype != "float32":
            result["float32"] = run_loader(ckpt, "float32", plan.threads)
            log(f"load in float32: {_fmt_dict(result['float32'])}")
    return result


# ---------------------------------------------------------------------------------------------------
# Rows, tables, files


@dataclass
class Row:
    key: str
    what: str
    against: str
    ours: str  # formatted value of our side
    theirs: str  # formatted value of the other side
    ratio: float | None
    target: str  # e.g. "<= 1.0"
    passed: bool | None
    note: str = ""


def check(ratio: float | None, target: str) -> bool | None:
    if ratio is None or not math.isfinite(ratio):
        return None
    op, bound = target.split()
    return ratio <= float(bound) if op == "<=" else ratio >= float(bound)


def make_row(key, what, against, ours, theirs, ratio, target, note="") -> Row:
    return Row(key, what, against, ours, theirs, ratio, target, check(ratio, target), note)


def paired(a: list[float], b: list[float]) -> str:
    """The ratio within each alternation round (A and B measured back to back): robust to slow drifts."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    if len(ratios) < 2:
        return ""
    return f"per-round ratios {', '.join(f'{x:.3g}' for x in ratios)} (median {median(ratios):.3g})"


def noise(r: dict, *labels: str) -> str:
    """What other processes took of the CPU while these numbers were measured."""
    shares = [x for label in labels for x in r.get("contention", {}).get(label, []) if math.isfinite(x)]
    if not shares:
        return ""
    mean = sum(shares) / len(shares)
    flag = "NOISY: " if mean > CpuWatch.IDLE_SHARE else ""
    return f"{flag}other processes took {mean:.0%} of the CPU on average (max {max(shares):.0%}) meanwhile"


def _s(seconds: float) -> str:
    return f"{seconds:.3g} s"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def build_rows(r: dict) -> list[Row]:
    rows = []
    v = r.get("vision")
    if v:
        ours, hf, eager = (median(v["samples"][k]) for k in ("ours", "hf_sdpa", "hf_eager_attn"))
        tiles = v["tiles"]
        vcfg = VisionConfig(**r["plan"]["vision"])
        ours_flops = tower_flops(vcfg, tiles, 1, features_only=True)["tower"]
        hf_flops = tower_flops(vcfg, tiles, 1)["tower"]
        rate = f"ours {ours_flops / 1e12:.2f} TFLOP at {ours_flops / ours / 1e9:.0f} GFLOP/s, transformers {hf_flops / 1e12:.2f} TFLOP at {hf_flops / hf / 1e9:.0f} GFLOP/s"
        best = ""
        if r.get("prefill"):
            mm = median(r["prefill"]["matmul_flops"])
            rate += f" (bare matmul {mm / 1e9:.0f} GFLOP/s)"
            best = (f"floor at the bare matmul's rate: {ours_flops / mm:.2f} s = {ours_flops / mm / eager:.2f} x the eager "
                    "side")
        rows.append(make_row("1", f"vision tower, {tiles} tiles, float32 (features of layer -2)",
                             "transformers CLIPVisionModel (sdpa), hidden_states[-2]", f"{_s(ours)}", f"{_s(hf)}",
                             ours / hf, "<= 1.0",
                             _join(f"same weights; max abs diff of the features {v['parity']['features_vs_hf']:.1e}", rate,
                                   paired(v["samples"]["ours"], v["samples"]["hf_sdpa"]), noise(r, "vision"))))
        rows.append(make_row("2", "vision tower + [CLS] scores (one call of ours)",
                             "transformers CLIP, eager attention, output_attentions, [CLS] row of the last layer",
                             f"{_s(ours)}", f"{_s(eager)}", ours / eager, "<= 0.6",
                             _join(best, paired(v["samples"]["ours"], v["samples"]["hf_eager_attn"]), noise(r, "vision"))))
    p = r.get("prefill")
    if p:
        for i, t in enumerate(r["plan"]["prefill_lengths"]):
            o, h = median(p["samples"][f"ours_{t}"]), median(p["samples"][f"hf_{t}"])
            comp = ""
            if f"ours_compiled_{t}" in p["samples"]:
                c = median(p["samples"][f"ours_compiled_{t}"])
                comp = (f"ours with --compile (compile_steps' prefill, dynamic=True): {_s(c)} = {c / h:.3g} x transformers"
                        + (f", compiled in {p['compile_s']:.0f} s (apart)" if i == 0 else ""))
            elif p.get("compile_error"):
                comp = f"--compile prefill failed: {p['compile_error']}"
            rows.append(make_row(f"3{'ab'[i] if i < 2 else i}", f"decoder prefill, {t} tokens",
                                 "transformers LlamaForCausalLM, inputs_embeds, logits_to_keep=1", f"{_s(o)}",
                                 f"{_s(h)}", o / h, "<= 1.0",
                                 _join("both fill a KV cache and compute the logits of the last position only",
                                       f"max abs diff of the logits {p['parity_logits']:.1e}" if i == 0 else "", comp,
                                       paired(p["samples"][f"ours_{t}"], p["samples"][f"hf_{t}"]), noise(r, "prefill"))))
    d = r.get("decode")
    if d:
        o = d["tokens_timed"] / median(d["samples"]["ours"])
        h = d["tokens_timed"] / median(d["samples"]["hf"])
        comp = (f"compile_steps, compile {d['compile_s']:.1f} s (apart)" if d["compiled"]
                else "EAGER (" + (d["compile_error"] or "compile off") + ")")
        ceiling = median(d["copy_bytes_per_s"]) / d["weight_bytes"]
        extra = f"bandwidth ceiling (weights read at the bare copy's rate): {ceiling:.2f} tok/s = {ceiling / h:.2f} x transformers"
        if "ours_eager" in d["samples"]:
            extra = f"ours eager: {d['tokens_timed'] / median(d['samples']['ours_eager']):.2f} tok/s; " + extra
        rows.append(make_row("4", f"decode tokens/s, batch 1, {comp}",
                             "transformers generate (greedy, DynamicCache)", f"{o:.2f} tok/s", f"{h:.2f} tok/s", o / h,
                             ">= 1.5", f"prompt {r['plan']['decode_prompt']}, {r['plan']['new_tokens']} new tokens "
                             f"(min_new_tokens = max_new_tokens), {d['tokens_timed']} decode steps timed; "
                             f"same greedy ids: {'yes' if d['same_ids'] else 'no'}; "
                             + _join(extra, paired(d["samples"]["hf"], d["samples"]["ours"]), noise(r, "decode"))))
    if p:
        t = max(r["plan"]["prefill_lengths"])
        spec = LlmSpec.from_text("bench", TextConfig(**r["plan"]["text"]))
        flops = prefill_flops(spec, t, causal=True)["total"]
        o = flops / median(p["samples"][f"ours_{t}"])
        h = flops / median(p["samples"][f"hf_{t}"])
        mm = median(p["matmul_flops"])
        n = r["plan"]["matmul_n"]
        rows.append(make_row("5", f"prefill FLOP/s, {t} tokens (matmul FLOPs, causal attention)",
                             f"bare torch.matmul {n} x {n} float32, same run", f"{o / 1e9:.0f} GFLOP/s",
                             f"{mm / 1e9:.0f} GFLOP/s", o / mm, ">= 0.6",
                             _join(f"{flops / 1e12:.3g} TFLOP per prefill; transformers reaches {h / 1e9:.0f} GFLOP/s"
                                   + (f", ours with --compile {flops / median(p['samples'][f'ours_compiled_{t}']) / 1e9:.0f} GFLOP/s"
                                      if f"ours_compiled_{t}" in p["samples"] else ""),
                                   noise(r, "prefill", "matmul"))))
    if d:
        per_token = median(d["samples"]["ours"]) / d["tokens_timed"]
        o = d["weight_bytes"] / per_token
        c = median(d["copy_bytes_per_s"])
        rows.append(make_row("6", "decode bytes/s (weight bytes read per token / time per token)",
                             f"bare dst.copy_(src) of {r['plan']['copy_bytes'] / 2**30:g} GiB, read + written bytes",
                             f"{o / GB:.1f} GB/s", f"{c / GB:.1f} GB/s", o / c, ">= 0.5",
                             f"{d['weight_bytes'] / GB:.2f} GB of weights per token (blocks, norm, lm_head, one "
                             f"embedding row; the KV cache of {d['cache_length']} positions not counted); copy counts "
                             "2 x size per copy; " + noise(r, "decode", "copy")))
    if p:
        lengths = p["row7_lengths"]
        c, u = median(p["row7"]["r0.25"]), median(p["row7"]["uncompressed"])
        rows.append(make_row("7", "LLM prefill at r = 0.25 / uncompressed, same 672 x 672 image",
                             "itself", f"{_s(c)} ({lengths['r0.25']} tok)", f"{_s(u)} ({lengths['uncompressed']} tok)",
                             c / u, "<= 0.35",
                             _join(f"{PROMPT_TOKENS} text tokens + the image's tokens from our AnyRes + globalcom2",
                                   paired(p["row7"]["r0.25"], p["row7"]["uncompressed"]), noise(r, "compressed"))))
    comp = r.get("compressor")
    if comp and v:
        c, t = median(comp["samples"]), median(v["samples"]["ours"])
        rows.append(make_row("8", "compressor time / vision tower time (globalcom2 r = 0.25, grid 2 x 2, D = 4096)",
                             "itself", f"{c * 1e3:.1f} ms", f"{_s(t)}", c / t, "<= 0.02",
                             _join(f"scores: {comp['scores_note']}", noise(r, "compress", "vision"))))
    ld = r.get("loading")
    if ld:
        own = ld["own_dtype"]
        if "error" in own:
            rows.append(make_row("9", "peak RSS while loading / checkpoint bytes", "itself", "error", "", None, "<= 1.25",
                                 own["error"]))
        else:
            peak = own["hwm_touch"] - own["rss_before"]
            load_only = own["hwm_load"] - own["rss_before"]
            note = (f"{ld['dtype']} checkpoint, {ld['shards']} shards, transformers layout, loaded in its own dtype in a "
                    f"fresh process in {own['load_s']:.1f} s; peak = VmHWM - RSS before loading, after reading every "
                    f"weight once (mapped file pages count); during load_model alone: {load_only / GB:.2f} GB")
            f32 = ld.get("float32")
            if f32 and "error" not in f32:
                p32 = f32["hwm_touch"] - f32["rss_before"]
                note += (f". Into float32 (no target): peak {p32 / GB:.2f} GB = {p32 / ld['ckpt_bytes']:.2f} x the "
                         f"checkpoint, {p32 / f32['model_bytes']:.2f} x the float32 model, load {f32['load_s']:.1f} s")
            rows.append(make_row("9", "peak RSS while loading / checkpoint bytes", "itself", f"{peak / GB:.2f} GB",
                                 f"{ld['ckpt_bytes'] / GB:.2f} GB", peak / ld["ckpt_bytes"], "<= 1.25", note))
    be = r.get("batch_eval")
    if be:
        sizes = r["plan"]["batch_sizes"]
        qps = {b: be["questions"] / median(be["samples"][f"batch{b}"]) for b in sizes}
        rows.append(make_row("10", f"questions/s, minillava.eval synthetic, --batch-size {sizes[1]} / 1",
                             "itself at --batch-size 1", f"{qps[sizes[1]]:.1f} q/s", f"{qps[sizes[0]]:.1f} q/s",
                             qps[sizes[1]] / qps[sizes[0]], ">= 4",
                             _join(f"shipped tiny model, globalcom2 r = 0.25, {be['questions']} questions per side; "
                                   + ", ".join(f"batch {b}: {q:.1f} q/s" for b, q in qps.items())
                                   + f"; same answers at every batch size: {'yes' if be['same_answers'] else 'NO'}",
                                   paired(be["samples"][f"batch{sizes[0]}"], be["samples"][f"batch{sizes[1]}"]),
                                   noise(r, "batch_eval"))))
    bd = r.get("batch_decode")
    if bd:
        one, many = bd["sizes"]
        for key, name in zip(("11a", "11b"), bd["dtypes"]):
            sm = bd["samples"]
            tps = {b: b * bd["steps_timed"] / median(sm[f"{name}_batch{b}"]) for b in bd["sizes"]}
            kernel = many * median(sm[f"{name}_kernels{one}"]) / median(sm[f"{name}_kernels{many}"])
            rows.append(make_row(key, f"decode tokens/s, batch {many} / batch 1 (all rows' tokens), {name}, eager",
                                 "itself at batch 1", f"{tps[many]:.2f} tok/s", f"{tps[one]:.2f} tok/s",
                                 tps[many] / tps[one], ">= 5",
                                 _join(f"prompt {r['plan']['decode_prompt']}, {bd['steps_timed']} decode steps timed, "
                                       f"the same prompt in every row; every row's ids equal batch 1's: "
                                       f"{'yes' if bd['same_ids'][name] else 'NO'}",
                                       f"the kernels alone (every linear of a step on {many} rows vs on 1, {name}): "
                                       f"{kernel:.2f}x, the ceiling of this ratio on this CPU",
                                       paired([many * t for t in sm[f"{name}_batch{one}"]], sm[f"{name}_batch{many}"]),
                                       noise(r, "batch_decode"))))
    return rows + quant_rows(r)


def quant_rows(r: dict) -> list[Row]:
    """Rows 12a-d (int8 / int4 decode against our bfloat16 and against their bytes-read ceilings) and 13."""
    rows, q = [], r.get("quant")
    if q:
        tps = {name: q["tokens_timed"] / median(q["samples"][name]) for name in QUANT_SIDES}
        bw = median(q["copy_bytes_per_s"])
        ceiling = {name: bw / q["bytes"][name] for name in QUANT_SIDES}
        kern = {name: median(k["s"]) for name, k in q["kernels"].items()}
        # tok/s if a step cost only its weights' reading at the kernel's own rate (bytes / s of one matrix)
        kernel_bound = {name: q["kernels"][name]["bytes"] / kern[name] / q["bytes"][name] for name in QUANT_SIDES}
        common = _join(
            "eager steps, batch 1, prompt " + str(r["plan"]["decode_prompt"]) + f", {q['tokens_timed']} steps timed",
            ", ".join(f"{name} {tps[name]:.2f} tok/s ({q['bytes'][name] / GB:.2f} GB per step, ceiling "
                      f"{ceiling[name]:.2f}, kernel-bound {kernel_bound[name]:.2f})" for name in QUANT_SIDES),
            "kernel alone, one " + f"{r['plan']['text']['intermediate_size']} x {r['plan']['text']['hidden_size']} "
            "matrix, one row: " + ", ".join(f"{name} {kern[name] * 1e3:.3f} ms" for name in QUANT_SIDES),
            "greedy ids equal to float32's: " + ", ".join(f"{name} {q['ids_equal_float32'][name]}/{q['ids_total']}"
                                                         for name in QUANT_SIDES[1:]),
            noise(r, "quant", "copy"))
        for key, name, target in (("12a", "int8", ">= 1.8"), ("12b", "int4", ">= 3")):
            rows.append(make_row(key, f"decode tokens/s, batch 1, {name} / our bfloat16", "our bfloat16, same run",
                                 f"{tps[name]:.2f} tok/s", f"{tps['bfloat16']:.2f} tok/s", tps[name] / tps["bfloat16"],
                                 target, _join(f"kernels alone allow {kern['bfloat16'] / kern[name]:.2f}x; float32 "
                                               f"{tps['float32']:.2f} tok/s",
                                               paired(q["samples"]["bfloat16"], q["samples"][name]), common)))
        for key, name in (("12c", "int8"), ("12d", "int4")):
            rows.append(make_row(key, f"decode tokens/s, {name} / its bytes-read ceiling",
                                 "copy bandwidth / weight bytes per step", f"{tps[name]:.2f} tok/s",
                                 f"{ceiling[name]:.2f} tok/s", tps[name] / ceiling[name], ">= 0.8",
                                 _join(f"the kernel alone reaches {kernel_bound[name] / ceiling[name]:.2f} of the ceiling "
                                       f"(bfloat16 {tps['bfloat16'] / ceiling['bfloat16']:.2f}, its kernel "
                                       f"{kernel_bound['bfloat16'] / ceiling['bfloat16']:.2f})",
                                       f"copy {bw / GB:.1f} GB/s (read + written)", noise(r, "quant", "copy"))))
    ql = r.get("quant_loading")
    if ql:
        w = ql["while_loading"]
        if "error" in w:
            rows.append(make_row("13", "peak RSS while loading with --quantize int4 / int4 checkpoint bytes", "itself",
                                 "error", "", None, "<= 1.3", w["error"]))
        else:
            peak = w["hwm_touch"] - w["rss_before"]
            d = ql["quantized_ckpt"]
            direct = (f"loading the int4 checkpoint itself: peak {(d['hwm_touch'] - d['rss_before']) / GB:.2f} GB in "
                      f"{d['load_s']:.1f} s" if "error" not in d else f"loading the int4 checkpoint: {d['error']}")
            rows.append(make_row("13", "peak RSS while loading with --quantize int4 / int4 checkpoint bytes", "itself",
                                 f"{peak / GB:.2f} GB", f"{ql['int4_bytes'] / GB:.2f} GB", peak / ql["int4_bytes"],
                                 "<= 1.3",
                                 _join(f"the float16 checkpoint of row 9 ({ql['ckpt_bytes'] / GB:.2f} GB) loaded into "
                                       f"bfloat16 with int4 linears (group {ql['group_size']}) in a fresh process in "
                                       f"{w['load_s']:.1f} s; peak = VmHWM - RSS before, after reading every weight once",
                                       f"python -m minillava.apps.quantize wrote the int4 checkpoint in {ql['quantize_s']:.1f} s",
                                       direct)))
    return rows


def markdown(r: dict, rows: list[Row]) -> str:
    plan = r["plan"]
    m = r["machine"]
    head = "# minillava benchmark" + ("" if plan["representative"] else " (QUICK: small shapes, NOT representative)")
    lines = [head, ""]
    if r.get("interrupted"):
        lines += ["**Interrupted** (Ctrl-C or SIGTERM): only the sections that finished are in the table.", ""]
    lines.append(f"Machine: {m['cpu_model']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} threads, "
                 f"{m['torch_interop_threads']} interop), transformers {m['transformers']}, Python {m['python']}; "
                 f"load average {m['loadavg_1min_at_start']:.2f} at start, {r.get('loadavg_end', float('nan')):.2f} at end. "
                 + _capital(noise(r, *r.get("contention", {})).replace("meanwhile", "during the timed rounds"))
                 + (f" (waited {r['idle_waited_s']:.0f} s for a quiet machine)" if r.get("idle_waited_s") else "")
                 + ".")
    lines.append(f"Models (random weights, float32): {r.get('models', '')}")
    lines.append(f"Method: one warm-up call per side, then sides alternated; medians of {_fmt_dict(plan['repeats'])} "
                 "timed calls per side (prefill: that many at the longest prompt, up to 2x more at shorter ones); "
                 "ratios are ratios of medians, the notes give the ratio within each round too.")
    lines.append("")
    lines.append("| # | what | against | ours | theirs | ours / theirs | target | |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        mark = {True: "pass", False: "**FAIL**", None: "n/a"}[row.passed]
        ratio = "-" if row.ratio is None else f"{row.ratio:.3g}"
        lines.append(f"| {row.key} | {row.what} | {row.against} | {row.ours} | {row.theirs} | {ratio} | {row.target} | {mark} |")
    lines.append("")
    for row in rows:
        if row.note:
            lines.append(f"- {row.key}: {row.note}")
    th = r.get("theory")
    if th:
        lines += ["", "## Theoretical prefill cost, 672 x 672 image (LLM-Viewer's count)", ""]
        lines.append(f"Token counts from our AnyRes + globalcom2 (P = 576, grid 2 x 2); scores: {th['scores_note']}; "
                     f"{th['prompt_note']}.")
        lines.append("")
        lines.append("| model | r | tokens (text + image) | TFLOPs | causal | KV MB (fp16) | paper TFLOPs | paper MB | "
                     "diff TFLOPs | diff KV | T = r x 2880: TFLOPs / MB | tower + projector TFLOPs |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in th["rows"]:
            if "paper_tflops" in t:
                paper = [f"{t['paper_tflops']:g}", f"{t['paper_kv_mb']:g}", f"{t['rel_tflops']:+.1%}", f"{t['rel_kv']:+.1%}"]
            else:
                paper = ["-"] * 4
            lines.append(
                f"| {t['model']} | {t['r']:g} | {t['tokens']} ({PROMPT_TOKENS} + {t['image_tokens']}) | {t['tflops']:.1f} | "
                f"{t['tflops_causal']:.1f} | {t['kv_mb']:.0f} | " + " | ".join(paper) + " | "
                f"{t['tflops_at_paper_tokens']:.1f} / {t['kv_mb_at_paper_tokens']:.0f} | {t['tower_projector_tflops']:.2f} |"
            )
        lines.append("")
        lines += [f"- {line}" for line in th["explanation"]]
    if "run_s" in r:
        lines += ["", f"Run time: {r['run_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(r: dict, rows: list[Row], path: Path) -> None:
    """A PNG: each row's ratio on a log axis with its target, then the theoretical TFLOPs per ratio."""
    width, left, right = 1200, 430, 60
    bar_h, top = 30, 70
    theory_rows = r.get("theory", {}).get("rows", [])
    height = top + bar_h * len(rows) + 60 + (330 if theory_rows else 0)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small = _font(12)
    title = "minillava vs transformers: ours / theirs (log scale)"
    if not r["plan"]["representative"]:
        title += "  -- QUICK MODE, NOT REPRESENTATIVE"
    draw.text((20, 20), title, fill="black", font=_font(18))
    lo, hi = -3.0, 1.0  # log10 range of the axis

    def x_of(value: float) -> float:
        v = min(max(math.log10(max(value, 1e-9)), lo), hi)
        return left + (v - lo) / (hi - lo) * (width - left - right)

    axis_y = top + bar_h * len(rows) + 5
    for e in range(int(lo), int(hi) + 1):
        x = x_of(10.0**e)
        draw.line((x, top - 5, x, axis_y), fill=(225, 225, 225))
        draw.text((x - 12, axis_y + 4), f"{10.0**e:g}", fill="black", font=small)
    for i, row in enumerate(rows):
        y = top + i * bar_h
        label = f"{row.key}  {row.what.split(' (')[0]}"
        draw.text((10, y + 8), label if len(label) <= 60 else label[:57] + "...", fill="black", font=small)
        if row.ratio is not None and math.isfinite(row.ratio):
            colour = {True: (60, 170, 90), False: (210, 60, 60), None: (150, 150, 150)}[row.passed]
            draw.rectangle((left, y + 6, x_of(row.ratio), y + bar_h - 6), fill=colour)
        op, bound = row.target.split()
        tx = x_of(float(bound))
        if row.ratio is not None and math.isfinite(row.ratio):
            draw.text((max(x_of(row.ratio), tx) + 8, y + 8), f"{row.ratio:.3g}", fill="black", font=small)
        draw.line((tx, y + 2, tx, y + bar_h - 2), fill="black", width=3)
        draw.text((tx - 18, y - 2), op, fill="black", font=small)
    if theory_rows:
        y0 = axis_y + 40
        draw.text((20, y0), "Theoretical prefill TFLOPs, 672 x 672 image (LLM only; paper's 7B figures in black)",
                  fill="black", font=_font(16))
        base, plot_h = y0 + 280, 230
        peak = max(t["tflops"] for t in theory_rows) * 1.1
        group_w = (width - 160) / len(RATIOS)
        for j, ratio in enumerate(RATIOS):
            gx = 100 + j * group_w
            for k, (name, colour) in enumerate([("LLaVA-NeXT-7B", (70, 110, 200)), ("LLaVA-NeXT-13B", (230, 150, 50))]):
                t = next(t for t in theory_rows if t["model"] == name and t["r"] == ratio)
                x = gx + k * 55
                h = t["tflops"] / peak * plot_h
                draw.rectangle((x, base - h, x + 45, base), fill=colour)
                draw.text((x, base - h - 15), f"{t['tflops']:.1f}", fill="black", font=small)
                if "paper_tflops" in t:
                    py = base - t["paper_tflops"] / peak * plot_h
                    draw.line((x - 4, py, x + 49, py), fill="black", width=3)
            draw.text((gx + 30, base + 6), f"r = {ratio:g}", fill="black", font=small)
        draw.line((90, base, width - 40, base), fill="black")
        draw.rectangle((width - 260, y0 + 30, width - 245, y0 + 45), fill=(70, 110, 200))
        draw.text((width - 238, y0 + 30), "7B (ours)", fill="black", font=small)
        draw.rectangle((width - 260, y0 + 52, width - 245, y0 + 67), fill=(230, 150, 50))
        draw.text((width - 238, y0 + 52), "13B (ours)", fill="black", font=small)
        draw.line((width - 262, y0 + 82, width - 243, y0 + 82), fill="black", width=3)
        draw.text((width - 238, y0 + 74), "paper, 7B", fill="black", font=small)
    img.save(path)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _fmt_dict(d: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    return ", ".join(f"{k}: {fmt(v)}" for k, v in d.items())


def to_json(obj):
    """Plain JSON: tensors dropped (the raw scores are not worth the bytes), dataclasses as dicts."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if dataclasses.is_dataclass(obj):
        return to_json(dataclasses.asdict(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------------
# The run


SECTIONS = ("loading", "vision", "compression", "prefill", "decode", "batch", "batchdecode", "quant")  # batch: rows 10-11b; batchdecode: 11a, 11b only


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
        n_params = decoder_params(ours)
        r["models_decoder_params"] = n_params
        log(f"built the decoders ({n_params:,} parameters, shared) in {time.perf_counter() - t0:.1f} s")
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


def run(plan: Plan, out: Path, sections=SECTIONS, log=None) -> dict:
    """Run the plan's sections in order, write bench.md, bench.json and bench.png into `out`; the results."""
    log = log or (lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    torch.set_num_threads(plan.threads)
    out.mkdir(parents=True, exist_ok=True)
    WATCH.rounds = {}
    r: dict = {"plan": dataclasses.asdict(plan), "machine": machine_facts(), "contention": WATCH.rounds}
    log(f"{plan.name} run, {plan.threads} threads; machine: {_fmt_dict(r['machine'])}")

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
    rows = build_rows(r)
    r["rows"] = [dataclasses.asdict(row) for row in rows]
    text = markdown(r, rows)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(to_json(r), indent=1))
    plot(r, rows, out / "bench.png")
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
