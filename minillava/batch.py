"""Many questions at once: the batch engine of the evaluation (`generate_batch`).

The same steps as one question's way (minillava/generate.py `generate`), for B questions: every tile of
every image through the tower in one pass, each image compressed alone, the prompts left-padded to one
length (`pad_left`) and decoded together through one static KV cache, each row stopping on its own
(`decode_batch`), a failing question failing alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .compression import encode, sequences
from .generate import (USER_ERRORS, NumericsError, Prompt, Result, Steps, TokenReader, _sync, cache_slots,
                       check_token, prepare, sample)
from .llama import PAD
from .model import Llava
from .tokenizer import StreamDecoder, Tokenizer


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator] | None) -> torch.Tensor:
    """`sample` for a batch (B, V) -> (B,). Greedy is one call. With a temperature each row draws from
    its own generator, one (1, V) draw per step exactly as a question answered alone does, so a row's
    random numbers do not depend on the other rows of its batch."""
    if temperature <= 0 or generators is None:
        return sample(logits, temperature, top_p, None)
    return torch.cat([sample(logits[i : i + 1], temperature, top_p, g) for i, g in enumerate(generators)])


@dataclass
class _Row:
    """One question of a batch between compression and decoding."""

    index: int  # in the caller's list
    prompt: Prompt
    tiles: int  # the tower's tiles of its image


@torch.inference_mode()
def generate_batch(
    model: Llava,
    tokenizer: Tokenizer,
    items: list[tuple],
    compressor: str = "none",
    retention_ratio: float = 1.0,
    max_new_tokens: int | list[int] = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_text=None,
    steps: Steps | None = None,
    return_exceptions: bool = False,
) -> list[Result | Exception]:
    """Answer the (PIL image, question) `items` together, one Result each, in order.

    Every tile of every image goes through the tower in one batch, each image is compressed alone (as
    if answered alone: the random method is seeded per image), and the prompts run through the decoder
    as one batch of unequal lengths (`decode_batch`). `max_new_tokens`: one limit, or one per item.
    `on_text(i, str)` receives item i's answer as it is produced. Timings are the batch's (every
    Result carries them); decode_tokens_per_s is the row's tokens over the batch's decode time. Each
    Result's timings also hold its own (minillava/eval/efficiency.py reads them): `first_token`, seconds
    from the batch's start to the row's first answer token; `own_prefill`, the prefill that computed it
    (the batch's, or the row's own for a decoder-side method); `own_decode`, the row's share of its decode time.

    Greedy (temperature 0) ids of a row are those of the question answered alone (tests/test_batch.py);
    with a temperature each row samples from its own generator seeded with `seed`, as alone, so only
    float rounding of batched matrix products can move a draw.

    A question that fails (an image that cannot be tiled, a prompt longer than the context, NaN logits
    in its row) fails alone: with `return_exceptions` its place holds the exception (a USER_ERRORS
    one) and the other rows are answered; otherwise the first failure is raised.

    A decoder-side method (`fastv`: a prompt with a `schedule`) prunes inside the prefill, whose kept
    count differs per image, so its pruned layers would hold a different number of slots per row: its
    questions are decoded one at a time (the tower still runs once for all of them)."""
    steps = steps or Steps()
    limits = [max_new_tokens] * len(items) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(items):
        raise ValueError(f"{len(limits)} max_new_tokens for {len(items)} items")
    out: list[Result | Exception | None] = [None] * len(items)
    t0 = time.perf_counter()
    rows, (vision, compress) = prepare_rows(model, tokenizer, items, compressor, retention_ratio, limits, seed, out)
    timings = {"vision": vision, "compress": compress, "prefill": 0.0, "decode": 0.0}
    groups = decode_groups(rows)
    decoded, own = {}, {}
    for group in groups:
        spent = timings["prefill"], timings["decode"]
        for row, ids in zip(group, decode_batch(model, tokenizer, group, temperature, top_p, seed, on_text, steps,
                                                timings), strict=True):
            decoded[row.index] = (row, ids)
        # this group's own timings (per row: pruned rows' groups are single rows); decode_batch times the
        # decode up to its return, so its first tokens were out `decode` seconds before now
        prefill, decode = timings["prefill"] - spent[0], timings["decode"] - spent[1]
        first = time.perf_counter() - decode - t0
        for row in group:
            own[row.index] = {"first_token": first, "own_prefill": prefill, "own_decode": decode / len(group)}
    for i, (row, ids) in decoded.items():
        if isinstance(ids, Exception):
            out[i] = ids
            continue
        n_steps = max(len(ids) - 1, 0)  # the first id came out of the prefill
        out[i] = Result(
            text=tokenizer.decode(ids),
            token_ids=ids,
            visual_tokens=row.prompt.visual_tokens,
            timings_s={**timings, **own[i]},
            decode_tokens_per_s=n_steps / timings["decode"] if n_steps and timings["decode"] > 0 else 0.0,
            tiles=row.tiles,
        )
    if not return_exceptions:
        for r in out:
            if isinstance(r, Exception):
                raise r
    return out


def prepare_rows(model: Llava, tokenizer: Tokenizer, items: list[tuple], compressor: str, retention_ratio: float,
                 limits: list[int], seed: int, out: list) -> tuple[list[_Row], tuple[float, float]]:
    """The decoder input of each item that gets that far (the tower once for every tile of every image,
    each image compressed alone); an item that fails puts its exception (one of USER_ERRORS) in `out`.
    Also the seconds of the tower and of the compression, each synchronised."""
    device = model.device
    t0 = time.perf_counter()
    tiles = {}
    for i, (image, _) in enumerate(items):
        try:
            tiles[i] = model.tile(image)
        except USER_ERRORS as e:
            out[i] = e
    encoded = encode(model, list(tiles.values()), compressor, ratio=retention_ratio) if tiles else []  # one tower pass for all
    _sync(device)
    t1 = time.perf_counter()
    images = dict(zip(tiles, sequences(model, encoded, compressor, retention_ratio, seed) if tiles else []))
    _sync(device)
    t2 = time.perf_counter()
    rows = []
    for i, (tokens, before) in images.items():
        try:
            prompt = prepare(model, tokenizer, items[i][1], tokens, before, compressor, retention_ratio, limits[i])
            rows.append(_Row(i, prompt, len(tiles[i].pixels)))
        except USER_ERRORS as e:
            out[i] = e
    return rows, (t1 - t0, t2 - t1)


def decode_groups(rows: list[_Row]) -> list[list[_Row]]:
    """The batches the rows are decoded in: rows pruned in the decoder one by one (see `generate_batch`),
    all others in one."""
    return [[r] for r in rows] if any(r.prompt.schedule for r in rows) else [rows] if rows else []


@torch.inference_mode()
def warm_up(model: Llava, steps: Steps, tokenizer: Tokenizer, items: list[tuple], compressor: str = "none",
            retention_ratio: float = 1.0, max_new_tokens: int = 512, seed: int = 0) -> float:
    """Run each compiled call of `steps` once at the shapes of the first batch the caller will ask,
    `items` ((PIL image, question) pairs: what `generate_batch` will be given first, or the one question
    of `generate`) with the same settings, so that compilation (and on CUDA the recording of the decode
    step's graph) is paid here, not inside the first answer: the tower on their tiles as `compressor`
    calls it, the prefill at their padded length and batch (a batch's both forms: padded, and rows of
    one length), three decode steps on the KV cache sized as their answers will size it (`cache_slots`
    of the prompt and `max_new_tokens`). Nothing is answered. Returns the seconds it took.

    A later batch of another size, or whose prompts and answers need another cache bucket, compiles
    its decode step once more (the step has static shapes: CUDA graphs)."""
    device = model.device
    t0 = time.perf_counter()
    rows, _ = prepare_rows(model, tokenizer, items, compressor, retention_ratio, [max_new_tokens] * len(items), seed,
                           [None] * len(items))
    if rows:
        group = decode_groups(rows)[0]
        embeds, input_pos, schedule, positions = decoder_inputs(model, group)
        run_prefill(model, steps, embeds, input_pos, schedule)
        if input_pos.dim() == 2:  # a batch of one prompt length takes the plain form (shapes only here)
            run_prefill(model, steps, embeds, torch.arange(embeds.shape[1], device=device), ())
        if positions.shape[0] > 1:  # an answer of one token never runs a decode step
            token = torch.zeros(len(group), 1, dtype=torch.long, device=device)
            for _ in range(3):  # CUDA graphs are recorded after a warm-up call, then replayed
                steps.decode(model, token, positions[0])
    _sync(device)
    return time.perf_counter() - t0


def retry_alone(run: Callable[[list], list], keys: list) -> list:
    """`run(keys)`, one result per key; if the batch runs out of GPU memory, each key again alone, so only a
    question too large alone fails: its result is then its OutOfMemoryError (the eval runner records it,
    the lmms-eval model answers "" for it).

    The retries run after the `except` block, not inside it: there the exception's traceback still holds
    the frames of the failed batch, and with them its tensors (activations, the KV cache of the batch),
    so the retry would run next to them and empty_cache could not give their memory back. The
    exception kept as a result loses its traceback for the same reason."""
    try:
        return run(keys)
    except torch.cuda.OutOfMemoryError as e:
        failed = _released(e)
    torch.cuda.empty_cache()  # the failed batch's blocks, freed now, back to the device
    if len(keys) == 1:
        return [failed]
    del failed
    return [result for key in keys for result in _run_alone(run, key)]


def _run_alone(run: Callable[[list], list], key) -> list:
    try:
        return run([key])
    except torch.cuda.OutOfMemoryError as e:
        failed = _released(e)
    torch.cuda.empty_cache()
    return [failed]


def _released(error: BaseException) -> BaseException:
    """`error` without its traceback or the exceptions it was raised while handling: nothing of the frames
    it was raised through stays reachable from it."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def pad_left(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (T_b, D) -> (B, T, D) left-padded with zeros, and their positions: (T,) 0 .. T-1 when all
    have one length (no padding, plain causal attention), else (B, T) per row, PAD on the padding.

    Left padding rather than packing: every row's last prompt token lands on slot T-1, so each decode
    step writes one shared cache slot for all rows and the step keeps static shapes (B, 1) for
    `--compile` and CUDA graphs; row b's tokens keep positions 0 .. T_b-1 (RoPE and mask go by position,
    not slot), so a row computes what it computes alone, and padding is masked out by its PAD position."""
    lengths = [e.shape[0] for e in embeds]
    t, device = max(lengths), embeds[0].device
    if min(lengths) == t:
        return torch.stack(embeds), torch.arange(t, device=device)
    padded = torch.stack([torch.cat([e.new_zeros(t - e.shape[0], e.shape[1]), e]) for e in embeds])
    pos = torch.stack([torch.arange(t, device=device) - (t - n) for n in lengths])
    return padded, pos.clamp(min=PAD)


def decoder_inputs(model: Llava, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor]:
    """The rows' prompts left-padded (B, T, D) and their positions (`pad_left`), the schedule of a
    decoder-side method (a single row), and each answer token's positions (n, B, 1) for n = the longest
    answer; the KV cache set up for them."""
    device, b = model.device, len(rows)
    embeds, input_pos = pad_left([r.prompt.embeds for r in rows])
    t, n = embeds.shape[1], max(r.prompt.limit for r in rows)
    # slots, not positions: past the context only when rows' lengths differ so much that the longest
    # prompt plus the longest answer exceeds it
    schedule = rows[0].prompt.schedule if b == 1 else ()
    slots = cache_slots(model, t + n, schedule)
    model.llm.setup_cache(b, slots[0], layer_lengths=slots)
    lengths = torch.tensor([r.prompt.embeds.shape[0] for r in rows], device=device)
    # (n, B, 1): row b's answer token s at [s, b]; each step's (B, 1) is a contiguous tensor, as the
    # compiled (CUDA graph) step was recorded with
    positions = (lengths[None, :] + torch.arange(n, device=device)[:, None])[..., None]
    return embeds, input_pos, schedule, positions


def run_prefill(model: Llava, steps: Steps, embeds: torch.Tensor, input_pos: torch.Tensor, schedule: tuple):
    """steps.prefill of `decoder_inputs`' prompts: plain positions with the schedule, or per-row ones."""
    return steps.prefill(model, embeds, schedule) if input_pos.dim() == 1 else steps.prefill(model, embeds, (), input_pos)


