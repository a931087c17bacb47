"""InternVL3: parity with transformers' `InternVLForConditionalGeneration` on tiny random checkpoints in both
layouts (OpenGVLab's and -hf) and both tower kinds (LayerNorm; RMSNorm with q/k norm), stage by stage and then
greedy ids; tiles against the published `dynamic_preprocess` (a literal transcription) and transformers' image
processor; prompt ids against the published internvl2_5 template; the released configs; the CLI."""

import json

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
from tests.conftest import PARITY

QUESTION = "What is in the picture?"
TILE = tiny.TILE
# (w, h): 1 crop (no thumbnail), 2 x 2, 4 x 3, 3 x 4, a 12-crop strip, the (7, 1) / (8, 1) tie at 300 x 40
SIZES = [(56, 56), (120, 110), (200, 150), (150, 200), (700, 50), (300, 40), (57, 200)]


def max_diff(a, b, stage: str) -> float:
    d = (a.float() - b.float()).abs().max().item()
    PARITY.append((stage, d))
    return d


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


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
    hub, original = load_model(checkpoints[kind, "hub"]), load_model(checkpoints[kind, "original"])
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
