"""FastV in the tools that show what a compressor kept: `globalcom2.keep_sequence` (sequence positions ->
true grid), `globalcom2.visualize --compressor fastv --prompt`, and `scripts/compression_table.py`."""

import sys
from pathlib import Path

import pytest
import torch

import globalcom2
import globalcom2.visualize as vis
import minillava.generate as gen
from globalcom2.layout import to_grid
from minillava.anyres import tile_image
from minillava.tokenizer import build_prompt
from minillava.trust import load_image
from tests.peers_cases import peer_case
from tests.test_fastv import QUESTION, deep_checkpoint, image_reference  # noqa: F401 (a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import compression_table  # noqa: E402

SHAPES = [((2, 2), (640, 480)), ((1, 3), (900, 500)), ((1, 3), (900, 200)), ((3, 1), (1000, 333)), ((2, 1), (150, 90))]


@pytest.mark.parametrize("grid, size", SHAPES)
def test_keep_sequence_maps_positions_to_the_grid(grid, size):
    image, _ = peer_case(grid, size, 4, seed=0)
    full = globalcom2.compress([image], "none")[0]
    n, P = full.tokens.shape[0], 16
    every = globalcom2.keep_sequence(full, torch.arange(n))
    assert torch.equal(every.tokens, full.tokens) and torch.equal(every.thumb_keep, full.thumb_keep)
    assert torch.equal(every.crop_keep, full.valid) and every.before == full.before

    kept = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 3].sort().values
    part = globalcom2.keep_sequence(full, kept)
    assert torch.equal(part.tokens, full.tokens[kept]) and torch.equal(part.thumb_keep, kept[kept < P])
    assert not (part.crop_keep & ~part.valid).any()
    crop_tokens = part.tokens[len(part.thumb_keep):]
    crop_tokens = crop_tokens[~(crop_tokens == image.newline).all(dim=1)]  # the kept newlines have no place
    assert torch.equal(crop_tokens, to_grid(image.crops, grid, 4)[part.crop_keep])  # raster order = sequence order
    per_crop = globalcom2.layout.to_crops(part.crop_keep, grid, 4).sum(1)
    valid = globalcom2.layout.to_crops(part.valid, grid, 4).sum(1)
    assert torch.equal(part.crop_ratio, per_crop.double() / valid.clamp(min=1).double())


@pytest.mark.parametrize("r", [0.5, 0.1])
def test_the_kept_tokens_are_the_naive_reference(deep_checkpoint, image_path, r):  # noqa: F811
    """What visualize and the table read from the cache is what the naive FastV of tests/test_fastv.py keeps,
    and the table's answer is the reference's."""
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32)
    with torch.no_grad():
        ref_ids, ref_kept, length = image_reference(model, tokenizer, image_path, r, max_new_tokens=8)
        tiles = tile_image(load_image(str(image_path)), model.cfg.grid_pinpoints, model.cfg.vision.image_size)
        features = model.encode_images([tiles], ())[0]
        full = globalcom2.compress([features], "none")[0]
        text, out = compression_table.answer(model, tokenizer, features, full, QUESTION, "fastv", r)
    start = len(tokenizer.encode_prompt(build_prompt(QUESTION))[0])
    image_kept = torch.tensor([k - start for k in ref_kept if start <= k < start + length])
    expected = globalcom2.keep_sequence(full, image_kept)
    assert out.tokens.shape[0] == round(length * r) == len(image_kept)
    assert torch.equal(out.thumb_keep, expected.thumb_keep) and torch.equal(out.crop_keep, expected.crop_keep)
    assert text == tokenizer.decode([i for i in ref_ids if i != tokenizer.eos_id])


def test_visualize_cli(capsys, deep_checkpoint, checkpoints, image_path, tmp_path):  # noqa: F811
    out = tmp_path / "kept.png"
    args = ["--image", str(image_path), "--out", str(out), "--compressor", "fastv", "--retention-ratio", "0.25"]
    with pytest.raises(SystemExit) as e:  # FastV's choice depends on the question
        vis.main(["--model", str(deep_checkpoint), *args])
    assert e.value.code == 2 and "needs --prompt" in capsys.readouterr().err
    assert vis.main(["--model", str(checkpoints["hub"]), *args, "--prompt", QUESTION]) == 1  # 2 decoder layers
    assert capsys.readouterr().err.startswith("error: FastV prunes after decoder layer 2") and not out.exists()
    assert vis.main(["--model", str(deep_checkpoint), *args, "--prompt", QUESTION]) == 0
    assert f"fastv, visual tokens 52 -> {round(52 * 0.25)}" in capsys.readouterr().out and out.exists()
