"""InternVL3: parity with transformers' `InternVLForConditionalGeneration` on tiny random checkpoints in both
layouts (OpenGVLab's and -hf) and both tower kinds (LayerNorm; RMSNorm with q/k norm), stage by stage and then
greedy ids; tiles against the published `dynamic_preprocess` (a literal transcription) and transformers' image
processor; prompt ids against the published internvl2_5 template; the released configs; the CLI."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from minillava import generate as gen
from minillava.anyres import IMAGENET_MEAN, IMAGENET_STD
from minillava.config import internvl_grids, parse_config
from minillava.internvit import pixel_shuffle
from minillava.weights import load_model
from tests import tiny
from tests.test_model import max_diff, noise_image

QUESTION = "What is in the picture?"
TILE = tiny.TILE
# (w, h): 1 crop (no thumbnail), 2 x 2, 4 x 3, 3 x 4, a 12-crop strip, the (7, 1) / (8, 1) tie at 300 x 40
SIZES = [(56, 56), (120, 110), (200, 150), (150, 200), (700, 50), (300, 40), (57, 200)]


# --- the published preprocessing, transcribed (the InternVL3 model cards' `dynamic_preprocess`,
# `find_closest_aspect_ratio` and `build_transform`; internvl_chat/internvl/train/dataset.py has the same),
# with torchvision's ToTensor / Normalize written out in numpy (torchvision must never be installed) ---

def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def published_pixels(image, image_size, max_num=12):
    """load_image's tiles: dynamic_preprocess, then ToTensor (uint8 / 255 in float32) and Normalize."""
    tiles = dynamic_preprocess(image, image_size=image_size, use_thumbnail=True, max_num=max_num)
    x = np.stack([np.asarray(t.resize((image_size, image_size), Image.Resampling.BICUBIC)) for t in tiles])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


# --- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def iv_tok(tmp_path_factory):
    return tiny.train_internvl_tokenizer(tmp_path_factory.mktemp("ivtok") / "tokenizer.json")