def decode_batch(model: Llava, tokenizer: Tokenizer, rows: list[_Row], temperature: float, top_p: float,
                 seed: int, on_text, steps: Steps, timings: dict) -> list[list[int] | NumericsError]:
    """Prefill the rows as one left-padded batch, then decode them together through one static KV
    cache until every row has stopped (EOS or its own limit); each row's ids, or the NumericsError of a
    row whose logits became NaN or infinite (the other rows go on). Adds to timings' prefill, decode."""
    device, b = model.device, len(rows)
    embeds, input_pos, schedule, positions = decoder_inputs(model, rows)
    n = positions.shape[0]
    generators = [torch.Generator(device).manual_seed(seed) for _ in rows] if temperature > 0 else None
    reader = TokenReader(device, n, b)

    t0 = time.perf_counter()
    logits = run_prefill(model, steps, embeds, input_pos, schedule)
    next_id = sample_rows(logits, temperature, top_p, generators)
    reader.start(0, next_id)
    _sync(device)
    t1 = time.perf_counter()

    ids: list[list[int] | NumericsError] = [[] for _ in rows]
    streams = [StreamDecoder(tokenizer) for _ in rows] if on_text is not None else None
    active = set(range(b))
    for step in range(n):
        if step + 1 < n:  # queue the next step before waiting for these ids
            # A BAD_TOKEN is fed as id 0, and a stopped row goes on with whatever it sampled: its
            # later ids are never read, and rows do not see each other.
            logits = steps.decode(model, next_id.clamp(min=0).view(b, 1), positions[step])
            next_id = sample_rows(logits, temperature, top_p, generators)
            reader.start(step + 1, next_id)
        tokens = reader.read(step)
        for i in sorted(active):
            try:
                token = check_token(tokens[i], step)
            except NumericsError as e:
                ids[i] = e
                active.discard(i)
                continue
            ids[i].append(token)
            if token == tokenizer.eos_id or len(ids[i]) >= rows[i].prompt.limit:
                active.discard(i)
            if token != tokenizer.eos_id and streams is not None:
                on_text(rows[i].index, streams[i].push(token))
        if not active:
            break
    _sync(device)
    timings["prefill"] += t1 - t0
    timings["decode"] += time.perf_counter() - t1
    return ids
