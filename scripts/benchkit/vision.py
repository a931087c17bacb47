"""Rows 1, 2: the vision tower, ours against transformers' CLIP (sdpa, and eager with attention maps)."""

from __future__ import annotations

import time

import torch

import globalcom2
from minillava.clip import ClipTower
from minillava.config import VisionConfig

from .fmt import fmt_dict
from .plan import Plan
from .timing import alternate, wall


def hf_clip(cfg: VisionConfig, attn: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_cfg = CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_channels=cfg.num_channels, layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
    )
    return CLIPVisionModel._from_config(hf_cfg, attn_implementation=attn).eval().requires_grad_(False)


@torch.inference_mode()
def bench_vision(plan: Plan, pixels: torch.Tensor, log) -> dict:
    """Our tower (features of layer -2 + [CLS] scores) against transformers' CLIP, same weights, float32."""
    torch.manual_seed(0)
    hf = hf_clip(plan.vision, "sdpa")
    eager = hf_clip(plan.vision, "eager")
    eager.load_state_dict(hf.state_dict(), strict=True, assign=True)  # share hf's tensors
    with torch.device("meta"):
        ours = ClipTower(plan.vision)
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True, assign=True)
    ours.eval()

    n_layers = len(ours.encoder.layers)

    def run_ours():  # the feature layer and GlobalCom2's [CLS] scores, as generate computes them
        x = ours(pixels, (-2,))[-2]  # the last layer's input
        scores = globalcom2.tower_probes((globalcom2.SCORE_PROBE,), {n_layers - 1: x}, ours.query_key, n_layers)
        return x[:, 1:], scores[globalcom2.SCORE_PROBE][:, 1:]

    def run_hf():  # what transformers' LLaVA-NeXT does: all hidden states, take -2
        return hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]

    def run_eager():  # what the published GlobalCom2 code does: eager attention, every layer's maps
        out = eager(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        return out.hidden_states[-2][:, 1:], out.attentions[-1][:, :, 0, 1:].mean(1)  # [CLS] row, last layer

    warm = {}
    t0 = time.perf_counter()
    features, scores = run_ours()
    warm["ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = run_hf()
    warm["hf_sdpa"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_eager, _ = run_eager()
    warm["hf_eager_attn"] = time.perf_counter() - t0
    log(f"vision warm-up (s): {fmt_dict(warm)}")
    parity = {"features_vs_hf": (features - ref).abs().max().item(),
              "features_vs_hf_eager": (features - ref_eager).abs().max().item(),
              "feature_scale": ref.abs().max().item()}
    del ref, ref_eager
    samples = alternate({"ours": wall(run_ours), "hf_sdpa": wall(run_hf), "hf_eager_attn": wall(run_eager)},
                        plan.repeats["vision"], warmup=False, label="vision")
    log(f"vision samples (s): {fmt_dict(samples)}")
    params = sum(p.numel() for p in ours.parameters())
    return {"samples": samples, "warmup_s": warm, "parity": parity, "scores": scores.clone(), "params": params,
            "tiles": pixels.shape[0]}