@pytest.fixture(scope="module", params=["layer_norm", "rms_norm"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def hf_models():
    return {"layer_norm": tiny.iv_hf_model(seed=0), "rms_norm": tiny.iv_hf_model(seed=1, rms=True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, hf_models, iv_tok):
    root = tmp_path_factory.mktemp("iv")
    return {(k, layout): tiny.save_iv_checkpoint(hf, root / f"{k}-{layout}", layout, iv_tok)
            for k, hf in hf_models.items() for layout in tiny.IV_LAYOUTS}


def test_both_layouts_load_the_same_model(checkpoints, kind):
    hub, original = load_model(checkpoints[kind, "hub"], pack=False), load_model(checkpoints[kind, "original"], pack=False)
    a, b = hub.state_dict(), original.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert hub.cfg.vision == original.cfg.vision and hub.cfg.text == original.cfg.text
    assert hub.cfg.grid_pinpoints == original.cfg.grid_pinpoints == [(i * TILE, j * TILE) for i, j in internvl_grids(1, 12)]
    v = hub.cfg.vision
    assert (v.model_type, v.norm_type, v.qk_norm, v.qkv_bias) == (
        ("internvit", "layer_norm", False, True) if kind == "layer_norm" else ("internvit", "rms_norm", True, False))
    assert hub.cfg.family == "internvl" and hub.cfg.token_side == 2 and not hasattr(hub, "image_newline")


@pytest.mark.parametrize("size", SIZES)
def test_tiles_match_the_published_preprocessing(size):
    """Our tiles equal a literal transcription of the published dynamic_preprocess + build_transform: the
    closest-ratio grid with its tie rule, crops row-major, the thumbnail last, none with one crop."""
    cfg = parse_config(tiny.iv_hf_config().to_dict())
    from minillava.anyres import tile_image

    image = noise_image(*size, seed=2)
    tiles = tile_image(image, cfg.grid_pinpoints, TILE, IMAGENET_MEAN, IMAGENET_STD, "closest-ratio")
    ref = published_pixels(image, TILE)
    n = tiles.pixels.shape[0]
    assert n == ref.shape[0] and tiles.thumb == (n - 1 if n > 1 else 0)
    assert tiles.grid == ((0, 0) if n == 1 else tiles.grid) and n == max(1, tiles.grid[0] * tiles.grid[1] + 1)
    assert max_diff(tiles.pixels, ref, f"InternVL tiles vs dynamic_preprocess, {size[0]}x{size[1]}") < 1e-6


def test_grid_choice_matches_the_published_rule_on_many_sizes():
    """The grid (and so the tile count) of 2,000 random sizes, InternVL3's 448 px tiles and 1..12 crops,
    exact ties included (whose winner the published set order decides)."""
    from minillava.anyres import closest_grid

    rng = np.random.default_rng(0)
    grids = internvl_grids(1, 12)
    ratios = sorted(set((i, j) for n in range(1, 13) for i in range(1, n + 1) for j in range(1, n + 1) if 1 <= i * j <= 12),
                    key=lambda x: x[0] * x[1])
    assert grids == ratios
    for w, h in [*rng.integers(1, 4000, (2000, 2)).tolist(), (500, 400), (300, 40), (896, 448), (448, 896)]:
        assert closest_grid((w, h), grids, 448) == find_closest_aspect_ratio(w / h, ratios, w, h, 448), (w, h)


@pytest.mark.parametrize("size", [pytest.param((56, 56), marks=pytest.mark.slow), (200, 150),
                                  pytest.param((700, 50), marks=pytest.mark.slow)])
def test_tiles_match_transformers_processor(size):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                    max_patches=12, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    cfg = parse_config(tiny.iv_hf_config().to_dict())
    from minillava.anyres import tile_image

    image = noise_image(*size, seed=4)
    tiles = tile_image(image, cfg.grid_pinpoints, TILE, IMAGENET_MEAN, IMAGENET_STD, "closest-ratio")
    ref = proc(image, return_tensors="pt")
    assert ref["num_patches"].tolist() == [tiles.pixels.shape[0]]
    assert max_diff(tiles.pixels, ref["pixel_values"], f"InternVL tiles vs GotOcr2 processor, {size[0]}x{size[1]}") < 1e-5


def test_pixel_shuffle_matches_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = torch.randn(3, 64, 5)  # 8 x 8 patches
    ref = InternVLModel.pixel_shuffle(None, x.reshape(3, 8, 8, 5), 0.5).reshape(3, 16, 20)
    assert torch.equal(pixel_shuffle(x), ref)
    # token (i, j) is patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) side by side
    grid = x.reshape(3, 8, 8, 5)
    assert torch.equal(pixel_shuffle(x)[:, 1 * 4 + 2], torch.cat([grid[:, 2, 4], grid[:, 2, 5], grid[:, 3, 4], grid[:, 3, 5]], -1))


def test_tower_and_features_match_transformers(checkpoints, hf_models, kind):
    """Every hidden state of the tower, then the pixel-shuffled, projected tokens of each tile in InternVL's
    order (crops, then the thumbnail), for images of 1, 12 and 13 tiles."""
    hf, ours = hf_models[kind], load_model(checkpoints[kind, "original"])
    for size in [(56, 56), (700, 50), (200, 150)]:
        tiles = ours.tile(noise_image(*size, seed=1))
        with torch.no_grad():
            got = ours.vision(tiles.pixels, (1, 2))
            ref = hf.model.vision_tower(tiles.pixels, output_hidden_states=True).hidden_states
            image = ours.encode_images([tiles])[0]
            seq = ours.image_tokens(image)
            feats = hf.model.get_image_features(tiles.pixels, return_dict=True).pooler_output.flatten(0, 1)
        for i in (1, 2):
            assert max_diff(got[i], ref[i], f"InternViT ({kind}) hidden state {i}, {size[0]}x{size[1]}") < 1e-5
        assert seq.shape == feats.shape and seq.shape[0] == ours.uncompressed_length(image)
        assert max_diff(seq, feats, f"InternVL ({kind}) image tokens, {size[0]}x{size[1]}") < 1e-5


def test_prompt_ids_match_the_published_template(checkpoints, iv_tok):
    """internvl2_5 as InternVL's Conversation.get_prompt (MPT style) renders it, the image as <img>, one
    <IMG_CONTEXT> per token, </img>; tokenized whole by the tokenizer (tokenizers), against our two chunks."""
    from transformers import PreTrainedTokenizerFast

    _, tok = gen.load(str(checkpoints["layer_norm", "hub"]))
    assert tok.template.name == "internvl2_5"
    system = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    question = "How many dots? Größe 42 — 3.5!"
    # get_prompt, SeparatorStyle.MPT: system_prompt + sep, then role + message + sep, then the open role
    sep, roles = "<|im_end|>\n", ("<|im_start|>user\n", "<|im_start|>assistant\n")
    prompt = f"<|im_start|>system\n{system}" + sep + roles[0] + "<image>\n" + question + sep + roles[1]
    prompt = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 8 + "</img>", 1)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(iv_tok))(prompt).input_ids
    before, after = tok.encode_question(question)
    assert before + [tiny.IV_IMAGE_TOKEN] * 8 + after == ref
    assert tok.eos_id == tiny.OV_BPE + 2 and tok.token_id("</img>") == after[0]


GREEDY = [(k, layout, size) for k in ("layer_norm", "rms_norm") for layout in tiny.IV_LAYOUTS for size in [(56, 56), (200, 150)]]
DEFAULT = {("layer_norm", "hub", (200, 150)), ("rms_norm", "original", (200, 150)), ("layer_norm", "original", (56, 56))}


@pytest.mark.parametrize("kind, layout, size", [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow) for c in GREEDY])
def test_greedy_ids_match_transformers(checkpoints, hf_models, kind, layout, size):
    """Greedy ids equal transformers' generate on the same prompt ids (3 of the 8 cases in the default suite)."""
    model, tok = gen.load(str(checkpoints[kind, layout]))
    image = noise_image(*size, seed=5)
    result = gen.generate(model, tok, image, QUESTION, "none", max_new_tokens=10)
    before, after = tok.encode_question(QUESTION)
    tiles = model.tile(image)
    assert result.visual_tokens["before"] == 4 * tiles.pixels.shape[0]
    ids = torch.tensor([before + [tiny.IV_IMAGE_TOKEN] * result.visual_tokens["before"] + after])
    with torch.no_grad():
        ref = hf_models[kind].generate(input_ids=ids, pixel_values=tiles.pixels, max_new_tokens=10, do_sample=False,
                                       eos_token_id=tok.eos_id, pad_token_id=0)
    assert result.token_ids == ref[0, ids.shape[1]:].tolist()


