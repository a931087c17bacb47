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
from minillava.model import Llava
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
    return load_model(ov_checkpoints["hub"], pack=False)


def test_both_layouts_load_the_same_model(ov_checkpoints, ours):
    other = load_model(ov_checkpoints["original"], pack=False)
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


def llava_next_chatml_prompt(question: str) -> str:
    """LLaVA-VL/LLaVA-NeXT llava/conversation.py: conv_qwen ("qwen_1_5") and Conversation.get_prompt's
    CHATML branch, transcribed, for messages [(roles[0], "<image>\\n" + q), (roles[1], None)]."""
    system, roles, sep = "<|im_start|>system\nYou are a helpful assistant.", ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>"
    messages = [(roles[0], "<image>\n" + question), (roles[1], None)]
    ret = "" if system == "" else system + sep + "\n"
    for role, message in messages:
        if message:
            ret += role + "\n" + message + sep + "\n"
        else:
            ret += role + "\n"
    return ret


def test_qwen_1_5_is_llava_next_s_get_prompt():
    from minillava.conversation import TEMPLATES

    for q in ["What is in the picture?", "", " two  spaces ", "Ünïcode – 猫?", "end with a newline\n"]:
        assert TEMPLATES["qwen_1_5"].render(q) == llava_next_chatml_prompt(q)


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


@pytest.mark.parametrize("spec", ["int8", "int4-g32"])
def test_quantized_tied_head_is_its_own_copy(tmp_path, qwen_tok, spec):
    """--quantize on a tied head (Qwen2-0.5B): lm_head is quantized from the embedding's values into a
    copy of its own, the embedding stays in full precision, and the head's logits are the quantized
    embedding's (what the README's 0.5B cells count)."""
    from minillava.quant import QuantizedLinear, Spec

    spec = Spec(8) if spec == "int8" else Spec(4, 32)
    hf = tiny.ov_hf_model(seed=1, tie=True, layers=2)
    path = tiny.save_ov_checkpoint(hf, tmp_path / "tied", "original", qwen_tok)
    plain, model = load_model(path), load_model(path, quantize=spec)
    assert isinstance(model.lm_head, QuantizedLinear) and model.llm.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.llm.embed_tokens.weight, plain.llm.embed_tokens.weight)
    hidden = torch.randn(5, 128)
    expected = QuantizedLinear.from_weight(plain.llm.embed_tokens.weight, spec)
    with torch.no_grad():
        assert torch.allclose(model.logits(hidden), expected(hidden).float(), atol=1e-5)


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


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("method", ["globalcom2", "uniform", "random", "fastv"])
def test_cli_token_counts_follow_r_of_the_downscaled_sequence(capsys, ov_checkpoints, big_image, method, ratio):
    """On a grid OneVision downscales (22 x 24 tokens -> 11 x 12, as above) a compressor selects on the
    full-resolution crops but keeps r of the visual tokens the uncompressed model sees (16 + 11 x 12 =
    148; newlines apart): the thumbnail int(16 r), each crop int(N_c r s) of its N_c valid tokens, s =
    132 / 528 (uniform, random; GlobalCom2 moves budget between crops around the same mean), packed at
    their full-resolution places, a newline closing each of the 22 rows; shorter than the uncompressed
    sequence at these r (without the scaling r = 0.5 kept more than it). FastV prunes the downscaled
    sequence itself."""
    code, out, err = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", method,
                              "--retention-ratio", str(ratio))
    assert code == 0, err
    before, after = (json.loads(out)["visual_tokens"][k] for k in ("before", "after"))
    assert before == 16 + 11 * (12 + 1)
    if method == "fastv":
        assert after == round(before * ratio) or abs(after - before * ratio) <= 1
        return
    heights = [3, 4, 4, 4, 4, 3]  # rows 1 .. 22 of the 24: crop row 0 loses its first, row 5 its last
    crops = [hgt * 4 for hgt in heights for _ in range(6)]  # N_c: every crop column keeps all 4 of its columns
    assert sum(crops) == 22 * 24
    share = 11 * 12 / (22 * 24)
    kept = after - 22  # the newlines closing the 22 full-resolution rows
    if method == "globalcom2":  # crop c: int(N_c b (1 + p_c - mean p)), b = r s, never clipped here (b < 1/2);
        # sum_c N_c (p_c - mean p) = 4 * sum over the 16-token crops of (p_c - mean p), within [-4, 4]
        b = ratio * share
        assert int(16 * ratio) + b * (528 - 4) - 36 < kept <= int(16 * ratio) + b * (528 + 4), kept
    else:
        assert kept == int(16 * ratio) + sum(int(n * ratio * share) for n in crops)
    assert after < before


@pytest.mark.parametrize("method", ["fastervlm", "visionzip", "hired", "prumerge+", "globalcom2-paper", "globalcom2-attn"])
def test_cls_methods_refuse_a_tower_without_cls(capsys, ov_checkpoints, big_image, method):
    code, out, err = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", method)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1
    assert lines[0].startswith("error:") and "[CLS]" in lines[0], lines[0]


