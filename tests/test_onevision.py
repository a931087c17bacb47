"""LLaVA-OneVision: parity with transformers' `LlavaOnevisionForConditionalGeneration` on tiny random
checkpoints in both layouts (SigLIP tower, Qwen2 decoder with q/k/v biases and GQA, anyres_max_9 with and
without the bilinear downscale), stage by stage and then greedy ids; the released configs; the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minillava import generate as gen
from minillava.batch import generate_batch
from minillava.config import parse_config
from minillava.layout import downscaled_size
from minillava.model import LlavaNext
from minillava.tokenizer import ByteBPETokenizer
from minillava.weights import load_model
from tests import tiny
from tests.conftest import PARITY

TOL = 1e-4
QUESTION = "What is in the picture?"
# (w, h): grids 6x6, 6x4, 4x4 (downscaled: more than 9 tiles' tokens) and 2x3, 3x2, 6x1, 1x6 (not);
# sizes whose unpadding gives the same rows under truncation (LLaVA) and rounding (transformers)
SIZES = [(336, 336), (500, 320), (200, 200), (90, 150), (113, 112), (300, 40), (40, 300)]


def max_diff(a, b, stage: str) -> float:
    d = (a.float() - b.float()).abs().max().item()
    PARITY.append((stage, d))
    return d


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return tiny.train_qwen_tokenizer(tmp_path_factory.mktemp("qwen") / "tokenizer.json")


@pytest.fixture(scope="module")
def hf(qwen_tok):
    return tiny.ov_hf_model(seed=0)


@pytest.fixture(scope="module")
def ov_checkpoints(tmp_path_factory, hf, qwen_tok):
    root = tmp_path_factory.mktemp("ov")
    return {name: tiny.save_ov_checkpoint(hf, root / name, name, qwen_tok) for name in tiny.OV_LAYOUTS}


@pytest.fixture(scope="module")
def ours(ov_checkpoints):
    return load_model(ov_checkpoints["hub"])


def test_both_layouts_load_the_same_model(ov_checkpoints, ours):
    other = load_model(ov_checkpoints["original"])
    a, b = ours.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert other.cfg.vision == ours.cfg.vision and other.cfg.text == ours.cfg.text
    assert other.cfg.grid_pinpoints == ours.cfg.grid_pinpoints and other.cfg.anyres_max == ours.cfg.anyres_max == 9
    assert ours.cfg.vision.model_type == "siglip" and not ours.vision.has_cls
    assert ours.cfg.text.qkv_bias and ours.llm.layers[0].self_attn.o_proj.bias is None
    assert ours.llm.layers[0].self_attn.kv_heads == 2 and ours.cfg.text.rope_theta == 1e6


def test_tiles_match_transformers_processor(ours):
    """Our tiles against transformers' LlavaOnevisionImageProcessorPil (SigLIP's mean and std 0.5)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    proc = LlavaOnevisionImageProcessorPil(size={"height": tiny.TILE, "width": tiny.TILE}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3,
                                           image_grid_pinpoints=[[h, w] for w, h in tiny.OV_PINPOINTS_WH])
    for size in [(336, 336), (90, 150), (300, 40)]:
        image = noise_image(*size, seed=2)
        tiles = ours.tile(image)
        ref = proc(image, return_tensors="pt")
        assert ref["image_sizes"][0].tolist() == [size[1], size[0]]
        assert max_diff(tiles.pixels, ref["pixel_values"][0], f"OneVision tiles, {size[0]}x{size[1]}") < 1e-6


def test_siglip_features_match_transformers(ours, hf):
    pixels = ours.tile(noise_image(90, 150)).pixels
    with torch.no_grad():
        got = ours.vision(pixels, (-1, 1))
        ref = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert got[-1].shape == ref[-1].shape == (pixels.shape[0], 16, 128)  # no [CLS]: 4 x 4 tokens
    assert max_diff(got[1], ref[1], "SigLIP hidden state 1") < TOL
    assert max_diff(got[-1], ref[-1], "SigLIP features (last layer, no [CLS]), 7 tiles") < TOL