def test_config_refusals_are_one_line():
    from minillava.trust import ConfigError

    good = tiny.iv_original_config(tiny.iv_hf_config())
    for change, words in [({"ps_version": "v1"}, "ps_version"), ({"downsample_ratio": 0.25}, "downsample_ratio"),
                          ({"llm_config": {"architectures": ["InternLM2ForCausalLM"]}}, "Qwen2"),
                          ({"force_image_size": 448}, "force_image_size"), ({"max_dynamic_patch": 0}, "max_dynamic_patch")]:
        with pytest.raises(ConfigError, match=words) as e:
            parse_config(json.loads(json.dumps({**good, **change})))
        assert "\n" not in str(e.value)


# --- the released configs ------------------------------------------------------------------------------------

VIT_300M = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm"}  # InternViT-300M-448px-V2_5
VIT_6B = {"hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45, "num_attention_heads": 25,
          "qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm"}  # InternViT-6B-448px-V2_5
QWEN25 = {  # Qwen2.5-{0.5,1.5,7,14,32,72}B-Instruct's sizes as InternVL3's llm_config carries them (151,674 embeddings)
    "1B": (VIT_300M, {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                      "num_key_value_heads": 2}),
    "2B": (VIT_300M, {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                      "num_key_value_heads": 2}),
    "8B": (VIT_300M, {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                      "num_key_value_heads": 4}),
    "14B": (VIT_300M, {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
                       "num_key_value_heads": 8}),
    "38B": (VIT_6B, {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
                     "num_key_value_heads": 8}),
    "78B": (VIT_6B, {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
                     "num_key_value_heads": 8}),
}
QWEN25_COMMON = {"vocab_size": 151674, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
                 "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                 "sliding_window": 32768, "use_sliding_window": False, "rope_scaling": None, "torch_dtype": "bfloat16"}


def released(size: str, layout: str) -> dict:
    """The config.json of OpenGVLab/InternVL3-{size} (original) or OpenGVLab/InternVL3-{size}-hf, the keys that matter."""
    vit, llm = QWEN25[size]
    text = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **QWEN25_COMMON, **llm}
    if layout == "original":
        vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "image_size": 448, "patch_size": 14,
                  "hidden_act": "gelu", "layer_norm_eps": 1e-06, "use_flash_attn": True, "drop_path_rate": 0.0, **vit}
        return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
                "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "dynamic_image_size": True,
                "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "force_image_size": 448,
                "vision_config": vision, "llm_config": {**text, "tie_word_embeddings": False}, "torch_dtype": "bfloat16"}
    vision = {"model_type": "internvl_vision", "image_size": [448, 448], "patch_size": [14, 14], "hidden_act": "gelu",
              "layer_norm_eps": 1e-06, "use_mean_pooling": True, "layer_scale_init_value": 0.1,
              **{k: v for k, v in vit.items() if k not in ("qkv_bias", "qk_normalization")},
              "attention_bias": vit["qkv_bias"], "use_qk_norm": vit["qk_normalization"]}
    return {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "downsample_ratio": 0.5,
            "image_seq_length": 256, "image_token_id": 151667, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "vision_config": vision,
            "text_config": {**text, "tie_word_embeddings": False}, "tie_word_embeddings": False}


