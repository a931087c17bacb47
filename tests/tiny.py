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
    """transformers' Llava with random weights large enough that outputs depend on them."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    return randomise(LlavaNextForConditionalGeneration(hf_config(**text_overrides)).eval())


def randomise(model):
    """Random weights (from the current torch seed) large enough that outputs depend on them."""
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


# --- the LLaVA-1.6 family: a Mistral decoder, and a Yi-like decoder (GQA) with a ChatML tokenizer ---------

IM_START, IM_END = 400, 401  # ChatML's added tokens: embedding rows past the tokenizer's pieces, as no piece
CHATML_LINES = [  # Yi-like tokenizer text: the template's words, without <|im_start|> / <|im_end|>
    "system\nAnswer the questions.", "user\nWhat is in the picture?", "assistant\nA red square.",
] + LINES
ADDED = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}


def train_chatml_tokenizer(path: Path) -> Path:
    """A sentencepiece model as Yi's: no dummy prefix, ChatML tokens not among its pieces."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHATML_LINES * 20), model_writer=buf, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def hf_family_model(text_config, seed: int = 0):
    """transformers' Llava with the tiny tower and `text_config` (a LlamaConfig or MistralConfig),
    weights initialised as `hf_model`'s."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=hf_config().vision_config, text_config=text_config,
                             image_grid_pinpoints=[[h, w] for w, h in PINPOINTS_WH], image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    return randomise(LlavaNextForConditionalGeneration(config).eval())


def mistral_text_config(**overrides):
    """A tiny Mistral decoder: GQA (4 query heads, 2 KV heads), rope_theta 1e6 and a sliding window
    longer than the tests' prompts (shorter ones are refused)."""
    from transformers import MistralConfig

    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=1024,
                rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=512)
    return MistralConfig(**{**text, **overrides})


def yi_text_config():
    """A tiny Yi-34B: LLaMA layers, GQA 8 query heads on 2 KV heads (Yi: 56 on 8), rope_theta 5e6,
    ChatML's end <|im_end|> as EOS."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       rope_theta=5e6, bos_token_id=1, eos_token_id=IM_END)


MISTRAL_CHAT_TEMPLATE = (  # llava-hf's Mistral chat template, in its parts that matter here
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] {% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %} [/INST]{% endif %}{% endfor %}"
)
CHATML_CHAT_TEMPLATE = (  # llava-hf's 34B chat template, in its parts that matter here
    "{% for message in messages %}{% if message['role'] == 'system' %}<|im_start|>system\n{{ message['content'] }}"
    "<|im_end|>{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_mistral_checkpoint(model, out: Path, layout: str, tokenizer: Path) -> Path:
    """A Mistral Llava in the hub layout with llava-hf's kind of chat_template.json, or in the
    original layout (model_type llava_mistral, no chat template, as liuhaotian/llava-v1.6-mistral-7b)."""
    save_checkpoint(model, out, layout, tokenizer)
    if layout == "original":
        t = model.config.text_config
        config = original_config(model.config)
        config.update(model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"],
                      rope_theta=t.rope_parameters["rope_theta"], sliding_window=t.sliding_window, head_dim=t.head_dim)
        (out / "config.json").write_text(json.dumps(config, indent=1))
    else:
        (out / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL_CHAT_TEMPLATE}))
    return out


def save_chatml_checkpoint(model, out: Path, tokenizer: Path) -> Path:
    """A Yi-like Llava in the hub layout: <|im_start|> / <|im_end|> only in tokenizer_config.json's
    added_tokens_decoder, no BOS added (Yi's tokenizer adds none), llava-hf's kind of chat template."""
    save_checkpoint(model, out, "hub", tokenizer)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False,
        "added_tokens_decoder": {str(IM_START): {"content": "<|im_start|>", **ADDED},
                                 str(IM_END): {"content": "<|im_end|>", **ADDED}},
        "chat_template": CHATML_CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
    }, indent=1))
    return out


def stop_at_im_end(model, input_ids, max_new_tokens: int = 12, **inputs) -> list[int]:
    """Make greedy decoding of `input_ids` emit <|im_end|> after a few tokens (random weights never
    would): its lm_head row becomes a slightly larger copy of the row of a token greedy decoding emits
    later, so it wins there first. Returns transformers' greedy ids, ending in IM_END."""
    head = model.lm_head.weight
    with torch.no_grad():
        plain = model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=IM_END, pad_token_id=0, **inputs)[0, input_ids.shape[1]:].tolist()
        for j in range(3, len(plain)):
            if plain[j] in plain[:j]:
                continue
            head[IM_END] = 1.01 * head[plain[j]]
            out = model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=IM_END, pad_token_id=0, **inputs)[0, input_ids.shape[1]:].tolist()
            if len(out) >= 3 and out[-1] == IM_END:
                return out
    raise RuntimeError("no stopping point found for <|im_end|>")


