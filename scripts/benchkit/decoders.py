"""The decoders under test: transformers' LlamaForCausalLM and our Llava on the very same weight
tensors, copies in another dtype, their sizes, and prompt inputs."""

from __future__ import annotations

import torch

from minillava.config import LlavaConfig, TextConfig, VisionConfig
from minillava.llama import pack_linears
from minillava.model import Llava


STUB_VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14)  # the decoder benchmarks never call the tower


def build_decoders(text: TextConfig):
    """transformers' LlamaForCausalLM with random weights, and our Llava whose decoder and lm_head are
    the very same tensors (so only one copy is in memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = Llava(LlavaConfig(vision=STUB_VISION, text=text))
    for module in (ours.vision, ours.projector):
        module.to_empty(device="cpu")
        for p in module.parameters():
            p.data.zero_()
    ours.image_newline = torch.nn.Parameter(torch.zeros(text.hidden_size), requires_grad=False)
    llm_state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k.startswith("model.")}
    ours.llm.load_state_dict(llm_state, strict=True, assign=True)
    ours.lm_head.weight = hf.lm_head.weight
    ours.eval().requires_grad_(False)
    return ours, hf


def as_loaded(model: Llava) -> Llava:
    """`model` as load_model leaves it: on the CPU, its decoder's float matrices laid out for oneDNN
    (minillava/llama.py `Linear.pack`; no longer shared with transformers' copy); elsewhere unchanged."""
    pack_linears(model)
    return model


def clone_as(model: Llava, dtype: torch.dtype) -> Llava:
    """A second model of `model`'s config with its tensors in `dtype` (shared where already so; built on the
    meta device, so the converted tensors are the only new memory), `as_loaded`."""
    with torch.device("meta"):
        out = Llava(model.cfg)
    state = {k: (v.to_dense() if v.is_mkldnn else v).to(dtype) for k, v in model.state_dict().items()}
    out.load_state_dict(state, strict=True, assign=True)
    return as_loaded(out.eval().requires_grad_(False))


def decoder_weight_bytes(model: Llava) -> int:
    """Bytes of weights a decode step reads: every block, the final norm, lm_head and one embedding row."""
    llm = model.llm
    blocks = sum(p.numel() * p.element_size() for p in llm.layers.parameters())
    norm = llm.norm.weight.numel() * llm.norm.weight.element_size()
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    row = llm.embed_tokens.weight.shape[1] * llm.embed_tokens.weight.element_size()
    return blocks + norm + head + row


def decoder_params(model: Llava) -> int:
    return sum(p.numel() for p in model.llm.parameters()) + model.lm_head.weight.numel()


def text_params(t: TextConfig) -> int:
    """Parameters of the decoder `t` describes (embedding, blocks, final norm, untied lm_head)."""
    d, hd = t.hidden_size, t.head_dim
    attn = d * t.num_attention_heads * hd * 2 + d * t.num_key_value_heads * hd * 2
    block = attn + 3 * d * t.intermediate_size + 2 * d
    return 2 * t.vocab_size * d + t.num_hidden_layers * block + d


def random_embeds(hf, length: int, seed: int) -> torch.Tensor:
    """(1, length, D) rows of the embedding table for random ids: the decoder input of a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, hf.config.vocab_size, (1, length), generator=g)
    with torch.inference_mode():
        return hf.model.embed_tokens(ids).clone()