def expected_parameters(size: str) -> int:
    """Written out from the architecture, not from our modules: InternViT (patch conv with bias, [CLS], 1 + 1024
    positions; per layer q/k/v (biases or q/k RMSNorm), the output projection, the MLP, two norms (LayerNorm:
    weight and bias; RMSNorm: weight), two layer scales), mlp1 (LayerNorm of 4 D, two linears), Qwen2.5 (q/k/v
    biases, GQA) and its own head."""
    vit, llm = QWEN25[size]
    D, F, L = vit["hidden_size"], vit["intermediate_size"], vit["num_hidden_layers"]
    norms = 2 * (2 * D if vit["norm_type"] == "layer_norm" else D)
    attn = 4 * D * D + D + (3 * D if vit["qkv_bias"] else 0) + (2 * D if vit["qk_normalization"] else 0)
    tower = D * 3 * 14 * 14 + D + D + 1025 * D + L * (attn + 2 * D * F + F + D + norms + 2 * D)
    d, n, H, KV, I, V = (llm[k] if k in llm else QWEN25_COMMON[k] for k in
                         ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                          "intermediate_size", "vocab_size"))
    hd = d // H
    layer = d * H * hd + H * hd + 2 * (d * KV * hd + KV * hd) + H * hd * d + 3 * d * I + 2 * d
    projector = 2 * 4 * D + 4 * D * d + d + d * d + d
    return tower + projector + V * d + n * layer + d + V * d