def train_chatml_piece_tokenizer(path: Path) -> Path:
    """As `train_chatml_tokenizer`, but <|im_start|> and <|im_end|> are user-defined pieces of the model,
    which sentencepiece itself matches in any text."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHATML_LINES * 20), model_writer=buf, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


# --- LLaVA-OneVision: SigLIP tower, Qwen2 decoder (q, k, v biases, GQA), anyres_max_9, byte-level BPE -------

OV_PINPOINTS_WH = [[TILE * i, TILE * j] for i in range(1, 7) for j in range(1, 7)]  # OneVision's 384..2304, / (384/56)
OV_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen2's added tokens, after the BPE pieces
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")  # Qwen2's tokenizer.json pre-tokenizer split
OV_BPE = 300  # BPE pieces (bytes and merges); the added tokens follow
OV_VOCAB = 320  # embedding rows, padded past the tokenizer as Qwen2's 151936 are
OV_IMAGE_TOKEN = 319  # transformers' placeholder id (a padding row)


def train_qwen_tokenizer(path: Path) -> Path:
    """A tokenizer.json built as Qwen2's: NFC, the Qwen2 split and byte-level pieces, BPE, its added
    tokens after the pieces (<|endoftext|>, <|im_start|>, <|im_end|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=OV_BPE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CHATML_LINES * 20, trainer)
    tok.add_special_tokens(OV_SPECIAL)
    tok.save(str(path))
    return path


def ov_hf_config(tie: bool = False, vision_aspect_ratio: str = "anyres_max_9", layers: int = 3):
    """A tiny LlavaOnevisionConfig: SigLIP (2 layers, no head) on 56 px tiles of 4 x 4 patches, Qwen2 with
    GQA (4 query heads on 2 KV heads) and rope_theta 1e6, the 6 x 6 pinpoints scaled to the tile."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TILE, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=OV_VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-6,
                       rope_theta=1e6, tie_word_embeddings=tie, bos_token_id=OV_BPE, eos_token_id=OV_BPE + 2)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, tie_word_embeddings=tie,
                                image_grid_pinpoints=[[h, w] for w, h in OV_PINPOINTS_WH],
                                image_token_index=OV_IMAGE_TOKEN, video_token_index=OV_IMAGE_TOKEN - 1,
                                vision_aspect_ratio=vision_aspect_ratio)


def ov_hf_model(seed: int = 0, **kw):
    """transformers' LlavaOnevisionForConditionalGeneration with random weights (as `hf_model`'s)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = randomise(LlavaOnevisionForConditionalGeneration(ov_hf_config(**kw)).eval())
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


OV_LAYOUTS = {
    # llava-hf/llava-onevision-qwen2-*-ov-hf as published
    "hub": [],
    # lmms-lab/llava-onevision-qwen2-*-ov: LLaVA-NeXT's keys (llava_qwen.py)
    "original": LAYOUTS["original"],
}


def ov_original_config(hf_cfg) -> dict:
    """An lmms-lab config.json for `hf_cfg`: Qwen2's keys at the top level, model_type "llava" and the
    class in `architectures`, anyres_max_9 and the pinpoints as (width, height), the tower by a name we
    do not know (its sizes come from the weights)."""
    t = hf_cfg.text_config
    return {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_attention_heads, "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_parameters["rope_theta"], "vocab_size": t.vocab_size,
        "tie_word_embeddings": t.tie_word_embeddings, "use_sliding_window": False, "sliding_window": 32768,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "hidden_act": "silu",
        "image_aspect_ratio": hf_cfg.vision_aspect_ratio, "image_grid_pinpoints": OV_PINPOINTS_WH,
        "mm_hidden_size": hf_cfg.vision_config.hidden_size, "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "tiny/siglip-test", "mm_newline_position": "one_token", "use_mm_proj": True,
    }


def save_ov_checkpoint(model, out: Path, layout: str, tokenizer: Path) -> Path:
    """Write a OneVision `model` to `out` in `layout` (a key of OV_LAYOUTS): config.json, safetensors,
    tokenizer.json; the hub layout with llava-hf's kind of chat template (ChatML markers)."""
    out.mkdir(parents=True, exist_ok=True)
    state = rename(canonical_state(model), OV_LAYOUTS[layout])
    if model.config.tie_word_embeddings:  # tied: the head is the embedding table, saved once
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    config = ov_original_config(model.config) if layout == "original" else model.config.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state, out / "model.safetensors")
    (out / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    if layout == "hub":
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_CHAT_TEMPLATE}))
    return out


# --- InternVL: InternViT (LayerNorm, or RMSNorm with q/k norm), pixel shuffle, Qwen2, tiles thumbnail last ---

