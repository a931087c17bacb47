"""Where a decode step of a random LLaMA decoder spends its time (issues 12, 29).

    python scripts/profile_decode.py [--decoder 0.95b|1024] [--dtype float32|bfloat16] [--quantize int8|int4]
                                     [--batch B] [--threads N] [--steps 16] [--rounds 3] [--cpu-time] [--against REV]

A step is what generation runs per token: `decode_one_token` and greedy `sample`, B rows at one
position each, over a KV cache holding --prompt random keys and values (no prefill is run: its cost is
not what is measured). Measured side by side, alternating: (a) the bare 1 GiB copy (bytes read + written
per second, as bench.py row 6), (b) the whole step (weights read per second), (c) the matmuls alone:
each linear of the model (nn.Linear or QuantizedLinear) called on a (B, 1, K) input, the kernels' floor.
Then a clocked run: the same step with its functions timed (the same clock, each less the timed functions
it calls): matmul (every linear), attention, KV-cache writes + mask, RoPE, RMSNorm, residual adds + SiLU,
embedding, logits + sampling; Python/dispatch is what is left: the glue between them (the decoder's loop,
module calls, views). Not torch.profiler: it records every operator, and on a busy machine its own cost
made the categories add up to more than the step. With --against REV both sides run alternated in one
process. Ratios are what to read on a shared machine; absolute numbers move with the load (printed
beside them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import statistics
import subprocess
import sys
import types
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minillava import generate, llama  # noqa: E402
from minillava.config import LlavaConfig, TextConfig  # noqa: E402
from minillava.model import Llava  # noqa: E402
from minillava.quant import QuantizedLinear, Spec, input_widths, quantize_model  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench import STUB_VISION, bare_copy, decoder_1b  # noqa: E402
from benchkit.quant import step_bytes  # noqa: E402

DECODERS = {
    "0.95b": decoder_1b,  # width 2048, MLP 5632, 16 layers, 32 heads (bench.py's decode rows)
    "1024": lambda: TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                               num_attention_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The categories of the breakdown, in print order: the time spent in these functions, less that of the labelled
# functions they call (`Clock`); what no labelled function holds is Python/dispatch.
REST = ("attention", "cache write + mask", "rope", "rmsnorm", "residual + silu", "embedding", "logits + sampling")


def build(text: TextConfig, dtype: torch.dtype, quantize: str | None) -> Llava:
    """Our Llava with decoder `text`, random N(0, 0.02) weights (norms 1) in `dtype`, quantized if asked."""
    with torch.device("meta"):
        model = Llava(LlavaConfig(vision=STUB_VISION, text=text))
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02, generator=g)
    model = model.to(dtype).eval().requires_grad_(False)
    if quantize:
        quantize_model(model, Spec.of(int(quantize[3:])).fit(input_widths(text)))
    return model


class Clock:
    """Time per label by `now` (the wall clock, or the process's CPU time), exclusive: a labelled function's
    time less that of the labelled calls inside it."""

    def __init__(self, now=time.perf_counter):
        self.totals, self.inner, self.now = collections.defaultdict(float), [], now

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            self.inner.append(0.0)
            t0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                took = self.now() - t0
                self.totals[name] += took - self.inner.pop()
                if self.inner:
                    self.inner[-1] += took
        return run


def at_revision(rev: str) -> dict[str, types.ModuleType]:
    """minillava/llama.py and generate.py as of git revision `rev`, as modules of the package."""
    out = {}
    for name in ("llama", "generate"):
        path = f"minillava/{name}.py"
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                             check=True).stdout
        module = types.ModuleType(f"minillava.{name}_at_{rev}")
        module.__package__ = "minillava"
        sys.modules[module.__name__] = module  # dataclasses look their module up there
        exec(compile(src, f"{rev}:{path}", "exec"), module.__dict__)
        out[name] = module
    return out


@contextlib.contextmanager
def swapped(old: dict[str, types.ModuleType]):
    """The live modules' functions, and their classes' methods, replaced by `old`'s (`at_revision`), so the
    model already built runs the old code; undone on exit."""
    saved = []

    def put(obj, attr, value):
        saved.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, value)

    for name, module in (old or {}).items():
        live = sys.modules[f"minillava.{name}"]
        for attr, value in vars(module).items():
            here = getattr(live, attr, None)
            if inspect.isfunction(value) and inspect.isfunction(here):
                put(live, attr, value)
            elif isinstance(value, type) and isinstance(here, type) and value.__module__ == module.__name__:
                for method, f in vars(value).items():
                    if inspect.isfunction(f):
                        put(here, method, f)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value) if value is not None else delattr(obj, attr)


@contextlib.contextmanager
def running(model: Llava, old: dict[str, types.ModuleType] | None):
    """The model runs `old`'s code (`swapped`; None: this tree's), with the RoPE table that code builds."""
    with swapped(old):
        cfg = model.llm.cfg
        model.llm.rope = llama.rope_table(cfg.head_dim, model.llm.rope.shape[1], cfg.rope_theta)
        yield


@contextlib.contextmanager
def labels(model: Llava, clock: Clock, llamas=(llama,)):
    """The functions of a step timed by `clock` under their category (instance methods wrapped, the module
    functions `apply_rope` and `attend` swapped in each of `llamas`); undone on exit."""
    patched = []

    def wrap(obj, attr, name):
        patched.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, clock.wrap(name, getattr(obj, attr)))

    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, QuantizedLinear)):
            wrap(m, "forward", "matmul")
        elif isinstance(m, llama.RMSNorm):
            wrap(m, "forward", "rmsnorm")
        elif isinstance(m, llama.Attention):
            wrap(m, "forward", "attention")  # its views and transposes, around `attend`
            wrap(m.cache, "update", "cache write + mask")
        elif isinstance(m, (llama.MLP, llama.Block)):
            wrap(m, "forward", "residual + silu")
    wrap(model.llm.embed_tokens, "forward", "embedding")
    wrap(model.llm, "positions", "rope")
    wrap(model, "logits", "logits + sampling")
    for module in llamas:
        wrap(module, "apply_rope", "rope")
        wrap(module, "attend", "attention")
    try:
        yield
    finally:
        for obj, attr, old in reversed(patched):
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/profile_decode.py", description=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=DECODERS, default="0.95b",
                   help="0.95b: width 2048, MLP 5632, 16 layers (bench.py's); 1024: MLP 2816, 8 layers, 16 heads")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quant.quantize_model on the built model (int4: the largest group size up to 128 that fits)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--prompt", type=int, default=128, help="cache slots filled before the steps")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-time", action="store_true",
                   help="time steps and matmuls by this process's CPU time, not the wall clock: with --threads 1 on a "
                        "busy machine, the time other jobs hold the core is then not counted")
    p.add_argument("--against", metavar="REV", default=None,
                   help="also run the step with minillava/llama.py's and generate.py's functions as of git revision "
                        "REV (e.g. main), alternated with this tree's in this process: before / after")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text, dtype, b = DECODERS[args.decoder](), DTYPES[args.dtype], args.batch
    model = build(text, dtype, args.quantize)
    weight_bytes = step_bytes(model)
    sides = {"after": None, "before": at_revision(args.against)} if args.against else {"now": None}
    with torch.inference_mode():
        model.llm.setup_cache(b, args.prompt + args.steps + 16)
        pos = torch.arange(args.prompt)
        for layer in model.llm.layers:
            attn = layer.self_attn
            kv = torch.randn(2, b, attn.kv_heads, args.prompt, attn.head_dim, dtype=dtype)
            attn.cache.prefill(pos, kv[0], kv[1])
        token = torch.zeros(b, 1, dtype=torch.long)
        positions = [torch.full((b, 1), args.prompt + s) for s in range(args.steps)]
        linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))
                   and m.in_features > 64]  # the stub tower's and projector's are not in a step
        x = [torch.randn(b, 1, m.in_features, dtype=dtype) for m in linears]

        def step(pick=None):
            for s in range(args.steps):  # looked up at each call: `swapped` may have replaced them
                (pick or generate.sample)(generate.decode_one_token(model, token, positions[s]), 0.0, 1.0, None)

        def matmuls():
            for _ in range(args.steps):
                for m, xm in zip(linears, x):
                    m(xm)

        now = time.process_time if args.cpu_time else time.perf_counter

        def timed(fn, old=None) -> float:
            with running(model, old):
                t0 = now()
                fn()
                return (now() - t0) / args.steps

        logits = {}
        for side, old in sides.items():  # warm-up, and each side's logits of the same step
            timed(step, old)
            with running(model, old):
                logits[side] = generate.decode_one_token(model, token, positions[0])
        timed(matmuls), bare_copy(1 << 30, 1)
        copy, mm, steps = [], [], {side: [] for side in sides}
        for _ in range(args.rounds):  # alternated
            copy += bare_copy(1 << 30, 2)
            for side, old in sides.items():
                steps[side].append(timed(step, old))
            mm.append(timed(matmuls))
        clocked = {side: [] for side in sides}
        for _ in range(args.rounds):  # alternated too; each category's median below
            for side, old in sides.items():
                clock = Clock(now)
                with running(model, old), labels(model, clock, (llama, *([old["llama"]] if old else []))):
                    t0 = now()
                    step(clock.wrap("logits + sampling", generate.sample))
                    clock.totals["step"] = now() - t0
                clocked[side].append({k: v / args.steps for k, v in clock.totals.items()})
        parts = {side: {name: statistics.median(p.get(name, 0.0) for p in runs) for name in ("step", "matmul", *REST)}
                 for side, runs in clocked.items()}
    c, m = statistics.median(copy), statistics.median(mm)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"decoder {args.decoder} {args.dtype}{' ' + args.quantize if args.quantize else ''}, batch {b}, "
          f"{args.prompt} cached slots; threads {torch.get_num_threads()}; load {' '.join(load)}")
    print(f"weights read per step: {weight_bytes / 1e9:.3f} GB; bare copy {c / 1e9:.1f} GB/s")
    print(f"matmuls alone: {m * 1e3:.2f} ms = {weight_bytes / m / c:.2f} of the copy's bandwidth")
    if args.against:
        diff = (logits["after"] - logits["before"]).abs().max() / logits["before"].abs().max()
        print(f"logits after / before: largest difference {diff:.1e} of the largest logit")
    med = {side: statistics.median(t) for side, t in steps.items()}
    rows = [("step", med), ("matmuls alone", dict.fromkeys(sides, m)), ("the rest", {k: v - m for k, v in med.items()}),
            ("  share of the step", {k: (v - m) / v for k, v in med.items()}),
            ("clocked step", {k: p["step"] for k, p in parts.items()}), ("  matmul", {k: p["matmul"] for k, p in parts.items()})]
    rows += [(f"  {name}", {k: p[name] for k, p in parts.items()}) for name in REST]
    rows.append(("  Python/dispatch", {k: p["step"] - p["matmul"] - sum(p[n] for n in REST) for k, p in parts.items()}))
    print(f"{'ms per step':21s}" + "".join(f"{side:>10s}" for side in sides))
    for name, values in rows:
        print(f"{name:21s}" + "".join(f"{values[side]:10.1%}" if "share" in name else f"{values[side] * 1e3:10.2f}"
                                      for side in sides))
    for side, t in steps.items():
        print(f"{side} step per round: {', '.join(f'{v * 1e3:.1f}' for v in t)} ms"
              f" ({weight_bytes / med[side] / c:.2f} of the copy's bandwidth)")
    if args.against:
        ratios = [b_ / a for a, b_ in zip(steps["after"], steps["before"])]
        print(f"before / after per round: {', '.join(f'{r:.3f}' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