# the hub's model pages (OpenGVLab/InternVL3-*): 938M, 2.09B, 7.94B, 15.1B, 38.4B, 78.4B parameters
HUB_SIZES = {"1B": 0.938e9, "2B": 2.09e9, "8B": 7.94e9, "14B": 15.1e9, "38B": 38.4e9, "78B": 78.4e9}


RELEASED = [(size, layout) for size in QWEN25 for layout in ("original", "transformers")]
FAST = {(size, "original") for size in QWEN25} | {("1B", "transformers"), ("38B", "transformers")}  # both towers


@pytest.mark.parametrize("size, layout", [c if c in FAST else pytest.param(*c, marks=pytest.mark.slow) for c in RELEASED])
def test_released_configs_parse_and_build(size, layout):
    from minillava.model import Llava

    cfg = parse_config(released(size, layout))
    v, t = cfg.vision, cfg.text
    assert (v.model_type, v.image_size, v.patches_per_side, cfg.token_side, cfg.vision_feature_layer) == ("internvit", 448, 32, 16, -1)
    assert len(cfg.grid_pinpoints) == len(internvl_grids(1, 12)) and cfg.family == "internvl"
    assert (t.model_type, t.qkv_bias, t.rope_theta, t.tie_word_embeddings) == ("qwen2", True, 1e6, False)
    with torch.device("meta"):
        model = Llava(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_parameters(size)
    assert abs(n - HUB_SIZES[size]) / HUB_SIZES[size] < 0.002  # the pages' three digits


@pytest.mark.slow
def test_quantize_app_writes_the_hf_layout_and_refuses_the_fused_one(tmp_path, checkpoints, capsys):
    """apps.quantize on an -hf checkpoint (Qwen2's q/k/v biases stay as they are): the written int8 checkpoint
    answers as --quantize int8 does; OpenGVLab's fused attn.qkv is refused in one line, nothing written."""
    from minillava.apps import quantize
    from minillava.quant import Spec

    assert quantize.main(["--model", str(checkpoints["layer_norm", "hub"]), "--out", str(tmp_path / "q8"), "--bits", "8"]) == 0
    image = noise_image(200, 150, seed=6)
    written, tok = gen.load(str(tmp_path / "q8"))
    loaded = load_model(checkpoints["layer_norm", "hub"], quantize=Spec(8))
    assert (gen.generate(written, tok, image, QUESTION, "none", max_new_tokens=5).token_ids
            == gen.generate(loaded, tok, image, QUESTION, "none", max_new_tokens=5).token_ids)
    capsys.readouterr()
    code = quantize.main(["--model", str(checkpoints["layer_norm", "original"]), "--out", str(tmp_path / "no"), "--bits", "8"])
    err = capsys.readouterr().err
    assert code != 0 and "attn.qkv" in err and err.count("\n") == 1 and not (tmp_path / "no").exists()


def test_int4_with_a_head_off_the_kernels_16_rows(tmp_path, iv_tok, capsys):
    """--quantize int4 on an InternVL whose head has 314 rows (like InternVL3's 151,674: 10 past a multiple of
    16): the CPU kernel's packing gets 6 zero rows, the logits are sliced back and equal a dequantize-and-matmul
    of the stored integers (our float model, and transformers' InternVLForConditionalGeneration, with each
    quantized weight replaced by its dequantized copy) within
    the kernel's bfloat16 activations; greedy ids equal that reference's; apps.quantize writes the
    true 314 rows and its checkpoint gives the very logits of quantizing while loading."""
    from safetensors import safe_open

    from minillava import quant
    from minillava.apps import quantize
    from minillava.quant import QuantizedLinear, Spec

    hf = tiny.iv_hf_model(seed=3, vocab=314)
    src = tiny.save_iv_checkpoint(hf, tmp_path / "v314", "hub", iv_tok)
    spec = Spec(4, 128)  # `fit` on widths 128 / 128 / 256
    q4, ref = load_model(src, quantize=Spec(4), pack=False), load_model(src, pack=False)
    head = q4.lm_head
    assert isinstance(head, QuantizedLinear) and head.spec == spec and head.kernel == "int4pack_cpu"
    assert head.out_features == 314 and head.scales_and_zeros.shape == (1, 320, 2)  # the kernel's 6 zero rows
    with torch.no_grad():  # the same dequantized weights in ours and in transformers' model
        theirs = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|lm_head")
        for model, pattern in ((ref, quant.QUANTIZED), (hf, theirs)):
            for name, m in list(model.named_modules()):
                if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name):
                    m.weight.copy_(quant.dequantize(quant.quantize(m.weight, spec, torch.float32), spec, torch.float32))

    def logits(model, n=12):
        ids = torch.arange(3, 3 + n)
        model.llm.setup_cache(1, 64)
        return model.logits(model.llm(model.embed(ids)[None], torch.arange(n), prefill=True))

    got, want = logits(q4), logits(ref)
    with torch.no_grad():
        theirs = hf(input_ids=torch.arange(3, 15)[None]).logits
    assert got.shape == want.shape == theirs.shape and got.shape[-1] == 314 and got.is_contiguous()
    assert ((want - theirs).norm() / theirs.norm()).item() < 1e-5  # the reference is transformers' too
    # 0.0088 measured: the kernel's bfloat16 activations (1e-2 a layer in tests/test_quantize.py) through two
    # layers and the head; the float model itself is 0.28 away (int4's own error)
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    image, tok = noise_image(200, 150, seed=6), gen.load(str(src))[1]
    answer = gen.generate(q4, tok, image, QUESTION, "none", max_new_tokens=5).token_ids
    assert len(answer) == 5 and answer == gen.generate(ref, tok, image, QUESTION, "none", max_new_tokens=5).token_ids

    assert quantize.main(["--model", str(src), "--out", str(tmp_path / "q4"), "--bits", "4"]) == 0
    capsys.readouterr()
    with safe_open(str(tmp_path / "q4" / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("lm_head.weight"))
        assert tuple(f.get_slice(key).get_shape()) == (314, 64)
    written, _ = gen.load(str(tmp_path / "q4"))
    assert written.cfg.quantization == spec and torch.equal(logits(written), got)


README_MEMORY = {"1B": (1.9, 1.4, 1.2, 0.012), "2B": (4.2, 2.6, 1.9, 0.029), "8B": (15.9, 8.8, 5.5, 0.057),
                 "14B": (30.2, 16.3, 9.7, 0.197), "38B": (76.8, 44.8, 29.8, 0.262),
                 "78B": (156.8, 85.4, 51.9, 0.328)}  # GB bf16, GB int8, GB int4, MB of KV cache a token


@pytest.mark.parametrize("size", [s if s == "1B" else pytest.param(s, marks=pytest.mark.slow) for s in QWEN25])
def test_readme_memory_cells(size):
    """The README's and docs/checkpoints.md's InternVL3 cells, counted as the other rows (tests/test_quantize.py):
    the model on the meta device in bfloat16, the decoder's linears and head swapped for the storage form of int8
    and of int4 (the group size `Spec.fit` chooses: 128 on every Qwen2.5; the head's 151,674 rows stored as they
    are, their kernel's padding to 151,680 in memory being 6 rows); the KV cache a token,
    2 x layers x KV heads x head x 2 bytes."""
    from minillava import quant
    from minillava.model import Llava
    from minillava.quant import Spec

    cfg = parse_config(released(size, "original"))
    int4 = Spec(4).fit(quant.input_widths(cfg.text))
    assert int4.group_size == 128
    sizes = []
    for spec in (None, Spec(8), int4):
        with torch.device("meta"):
            model = Llava(cfg).to(torch.bfloat16)
            if spec:
                quant.swap_linears(model, spec)
        sizes.append(round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9, 1))
    t = cfg.text
    assert (*sizes, round(2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2 / 1e6, 3)) == README_MEMORY[size]
