"""docs/how-it-works.md stays true of the code: its snippet prints what it says, and its stage table's
"tiny" column holds the numbers the code gives.

The page is a learner's map (file, function, tensor shapes), and code restructured under it drifts
silently (issue 26). Two checks, on the shipped model (llava-next-tiny-scenes, examples/scene.png):
- the page's first ```python block runs from the repository root, and every `print(...)` line of it
  prints exactly the `# ...` comment on that line;
- every number in the tiny column of "The tensors at each stage" equals the one computed below with the
  same calls (GlobalCom2 at r = 0.25; FastV at r = 0.25 for the schedule and decoder rows). A table row
  this test does not know fails too, so no number of the column goes unchecked. The 7B column is not
  checked (no 7B weights here).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
from pathlib import Path

import torch
from PIL import Image

import globalcom2
from minillava.compression import encode, sequences, stage_inputs
from minillava.generate import cache_slots, load, prepare
from minillava.schedule import layer_lengths

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "how-it-works.md"
QUESTION = "What digit is on the red card?"  # the README's first command, the page's "tiny" example
RATIO = 0.25


def snippet() -> str:
    """The page's first ```python block."""
    match = re.search(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M)
    assert match, f"{PAGE} has no ```python block"
    return match.group(1)


def tiny_column() -> dict[str, str]:
    """{stage name ("tiles", "tower", ...): its cell in the "tiny" column} of the stage table."""
    lines = PAGE.read_text().split("## The tensors at each stage", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))  # the section's first table
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    column = header.index("tiny")
    cells = {}
    for line in table[2:]:
        row = [cell.strip() for cell in line.strip("|").split("|")]
        cells[re.fullmatch(r"\d+\. (.+)", row[0]).group(1)] = row[column]
    return cells


def numbers(text: str) -> list[str]:
    """The numbers of a cell, in order, as written."""
    return re.findall(r"\d+(?:\.\d+)?", text)


def test_snippet_prints_its_comments(monkeypatch):
    code = snippet()
    expected = []
    for line in code.splitlines():
        if line.startswith("print("):
            assert "  # " in line, f"a print line of the snippet without its expected output: {line}"
            expected.append(line.split("  # ", 1)[1].strip())
    assert len(expected) >= 8, "the snippet's print lines were not found"
    monkeypatch.chdir(ROOT)  # the snippet runs from the repository root (examples/scene.png)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(PAGE), "exec"), {"__name__": "how_it_works"})
    assert out.getvalue().splitlines() == expected


@torch.inference_mode()
def computed_column() -> dict[str, list]:
    """The numbers of each row of the tiny column, computed with the calls the table names."""
    model, tokenizer = load("llava-next-tiny-scenes")
    n_layers = model.cfg.text.num_hidden_layers
    tiles = model.tile(Image.open(ROOT / "examples" / "scene.png"))
    states = model.vision(tiles.pixels, (-2,))[-2]
    image = encode(model, [tiles], "globalcom2")[0]
    (probe,) = image.probes.values()
    features = stage_inputs(model, [image])
    thumb_scores, crop_scores = globalcom2.token_scores(features[0], "globalcom2")
    kept = globalcom2.compress(features, "globalcom2", RATIO)[0]
    tokens, before = sequences(model, [image], "globalcom2", RATIO)[0]
    uncompressed = model.image_tokens(image)
    top, bottom, left, right = image.area
    prompt = prepare(model, tokenizer, QUESTION, tokens, before, "globalcom2", RATIO, 16)
    text = tokenizer.encode_question(QUESTION)
    fastv = prepare(model, tokenizer, QUESTION, uncompressed, before, "fastv", RATIO, 16)
    (stage,) = fastv.schedule

    def prefill(p):  # the decoder's prefill of a prompt, its cache sized as generate sizes it
        slots = cache_slots(model, len(p.embeds), p.schedule)
        model.llm.setup_cache(1, slots[0], layer_lengths=slots)
        embeds = p.embeds[None]
        hidden = model.llm(embeds, torch.arange(embeds.shape[1]), prefill=True, schedule=p.schedule)
        return [*embeds.shape, *hidden.shape]

    return {
        "tiles": [*tiles.pixels.shape, *tiles.grid],
        "tower": [*states.shape],
        "projector": [*image.thumb.shape, *image.crops.shape, *image.area],
        "probe": [*probe.shape],
        "scores": [*thumb_scores.shape, *crop_scores.shape],
        "compress": [*kept.thumb_keep.shape, *kept.crop_keep.shape, int(kept.crop_keep.sum()),
                     *(f"{r:.3f}" for r in kept.crop_ratio.tolist())],
        "layout": [*tokens.shape, len(kept.thumb_keep), int(kept.crop_keep.sum()), bottom - top,
                   *uncompressed.shape, len(image.thumb), bottom - top, right - left + 1],
        "prompt": [*prompt.embeds.shape, len(text[0]), len(tokens), len(text[1])],
        "schedule": [stage.layer, stage.keep_count, stage.length,
                     *layer_lengths(fastv.schedule, len(fastv.embeds), n_layers)],
        "decoder": [*prefill(prompt), *prefill(fastv)],
    }


def test_table_tiny_column():
    page, code = tiny_column(), computed_column()
    assert set(page) == set(code), f"stage rows of the page {sorted(page)} against those checked here {sorted(code)}"
    for stage, values in code.items():
        assert numbers(page[stage]) == [str(v) for v in values], (
            f"docs/how-it-works.md, row {stage!r}: the tiny column says {page[stage]!r}; "
            f"the code gives the numbers {[str(v) for v in values]}")

