"""Where a batch-1 decode step of the 0.95B float32 decoder spends its time (issue 12).

    python scripts/profile_decode.py [--steps 16] [--threads N]

Measured side by side, alternating: (a) the bare 1 GiB copy (bytes read + written per second, as
bench.py row 6), (b) one decode step of ours (weights read per second), (c) the same step's matrix-vector
products alone (F.linear of every weight on one row: the kernels' floor). Then torch.profiler's table of
one step by operator. Ratios are what to read on a shared machine; absolute numbers move with the load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from minillava.config import LlavaConfig  # noqa: E402
from minillava.generate import decode_one_token, prefill  # noqa: E402
from minillava.model import Llava  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench import STUB_VISION, bare_copy, decoder_1b, decoder_weight_bytes  # noqa: E402


def build() -> Llava:
    """Our Llava with the 0.95B decoder, random N(0, 0.02) weights, float32."""
    with torch.device("meta"):
        model = Llava(LlavaConfig(vision=STUB_VISION, text=decoder_1b()))
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/profile_decode.py")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build()
    weight_bytes = decoder_weight_bytes(model)
    prompt = 128
    with torch.inference_mode():
        model.llm.setup_cache(1, 256)
        embeds = model.llm.embed_tokens(torch.randint(3, 32000, (1, prompt)))
        prefill(model, embeds)
        token = torch.zeros(1, 1, dtype=torch.long)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.shape[1] > 64]
        x = {w: torch.randn(1, 1, m.weight.shape[1]) for w, m in enumerate(linears)}

        def step_s() -> float:
            t0 = time.perf_counter()
            for s in range(args.steps):
                decode_one_token(model, token, torch.tensor([[prompt + s]]))
            return (time.perf_counter() - t0) / args.steps

        def matvec_s() -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                for w, m in enumerate(linears):
                    F.linear(x[w], m.weight)
            return (time.perf_counter() - t0) / args.steps

        step_s(), matvec_s(), bare_copy(1 << 30, 1)  # warm-up
        copy, step, mv = [], [], []
        for _ in range(args.rounds):  # A, B, C alternated
            copy += bare_copy(1 << 30, 2)
            step.append(step_s())
            mv.append(matvec_s())
        c, s, m = statistics.median(copy), statistics.median(step), statistics.median(mv)
        print(f"weights read per step: {weight_bytes / 1e9:.2f} GB; threads {torch.get_num_threads()}")
        print(f"bare copy            {c / 1e9:6.1f} GB/s")
        print(f"decode step          {s * 1e3:6.1f} ms = {weight_bytes / s / 1e9:5.1f} GB/s = {weight_bytes / s / c:.2f} of the copy"
              f"  (rounds {', '.join(f'{x * 1e3:.0f}' for x in step)} ms)")
        print(f"matvecs alone        {m * 1e3:6.1f} ms = {weight_bytes / m / 1e9:5.1f} GB/s = {weight_bytes / m / c:.2f} of the copy"
              f"  -> the rest of the step (norms, RoPE, mask, cache write, attention, sampling-free): {(s - m) * 1e3:.1f} ms")

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s_ in range(4):
                decode_one_token(model, token, torch.tensor([[prompt + s_]]))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return 0


if __name__ == "__main__":
    sys.exit(main())
