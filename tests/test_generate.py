"""The command line end to end: greedy ids equal transformers', JSON contract, streaming, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minillava import generate as gen
from minillava import weights
from minillava.anyres import tile_image
from minillava.tokenizer import Tokenizer, build_prompt
from minillava.trust import load_image
from tests import tiny
from tests.peers_cases import tower_run

QUESTION = "What is in the picture?"


def run_cli(capsys, *args):
    code = gen.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, model_dir, image_path, *extra, compressor=("--compressor", "none")):
    code, out, err = run_cli(capsys, "--model", model_dir, "--image", image_path, "--prompt", QUESTION,
                             "--max-new-tokens", 12, "--json", *compressor, *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_greedy_ids_equal_transformers(capsys, checkpoints, hf_model, tokenizer_path, image_path, layout):
    result = run_json(capsys, checkpoints[layout], image_path)

    tok = Tokenizer(tokenizer_path)
    chunks = tok.encode_prompt(build_prompt(QUESTION))
    tiles = tile_image(load_image(str(image_path)), [tuple(p) for p in tiny.PINPOINTS_WH], tiny.TILE)
    n_image = result["visual_tokens"]["after"]
    ids = torch.tensor([chunks[0] + [tiny.IMAGE_TOKEN] * n_image + chunks[1]])
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=ids, pixel_values=tiles.pixels[None], image_sizes=torch.tensor([[90, 150]]),
            max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0,
        )
    expected = out[0, ids.shape[1]:].tolist()
    assert result["token_ids"] == expected
    assert result["text"] == tok.decode(expected)


def test_json_contract(capsys, checkpoints, image_path):
    result = run_json(capsys, checkpoints["tf5"], image_path)
    assert set(result) >= {"text", "token_ids", "visual_tokens", "timings_s", "decode_tokens_per_s"}
    # 150 x 90 on 56 px tiles: best canvas 112 x 56 (2 x 1 crops), 8 x 4 tokens, 150/90 is wider than
    # 8/4, so rows are unpadded: new_h = int(90 * 8 / 150) = 4, all 4 rows valid -> 16 + 4 * (8 + 1).
    assert result["visual_tokens"] == {"before": 16 + 4 * 9, "after": 16 + 4 * 9}
    assert set(result["timings_s"]) == {"load", "vision", "compress", "prefill", "decode"}
    assert len(result["token_ids"]) == 12 and result["decode_tokens_per_s"] > 0


def test_streamed_text_equals_json_text(capsys, checkpoints, image_path):
    result = run_json(capsys, checkpoints["hub"], image_path)
    code, out, err = run_cli(capsys, "--model", checkpoints["hub"], "--image", image_path, "--prompt", QUESTION,
                             "--max-new-tokens", 12, "--compressor", "none")
    assert code == 0
    assert out.rstrip("\n") == result["text"]
    assert "visual tokens 52 -> 52" in err and len(err.strip().splitlines()) == 1


def test_sampling_is_seeded(capsys, checkpoints, image_path):
    args = ("--temperature", 1.5, "--top-p", 0.95)
    a = run_json(capsys, checkpoints["hub"], image_path, *args, "--seed", 1)
    b = run_json(capsys, checkpoints["hub"], image_path, *args, "--seed", 1)
    c = run_json(capsys, checkpoints["hub"], image_path, *args, "--seed", 2)
    assert a["token_ids"] == b["token_ids"]
    assert a["token_ids"] != c["token_ids"]


def test_top_p_keeps_the_smallest_head_reaching_p():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    g = torch.Generator().manual_seed(0)
    assert {gen.sample(logits, 1.0, 0.5, g).item() for _ in range(50)} == {0}
    assert {gen.sample(logits, 1.0, 0.8, g).item() for _ in range(200)} == {0, 1}
    assert gen.sample(logits, 0.0, 1.0, None).item() == 0


def test_ids_past_the_tokenizer_decode_to_nothing(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode("Three dots")
    assert tok.n_pieces < tiny.VOCAB
    assert tok.decode(ids[:1] + [tiny.VOCAB - 1, tok.n_pieces] + ids[1:]) == tok.decode(ids) == "Three dots"


def test_prompt_chunks_are_encoded_on_their_own(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    before, after = tok.encode_prompt(build_prompt("Hi"))
    assert before[0] == tok.bos_id
    assert before[1:] == tok.encode(build_prompt("Hi").split("<image>")[0])
    assert after == tok.encode("\nHi ASSISTANT:")


def one_error_line(code, err, *needles):
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") or "error:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_images(capsys, checkpoints, tmp_path):
    model = checkpoints["hub"]
    code, _, err = run_cli(capsys, "--model", model, "--image", tmp_path / "nope.png", "--prompt", "x")
    one_error_line(code, err, "nope.png")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    code, _, err = run_cli(capsys, "--model", model, "--image", text, "--prompt", "x")
    one_error_line(code, err, "text.png", "not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 8000)).save(bomb)
    code, _, err = run_cli(capsys, "--model", model, "--image", bomb, "--prompt", "x")
    one_error_line(code, err, "bomb.png", "too large")


def test_bad_models(capsys, checkpoints, image_path, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "--model", empty, "--image", image_path, "--prompt", "x")
    one_error_line(code, err, "config.json")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in checkpoints["hub"].iterdir():
        if f.name != "tokenizer.model":
            (no_tok / f.name).symlink_to(f)
    code, _, err = run_cli(capsys, "--model", no_tok, "--image", image_path, "--prompt", "x")
    one_error_line(code, err, "tokenizer.model")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")
    code, _, err = run_cli(capsys, "--model", "someone/missing-model", "--image", image_path, "--prompt", "x")
    one_error_line(code, err, "someone/missing-model", "huggingface-cli download", "--model DIR")


def test_prompt_longer_than_the_context(capsys, checkpoints, image_path):
    code, _, err = run_cli(capsys, "--model", checkpoints["hub"], "--image", image_path,
                           "--prompt", "How many dots are there? " * 200)
    one_error_line(code, err, "context is 1024")


def test_bad_arguments():
    for args in (["--retention-ratio", "0"], ["--retention-ratio", "1.5"], ["--retention-ratio", "nan"]):
        with pytest.raises(SystemExit) as e:
            gen.parse_args(["--image", "x", "--prompt", "y", *args])
        assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda(capsys, checkpoints, image_path):
    code, _, err = run_cli(capsys, "--model", checkpoints["hub"], "--image", image_path, "--prompt", "x",
                           "--device", "cuda")
    one_error_line(code, err, "CUDA is not available")


def test_module_entry_point_and_exit_codes(checkpoints, image_path, tmp_path):
    """The real `python -m minillava.generate`: a clean answer, and a one-line error with no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "minillava.generate", "--model", str(checkpoints["original"]), "--prompt", QUESTION]
    ok = subprocess.run(cmd + ["--image", str(image_path), "--max-new-tokens", "4", "--json"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout.strip().splitlines()[-1])["token_ids"]) == 4
    bad = subprocess.run(cmd + ["--image", str(tmp_path / "missing.jpg")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]


def predicted_count(scores_thumb, grid, size, side, r, paper):
    """The token count of docs/globalcom2.md (step 4), worked out here from its formulas (not from the package)."""
    gw, gh = grid
    P, H, W = side * side, gh * side, gw * side
    s = scores_thumb.double().view(side, side)
    ph, pw = max(side // gh, 1), max(side // gw, 1)
    sums = torch.zeros(gh * gw, dtype=torch.float64)
    for i in range(side):
        for j in range(side):
            sums[min(i // ph, gh - 1) * gw + min(j // pw, gw - 1)] += s[i, j]
    e = torch.exp((sums - sums.max()) / 10)
    p = e / (e.sum() + 1e-8)
    scale = (r * (1 + p - p.mean())).clamp(max=1.0)
    w0, h0 = size
    if w0 / h0 > W / H:
        pad = (H - int(h0 * (W / w0))) // 2
        rows, cols = range(pad, H - pad), range(W)
    else:
        pad = (W - int(w0 * (H / h0))) // 2
        rows, cols = range(H), range(pad, W - pad)
    n = [0] * (gw * gh)
    for y in rows:
        for x in cols:
            n[(y // side) * gw + x // side] += 1
    kept = sum(int(n[c] * scale[c].item()) for c in range(gw * gh))
    return int(P * r) + kept + (H if paper else len(rows))


@pytest.mark.parametrize("ratio", [0.25, 0.1])
@pytest.mark.parametrize("mode", ["globalcom2", "globalcom2-paper"])
def test_compressed_token_count_through_the_cli(capsys, checkpoints, image_path, tmp_path, ratio, mode):
    from minillava.weights import load_model

    wide = tmp_path / "wide.png"
    Image.open(image_path).resize((300, 60)).save(wide)  # padded rows: 300/60 is wider than its 3 x 1 grid
    result = run_json(capsys, checkpoints["hub"], wide, compressor=("--compressor", mode, "--retention-ratio", ratio))
    model = load_model(checkpoints["hub"])
    tiles = tile_image(load_image(str(wide)), model.cfg.grid_pinpoints, tiny.TILE)
    with torch.no_grad():
        _, scores, _ = tower_run(model.vision, tiles.pixels)
    assert tiles.grid == (3, 1)
    expected = predicted_count(scores[0], tiles.grid, tiles.size, tiny.TILE // 14, ratio, mode == "globalcom2-paper")
    assert result["visual_tokens"]["after"] == expected
    # new_h = int(60 * 12 / 300) = 2 of the 4 grid rows, pad 1: rows 1 and 2, each 12 tokens + newline
    assert result["visual_tokens"]["before"] == 16 + 2 * (12 + 1)


def test_compiled_steps_give_the_eager_ids(capsys, checkpoints, image_path):
    """--compile: torch.compile'd tower, prefill and decode step (about 30 s of compiling on 2 cores)."""
    eager = run_json(capsys, checkpoints["hub"], image_path)
    compiled = run_json(capsys, checkpoints["hub"], image_path, "--compile")
    assert compiled["token_ids"] == eager["token_ids"]
    assert compiled["timings_s"]["compile"] > 0 and "compile" not in eager["timings_s"]


def test_the_uncompressed_model_runs_without_the_compression_stage(tmp_path):
    """minillava alone is LLaVA-NeXT: with `globalcom2` made unimportable, `none` answers through both the
    single path and the batch engine (every method, FastV's decoder-side one too, comes from globalcom2's
    table: globalcom2/methods.py)."""
    code = "\n".join([
        "import sys",
        "sys.modules['globalcom2'] = None  # any import of it now fails",
        "from PIL import Image",
        "from minillava import batch, generate as gen",
        "model, tok = gen.load(gen.DEFAULT_MODEL)",
        f"image = Image.open({str(Path(__file__).parent.parent / 'examples' / 'scene.png')!r})",
        "q = 'What digit is on the red card?'",
        "for method in ('none',):",
        "    one = gen.generate(model, tok, image, q, method, 0.5, max_new_tokens=4)",
        "    two = batch.generate_batch(model, tok, [(image, q)] * 2, method, 0.5, max_new_tokens=4)",
        "    assert one.token_ids == two[0].token_ids == two[1].token_ids, method",
        "    print(method, one.text, one.visual_tokens['after'])",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["none 6 336"]


def test_sliver_images_answer_with_every_compressor(capsys, tmp_path):
    """A 9 x 3000 strip on the shipped model: its unpadded crop area has no column left (LLaVA's
    `unpad_image` keeps zero columns; the sequence holds a newline per row). Every compressor answers
    (OneVision's `grid_share` divided by that zero area: issue 32)."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (9, 3000), (200, 40, 40)).save(path)
    from minillava.compression import place

    for compressor in gen.compressors():
        # a tower method merges at most half of a layer's tokens: on the tiny tower (one merging layer) r >= 0.5
        ratio = ("--retention-ratio", 0.5) if place(compressor) == "tower" else ()
        code, out, err = run_cli(capsys, "--image", path, "--prompt", QUESTION, "--max-new-tokens", 1, "--json",
                                 "--compressor", compressor, *ratio)
        assert code == 0, (compressor, err)
        visual = json.loads(out)["visual_tokens"]
        if ratio:  # merged tiles are not unpadded (docs/methods.md, ficoco): 4 tiles of 64 - 32, more than the
            assert visual == {"before": 88, "after": 4 * 32}  # 64 + 24 newlines of this zero-width area
        else:
            assert 0 < visual["after"] <= visual["before"], (compressor, visual)
