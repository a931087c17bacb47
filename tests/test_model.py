"""Parity with transformers, stage by stage, on a tiny random checkpoint, in float32."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from minillava.anyres import tile_image
from minillava.weights import load_model
from tests import tiny
from tests.conftest import PARITY
from tests.peers_cases import tower_run

TOL = 1e-4


def max_diff(a, b, stage: str | None = None) -> float:
    """Largest absolute difference; with `stage`, also listed in the parity summary at the end of the run."""
    d = (a.float() - b.float()).abs().max().item()
    if stage:
        PARITY.append((stage, d))
    return d


@pytest.fixture(scope="module")
def ours(checkpoints):
    return load_model(checkpoints["hub"], pack=False)


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_pixels(tiles):
    """Our tiles in transformers' input form: pixel_values (1, n, 3, S, S), image_sizes [[h, w]]."""
    return tiles.pixels[None], torch.tensor([[tiles.size[1], tiles.size[0]]])


@pytest.mark.parametrize("layout", list(tiny.LAYOUTS))
def test_every_layout_loads_the_same_weights(checkpoints, ours, layout):
    other = load_model(checkpoints[layout], pack=False)
    a, b = ours.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert other.cfg.vision == ours.cfg.vision and other.cfg.text == ours.cfg.text
    assert other.cfg.grid_pinpoints == ours.cfg.grid_pinpoints


def test_vision_features_match_transformers(ours, hf_model):
    pixels = tile_image(noise_image(90, 150), ours.cfg.grid_pinpoints, tiny.TILE).pixels
    with torch.no_grad():
        features = ours.vision(pixels)[-2][:, 1:]  # the feature layer, [CLS] dropped
        ref = hf_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    d = max_diff(features, ref, "vision features (layer -2), 3 tiles")
    assert features.shape == ref.shape
    assert d < TOL, f"vision features differ by {d:.2e}"


