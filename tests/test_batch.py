"""Batched generation (issue 12): every row of a batch gives the ids of its question answered alone."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from minillava import batch as engine
from minillava import generate as gen
from minillava.config import TextConfig
from minillava.llama import Decoder
from minillava.tokenizer import PromptError
from tests import tiny

# Unequal images (on the tiny model's 56 px tiles: 1 to 3 crops, padded rows and columns) and questions
# of very different lengths, so the prompts differ by hundreds of tokens.
SIZES = [(150, 90), (40, 200), (300, 300), (60, 60)]
QUESTIONS = ["What is in the picture?", "Describe the image in detail. " * 12 + "Is there a cat?", "How many dots?",
             "Which colour is the text?"]
LIMITS = [12, 3, 9, 1]  # per-row max_new_tokens: rows stop at different steps


def noise(size, seed):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer_path):
    """3 decoder layers (FastV prunes before layer 2) with grouped-query attention (4 heads, 2 KV heads)."""
    hf = tiny.hf_model(seed=3, num_hidden_layers=3, num_key_value_heads=2)
    return gen.load(tiny.save_checkpoint(hf, tmp_path_factory.mktemp("batch") / "tf5", "tf5", tokenizer_path, shards=1))


def items():
    return [(noise(size, i), q) for i, (size, q) in enumerate(zip(SIZES, QUESTIONS))]


def alone(model, tokenizer, compressor, limits=LIMITS, **kw):
    return [gen.generate(model, tokenizer, image, q, compressor, 0.5, n, **kw) for (image, q), n in zip(items(), limits)]


@pytest.mark.parametrize("compressor", ["none", "globalcom2", "globalcom2-paper", "random", "fastv"])
def test_rows_equal_their_question_alone(loaded, compressor):
    """Greedy ids and token counts of each row equal generate() of that question alone. fastv rows are
    decoded one by one (their pruned layers hold a different count per row), the others as one batch."""
    model, tokenizer = loaded
    batch = engine.generate_batch(model, tokenizer, items(), compressor, 0.5, LIMITS)
    single = alone(model, tokenizer, compressor)
    lengths = {len(r.token_ids) for r in batch}
    assert len(lengths) > 1  # rows really stop at different steps
    for got, want in zip(batch, single, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.visual_tokens == want.visual_tokens


def test_rows_stop_early_at_eos(loaded):
    """A row that reaches EOS stops there while the others go on: EOS is made the id that row 0 emits
    third alone, so row 0 stops after 3 tokens, and a row that never emits it runs to its limit."""
    model, tokenizer = loaded
    free = alone(model, tokenizer, "globalcom2", limits=[12] * 4)
    eos_tok = copy.copy(tokenizer)
    eos_tok.eos_id = free[0].token_ids[2]
    want = alone(model, eos_tok, "globalcom2", limits=[12] * 4)
    got = engine.generate_batch(model, eos_tok, items(), "globalcom2", 0.5, 12)
    assert want[0].token_ids == free[0].token_ids[: free[0].token_ids.index(eos_tok.eos_id) + 1]
    assert any(len(w.token_ids) == 12 for w in want)  # some row is not stopped by it
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_sampling_draws_per_row_as_alone(loaded):
    """temperature > 0: each row has its own generator seeded with `seed`, so it draws what it draws
    alone; its tokens equal the single run's (float rounding of the batched products could in principle
    move a draw across a boundary; on these cases it does not)."""
    model, tokenizer = loaded
    batch = engine.generate_batch(model, tokenizer, items(), "none", 1.0, 8, temperature=0.9, top_p=0.9, seed=5)
    single = alone(model, tokenizer, "none", limits=[8] * 4, temperature=0.9, top_p=0.9, seed=5)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]


def test_a_failing_row_fails_alone(loaded, monkeypatch):
    """A prompt error in one row and NaN logits in another: with return_exceptions those rows hold
    their errors and the other rows their usual answers; without, the first error is raised."""
    model, tokenizer = loaded
    batch = items()
    batch[1] = (batch[1][0], "bad \ud800 question")  # a lone surrogate: PromptError
    want = alone(model, tokenizer, "globalcom2")
    logits = model.logits

    def nan_in_row_2(hidden):  # row 2 of every call with 3 rows (rows 0, 2, 3 reach the decoder)
        out = logits(hidden)
        if out.shape[0] == 3:
            out[1] = float("nan")
        return out

    monkeypatch.setattr(model, "logits", nan_in_row_2)
    got = engine.generate_batch(model, tokenizer, batch, "globalcom2", 0.5, LIMITS, return_exceptions=True)
    assert isinstance(got[1], PromptError)
    assert isinstance(got[2], gen.NumericsError) and "answer token 1" in str(got[2])
    assert got[0].token_ids == want[0].token_ids and got[3].token_ids == want[3].token_ids
    with pytest.raises(PromptError):
        engine.generate_batch(model, tokenizer, batch, "globalcom2", 0.5, LIMITS)


def test_streamed_text_per_row(loaded):
    """on_text(i, piece) streams each row as generate's on_text streams that question alone."""
    model, tokenizer = loaded
    texts = ["", "", "", ""]

    def on_text(i, s):
        texts[i] += s

    engine.generate_batch(model, tokenizer, items(), "none", 1.0, LIMITS, on_text=on_text)
    want = []
    for (image, q), n in zip(items(), LIMITS):
        pieces = []
        gen.generate(model, tokenizer, image, q, "none", 1.0, n, on_text=pieces.append)
        want.append("".join(pieces))
    assert texts == want and any(texts)


def test_left_padded_decoder_equals_each_prompt_alone():
    """Decoder level, grouped-query attention: prompts of 3, 9 and 6 tokens left-padded into one batch,
    then 4 cached steps at per-row positions, give each prompt's logits alone (padding never seen)."""
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    dec = Decoder(cfg).eval()
    prompts = [torch.randn(n, 32) for n in (3, 9, 6)]
    steps = torch.randn(3, 4, 32)
    with torch.no_grad():
        want = []
        for i, p in enumerate(prompts):
            dec.setup_cache(1, 16)
            out = [dec(p[None], torch.arange(len(p)), prefill=True)[:, -1:]]
            out += [dec(steps[i : i + 1, s : s + 1], torch.tensor([len(p) + s])) for s in range(4)]
            want.append(torch.cat(out, dim=1))
        embeds, pos = engine.pad_left(prompts)
        assert pos.tolist()[0] == [-1] * 6 + [0, 1, 2]
        dec.setup_cache(3, 16)
        got = [dec(embeds, pos, prefill=True)[:, -1:]]
        lengths = torch.tensor([3, 9, 6])
        got += [dec(steps[:, s : s + 1], (lengths + s)[:, None]) for s in range(4)]
    torch.testing.assert_close(torch.cat(got, dim=1), torch.cat(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_batch_gives_the_eager_ids(loaded):
    """--compile with a batch: the decode step compiled for (B, 1) (about 40 s of compiling)."""
    model, tokenizer = loaded
    eager = engine.generate_batch(model, tokenizer, items(), "globalcom2", 0.5, LIMITS)
    steps = gen.compile_steps(model)
    engine.warm_up(model, steps, tokenizer, items(), "globalcom2", 0.5, max(LIMITS))
    compiled = engine.generate_batch(model, tokenizer, items(), "globalcom2", 0.5, LIMITS, steps=steps)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]

