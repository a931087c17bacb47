"""The real tower shape: CLIP ViT-L/14-336 with random weights against transformers' CLIP (about 25 s)."""

import math

import torch

from minillava.clip import ClipTower
from minillava.config import KNOWN_TOWERS
from tests.conftest import PARITY
from tests.peers_cases import tower_run


def test_vit_l14_336_matches_transformers():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=336, patch_size=14)).eval()
    ours = ClipTower(KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]).eval()
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True)
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        features, scores, _ = tower_run(ours, pixels)
        hidden = hf(pixels, output_hidden_states=True).hidden_states
        ref_features = hidden[-2][:, 1:]
        tower = getattr(hf, "vision_model", hf)
        last = tower.encoder.layers[-1]
        h = last.layer_norm1(hidden[-2])
        q = last.self_attn.q_proj(h[:, :1]).view(2, 1, 16, 64).transpose(1, 2)
        k = last.self_attn.k_proj(h).view(2, -1, 16, 64).transpose(1, 2)
        ref_scores = (q @ k.transpose(-1, -2) / math.sqrt(64)).mean(1)[:, 0, 1:]
    d_feat = (features - ref_features).abs().max().item()
    d_score = (scores - ref_scores).abs().max().item()
    PARITY.append((f"ViT-L/14-336 features, 2 tiles (values up to {ref_features.abs().max():.1f})", d_feat))
    PARITY.append((f"ViT-L/14-336 [CLS] scores (values up to {ref_scores.abs().max():.2f})", d_score))
    assert features.shape == (2, 576, 1024) and scores.shape == (2, 576)
    assert d_feat < 1e-3 * ref_features.abs().max().item()
    assert d_score < 1e-3 * ref_scores.abs().max().item()
