"""What a run cost, from the run that scored it: per-question measurements in, one summary out.

    meter = Meter(device)                    # after loading and warm-up: peaks reset, clock started
    tile = tile_flops(model, method, ratio)  # once per run
    costs = [question_cost(result, text, spec, method, ratio, tile) for each answered question]
    summary(costs, meter.stop())             # the `efficiency` object of the summary line

The fields of `summary` (means over the questions this run answered; FIELDS says the same for --help):
- visual_tokens_before / _after: visual tokens per question before and after compression (a
  decoder-side method, FastV: what its last pruned layers see).
- visual_tokens_layer_mean (a decoder-side method only: fastv, pdrop, sparsevlm, ficoco-l): the image
  tokens the decoder's layers see, averaged over the layers (minillava/schedule.py `layer_lengths`), so the
  layer-averaged share is this over _before, and the share the last layers see _after over _before.
- prefill_tflops: the theoretical TFLOPs of the question's real prefill, LLM-Viewer's count
  (minillava/flops.py `prefill_flops`, the docs/speed.md table's function) for its own token count:
  template text, question and image tokens after compression, newlines included; a decoder-side
  method's layers at the counts its schedule leaves them (FastV: from layer K on). Batch padding is not counted (it is the question's own cost).
  The LLM only, as the paper's figures.
- tower_tflops: the same count for the vision tower: every tile of the question's image through the patch
  embedding and the layers up to the feature layer, each layer at the tokens a tower method's schedule
  leaves it (FiCoCo-V: attention before, MLP after its merge; `tile_flops`). Not counted: the projector,
  and the probes a stage method reads (GlobalCom2's last-layer [CLS] row), as a decoder stage's reading.
- prefill_ms: wall time of the prefill that computed the question's first answer token (its batch's:
  shared by the rows of a --batch-size batch, which are prefilled together), device synchronised.
- ttft_ms: time to first token: from the start of the question's batch (tiling its images) through
  the tower, compression, prompt building and prefill to its first answer token. >= prefill_ms.
- decode_tokens_per_s: answer tokens after the first, summed, over the decode wall time, summed over
  decoder batches (rows decoded together count their batch's time once).
- samples_per_s: answered questions over the wall time of answering them, end to end (image reading,
  every model step, writing the answers), without loading the model and the --compile warm-up.
- peak memory: on CUDA `peak_allocated_mib` / `peak_reserved_mib`, torch's max_memory_allocated /
  max_memory_reserved while answering (weights included, compilation excluded); on CPU `peak_rss_mib`,
  the process's peak resident set size while answering (Linux; elsewhere since the process started).
Every timed step synchronises the device before reading the clock (generate.py / batch.py).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compression import place, tower_schedule
from ..flops import LlmSpec, layered_prefill_flops, tile_flops as tower_tile_flops
from ..generate import Result
from ..schedule import build as build_schedule, token_counts

MIB = 1 << 20

FIELDS = {  # name: what it measures, for --help
    "visual_tokens_before/after": "visual tokens per question before / after compression",
    "visual_tokens_layer_mean": "a decoder-side method: visual tokens per question averaged over the decoder's layers",
    "prefill_tflops": "theoretical TFLOPs of the question's own prefill (LLM-Viewer's count, text and newlines "
                      "included, as the docs/speed.md table; the LLM only)",
    "tower_tflops": "the same count for the vision tower: the question's tiles through the layers up to the feature "
                    "layer, at what a tower method leaves each",
    "prefill_ms": "wall time of the prefill that gave the question's first token (its batch's)",
    "ttft_ms": "time to first token: batch start (image tiling) to the first answer token",
    "decode_tokens_per_s": "answer tokens after the first over decode wall time (a batch's time counted once)",
    "samples_per_s": "answered questions per second of answering, end to end (not loading or warm-up)",
    "peak_*_mib": "peak memory while answering: CUDA max allocated and reserved; CPU peak RSS",
}


@dataclass
class QuestionCost:
    """One answered question's measurements."""

    visual_before: int
    visual_after: int
    visual_layer_mean: float | None  # a decoder-side method: averaged over the decoder's layers; else None
    prefill_flops: int  # theoretical, its own prompt
    tower_flops: int  # theoretical, its image's tiles
    prefill_s: float  # the prefill that computed its first token
    ttft_s: float  # its batch's start to its first answer token
    decode_tokens: int  # answer tokens after the first (the first comes out of the prefill)
    decode_s: float  # its share of its decoder batch's decode time


def text_tokens(tokenizer, prompt: str) -> int:
    """Token count of the template's text around the image for `prompt` (BOS included)."""
    return sum(len(chunk) for chunk in tokenizer.encode_question(prompt))