IV_SPECIAL = [*OV_SPECIAL, "<img>", "</img>", "<IMG_CONTEXT>"]  # InternVL3's added tokens (Qwen2's, then its own)
IV_IMAGE_TOKEN = OV_BPE + 5  # <IMG_CONTEXT>: transformers' placeholder id
IV_MAX_TILES = 12


def train_internvl_tokenizer(path: Path) -> Path:
    """As `train_qwen_tokenizer`, with InternVL's <img>, </img>, <IMG_CONTEXT> added after Qwen2's tokens."""
    from tokenizers import Tokenizer

    train_qwen_tokenizer(path)
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens(IV_SPECIAL[3:])
    tok.save(str(path))
    return path


def iv_hf_config(rms: bool = False, layers: int = 2, tie: bool = False, tile: int = TILE, vocab: int = OV_VOCAB):
    """A tiny InternVLConfig: InternViT (2 layers, 56 px tiles of 4 x 4 patches: 2 x 2 tokens after the pixel
    shuffle) with LayerNorm and q, k, v biases (the 300M tower's kind) or `rms` RMSNorm with q/k norm and no
    biases (the 6B tower's), a Qwen2 decoder with GQA and `vocab` embedding rows (a head of 314 is, like
    InternVL3's 151,674, 10 past a multiple of 16: the int4 kernels' padding)."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=tile, patch_size=14, norm_type="rms_norm" if rms else "layer_norm",
                                  use_qk_norm=rms, attention_bias=not rms, layer_norm_eps=1e-6)
    text = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       rope_theta=1e6, tie_word_embeddings=tie, bos_token_id=OV_BPE, eos_token_id=OV_BPE + 2)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IV_IMAGE_TOKEN,
                          image_seq_length=(tile // 28) ** 2,
                          downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=tie)


def iv_hf_model(seed: int = 0, **kw):
    """transformers' InternVLForConditionalGeneration with random weights (as `hf_model`'s; layer scale too)."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    return randomise(InternVLForConditionalGeneration(iv_hf_config(**kw)).eval())


IV_LAYOUTS = {
    # OpenGVLab/InternVL3-*-hf as published (transformers 4.5x saves)
    "hub": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")],
    # OpenGVLab/InternVL3-*: its own modeling_internvl_chat.py (vision_model, mlp1, language_model)
    "original": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_model."), ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
                 ("model.multi_modal_projector.linear_1.", "mlp1.1."),
                 ("model.multi_modal_projector.linear_2.", "mlp1.3.")],
}
ORIGINAL_VIT = [  # transformers' InternViT names -> OpenGVLab's (modeling_intern_vit.py)
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("encoder.layer.", "encoder.layers."), (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."), (".attention.k_norm.", ".attn.k_norm."),
    (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."), (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
]


def iv_original_state(state: dict) -> dict:
    """transformers' InternVL weights in OpenGVLab's names: the tower's renamed, q, k, v fused into attn.qkv."""
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            for old, new in ORIGINAL_VIT:
                key = key.replace(old, new, 1)
        out[key] = value
    for key in [k for k in out if ".attention.q_proj." in k]:
        parts = [out.pop(key.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"]
        out[key.replace(".attention.q_proj.", ".attn.qkv.")] = torch.cat(parts).contiguous()
    return out


def iv_original_config(hf_cfg) -> dict:
    """An OpenGVLab config.json (InternVLChatConfig) for `hf_cfg`."""
    v, t = hf_cfg.vision_config, hf_cfg.text_config
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "dynamic_image_size": True,
        "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": IV_MAX_TILES, "force_image_size": v.image_size[0],
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                          "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                          "image_size": v.image_size[0], "patch_size": 14, "qkv_bias": v.attention_bias,
                          "qk_normalization": v.use_qk_norm, "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps,
                          "hidden_act": "gelu", "use_flash_attn": False},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": t.hidden_size,
                       "intermediate_size": t.intermediate_size, "num_attention_heads": t.num_attention_heads,
                       "num_hidden_layers": t.num_hidden_layers, "num_key_value_heads": t.num_key_value_heads,
                       "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
                       "rope_theta": t.rope_parameters["rope_theta"], "vocab_size": t.vocab_size,
                       "use_sliding_window": False, "sliding_window": 32768, "bos_token_id": t.bos_token_id,
                       "eos_token_id": t.eos_token_id, "hidden_act": "silu", "tie_word_embeddings": False},
    }


def save_iv_checkpoint(model, out: Path, layout: str, tokenizer: Path) -> Path:
    """Write an InternVL `model` to `out` in `layout` (a key of IV_LAYOUTS): config.json, safetensors, tokenizer.json."""
    out.mkdir(parents=True, exist_ok=True)
    state = rename({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, IV_LAYOUTS[layout])
    if layout == "original":
        state = iv_original_state(state)
    config = iv_original_config(model.config) if layout == "original" else model.config.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state, out / "model.safetensors")
    (out / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return out