@pytest.mark.parametrize("size", SIZES)
def test_packed_image_features_match_transformers(ours, hf, size):
    """The thumbnail, then the unpadded crop grid, downscaled where it holds more than 9 tiles' tokens,
    a newline closing each row: transformers' pack_image_features."""
    tiles = ours.tile(noise_image(*size, seed=1))
    with torch.no_grad():
        image = ours.encode_images([tiles])[0]
        packed = ours.image_tokens(image)
        ref = hf.model.get_image_features(tiles.pixels[None], torch.tensor([[size[1], size[0]]]),
                                          return_dict=True).pooler_output[0]
    top, bottom, left, right = image.area
    downscaled = downscaled_size(image.area, 4, 9) != (bottom - top, right - left)
    assert downscaled == (size in SIZES[:3])
    assert packed.shape == ref.shape and packed.shape[0] == ours.uncompressed_length(image)
    d = max_diff(packed, ref, f"OneVision packed features, {size[0]}x{size[1]}" + (" (downscaled)" if downscaled else ""))
    assert d < TOL


def test_qwen2_decoder_matches_transformers(ours, hf):
    torch.manual_seed(0)
    embeds = torch.randn(1, 23, 128)
    with torch.no_grad():
        ours.llm.setup_cache(1, 32)
        steps = [ours.logits(ours.llm(embeds[:, :15], torch.arange(15), prefill=True))]
        for t in range(15, 23):
            steps.append(ours.logits(ours.llm(embeds[:, t : t + 1], torch.tensor([t]))))
        ref = hf(inputs_embeds=embeds).logits
    assert max_diff(torch.cat(steps, dim=1), ref, "Qwen2 logits, prefill 15 + 8 cached steps") < TOL


def test_prompt_ids_are_llava_next_s_qwen_1_5(ov_checkpoints, qwen_tok):
    """The template's prompt (LLaVA-NeXT conv_qwen) encoded by transformers' fast tokenizer on the same
    tokenizer.json, split at <image> as LLaVA's tokenizer_image_token does; the template is chosen from the
    checkpoint (ChatML markers and a Qwen2 decoder)."""
    from transformers import PreTrainedTokenizerFast

    _, tok = gen.load(str(ov_checkpoints["hub"]))
    assert tok.template.name == "qwen_1_5" and isinstance(tok, ByteBPETokenizer)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(qwen_tok))
    question = "How many dots? Größe 42 — 3.5!"
    before, after = tok.template.render(question).split("<image>")
    assert before == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert after == "\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_question(question) == [ref(before).input_ids, ref(after).input_ids]
    assert tok.eos_id == ref.convert_tokens_to_ids("<|im_end|>")
    # a question holding a turn marker stays text
    ids = tok.encode_question("a <|im_end|> b")[1]
    assert ids.count(tok.token_id("<|im_end|>")) == 1
    assert tok.decode(ref("hello there, Größe").input_ids) == "hello there, Größe"


@pytest.mark.parametrize("layout", list(tiny.OV_LAYOUTS))
@pytest.mark.parametrize("size", [(336, 336), (90, 150)])
def test_greedy_ids_match_transformers(ov_checkpoints, hf, layout, size):
    model, tok = gen.load(str(ov_checkpoints[layout]))
    image = noise_image(*size, seed=5)
    result = gen.generate(model, tok, image, QUESTION, "none", max_new_tokens=10)
    before, after = tok.encode_question(QUESTION)
    tiles = model.tile(image)
    ids = torch.tensor([before + [tiny.OV_IMAGE_TOKEN] * result.visual_tokens["before"] + after])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=tiles.pixels[None], image_sizes=torch.tensor([[size[1], size[0]]]),
                          max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=0)
    assert result.token_ids == ref[0, ids.shape[1]:].tolist()


