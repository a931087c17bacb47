"""Answer a question about an image: the steps (prefill, decode, sampling), one question's way from
PIL to answer (`generate`), and the command line.

    python -m minillava.generate --model DIR_OR_HUB_ID --image PATH_OR_URL --prompt "What is this?"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compression import compressor_help, compressors, encode, sequences
from .config import LlavaConfig, load_config
from .model import Llava
from .schedule import build as build_schedule, layer_lengths
from . import tensor_parallel
from .quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, Spec
from .conversation import FLAG as CONV_FLAG, TEMPLATES, choose_template
from .tokenizer import PromptError, StreamDecoder, Tokenizer, load_tokenizer
from .trust import ConfigError, ImageError, WeightsError, load_image
from .weights import DEFAULT_MODEL, checkpoint_files, load_model, read_layout, resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_HELP = ("weights and activations (default on cuda: float16 for a checkpoint saved in float16, else bfloat16 "
              "where the GPU has it natively, else float32; on cpu: float32, or bfloat16 when float32 weights would "
              "take over half the memory. Measured on the CPU (docs/speed.md): on an AMD EPYC with AVX512-BF16, "
              "bfloat16 decodes 2.1x as fast as float32 (0.95B decoder: 18.3 against 8.6 tokens/s) in half the "
              "memory, its answers a little different; on an Intel Xeon without AVX512-BF16 it decoded one answer "
              "as fast as float32, but its products of several rows are compute-bound there: a batch of 8 decodes "
              "2x slower than in float32; --quantize's matmuls take bfloat16 activations either way)")
DEFAULT_COMPRESSOR = "globalcom2"
DEFAULT_RETENTION_RATIO = 0.25  # the paper's default
RATIO_HELP = (f"fraction of visual tokens kept, in (0, 1] (default {DEFAULT_RETENTION_RATIO}, the paper's default); on "
              "OneVision's downscaled crop grid, of the tokens the uncompressed model sees, selected on the "
              "full-resolution crops (our choice: docs/onevision.md)")


class NumericsError(RuntimeError):
    """The model produced logits that cannot be sampled (NaN or infinite): broken weights or config,
    or an overflow of the dtype."""


USER_ERRORS = (ImageError, ConfigError, WeightsError, PromptError, NumericsError)


@dataclass
class Result:
    text: str
    token_ids: list[int]
    visual_tokens: dict[str, int]
    timings_s: dict[str, float] = field(default_factory=dict)
    decode_tokens_per_s: float = 0.0
    tiles: int = 0  # tiles the vision tower ran for the image (thumbnail and crops): its cost, eval/efficiency.py


def load(model: str, device="cpu", dtype: torch.dtype | None = None,
         conv_template: str | None = None, quantize: Spec | None = None,
         shard: tensor_parallel.Shard | None = None, pack: bool = True) -> tuple[Llava, Tokenizer]:
    """Model and tokenizer from a checkpoint directory or hub id; `dtype` None picks `default_dtype`;
    `quantize`: the decoder's linears weight-only int8 / int4, quantized while loading (minillava/quant.py);
    `shard`: only this rank's part of a tensor-parallel decoder (minillava/tensor_parallel.py);
    `pack`: on the CPU, the decoder's matrices in oneDNN's layout (`load_model`).
    The config is validated whole, the tokenizer checked against it and the conversation template chosen
    (`read_checkpoint`) before any weight is read."""
    model_dir = resolve_model(model)
    _, tokenizer = read_checkpoint(model_dir, conv_template)
    device = torch.device(device)
    dtype = dtype or default_dtype(model_dir, device)
    return load_model(model_dir, device, dtype, quantize, shard, pack), tokenizer


def read_checkpoint(model_dir: Path, conv_template: str | None = None) -> tuple[LlavaConfig, Tokenizer]:
    """A checkpoint's validated config and its tokenizer, checked against it, with the conversation
    template chosen (`conv_template` names one, else `conversation.choose_template` reads the checkpoint);
    no weight is read."""
    cfg = load_config(model_dir)  # a directory that is no checkpoint fails here, before anything is read
    tokenizer = load_tokenizer(model_dir)  # tokenizer.model (sentencepiece) or tokenizer.json (Qwen2's BPE)
    if tokenizer.n_pieces > cfg.text.vocab_size:  # ids past the embedding table would index out of it
        raise WeightsError(f"{model_dir}: the tokenizer has {tokenizer.n_pieces} pieces but config.json's "
                           f"vocab_size is {cfg.text.vocab_size}; the tokenizer belongs to another model")
    has_chatml = all(tokenizer.token_id(t) is not None for t in TEMPLATES["chatml_direct"].special)
    template = choose_template(model_dir, cfg.layout, cfg.text.model_type, cfg.text.vocab_size, has_chatml,
                               conv_template, cfg.family)
    tokenizer.use_template(template, cfg.text.vocab_size)
    return cfg, tokenizer


def prefill(model: Llava, embeds: torch.Tensor, schedule: tuple = (),
            input_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompts (B, T, D) from position 0, filling the cache (with a decoder-side method's
    `schedule`: pruning between layers, minillava/schedule.py); logits of the last position (B, V).
    `input_pos` (B, T): per-row positions of left-padded prompts, PAD (-1) on the padding
    (minillava/batch.py `pad_left`); default 0 .. T-1."""
    pos = torch.arange(embeds.shape[1], device=embeds.device) if input_pos is None else input_pos
    hidden = model.llm(embeds, pos, prefill=True, schedule=schedule)
    return model.logits(hidden[:, -1])


