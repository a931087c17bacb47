"""Greedy answers of every compressor, recorded once: a refactoring that changes none of them keeps the
project's behaviour (the tokens each method keeps decide the ids, so a changed selection shows here).

Two models: the shipped tiny model (trained; 4 decoder layers, so FastV runs) on held-out synthetic
scenes of both families, and the tests' tiny random checkpoint (hub layout) on a noise picture, where
any change of the numbers moves the ids. Re-record (only when a change of behaviour is intended, and
say so in the commit):

    python -m tests.test_golden
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from minillava import generate as gen
from minillava.batch import generate_batch
from minillava.compression import compressors
from minillava.eval import synthetic as S

GOLDEN = Path(__file__).parent / "data" / "golden_ids.json"
RATIOS = (0.5, 0.25, 0.1)
SCENES = [("card", 0), ("card", 1), ("dense", 0), ("dense", 1)]


def shipped_answers() -> dict:
    model, tokenizer = gen.load(gen.DEFAULT_MODEL, "cpu", torch.float32)
    items = []
    for family, i in SCENES:
        s = S.sample(S.DEFAULT_SEED, "test", i, family=family)
        items.append((s.scene.image, S.prompt(s.question)))
    out = {}
    for method in compressors():
        for r in RATIOS:
            results = generate_batch(model, tokenizer, items, method, r, max_new_tokens=4)
            out[f"{method}@{r}"] = [[res.token_ids, res.visual_tokens["before"], res.visual_tokens["after"]]
                                    for res in results]
    return out


def random_answers(checkpoint: Path, image_path: Path) -> dict:
    from PIL import Image

    model, tokenizer = gen.load(str(checkpoint), "cpu", torch.float32)
    image = Image.open(image_path).convert("RGB")
    out = {}
    for method in compressors():
        if method == "fastv":  # the random checkpoint has 2 decoder layers: FastV needs more
            continue
        for r in RATIOS:
            res = gen.generate(model, tokenizer, image, "What is in the picture?", method, r, max_new_tokens=8)
            out[f"{method}@{r}"] = [res.token_ids, res.visual_tokens["before"], res.visual_tokens["after"]]
    return out


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def test_shipped_model_answers_as_recorded(golden):
    assert shipped_answers() == golden["shipped"]


def test_random_checkpoint_answers_as_recorded(golden, checkpoints, image_path):
    assert random_answers(checkpoints["hub"], image_path) == golden["random"]


def record():
    import tempfile

    from PIL import Image
    import numpy as np

    from tests import tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tiny.train_tokenizer(tmp / "tokenizer.model")
        ckpt = tiny.save_checkpoint(tiny.hf_model(seed=0), tmp / "hub", "hub", tok)
        rng = np.random.default_rng(7)  # the conftest's `image_path`
        Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(tmp / "scene.png")
        data = {"shipped": shipped_answers(), "random": random_answers(ckpt, tmp / "scene.png")}
    lines = [f'"{part}": {{\n' + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items()) + "\n}"
             for part, rows in data.items()]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    record()