@pytest.mark.parametrize("method", ["none", "random", "fastv", "globalcom2", "uniform"])
def test_batch_gives_the_ids_of_one_question(ov_checkpoints, method):
    model, tok = gen.load(str(ov_checkpoints["original"]))
    items = [(noise_image(200, 200, seed=8), QUESTION), (noise_image(90, 150, seed=9), "Describe it.")]  # 4x4 grid downscaled, 2x3 not
    alone = [gen.generate(model, tok, im, q, method, 0.5, max_new_tokens=5).token_ids for im, q in items]
    batch = [r.token_ids for r in generate_batch(model, tok, items, method, 0.5, max_new_tokens=5)]
    assert batch == alone


def test_visualize_draws_a_onevision_model(ov_checkpoints, big_image, tmp_path):
    """The picture's counts are the decoder's, as generate reports them: the downscaled 11 x 12 grid
    uncompressed (159 tokens), a compressor's crops' ratio r * 132 / 528 beside r."""
    from minillava.apps import visualize

    model, tok = gen.load(str(ov_checkpoints["hub"]))
    for method in ("none", "random", "globalcom2"):  # globalcom2: its similarity score drawn as the heat map
        out = tmp_path / f"{method}.png"
        assert visualize.main(["--model", str(ov_checkpoints["hub"]), "--image", str(big_image), "--out", str(out),
                               "--compressor", method, "--retention-ratio", "0.5"]) == 0
        assert Image.open(out).width > 0
        counts = gen.generate(model, tok, Image.open(big_image), QUESTION, method, 0.5, max_new_tokens=1).visual_tokens
        picture = visualize.kept_picture(model, Image.open(big_image), method, 0.5)
        assert (picture.before, picture.after) == (counts["before"], counts["after"])
        text = picture.image.info["text"]
        assert f"visual tokens {counts['before']} -> {counts['after']}" in text[-1], text
        if method == "none":
            assert text[2] == "crops 528 tokens downscaled to 11x12 = 132" and text[3] == "11 newlines", text
        else:
            assert text[0].endswith("r = 0.5 (crops 0.125: the grid is 11x12 uncompressed)"), text
            assert text[3] == "22 newlines", text  # a newline closing each full-resolution row
    out = tmp_path / "fastv.png"
    assert visualize.main(["--model", str(ov_checkpoints["hub"]), "--image", str(big_image), "--out", str(out),
                           "--compressor", "fastv", "--prompt", QUESTION]) == 0


@pytest.mark.slow
def test_compiled_steps_give_the_eager_ids(capsys, ov_checkpoints, big_image):
    eager = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", "none")
    compiled = run_json(capsys, ov_checkpoints["hub"], big_image, "--compressor", "none", "--compile")
    assert eager[0] == compiled[0] == 0
    assert json.loads(compiled[1])["token_ids"] == json.loads(eager[1])["token_ids"]


# --- the released configs -----------------------------------------------------------------------------

OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # as both layouts list them
SIGLIP_SO400M = {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                 "num_attention_heads": 16, "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": False}
QWEN2 = {  # Qwen2-{0.5B,7B,72B}-Instruct's sizes as the OneVision configs carry them
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "max_window_layers": 24},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False, "max_window_layers": 28},
    "72b": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False, "max_window_layers": 80},
}
COMMON = {"bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "max_position_embeddings": 32768,
          "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
          "attention_dropout": 0.0, "initializer_range": 0.02, "rope_scaling": None, "torch_dtype": "bfloat16"}


