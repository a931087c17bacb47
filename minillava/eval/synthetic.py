"""Synthetic high-resolution scenes whose answers live in details only the AnyRes crops show.

A scene is a cluttered pastel background with one small coloured card showing a digit, and the
question asks for that digit: "What digit is on the red card?", a single-word answer. Sizes are
chosen so that the card (its colour) survives the thumbnail but its digit does not:

    original image     2 x the AnyRes canvas (448 x 448, 672 x 224, 448 x 336, ...)
    AnyRes canvas      the card about 12 px with a digit about 9 px tall, inside one 14 px patch cell
    thumbnail 112 px   the card 3 to 6 px wide, its digit a blur of 2 to 4 px

So the answer sits in one visual token of the crops out of about 350: the needle a compressor must
keep. (Scenes with several cards, `cards=(3, 5)`, train the tower; the tiny decoder trained here does
not learn to pick a card by its colour in the hour it gets, so the held-out questions have one card.)
The card sits in a 14 px patch cell of the canvas (give or take a pixel), never across a crop border.

A second family, "dense" (`sample(..., family="dense")`), is where the per-crop budget matters: 3 to 8
cards gathered in a window of 6 x 6 patch cells that falls in one crop or straddles the border of two,
clutter elsewhere, and the question "What is the largest digit?". One card decides (its digit is the
only largest; the others are smaller, repeats allowed, so the answer is uniform over 1-9 and cannot be
guessed from the count), and it can be any of the cards. At r = 0.1 a crop keeps int(64 x 0.1) = 6 of
its 64 tokens under a uniform budget: not every card of the dense crop, while a budget that follows the
thumbnail can give that crop up to 1.75 r (4 crops) of them.
Everything is drawn with PIL from a numpy generator seeded by (seed, split, index), so a split is the
same on every run: `sample(seed, split, index)`. `write_split` writes one in LLaVA's evaluation layout
(question file, image folder, answers), which the `synthetic` task of the evaluation harness scores.

    python -m minillava.eval.synthetic --out data/synthetic --n 500     # the held-out test split
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 150, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 20),
    "purple": (135, 50, 175),
    "orange": (245, 125, 15),
    "pink": (245, 115, 185),
    "brown": (120, 70, 30),
}
DARK_INK = ("yellow", "orange", "pink")  # cards light enough for a black digit; the others get white
DIGITS = "0123456789"
SCALE = 2  # original image pixels per canvas pixel
CELL = 14 * SCALE  # one patch of the canvas, in original pixels
# Original sizes (w, h): 2 x a pinpoint, or 2 x a padded fit (448 x 336 -> 224 x 168 on a 224 x 224 canvas).
SIZES = [(448, 448), (448, 224), (224, 448), (672, 224), (224, 672), (448, 336), (336, 448)]
SPLITS = {"train": 0, "test": 1, "val": 2}
FAMILIES = ("card", "dense")  # one card and its colour; several cards in one region and their largest digit
TILE = 112  # the tile and pinpoints (w, h) the scenes are drawn for: LLaVA-1.6's divided by 3 (train_tiny.py)
PINPOINTS = [(112, 224), (224, 112), (224, 224), (336, 112), (112, 336)]
DENSE_CARDS = (3, 8)  # fewest and most cards of a dense scene (at most one per colour)
DENSE_WINDOW = 6  # side of the dense region, in patch cells; cards on every other cell of it (<= 9 places)
DEFAULT_SEED = 0
TEMPLATES = {
    "digit": "What digit is on the {colour} card?",
    # Asked of multi-card scenes in earlier experiments (see train_tiny.py); still in the tokenizer's
    # corpus, so that the shipped tokenizer is the one train_tiny.py trains.
    "colour": "What colour is the card with the digit {digit}?",
    "largest": "What is the largest digit?",  # the dense family's question
}
CARDS = (1, 1)  # fewest and most cards in a scene
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass
class Card:
    colour: str
    digit: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in original image pixels


@dataclass
class Scene:
    image: Image.Image
    cards: list[Card]


@dataclass
class Sample:
    scene: Scene
    question: str  # the question alone; the prompt adds SHORT_ANSWER on a second line
    answer: str
    category: str  # a key of TEMPLATES


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Pale vertical gradient, faint noise and a few large pastel shapes: clutter that is not a card."""
    w, h = size
    top, bottom = rng.uniform(185, 245, 3), rng.uniform(185, 245, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    pixels = top * (1 - t) + bottom * t + rng.normal(0, 6, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):
        colour = tuple(int(c) for c in rng.uniform(150, 235, 3))
        x0, y0 = rng.uniform(-0.2, 0.9) * w, rng.uniform(-0.2, 0.9) * h
        x1, y1 = x0 + rng.uniform(0.15, 0.6) * w, y0 + rng.uniform(0.15, 0.6) * h
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(4, 14)))
    return image.filter(ImageFilter.GaussianBlur(1.5))