def test_cls_scores_match_an_explicit_computation(ours, hf_model):
    """Head-mean pre-softmax [CLS] logits of the last layer, from transformers' own modules."""
    pixels = tile_image(noise_image(120, 60, seed=1), ours.cfg.grid_pinpoints, tiny.TILE).pixels
    tower = hf_model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # transformers 4.x wraps it once more
    with torch.no_grad():
        _, scores, _ = tower_run(ours.vision, pixels)
        x = tower(pixels, output_hidden_states=True).hidden_states[-2]  # input of the last layer
        last = tower.encoder.layers[-1]
        h = last.layer_norm1(x)
        heads = last.self_attn.num_heads
        hd = h.shape[-1] // heads
        q = last.self_attn.q_proj(h).view(*h.shape[:2], heads, hd).transpose(1, 2)
        k = last.self_attn.k_proj(h).view(*h.shape[:2], heads, hd).transpose(1, 2)
        full = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (N, heads, T, T): the whole matrix, for reference
        ref = full[:, :, 0, 1:].mean(1)
    d = max_diff(scores, ref, "[CLS] scores vs explicit full-matrix computation")
    assert scores.shape == (pixels.shape[0], (tiny.TILE // 14) ** 2)
    assert d < TOL, f"[CLS] scores differ by {d:.2e}"


# Sizes whose unpadding gives the same rows under truncation (original LLaVA) and rounding (transformers).
PACK_SIZES = [(1, 1), (90, 150), (150, 90), (300, 40), (40, 300), (113, 112), (500, 320)]


@pytest.mark.parametrize("size", PACK_SIZES)
def test_packed_image_features_match_transformers(ours, hf_model, size):
    tiles = tile_image(noise_image(*size), ours.cfg.grid_pinpoints, tiny.TILE)
    pixel_values, image_sizes = hf_pixels(tiles)
    with torch.no_grad():
        packed = ours.image_tokens(ours.encode_images([tiles])[0])
        ref = hf_model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output[0]
    assert packed.shape == ref.shape, f"{size}: {tuple(packed.shape)} vs {tuple(ref.shape)}"
    d = max_diff(packed, ref, f"packed image features, {size[0]}x{size[1]}")
    assert d < TOL, f"{size}: packed features differ by {d:.2e}"


def test_decoder_logits_match_transformers(ours, hf_model):
    torch.manual_seed(0)
    embeds = torch.randn(1, 37, ours.cfg.text.hidden_size)
    with torch.no_grad():
        ours.llm.setup_cache(1, 64)
        logits = ours.logits(ours.llm(embeds, torch.arange(37), prefill=True))
        ref = hf_model(inputs_embeds=embeds).logits
    d = max_diff(logits, ref, "decoder logits, 37 tokens")
    assert d < TOL, f"decoder logits differ by {d:.2e}"


def test_cached_decoding_matches_a_full_forward(ours, hf_model):
    """Prefill then one token at a time through the static cache: the logits of a full pass."""
    torch.manual_seed(1)
    embeds = torch.randn(1, 20, ours.cfg.text.hidden_size)
    with torch.no_grad():
        ours.llm.setup_cache(1, 32)
        steps = [ours.logits(ours.llm(embeds[:, :12], torch.arange(12), prefill=True))]
        for t in range(12, 20):
            steps.append(ours.logits(ours.llm(embeds[:, t : t + 1], torch.tensor([t]))))
        ref = hf_model(inputs_embeds=embeds).logits
    d = max_diff(torch.cat(steps, dim=1), ref, "decoder logits, prefill 12 + 8 cached steps")
    assert d < TOL, f"cached decoding differs by {d:.2e}"


def test_grouped_query_attention_matches_transformers(tmp_path, tokenizer_path):
    hf = tiny.hf_model(seed=3, num_key_value_heads=2)
    model = load_model(tiny.save_checkpoint(hf, tmp_path / "gqa", "tf5", tokenizer_path, shards=1))
    embeds = torch.randn(1, 9, model.cfg.text.hidden_size)
    with torch.no_grad():
        model.llm.setup_cache(1, 16)
        logits = model.logits(model.llm(embeds, torch.arange(9), prefill=True))
        ref = hf(inputs_embeds=embeds).logits
    assert max_diff(logits, ref, "decoder logits, grouped-query attention") < TOL


def test_full_model_logits_match_transformers(ours, hf_model, tokenizer_path):
    from minillava.tokenizer import Tokenizer, build_prompt

    tok = Tokenizer(tokenizer_path)
    tiles = tile_image(noise_image(150, 90, seed=4), ours.cfg.grid_pinpoints, tiny.TILE)
    chunks = tok.encode_prompt(build_prompt("What is in the picture?"))
    with torch.no_grad():
        image = ours.image_tokens(ours.encode_images([tiles])[0])
        embeds = ours.prompt_embeds(chunks, [image])
        ours.llm.setup_cache(1, embeds.shape[1])
        logits = ours.logits(ours.llm(embeds, torch.arange(embeds.shape[1]), prefill=True))
        ids = torch.tensor([chunks[0] + [tiny.IMAGE_TOKEN] * image.shape[0] + chunks[1]])
        pixel_values, image_sizes = hf_pixels(tiles)
        ref = hf_model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    d = max_diff(logits, ref, "end-to-end logits, prompt + 150x90 image")
    assert d < TOL, f"end-to-end logits differ by {d:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_tracks_float32(checkpoints, ours, dtype):
    half = load_model(checkpoints["original"], dtype=dtype)
    assert all(p.dtype == dtype for p in half.parameters())
    embeds = torch.randn(1, 10, ours.cfg.text.hidden_size)
    with torch.no_grad():
        for m in (ours, half):
            m.llm.setup_cache(1, 16)
        ref = ours.logits(ours.llm(embeds, torch.arange(10), prefill=True))
        got = half.logits(half.llm(embeds.to(dtype), torch.arange(10), prefill=True))
    assert max_diff(got, ref) < 0.1 * ref.abs().max().item()