def released(size: str, layout: str) -> dict:
    """The config.json of lmms-lab/llava-onevision-qwen2-{size}-ov (original) or
    llava-hf/llava-onevision-qwen2-{size}-ov-hf (transformers), the keys that matter."""
    if layout == "original":
        return {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", **COMMON, **QWEN2[size],
                "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": OV_PINPOINTS, "mm_hidden_size": 1152,
                "mm_newline_position": "one_token", "mm_patch_merge_type": "spatial_unpad",
                "mm_projector_type": "mlp2x_gelu", "mm_spatial_pool_mode": "bilinear",
                "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
                "mm_vision_tower": "google/siglip-so400m-patch14-384", "use_mm_proj": True,
                "tokenizer_model_max_length": 32768, "use_pos_skipping": False, "vision_tower_pretrained": None}
    text = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **COMMON, **QWEN2[size]}
    return {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
            "image_grid_pinpoints": OV_PINPOINTS, "image_token_index": 151646, "video_token_index": 151647,
            "projector_hidden_act": "gelu", "text_config": text, "vision_config": SIGLIP_SO400M,
            "tie_word_embeddings": QWEN2[size]["tie_word_embeddings"], "use_image_newline_parameter": True,
            "vision_aspect_ratio": "anyres_max_9", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full"}


def expected_parameters(t: dict) -> int:
    """Written out from the architecture, not from our modules: SigLIP so400m's 26 layers with its patch
    and position embeddings and post-LayerNorm, the mlp2x_gelu projector, the newline, Qwen2 (q/k/v
    biases, GQA) and, unless tied, the head."""
    D, F, P = 1152, 4304, 729
    tower = 26 * (4 * (D * D + D) + 2 * D * F + F + D + 4 * D) + D * 3 * 14 * 14 + D + P * D + 2 * D
    d, L, H, KV, I, V = (t[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "intermediate_size", "vocab_size"))
    hd = d // H
    layer = d * H * hd + H * hd + 2 * (d * KV * hd + KV * hd) + H * hd * d + 3 * d * I + 2 * d
    return tower + (D * d + d + d * d + d) + d + V * d + L * layer + d + (0 if t["tie_word_embeddings"] else V * d)


# the hub's model pages: 894M, 8.03B, 73.2B parameters
HUB_SIZES = {"0.5b": 0.894e9, "7b": 8.03e9, "72b": 73.2e9}


@pytest.mark.parametrize("layout", ["original", "transformers"])
@pytest.mark.parametrize("size", list(QWEN2))
def test_released_configs_parse_and_build(size, layout):
    cfg = parse_config(released(size, layout))
    v, t = cfg.vision, cfg.text
    assert (v.model_type, v.image_size, v.patch_size, v.patches_per_side, v.num_hidden_layers) == ("siglip", 384, 14, 27, 26)
    assert v.hidden_act == "gelu_pytorch_tanh" and v.layer_norm_eps == 1e-6
    assert cfg.vision_feature_layer == -1 and cfg.anyres_max == 9 and len(cfg.grid_pinpoints) == 36
    assert (t.model_type, t.qkv_bias, t.attention_bias, t.rope_theta) == ("qwen2", True, False, 1e6)
    assert t.sliding_window is None and t.max_position_embeddings == 32768
    assert t.tie_word_embeddings == QWEN2[size]["tie_word_embeddings"]
    with torch.device("meta"):
        model = Llava(cfg)
    if t.tie_word_embeddings:  # the loader makes the head the embedding table (weights.load_model)
        model.lm_head.weight = model.llm.embed_tokens.weight
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_parameters(QWEN2[size])
    assert abs(n - HUB_SIZES[size]) / HUB_SIZES[size] < 0.001


def test_config_mistakes_are_one_line_errors():
    from minillava.trust import ConfigError

    bad = [({**released("7b", "original"), "image_aspect_ratio": "anyres_max_x"}, "image_aspect_ratio"),
           ({**released("7b", "transformers"), "vision_feature_select_strategy": "default"}, "'full'"),
           ({**released("7b", "transformers"), "vision_config": {**SIGLIP_SO400M, "vision_use_head": True}}, "head"),
           ({**released("7b", "original"), "use_sliding_window": True}, "use_sliding_window"),
           ({**released("7b", "original"), "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "SigLIP"),
           ({**released("7b", "transformers"), "vision_aspect_ratio": "anyres_max_0"}, "outside")]
    for raw, needle in bad:
        with pytest.raises(ConfigError, match=needle) as e:
            parse_config(raw)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_eval_runs_on_onevision(capsys, ov_checkpoints, tmp_path):
    """The evaluation harness (batching, resume records) on a OneVision checkpoint: the synthetic task."""
    from minillava.eval import runner

    out = tmp_path / "answers.jsonl"
    code = runner.main(["synthetic", "--model", str(ov_checkpoints["hub"]), "--output", str(out), "--limit", "3",
                        "--compressor", "none", "--max-new-tokens", "3", "--batch-size", "2"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[0])
    assert (summary["questions"], summary["answered"], summary["failed"]) == (3, 3, 0)


@pytest.mark.parametrize("size, gb", [("0.5b", [1.8, 1.6, 1.3]), ("7b", [16.1, 9.0, 5.7]), ("72b", [146.4, 74.9, 41.4])])
def test_readme_memory_columns_of_onevision(size, gb):
    """README's bf16 / int8 / int4 (group 128) columns for the OneVision checkpoints, counted as
    tests/test_quantize.py counts the 7B's: built on the meta device, the decoder's linears and lm_head
    swapped for their storage form. 0.5B's tied head is the embedding in 16 bits (counted once); quantized,
    it is a copy of its own beside the 16-bit embedding (test_quantized_tied_head_is_its_own_copy)."""
    from minillava import quant
    from minillava.quant import Spec

    sizes = []
    for spec in (None, Spec(8), Spec(4, 128)):
        with torch.device("meta"):
            model = Llava(parse_config(released(size, "transformers"))).to(torch.bfloat16)
            if spec:
                quant.swap_linears(model, spec)
        state = model.state_dict()
        if model.cfg.text.tie_word_embeddings and not spec:
            del state["lm_head.weight"]  # loaded as the embedding tensor itself
        sizes.append(round(sum(t.numel() * t.element_size() for t in state.values()) / 1e9, 1))
    assert sizes == gb