def question_cost(result: Result, text: int, spec: LlmSpec, method: str = "none", ratio: float = 1.0,
                  tile: int = 0) -> QuestionCost:
    """The cost of one answered question from its Result (generate_batch's) and its `text` token count.
    `method` at `ratio`: a decoder-side method's layers see what its schedule leaves them (rebuilt here
    for the question's `before` image tokens, as generate.prepare built it); the others' every layer
    sees `after`. `tile`: the tower's FLOPs for one tile (`tile_flops`), times the question's tiles."""
    before, after = result.visual_tokens["before"], result.visual_tokens["after"]
    stages = build_schedule(method, 0, before, ratio, spec.layers)
    decoder = place(method) == "decoder"
    image, mlp = token_counts(stages, before, spec.layers) if decoder else ([after] * spec.layers,) * 2
    flops = layered_prefill_flops(spec, [text + n for n in image], [text + n for n in mlp])
    t = result.timings_s
    return QuestionCost(before, after, sum(image) / spec.layers if decoder else None, flops, tile * result.tiles,
                        t["own_prefill"], t["first_token"], max(len(result.token_ids) - 1, 0), t["own_decode"])


def tile_flops(model, method: str = "none", ratio: float = 1.0) -> int:
    """Matmul FLOPs of one tile through `model`'s vision tower as it runs under `method` at `ratio`: the patch
    embedding and the layers up to the feature layer, each at the tokens the tower schedule (FiCoCo-V)
    leaves it (minillava/flops.py `tile_flops`)."""
    v = model.cfg.vision
    layers = model.cfg.vision_feature_layer % (v.num_hidden_layers + 1)  # the layers the features need
    attention, mlp = token_counts(tower_schedule(model, method, ratio), int(model.vision.has_cls) + v.patches_per_side**2,
                                  layers)
    return tower_tile_flops(v, attention, mlp)


class Meter:
    """Wall time and peak memory of the answering part of a run: create it once the model is loaded
    and warmed up (the peaks are reset then), `stop()` when the last answer is written."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        self.start = time.perf_counter()

    def stop(self) -> dict:
        """{"wall_s", and the peak memory fields in MiB}."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peaks = {"peak_allocated_mib": torch.cuda.max_memory_allocated(self.device) / MIB,
                     "peak_reserved_mib": torch.cuda.max_memory_reserved(self.device) / MIB}
        else:
            peaks = {"peak_rss_mib": peak_rss_bytes() / MIB}
        return {"wall_s": time.perf_counter() - self.start, **peaks}


def reset_peak_rss():
    """Linux: restart the process's peak RSS count (VmHWM) from its current size; elsewhere nothing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The process's peak resident set size: /proc's VmHWM (resettable), else getrusage (since start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


def summary(costs: list[QuestionCost], meters: list[dict]) -> dict | None:
    """The efficiency object of `costs` (every process's questions) and `meters` (one `Meter.stop()`
    per process: run side by side, so the run's wall time is the longest, a peak the largest); None
    if no question was answered."""
    if not costs:
        return None
    n = len(costs)
    mean = lambda f: sum(f(c) for c in costs) / n  # noqa: E731
    decode_s = sum(c.decode_s for c in costs)
    wall = max(m["wall_s"] for m in meters)
    out = {
        "measured": n,
        "visual_tokens_before": mean(lambda c: c.visual_before),
        "visual_tokens_after": mean(lambda c: c.visual_after),
        **({"visual_tokens_layer_mean": mean(lambda c: c.visual_layer_mean)}
           if all(c.visual_layer_mean is not None for c in costs) else {}),
        "prefill_tflops": mean(lambda c: c.prefill_flops) / 1e12,
        "tower_tflops": mean(lambda c: c.tower_flops) / 1e12,
        "prefill_ms": 1e3 * mean(lambda c: c.prefill_s),
        "ttft_ms": 1e3 * mean(lambda c: c.ttft_s),
        "decode_tokens_per_s": sum(c.decode_tokens for c in costs) / decode_s if decode_s > 0 else None,
        "samples_per_s": n / wall if wall > 0 else None,
    }
    for key in sorted({k for m in meters for k in m if k.startswith("peak_")}):
        out[key] = max(m[key] for m in meters if key in m)
    return out


def relative(efficiency: dict, base: dict) -> dict:
    """Each numeric field as a percentage of the base run's (the paper's efficiency table: 100% = uncompressed)."""
    return {k: 100.0 * v / base[k] for k, v in efficiency.items()
            if k != "measured" and isinstance(v, (int, float)) and isinstance(base.get(k), (int, float)) and base[k]}
