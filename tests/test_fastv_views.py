"""FastV in the tools that show what a compressor kept: `minillava.layout.on_grid` (sequence positions ->
true grid), `python -m minillava.apps.visualize --compressor fastv --prompt`, and `scripts/compression_table.py`."""

import sys
from pathlib import Path

import pytest
import torch

import minillava.apps.visualize as vis
import minillava.generate as gen
from globalcom2.layout import area_mask, to_grid
from minillava.anyres import tile_image
from minillava.compression import encode, stage_inputs
from minillava.layout import on_grid
from minillava.layout import crop_grid, pack, uncompressed_length
from minillava.tokenizer import build_prompt
from minillava.trust import load_image
from tests.peers_cases import peer_case
from tests.test_fastv import QUESTION, deep_checkpoint, image_reference  # noqa: F401 (a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import compression_table  # noqa: E402

SHAPES = [((2, 2), (640, 480)), ((1, 3), (900, 500)), ((1, 3), (900, 200)), ((3, 1), (1000, 333)), ((2, 1), (150, 90))]


@pytest.mark.parametrize("grid, size", SHAPES)
def test_on_grid_maps_sequence_positions_to_the_grid(grid, size):
    image, _ = peer_case(grid, size, 4, seed=0)
    full = pack(image.thumb, crop_grid(image.crops, grid), image.area, image.newline)  # the uncompressed sequence
    n, P = full.shape[0], 16
    assert n == uncompressed_length(image.area, 4)
    valid = area_mask(image.area, (grid[1] * 4, grid[0] * 4), "cpu")
    thumb_keep, crop_keep = on_grid(torch.arange(n), grid, image.area, 4)
    assert thumb_keep.tolist() == list(range(P)) and torch.equal(crop_keep, valid)

    kept = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 3].sort().values
    thumb_keep, crop_keep = on_grid(kept, grid, image.area, 4)
    assert torch.equal(thumb_keep, kept[kept < P])
    assert not (crop_keep & ~valid).any()
    crop_tokens = full[kept][len(thumb_keep):]
    crop_tokens = crop_tokens[~(crop_tokens == image.newline).all(dim=1)]  # the kept newlines have no place
    assert torch.equal(crop_tokens, to_grid(image.crops, grid, 4)[crop_keep])  # raster order = sequence order


@pytest.mark.parametrize("r", [0.5, 0.1])
def test_the_kept_tokens_are_the_naive_reference(deep_checkpoint, image_path, r):  # noqa: F811
    """What visualize and the table read from the cache is what the naive FastV of tests/test_fastv.py keeps,
    and the table's answer is the reference's."""
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        ref_ids, ref_kept, length = image_reference(model, tokenizer, image_path, r, max_new_tokens=8)
        tiles = tile_image(load_image(str(image_path)), model.cfg.grid_pinpoints, model.cfg.vision.image_size)
        image = encode(model, [tiles], "globalcom2")[0]
        features = stage_inputs(model, [image])[0]
        text, out = compression_table.answer(model, tokenizer, image, features, QUESTION, "fastv", r)
    start = len(tokenizer.encode_prompt(build_prompt(QUESTION))[0])
    image_kept = torch.tensor([k - start for k in ref_kept if start <= k < start + length])
    thumb_keep, crop_keep = on_grid(image_kept, image.grid, image.area, model.cfg.vision.patches_per_side)
    assert len(image_kept) == round(length * r)
    assert torch.equal(out.thumb_keep, thumb_keep) and torch.equal(out.crop_keep, crop_keep)
    assert text == tokenizer.decode([i for i in ref_ids if i != tokenizer.eos_id])


def test_visualize_cli(capsys, deep_checkpoint, checkpoints, image_path, tmp_path):  # noqa: F811
    out = tmp_path / "kept.png"
    args = ["--image", str(image_path), "--out", str(out), "--compressor", "fastv", "--retention-ratio", "0.25"]
    with pytest.raises(SystemExit) as e:  # FastV's choice depends on the question
        vis.main(["--model", str(deep_checkpoint), *args])
    assert e.value.code == 2 and "needs --prompt" in capsys.readouterr().err
    assert vis.main(["--model", str(checkpoints["hub"]), *args, "--prompt", QUESTION]) == 1  # 2 decoder layers
    assert capsys.readouterr().err.startswith("error: fastv prunes after decoder layer 2") and not out.exists()
    assert vis.main(["--model", str(deep_checkpoint), *args, "--prompt", QUESTION]) == 0
    assert f"fastv, visual tokens 52 -> {round(52 * 0.25)}" in capsys.readouterr().out and out.exists()