def _free_cells(rng: np.random.Generator, columns: int, rows: int, n: int) -> list[tuple[int, int]]:
    """n cells of the patch grid, no two touching (not even diagonally), in random order."""
    cells = [(c, r) for r in range(rows) for c in range(columns)]
    order = rng.permutation(len(cells))
    chosen: list[tuple[int, int]] = []
    for i in order:
        c, r = cells[i]
        if all(abs(c - c2) > 1 or abs(r - r2) > 1 for c2, r2 in chosen):
            chosen.append((c, r))
            if len(chosen) == n:
                break
    return chosen


def _draw_card(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cell: tuple[int, int], colour: str,
               digit: str) -> Card:
    """A card of `colour` showing `digit`, centred in patch cell (column, row) of the original image."""
    c, r = cell
    side = int(rng.integers(23, 27))  # card side in original pixels, centred in its 28 px cell ...
    x0 = c * CELL + (CELL - side) // 2 + int(rng.integers(-1, 2))  # ... give or take a pixel
    y0 = r * CELL + (CELL - side) // 2 + int(rng.integers(-1, 2))
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    draw.rectangle(box, fill=COLOURS[colour])
    ink = (0, 0, 0) if colour in DARK_INK else (255, 255, 255)
    font = ImageFont.load_default(size=24)
    draw.text(((box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2), digit, fill=ink, font=font, anchor="mm")
    return Card(colour, digit, box)


def make_scene(rng: np.random.Generator, cards: tuple[int, int] = CARDS) -> Scene:
    """One scene: a size from SIZES, background clutter and cards[0] to cards[1] cards of distinct
    colours and digits."""
    w, h = SIZES[rng.integers(len(SIZES))]
    image = _background(rng, (w, h))
    draw = ImageDraw.Draw(image)
    n = int(rng.integers(cards[0], cards[1] + 1))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n]]
    digits = [DIGITS[i] for i in rng.permutation(len(DIGITS))[:n]]
    cells = _free_cells(rng, w // CELL, h // CELL, n)
    return Scene(image, [_draw_card(draw, rng, cell, c, d) for cell, c, d in zip(cells, colours, digits)])


def cell_crops(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Which crop each patch cell of an image of `size` (w, h) falls in, under AnyRes with PINPOINTS
    and TILE: (crop column of each cell column, crop row of each cell row, gw). Cell (c, r) is in crop
    rows[r] * gw + columns[c]."""
    w, h = size
    centre = lambda n: (np.arange(n) + 0.5) * CELL  # noqa: E731  cell centres, in original pixels
    x, y, width = to_canvas(size, PINPOINTS, centre(w // CELL), centre(h // CELL))
    return (x // TILE).astype(int), (y // TILE).astype(int), width // TILE


def _dense_window(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    """Top-left cell (column, row) of a DENSE_WINDOW-square window of cells inside one crop or, half the
    time, straddling the border between two neighbouring crops (never a corner of four)."""
    columns, rows, _ = cell_crops(size)
    starts = []  # per axis: the window starts that keep it inside one crop, or across one border
    straddle = rng.random() < 0.5
    split = [a for a, crops in enumerate((columns, rows)) if len(set(crops)) > 1]  # axes with a crop border
    axis = split[rng.integers(2)] if len(split) == 2 else split[0]
    for a, crops in enumerate((columns, rows)):
        inside = [s for s in range(len(crops) - DENSE_WINDOW + 1) if crops[s] == crops[s + DENSE_WINDOW - 1]]
        across = [s for s in range(len(crops) - DENSE_WINDOW + 1) if crops[s] != crops[s + DENSE_WINDOW - 1]]
        starts.append(across if straddle and a == axis else inside)
    return int(rng.choice(starts[0])), int(rng.choice(starts[1]))


def make_dense_scene(rng: np.random.Generator) -> Scene:
    """A dense scene: DENSE_CARDS cards of distinct colours on every other cell of a DENSE_WINDOW window
    (`_dense_window`), background clutter elsewhere. One card has the largest digit, uniform over 1-9;
    the others show smaller digits, uniform and possibly repeated."""
    w, h = SIZES[rng.integers(len(SIZES))]
    image = _background(rng, (w, h))
    draw = ImageDraw.Draw(image)
    x, y = _dense_window(rng, (w, h))
    dx, dy = rng.integers(2, size=2)  # which parity of the window's cells the cards sit on
    places = [(c, r) for r in range(y + dy, y + DENSE_WINDOW, 2) for c in range(x + dx, x + DENSE_WINDOW, 2)]
    n = int(rng.integers(DENSE_CARDS[0], DENSE_CARDS[1] + 1))
    cells = [places[i] for i in rng.permutation(len(places))[:n]]
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n]]
    largest = int(rng.integers(1, 10))
    digits = [largest] + [int(d) for d in rng.integers(largest, size=n - 1)]
    digits = [str(digits[i]) for i in rng.permutation(n)]  # the largest on any card
    return Scene(image, [_draw_card(draw, rng, cell, c, d) for cell, c, d in zip(cells, colours, digits)])


def card_cells(card: Card, size: tuple[int, int], pinpoints, tile: int, patch: int = 14):
    """Where the centre of a card of an image of `size` (w, h) lands in the model's tokens:
    ((row, col) on the thumbnail's patch grid, (row, col) on the crops' token grid H x W, the layout
    of `globalcom2.Compressed.crop_keep`), for AnyRes with these pinpoints and tile size."""
    w0, h0 = size
    x, y = (card.box[0] + card.box[2] + 1) / 2, (card.box[1] + card.box[3] + 1) / 2  # original pixels
    canvas_x, canvas_y, _ = to_canvas(size, pinpoints, x, y)
    thumb_x, thumb_y = x / w0 * tile, y / h0 * tile
    return (int(thumb_y // patch), int(thumb_x // patch)), (int(canvas_y // patch), int(canvas_x // patch))


def to_canvas(size: tuple[int, int], pinpoints, x, y):
    """Original-image pixel coordinates x, y (numbers or arrays) of an image of `size` (w, h) -> their
    place on the AnyRes canvas of these pinpoints: (canvas x, canvas y, canvas width)."""
    from ..anyres import canvas_placement

    (width, _), (left, top, new_w, _) = canvas_placement(size, pinpoints)
    scale = new_w / size[0]
    return left + scale * x, top + scale * y, width


def make_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, category): the digit on one card of the scene."""
    card = scene.cards[rng.integers(len(scene.cards))]
    return TEMPLATES["digit"].format(colour=card.colour), card.digit, "digit"


def deciding_card(s: Sample) -> Card:
    """The card whose token the answer needs: the one card of a card scene, the largest digit of a dense one."""
    return max(s.scene.cards, key=lambda card: card.digit) if s.category == "largest" else s.scene.cards[0]


def sample(seed: int, split: str, index: int, cards: tuple[int, int] = CARDS, family: str = "card") -> Sample:
    """Scene and question number `index` of a split and family: the same on every call. For the card
    family, `cards` is the range of the number of cards: one for the task, (3, 5) for the tower's
    pretraining in train_tiny.py. The dense family draws from its own stream of the same seed."""
    if family == "dense":
        scene = make_dense_scene(np.random.default_rng([seed, SPLITS[split], index, 1]))
        return Sample(scene, TEMPLATES["largest"], max(card.digit for card in scene.cards), "largest")
    if family != "card":
        raise ValueError(f"unknown scene family {family!r}; expected one of {', '.join(FAMILIES)}")
    rng = rng_for(seed, split, index)
    scene = make_scene(rng, cards)
    return Sample(scene, *make_question(scene, rng))


def prompt(question: str) -> str:
    """What the model is asked after `<image>\\n`, as LLaVA's short-answer benchmarks do."""
    return f"{question}\n{SHORT_ANSWER}"


def tokenizer_corpus() -> list[str]:
    """Every text the model reads or writes: the prompt, each question and each answer."""
    from ..tokenizer import build_prompt

    lines = [build_prompt(prompt(TEMPLATES["digit"].format(colour=c, digit=""))) for c in COLOURS]
    lines += [build_prompt(prompt(TEMPLATES["colour"].format(colour="", digit=d))) for d in DIGITS]
    lines += [build_prompt(prompt(TEMPLATES["largest"]))]
    lines += [f"{a}" for a in [*COLOURS, *DIGITS]]
    return lines


def question_id(split: str, index: int, family: str = "card") -> str:
    return f"{split}-{index:05d}" if family == "card" else f"{family}-{split}-{index:05d}"


def write_split(out: Path, n: int, split: str = "test", seed: int = DEFAULT_SEED, family: str = "card") -> Path:
    """Write samples 0..n-1 of a split of a family in LLaVA's evaluation layout:

        out/questions.jsonl   {"question_id", "image", "text", "category"} per line
        out/images/<id>.png
        out/answers.json      {question_id: answer}
    """
    from .files import write_atomic

    (out / "images").mkdir(parents=True, exist_ok=True)
    answers, rows = {}, []
    for i in range(n):
        s = sample(seed, split, i, family=family)
        qid = question_id(split, i, family)
        png = io.BytesIO()
        s.scene.image.save(png, format="PNG")
        write_atomic(out / "images" / f"{qid}.png", png.getvalue())
        rows.append({"question_id": qid, "image": f"{qid}.png", "text": prompt(s.question), "category": s.category})
        answers[qid] = s.answer
    write_atomic(out / "questions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    write_atomic(out / "answers.json", json.dumps(answers, indent=0) + "\n")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minillava.eval.synthetic",
                                description="Write a split of the synthetic scenes in LLaVA's evaluation layout.")
    p.add_argument("--out", type=Path, required=True, help="folder to write (questions.jsonl, images/, answers.json)")
    p.add_argument("--n", type=int, default=500, help="number of questions (default 500)")
    p.add_argument("--split", choices=list(SPLITS), default="test", help="which split (default test; train is what training sees)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    p.add_argument("--family", choices=FAMILIES, default="card",
                   help="card: one card, 'What digit is on the red card?' (default); dense: 3 to 8 cards in one "
                   "region, 'What is the largest digit?' (the synthetic-dense task)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    write_split(args.out, args.n, args.split, args.seed, args.family)
    print(f"wrote {args.n} {args.split} questions of the {args.family} family to {args.out}")


if __name__ == "__main__":
    main()