def decode_one_token(model: Llava, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One step: token ids (B, 1) at positions `pos` ((B, 1) per row, or (1,) for every row) -> logits (B, V)."""
    hidden = model.llm(model.llm.embed_tokens(token), pos)
    return model.logits(hidden[:, -1])


BAD_TOKEN = -1  # what `sample` returns for a row whose logits are not usable (NaN, +inf, all -inf)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else nucleus sampling.

    A row whose largest logit is not finite (a NaN anywhere, +inf, or every entry -inf) gets BAD_TOKEN
    instead of an id: argmax would silently pick a token from garbage. The check is on the device, so
    the caller learns of it when it reads the id, without a synchronisation per step.
    """
    # the largest logit and argmax's id (the first of equal ones) in one pass; NaN if any entry is NaN
    top, ids = logits.max(dim=-1)  # (B,) each
    bad = ~top.isfinite()
    if temperature > 0:
        # Subtract the max before dividing: a tiny temperature then sends the others to -inf (a one-hot
        # distribution) instead of overflowing every logit to inf and the softmax to NaN. float64,
        # because a temperature below float32's range (1e-46) would become 0 there, and 0 / 0 is NaN.
        shifted = torch.where(bad[:, None], 0.0, logits - top[:, None]).double()  # bad rows: uniform, never NaN
        probs = torch.softmax(shifted / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest head reaching top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        ids = draw(probs, generator)
    return torch.where(bad, BAD_TOKEN, ids)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of `probs` (B, V), drawn as torch.multinomial(probs, 1, generator=generator) draws
    it, without its host synchronisations.

    torch.multinomial's one-sample draw (aten/src/ATen/native/Distributions.cpp `multinomial_out`, the
    fast path for sampling without replacement, on every device) is argmax(p / q) with q ~ Exp(1) from
    `exponential_` on the same generator (the Gumbel-max trick, as gpt-fast's
    `multinomial_sample_one_no_sync`); before it, two checks of the probabilities read a result back
    to the host (`.item()`), which on CUDA waits for the device twice per draw. Our probabilities pass
    them by construction (softmax rows: finite, >= 0, summing to 1), so this is the draw alone: the same
    random numbers and the same ids for a seed (tests/test_cuda_paths.py), and no wait."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(dim=-1)


def check_token(token: int, step: int) -> int:
    """The id read back from `sample`, or NumericsError if the logits were unusable."""
    if token == BAD_TOKEN:
        raise NumericsError(
            f"the model's logits are NaN or infinite at answer token {step + 1}: the weights or config.json are "
            "broken, or the dtype overflows (try --dtype float32 or bfloat16)"
        )
    return token


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CACHE_BUCKET = 256  # KV cache lengths are rounded up to this, so a compiled decode step is reused


@dataclass
class Steps:
    """The two model calls of generation, eager or compiled."""

    prefill: Callable = prefill
    decode: Callable = decode_one_token
    compiled: bool = False


def compile_steps(model: Llava) -> Steps:
    """torch.compile the decode step (fixed shapes: static cache, one token; CUDA graphs on CUDA), and
    the vision tower and prefill with dynamic shapes (tile counts and prompt lengths vary)."""
    model.vision.compile(dynamic=True)
    return Steps(
        prefill=torch.compile(prefill, dynamic=True),
        decode=torch.compile(decode_one_token, options=decode_options(model.device), fullgraph=True),
        compiled=True,
    )


def decode_options(device: torch.device) -> dict | None:
    """Inductor's options for the decode step on `device` (None: the defaults). CUDA: mode
    "reduce-overhead"'s one option, CUDA graphs (torch._inductor.list_mode_options), and
    coordinate_descent_tuning, which gpt-fast sets (generate.py): with it inductor turns a one-row
    matrix product into a reduction (torch/_inductor/decomposition.py `mm`: "Our matrix vector multiplies
    only achieve peak bandwidth with coordinate descent tuning"), into which an int8 weight's
    dequantization fuses, instead of writing a 16-bit copy of the weight each step. Given as options,
    because torch.compile takes a mode or options, not both; the flag then holds for this step alone
    (on the CPU and for the prefill the decomposition does not apply: compile time for nothing)."""
    if device.type != "cuda":
        return None
    return {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


class TokenReader:
    """Brings sampled ids to the host without stalling the device: the ids are copied out before the
    next step is queued, and read after, so on CUDA the next step runs while the host handles this one.
    `device`: the model's, where the ids are."""

    def __init__(self, device: torch.device, n: int, batch: int = 1):
        self.device, self.cuda = device, device.type == "cuda"
        self.host = torch.empty(n, batch, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def start(self, step: int, ids: torch.Tensor):
        """ids (B,) of step `step`."""
        self.host[step].copy_(ids.view(-1), non_blocking=self.cuda)
        if self.cuda:
            # the copy is queued on the current stream of the ids' device, not of the current device
            # (aten/src/ATen/native/cuda/Copy.cu `copy_kernel_cuda`: a guard sets the source device, then
            # getCurrentCUDAStream()); the event must follow it there, or `read` may see the slot before
            # the copy lands (a model on cuda:1 while the current device is cuda:0). A torch.cuda.Event is
            # created on the device of the stream it is first recorded on.
            self.event.record(torch.cuda.current_stream(self.device))

    def read(self, step: int) -> list[int]:
        """The B ids of step `step`."""
        if self.cuda:
            self.event.synchronize()
        return self.host[step].tolist()


@dataclass
class Prompt:
    """One question's decoder input: its prompt with the image's tokens spliced in."""

    embeds: torch.Tensor  # (T, D)
    limit: int  # answer tokens at most: max_new_tokens, cut to the context
    schedule: tuple  # a decoder-side method's stages for it (minillava/schedule.py); () for the others
    visual_tokens: dict[str, int]  # "before" and "after" compression


def prepare(model: Llava, tokenizer: Tokenizer, question: str, image: torch.Tensor, before: int,
            compressor: str, retention_ratio: float, max_new_tokens: int) -> Prompt:
    """The decoder input of one question about its image's tokens (T_img, D) (`before` of them
    uncompressed); PromptError if it does not fit the context, ConfigError if a decoder-side method
    cannot prune this model."""
    chunks = tokenizer.encode_question(question)  # the checkpoint's conversation template (`load`)
    embeds = model.prompt_embeds(chunks, [image])[0]
    length, context = embeds.shape[0], model.cfg.text.max_position_embeddings
    if length >= context:
        raise PromptError(
            f"the prompt and image take {length} tokens but the model's context is {context}; "
            "shorten the prompt or compress the image (--compressor globalcom2 --retention-ratio 0.25)"
        )
    # a decoder-side method prunes the image in the prefill; `after` is what its last layers see
    stages = build_schedule(compressor, len(chunks[0]), image.shape[0], retention_ratio,
                            model.cfg.text.num_hidden_layers)
    visual = {"before": before, "after": image.shape[0] - sum(stage.dropped for stage in stages)}
    return Prompt(embeds, min(max_new_tokens, context - length), stages, visual)


def cache_slots(model: Llava, length: int, schedule: tuple = ()) -> list[int]:
    """KV cache slots of each decoder layer for `length` positions (prompt and answer), rounded up to
    CACHE_BUCKET so that a compiled decode step is reused, never past the context unless `length` is;
    the layers after a decoder-side method's stage never hold what it dropped (`layer_lengths`)."""
    context = model.cfg.text.max_position_embeddings
    bucket = lambda k: max(k, min(context, -(-k // CACHE_BUCKET) * CACHE_BUCKET))  # noqa: E731
    return [bucket(k) for k in layer_lengths(schedule, length, model.cfg.text.num_hidden_layers)]


@torch.inference_mode()
def generate(
    model: Llava,
    tokenizer: Tokenizer,
    image,
    question: str,
    compressor: str = "none",
    retention_ratio: float = 1.0,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_text=None,
    steps: Steps | None = None,
) -> Result:
    """Answer `question` about the PIL `image`; `on_text(str)` receives the answer as it is produced.

    The whole way of one question. minillava/batch.py `generate_batch` answers many together with the
    same steps, and gives each the ids this gives it (tests/test_batch.py).
    """
    device, steps = model.device, steps or Steps()
    t0 = time.perf_counter()
    tiles = model.tile(image)  # thumbnail + crops
    encoded = encode(model, [tiles], compressor, ratio=retention_ratio)  # tower and projector, and what the compressor reads
    _sync(device)
    t1 = time.perf_counter()
    tokens, before = sequences(model, encoded, compressor, retention_ratio, seed)[0]  # keep, then lay out
    _sync(device)
    t2 = time.perf_counter()
    prompt = prepare(model, tokenizer, question, tokens, before, compressor, retention_ratio, max_new_tokens)
    t, n = prompt.embeds.shape[0], prompt.limit
    slots = cache_slots(model, t + n, prompt.schedule)
    model.llm.setup_cache(1, slots[0], layer_lengths=slots)
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    positions = torch.arange(t, t + n, device=device).view(n, 1, 1)  # answer token s at [s]: (1, 1) each
    reader = TokenReader(device, n)

    t3 = time.perf_counter()  # the prompt's tokenisation and the cache set-up above are in no timing
    next_id = sample(steps.prefill(model, prompt.embeds[None], prompt.schedule), temperature, top_p, generator)
    reader.start(0, next_id)
    _sync(device)
    t4 = time.perf_counter()
    ids, stream = [], StreamDecoder(tokenizer)
    for step in range(n):
        if step + 1 < n:  # queue the next step before waiting for this id (a BAD_TOKEN is fed as 0)
            logits = steps.decode(model, next_id.clamp(min=0).view(1, 1), positions[step])
            next_id = sample(logits, temperature, top_p, generator)
            reader.start(step + 1, next_id)
        token = check_token(reader.read(step)[0], step)
        ids.append(token)
        if token == tokenizer.eos_id:
            break
        if on_text is not None:
            on_text(stream.push(token))
    _sync(device)
    timings = {"vision": t1 - t0, "compress": t2 - t1, "prefill": t4 - t3, "decode": time.perf_counter() - t4}
    n_steps = max(len(ids) - 1, 0)  # the first id came out of the prefill
    return Result(tokenizer.decode(ids), ids, prompt.visual_tokens, timings,
                  n_steps / timings["decode"] if n_steps and timings["decode"] > 0 else 0.0, len(tiles.pixels))

def _number(text: str, kind: type):
    """`text` as an int or float, or argparse's error naming what it should have been."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def ratio_arg(text: str) -> float:
    value = _number(text, float)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]: it is the fraction of visual tokens kept")
    return value


SEED_MAX = 2**63 - 1  # torch.Generator takes a 64-bit seed; 2**64 and up overflow it


def seed_arg(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 2**63 - 1]")
    return value


def temperature_arg(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):  # NaN fails every comparison: test finiteness first
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 is greedy)")
    return value


def conv_template_arg(p: argparse.ArgumentParser, default: str = "the checkpoint's"):
    p.add_argument(CONV_FLAG, choices=list(TEMPLATES), default=None, metavar="NAME",
                   help="conversation template: " + ", ".join(TEMPLATES) + f" (default: {default}, from its "
                   "chat template, its name as LLaVA's run_llava.py reads it, and its decoder)")


def quantize_args(p: argparse.ArgumentParser):
    """--quantize and --group-size, for every command that loads a model; `quantize_spec` reads them."""
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the decoder's linear layers and lm_head, done while loading "
                   "(int8 per output channel, int4 group-wise; activations stay in --dtype): half / a quarter of "
                   "the 16-bit weights' memory, and faster decoding. A checkpoint written by python -m "
                   "minillava.apps.quantize is quantized already and needs no flag")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None, metavar="G",
                   help=f"int4: inputs sharing one scale and zero, one of {', '.join(map(str, GROUP_SIZES))} "
                   f"(default: the largest up to {DEFAULT_GROUP_SIZE} that divides every quantized width, said "
                   "when loading: 128 on LLaVA-1.6, 64 on the tiny model)")


def quantize_spec(p: argparse.ArgumentParser, args: argparse.Namespace) -> Spec | None:
    """The Spec of --quantize / --group-size (None: not quantized); a usage error for --group-size alone."""
    try:
        return Spec.of({None: None, "int8": 8, "int4": 4}[args.quantize], args.group_size)
    except ValueError:
        p.error("--group-size goes with --quantize int4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m minillava.generate",
        description="Answer a question about an image with LLaVA-NeXT (LLaVA-1.6), optionally compressing "
        "its visual tokens with GlobalCom2. The answer streams to stdout; timings go to stderr.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory, folder name under weights/, or hub id (default {DEFAULT_MODEL}, "
                   "the tiny model trained here on synthetic scenes; the real one is e.g. liuhaotian/llava-v1.6-vicuna-7b); "
                   "hub ids owner/name are looked up in weights/owner--name/ and downloaded there if missing")
    p.add_argument("--image", required=True, help="image file or http(s) URL")
    p.add_argument("--prompt", required=True, help="the question about the image")
    p.add_argument("--compressor", default=DEFAULT_COMPRESSOR, choices=compressors(),
                   help=compressor_help())
    p.add_argument("--retention-ratio", type=ratio_arg, default=DEFAULT_RETENTION_RATIO, metavar="R",
                   help=RATIO_HELP)
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer length limit (default 512)")
    p.add_argument("--temperature", type=temperature_arg, default=0.0, metavar="T",
                   help="0 is greedy, as the paper's evaluation (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass when T > 0 (default 1.0)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of sampling and of the random compressor, in [0, 2**63 - 1] (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help=DTYPE_HELP)
    conv_template_arg(p)
    quantize_args(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the tower, prefill and decode step (pays off on long answers; "
                   "compile time is reported apart)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids, token counts and timings")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the decoder over N processes, by attention heads and MLP columns (launch with "
                   "torchrun --nproc-per-node N; each rank reads only its part of the weights; docs/tensor-parallel.md)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if not 0.0 < args.top_p <= 1.0:  # NaN fails too
        p.error("--top-p must be in (0, 1]")
    args.spec = quantize_spec(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda was asked for but CUDA is not available here; use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shard = None
    try:
        shard, rank_device = tensor_parallel.start(args.tensor_parallel, device.type)
        device = rank_device or device
        image = load_image(args.image)
        t0 = time.perf_counter()
        model, tokenizer = load(args.model, device, DTYPES.get(args.dtype), args.conv_template, args.spec, shard)
        load_s = time.perf_counter() - t0
        steps, compile_s = Steps(), {}
        if args.compile:  # compiled and warmed up on this very question: nothing compiles inside its answer
            from .batch import warm_up  # batch.py builds on this module

            steps = compile_steps(model)
            compile_s = {"compile": warm_up(model, steps, tokenizer, [(image, args.prompt)], args.compressor,
                                            args.retention_ratio, args.max_new_tokens, args.seed)}
        quiet = shard is not None and shard.rank > 0  # every rank computes the answer; rank 0 prints it
        on_text = None if args.json or quiet else (lambda s: print(s, end="", flush=True))
        result = generate(model, tokenizer, image, args.prompt, args.compressor, args.retention_ratio,
                          args.max_new_tokens, args.temperature, args.top_p, args.seed, on_text, steps)
    except USER_ERRORS as e:
        # every rank fails the same way: rank 0 says it and carries the status (a rank > 0 exiting 1 first
        # would have torchrun stop rank 0 before it speaks)
        return fail(str(e)) if tensor_parallel.speaks(shard) else 0
    finally:
        tensor_parallel.stop(shard)
    if quiet:
        return 0
    result.timings_s = {"load": load_s, **compile_s, **result.timings_s}
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        print()
        t = result.timings_s
        print(
            f"[{len(result.token_ids)} tokens | visual tokens {result.visual_tokens['before']} -> "
            f"{result.visual_tokens['after']} | load {t['load']:.2f}s "
            + (f"compile {t['compile']:.1f}s " if "compile" in t else "")
            + f"vision {t['vision']:.2f}s "
            f"compress {t['compress']:.3f}s prefill {t['prefill']:.2f}s decode {t['decode']:.2f}s "
            f"({result.decode_tokens_per_s:.1f} tok/s)]",
            file=sys.stderr,
        )
    return 0


def default_dtype(model_dir, device: torch.device) -> torch.dtype:
    """The dtype a model runs in when --dtype does not say.

    CUDA: float16 if the checkpoint was saved in float16 (config.json's torch_dtype: llava-hf's
    LLaVA-1.6), else bfloat16 where the GPU computes in it natively (compute capability 8.0 and up),
    else float32. Never float16 for a checkpoint saved otherwise: Qwen2 (LLaVA-OneVision, saved in
    bfloat16) overflows float16's range (NaN logits, "!!!!" answers), and float16 is then a choice
    the user makes with --dtype float16.
    On the CPU float32, unless the weights in float32 would take more than half the machine's memory
    (a 7B model: 28 GB), then bfloat16."""
    if device.type == "cuda":
        saved = load_config(model_dir).torch_dtype
        if saved == "float16":
            return torch.float16
        if native_bfloat16(device):
            return torch.bfloat16
        print(f"note: this GPU has no native bfloat16 and the checkpoint was saved in {saved or 'an unstated dtype'}; "
              "using float32 (pass --dtype float16 to halve the memory, at the risk of overflow)", file=sys.stderr)
        return torch.float32
    n_params = sum(math.prod(e.shape) for e in read_layout(checkpoint_files(Path(model_dir))).values())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * n_params > memory / 2:
        print(f"note: {n_params / 1e9:.1f}B parameters in float32 would not fit comfortably in "
              f"{memory / 2**30:.0f} GiB; using bfloat16 (pass --dtype float32 to insist)", file=sys.stderr)
        return torch.bfloat16
    return torch.float32


def native_bfloat16(device: torch.device) -> bool:
    """Whether CUDA `device` computes in bfloat16 natively: compute capability 8.0 (Ampere) and up, the
    test torch.cuda.is_bf16_supported(including_emulation=False) makes (torch/cuda/__init__.py), asked
    of this device rather than the current one; ROCm's GPUs all do (the same function's first test)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
