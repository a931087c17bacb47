"""Greedy answers of every compressor, recorded once: a refactoring that changes none of them keeps the
project's behaviour (the tokens each method keeps decide the ids, so a changed selection shows here).

Two models: the shipped tiny model (trained; 4 decoder layers, so FastV runs) and the tests' tiny random
checkpoint (hub layout), where any change of the numbers moves the ids. The images are fixed tiles,
seeded noise given to the model as `tile_image` would give them: what is recorded is everything after
tiling (tower, probes, compressors, layout, decoder), and it does not move with Pillow's resampling
(which differs between Pillow 12 and 13; the tiler itself is checked against transformers' image
processor in tests/test_anyres.py). Re-record (only when a change of behaviour is intended, and say so
in the commit):

    python -m tests.test_golden
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minillava import generate as gen
from minillava.anyres import Tiles

GOLDEN = Path(__file__).parent / "data" / "golden_ids.json"
RATIOS = (0.5, 0.25, 0.1)
QUESTION = "What digit is on the red card?"
# (grid (gw, gh), original size (w0, h0)): square, padded rows, padded columns, three crops in a row
SHIPPED_IMAGES = [((2, 2), (448, 448)), ((2, 1), (300, 120)), ((1, 3), (100, 330)), ((3, 1), (400, 120))]
RANDOM_IMAGES = [((2, 1), (150, 90))]


def fixed_tiles(grid, size, tile: int, seed: int) -> Tiles:
    """Seeded CLIP-normalised noise for the thumbnail and every crop."""
    g = torch.Generator().manual_seed(seed)
    return Tiles(torch.randn(1 + grid[0] * grid[1], 3, tile, tile, generator=g), grid, size)


@contextlib.contextmanager
def tiles_for(images: dict):
    """Make the pipeline's tiler return the fixed tiles of each placeholder image (keyed by its size)."""
    # wherever the code calls the tiler: generate.py and batch.py before, the model's `tile` since
    # LLaVA-OneVision (issue 19), whose tower chooses the normalisation
    modules = [m for m in ("minillava.generate", "minillava.batch", "minillava.model")
               if importlib.util.find_spec(m) and hasattr(importlib.import_module(m), "tile_image")]
    saved = {m: importlib.import_module(m).tile_image for m in modules}
    for m in modules:
        importlib.import_module(m).tile_image = lambda image, *args, **kwargs: images[image.size]
    try:
        yield
    finally:
        for m, f in saved.items():
            importlib.import_module(m).tile_image = f


def compressors() -> tuple[str, ...]:
    if hasattr(gen, "COMPRESSORS"):  # the code before minillava/compression.py existed, for recording
        return gen.COMPRESSORS
    from minillava.compression import compressors as names
    return names()


def runs_on(method: str, layers: int) -> bool:
    """Whether `method` can prune a decoder of `layers` layers (FastV needs 3, PyramidDrop 4)."""
    if method == "fastv":  # the code before minillava/schedule.py existed, for recording
        return layers > 2
    from minillava.schedule import build
    from minillava.trust import ConfigError

    try:
        build(method, 0, 1, 1.0, layers)
    except ConfigError:
        return False
    return True


def runs_at(model, method: str, r: float) -> bool:
    """Whether a method that prunes inside the tower (FiCoCo-V) can run at r on this tower (it refuses an r
    that would merge more than half a layer's tokens); every other method runs at every r."""
    try:
        from minillava.compression import tower_schedule
    except ImportError:  # the code before tower methods existed, for recording
        return True
    from minillava.trust import ConfigError

    try:
        tower_schedule(model, method, r)
    except ConfigError:
        return False
    return True


def generate_batch(*args, **kwargs):
    if hasattr(gen, "generate_batch"):  # the code before minillava/batch.py existed, for recording
        return gen.generate_batch(*args, **kwargs)
    from minillava.batch import generate_batch as run
    return run(*args, **kwargs)


def answers(model, tokenizer, specs, batch: bool, max_new_tokens: int) -> dict:
    tile = model.cfg.vision.image_size
    tiles = {size: fixed_tiles(grid, size, tile, seed) for seed, (grid, size) in enumerate(specs)}
    placeholders = [Image.new("RGB", size) for _, size in specs]  # stand-ins: only their size is read
    layers, out = model.cfg.text.num_hidden_layers, {}
    with tiles_for(tiles):
        for method in compressors():
            if not runs_on(method, layers):  # a decoder-side method on a decoder too shallow for it
                continue
            for r in RATIOS:
                if not runs_at(model, method, r):  # a tower method at an r its tower cannot merge to
                    continue
                if batch:
                    results = generate_batch(model, tokenizer, [(p, QUESTION) for p in placeholders], method, r,
                                             max_new_tokens=max_new_tokens)
                else:
                    results = [gen.generate(model, tokenizer, p, QUESTION, method, r, max_new_tokens=max_new_tokens)
                               for p in placeholders]
                out[f"{method}@{r}"] = [[res.token_ids, res.visual_tokens["before"], res.visual_tokens["after"]]
                                        for res in results]
    return out


def shipped_answers() -> dict:
    """The shipped model, all images as one batch (the batch engine)."""
    model, tokenizer = gen.load(gen.DEFAULT_MODEL, "cpu", torch.float32)
    return answers(model, tokenizer, SHIPPED_IMAGES, batch=True, max_new_tokens=6)


def random_answers(checkpoint: Path) -> dict:
    """The random checkpoint, one question at a time (the single path)."""
    model, tokenizer = gen.load(str(checkpoint), "cpu", torch.float32)
    return answers(model, tokenizer, RANDOM_IMAGES, batch=False, max_new_tokens=8)


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def test_shipped_model_answers_as_recorded(golden):
    assert shipped_answers() == golden["shipped"]


def test_random_checkpoint_answers_as_recorded(golden, checkpoints):
    assert random_answers(checkpoints["hub"]) == golden["random"]


def record():
    import tempfile

    from tests import tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tiny.train_tokenizer(tmp / "tokenizer.model")
        ckpt = tiny.save_checkpoint(tiny.hf_model(seed=0), tmp / "hub", "hub", tok)
        data = {"shipped": shipped_answers(), "random": random_answers(ckpt)}
    lines = [f'"{part}": {{\n' + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items()) + "\n}"
             for part, rows in data.items()]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    record()
