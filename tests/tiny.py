"""Tiny random LLaVA-NeXT checkpoints, built with transformers and saved in every key layout.

Nothing here is downloaded: the model is transformers' `LlavaNextForConditionalGeneration` from a
small config with random weights, and the tokenizer is a sentencepiece model trained on a few lines.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

TILE = 56  # tile side: 4 x 4 patches of 14 px
PINPOINTS_WH = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # LLaVA-1.6's, scaled by 1/6
SP_VOCAB = 400  # tokenizer pieces
VOCAB = 416  # embedding rows: padded past the tokenizer, like the hub's 32064
IMAGE_TOKEN = 415  # transformers' placeholder id (a padding row)

LINES = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the picture? ASSISTANT: A red square next to a blue circle.",
    "How many dots are there? Three. Which colour is the text? Green.",
    "Describe the image in detail. The scene shows shapes, letters and numbers.",
    "Is there a cat? No. Is there a triangle? Yes, at the top left.",
]


def train_tokenizer(path: Path) -> Path:
    """A LLaMA-style sentencepiece model (unk 0, bos 1, eos 2, byte fallback) trained on LINES."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES * 20),
        model_writer=buf,
        vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def hf_config(**text_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        image_size=TILE, patch_size=14, projection_dim=32,
    )
    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=1024, rms_norm_eps=1e-5,
    )
    text.update(text_overrides)
    return LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_grid_pinpoints=[[h, w] for w, h in PINPOINTS_WH],
        image_token_index=IMAGE_TOKEN,
    )


def hf_model(seed: int = 0, **text_overrides):
    """transformers' LlavaNext with random weights large enough that outputs depend on them."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(hf_config(**text_overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # norms away from 1 so their weights matter
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def canonical_state(model) -> dict[str, torch.Tensor]:
    """Weights under transformers' hub names (language_model.model.*, vision_tower.vision_model.*)."""
    out = {}
    for key, value in model.state_dict().items():
        for old, new in [
            ("model.language_model.", "language_model.model."),
            ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.image_newline", "image_newline"),
            ("lm_head.", "language_model.lm_head."),
        ]:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value.detach().clone().contiguous()
    return out


def rename(state: dict, table: list[tuple[str, str]]) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in table:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


LAYOUTS = {
    # transformers as published on the hub (sharded)
    "hub": [],
    # transformers 5 save_pretrained: no vision_model. level
    "tf5": [("vision_tower.vision_model.", "vision_tower.")],
    # newer transformers 4.x saves
    "tf4new": [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ],
    # original LLaVA
    "original": [
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
        ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("image_newline", "model.image_newline"),
    ],
}


def original_config(hf_cfg) -> dict:
    t = hf_cfg.text_config
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": 10000.0,
        "vocab_size": t.vocab_size,
        "tie_word_embeddings": False,
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": PINPOINTS_WH,
        "mm_hidden_size": hf_cfg.vision_config.hidden_size,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "tiny/clip-vit-test",  # unknown: sizes come from the weights
        "use_mm_proj": True,
    }


def save_checkpoint(model, out: Path, layout: str, tokenizer: Path, shards: int = 2) -> Path:
    """Write `model` to `out` in `layout` (a key of LAYOUTS): config.json, safetensors, tokenizer.model."""
    out.mkdir(parents=True, exist_ok=True)
    state = rename(canonical_state(model), LAYOUTS[layout])
    if layout == "original":
        config = original_config(model.config)
    else:
        config = model.config.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    keys = sorted(state)
    if shards == 1:
        save_file(state, out / "model.safetensors")
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, out / name)
            weight_map.update({k: name for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return out