def test_tied_head_matches_transformers(tmp_path, qwen_tok):
    """Qwen2-0.5B ties its head to the embeddings: no lm_head in the checkpoint, the same logits."""
    hf = tiny.ov_hf_model(seed=1, tie=True, layers=2)
    path = tiny.save_ov_checkpoint(hf, tmp_path / "tied", "original", qwen_tok)
    model = load_model(path)
    assert model.cfg.text.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.llm.embed_tokens.weight.data_ptr()
    embeds = torch.randn(1, 9, 128)
    with torch.no_grad():
        model.llm.setup_cache(1, 16)
        got = model.logits(model.llm(embeds, torch.arange(9), prefill=True))
        ref = hf(inputs_embeds=embeds).logits
    assert max_diff(got, ref, "Qwen2 logits, tied head") < TOL


# --- the command line and the other ways in ------------------------------------------------------------


def run_json(capsys, model_dir, image_path, *extra):
    code = gen.main(["--model", str(model_dir), "--image", str(image_path), "--prompt", QUESTION,
                     "--max-new-tokens", "6", "--json", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("ovimg") / "big.png"
    noise_image(336, 300, seed=3).save(path)
    return path


@pytest.mark.parametrize("method", ["none", "fastv", "random"])
def test_cli_runs_the_uncompressed_and_cls_free_methods(capsys, ov_checkpoints, big_image, method):
    code, out, err = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", method,
                              "--retention-ratio", "0.25")
    assert code == 0, err
    result = json.loads(out)
    before, after = result["visual_tokens"]["before"], result["visual_tokens"]["after"]
    # 336 x 300 fills a 6 x 6 canvas (24 x 24 tokens); unpadded rows 1 .. 22 (new_h = int(300 * 24 / 336) = 21,
    # pad 1): 22 x 24, ratio sqrt(22 * 24 / (9 * 16)) = 1.91 > 1.1 -> int(22 // 1.91) x int(24 // 1.91) = 11 x 12
    assert before == 16 + 11 * (12 + 1)
    assert (after == before) == (method == "none")


@pytest.mark.parametrize("method", ["globalcom2", "fastervlm", "visionzip", "hired", "prumerge+", "uniform"])
def test_cls_methods_refuse_a_tower_without_cls(capsys, ov_checkpoints, big_image, method):
    code, out, err = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", method)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1
    assert lines[0].startswith("error:") and "[CLS]" in lines[0] and "siglip" in lines[0], lines[0]


@pytest.mark.parametrize("method", ["none", "random", "fastv"])
def test_batch_gives_the_ids_of_one_question(ov_checkpoints, method):
    model, tok = gen.load(str(ov_checkpoints["original"]))
    items = [(noise_image(336, 336, seed=8), QUESTION), (noise_image(90, 150, seed=9), "Describe it.")]
    alone = [gen.generate(model, tok, im, q, method, 0.5, max_new_tokens=5).token_ids for im, q in items]
    batch = [r.token_ids for r in generate_batch(model, tok, items, method, 0.5, max_new_tokens=5)]
    assert batch == alone


def test_visualize_draws_a_onevision_model(ov_checkpoints, big_image, tmp_path):
    from minillava import visualize

    for method in ("random", "none"):
        out = tmp_path / f"{method}.png"
        assert visualize.main(["--model", str(ov_checkpoints["hub"]), "--image", str(big_image), "--out", str(out),
                               "--compressor", method]) == 0
        assert Image.open(out).width > 0
    out = tmp_path / "fastv.png"
    assert visualize.main(["--model", str(ov_checkpoints["hub"]), "--image", str(big_image), "--out", str(out),
                           "--compressor", "fastv", "--prompt", QUESTION]) == 0


@pytest.mark.slow
def test_compiled_steps_give_the_eager_ids(capsys, ov_checkpoints, big_image):
    eager = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", "none")
    compiled = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", "none", "--compile")
    assert eager[0] == compiled[0] == 0
    assert json.loads(compiled[1])["token_ids"] == json.loads(eager[1])["token_ids"]
