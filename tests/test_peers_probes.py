"""Tower probes (globalcom2/probes.py from the tower's hidden states and `query_key`) against transformers'
eager CLIP: [CLS] attention rows, keys and hidden states per layer."""

import pytest
import torch

from minillava.clip import ClipTower
from minillava.config import VisionConfig
from tests.conftest import PARITY
from tests.peers_cases import tower_run

LAYERS = 4


@pytest.fixture(scope="module")
def towers():
    """A tiny random CLIP tower (4 layers, 3 heads) in transformers (eager) and ours, same weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=LAYERS, num_attention_heads=3,
                           image_size=56, patch_size=14, attn_implementation="eager")
    hf = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # weights big enough that the attention rows are far from uniform
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    ours = ClipTower(VisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=LAYERS,
                                    num_attention_heads=3, image_size=56, patch_size=14)).eval()
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def reference(hf, pixels):
    """transformers' attentions and hidden states, and each layer's k_proj output caught by a forward hook."""
    tower = getattr(hf, "vision_model", hf)
    keys, hooks = {}, []
    for i, layer in enumerate(tower.encoder.layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i, out)))
    try:
        out = hf(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.attentions, out.hidden_states, keys


@pytest.mark.parametrize("layer", [0, 1, -2, -1])
@pytest.mark.parametrize("feature_layer", [-2, -1])  # -1: the last layer runs
def test_probes_equal_transformers(towers, layer, feature_layer):
    hf, ours = towers
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(layer + 10))
    needs = (("cls_attn", layer), ("keys", layer), ("hidden", layer))
    with torch.no_grad():
        features, scores, probes = tower_run(ours, pixels, feature_layer, needs)
        plain = tower_run(ours, pixels, feature_layer)
        attentions, hidden, keys = reference(hf, pixels)
    assert set(probes) == set(needs)
    cls = attentions[layer][:, :, 0, :]  # (N, heads, 1 + P)
    assert probes["cls_attn", layer].dtype == torch.float32 and probes["cls_attn", layer].shape == cls.shape
    d = (probes["cls_attn", layer] - cls).abs().max().item()
    PARITY.append((f"[CLS] attention row, layer {layer}", d))
    assert d < 1e-6
    # our layers use fused attention, transformers' eager one: equal up to float rounding
    for kind, ref in (("keys", keys[layer % LAYERS]), ("hidden", hidden[layer % LAYERS + 1])):
        assert probes[kind, layer].shape == ref.shape and probes[kind, layer].dtype == ref.dtype
        d = (probes[kind, layer] - ref).abs().max().item()
        PARITY.append((f"{kind} probe, layer {layer}", d))
        assert d < 1e-5, (kind, d)
    # asking for probes changes nothing else
    assert torch.equal(features, plain[0]) and torch.equal(scores, plain[1])
    if layer % LAYERS + 1 == feature_layer % (LAYERS + 1):
        assert torch.equal(probes["hidden", layer][:, 1:], features)


def test_only_what_is_asked(towers):
    hf, ours = towers
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert tower_run(ours, pixels, -2, ())[2] == {}
        _, _, probes = tower_run(ours, pixels, -2, (("cls_attn", -2), ("cls_attn", 2)))  # one layer asked two ways
    assert set(probes) == {("cls_attn", -2), ("cls_attn", 2)}
    assert torch.equal(probes["cls_attn", -2], probes["cls_attn", 2])


def test_no_full_attention_matrix_is_made(towers, monkeypatch):
    """The probes are one query row: nothing of shape (.., T, T) is computed beyond the fused attention."""
    _, ours = towers
    seen = []
    real = torch.Tensor.__matmul__

    def watch(a, b):
        out = real(a, b)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", watch)
    with torch.no_grad():
        tower_run(ours, torch.randn(2, 3, 56, 56), -2, (("cls_attn", 0), ("cls_attn", -1), ("keys", -2)))
    assert seen and all(shape[-2] == 1 for shape in seen)


@pytest.mark.parametrize("bad, message", [((("attn", 0),), "unknown tower probe"), ((("keys", 4),), "outside")])
def test_bad_needs_are_refused(towers, bad, message):
    with pytest.raises(ValueError, match=message):
        tower_run(towers[1], torch.randn(1, 3, 56, 56), -2, bad)
