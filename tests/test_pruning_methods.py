"""What every method that prunes inside the decoder or the vision tower promises, read from the method table
(globalcom2/methods.py), so a new one is held to it without a copy of these tests: at r = 1 it answers
exactly as `none` (ids and token counts), `generate_batch` gives each row what the question gets alone
(these methods' rows are decoded one by one, minillava/batch.py), and a decoder too shallow for a decoder
method's stages is one error line. Each method's own file checks its rule against the published code."""

import json

import pytest
import torch
from PIL import Image

import globalcom2
from minillava import generate as gen
from minillava.batch import generate_batch
from tests.test_fastv import QUESTION, deep_checkpoint  # noqa: F401 (a fixture: 4 decoder layers)

PRUNING = [m for m, entry in globalcom2.METHODS.items() if entry.place in (globalcom2.DECODER, globalcom2.TOWER)]
RATIO = {"ficoco": 0.5}  # the tiny tower merges at most half a layer's tokens (globalcom2/ficoco.py); else 0.25


def run_json(capsys, model_dir, image_path, *extra):
    """The CLI's JSON answer (12 tokens at most) to QUESTION about `image_path`."""
    code = gen.main([str(a) for a in ("--model", model_dir, "--image", image_path, "--prompt", QUESTION,
                                      "--max-new-tokens", 12, "--json", *extra)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", PRUNING)
def test_r_1_answers_as_none(capsys, deep_checkpoint, image_path, method):
    pruned = run_json(capsys, deep_checkpoint, image_path, "--compressor", method, "--retention-ratio", 1)
    none = run_json(capsys, deep_checkpoint, image_path, "--compressor", "none")
    assert pruned["token_ids"] == none["token_ids"] and pruned["visual_tokens"] == none["visual_tokens"]


@pytest.mark.parametrize("method", PRUNING)
def test_batch_rows_equal_their_question_alone(deep_checkpoint, image_path, method):
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32)
    images = [Image.open(image_path), Image.open(image_path).resize((90, 150)), Image.open(image_path).resize((200, 60))]
    questions = [QUESTION, "What colour is it?", "Describe it."]
    r = RATIO.get(method, 0.25)
    with torch.no_grad():
        batch = generate_batch(model, tokenizer, list(zip(images, questions)), method, r, max_new_tokens=5)
        alone = [gen.generate(model, tokenizer, im, q, method, r, max_new_tokens=5) for im, q in zip(images, questions)]
    for got, want in zip(batch, alone, strict=True):
        assert got.token_ids == want.token_ids and got.visual_tokens == want.visual_tokens
    assert batch[0].visual_tokens["after"] < batch[0].visual_tokens["before"]  # it pruned


@pytest.mark.parametrize("method", [m for m in PRUNING if globalcom2.METHODS[m].place == globalcom2.DECODER])
def test_a_decoder_too_shallow_is_one_error_line(capsys, checkpoints, image_path, method):
    code = gen.main(["--model", str(checkpoints["hub"]), "--image", str(image_path), "--prompt", QUESTION,
                     "--compressor", method])  # 2 decoder layers: no method here prunes after layer 1
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {method} prunes ") and "decoder layers" in err, err
    assert len(err.strip().splitlines()) == 1
