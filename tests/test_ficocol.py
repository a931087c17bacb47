"""FiCoCo-L (`--compressor ficoco-l`, globalcom2/ficocol.py) against its published code.

1. A literal transcription of kawhiiiileo/FiCoCo @ 8995e93, llava/model/language_model/FiCoCo_L.py (`Filter`,
   `Correlate`, `Compress`, `merge_ficoco_l`; the last line of `Compress` re-indented to its body, where the
   published file does not import, as in the notebook checkpoint beside it) and of llava_llama.py
   (`scaled_dot_product_attention`, the scores; the merging branch of `FiCoCo_LlamaDecoderLayer.forward`),
   with transformers 4.37's RoPE as tests/test_pdrop.py transcribes it, run against our stage on many
   random cases: the same kept positions and the same merged tokens.
2. Greedy ids through the CLI against a naive reference decoder (eager layers, no cache) that merges with
   the transcribed functions inside the published layers (scaled), renumbers, and decodes every answer
   token at the next position of each layer's own sequence (our stated decode rule, docs/methods.md).
"""

import math
from typing import Any, Callable, Tuple, Union

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from globalcom2.ficocol import FiCoCoL, ficoco_l_schedule, merge_layers, merged_per_layer
from minillava import generate as gen
from minillava.config import TextConfig
from minillava.llama import Decoder
from minillava.schedule import Between, apply_stage, layer_lengths, token_counts
from tests.test_fastv import QUESTION, deep_checkpoint, layer_ref, prompt_embeds, rms, rope  # noqa: F401 (a fixture)
from tests.test_pdrop import LlamaRotaryEmbedding, apply_rotary_pos_emb
from tests.test_pruning_methods import run_json


# --- the transcription: FiCoCo_L.py ---------------------------------------------------------------------

def merge_ficoco_l(
    Merge: Callable,
    input_embeddings: torch.Tensor,
    merge_indices: torch.Tensor,
    remain_indices: torch.Tensor,
    merge_targets: torch.Tensor,
    top_values: torch.Tensor,
    reduction_factor: int,
    size: torch.Tensor = None
) -> Tuple[torch.Tensor, torch.Tensor]:

    if size is None:
        size = torch.ones_like(input_embeddings[..., 0, None])

    input_embeddings = Compress(
        input_embeddings * size,  # Scale embeddings by their sizes
        merge_indices,
        remain_indices,
        merge_targets,
        top_values,
        reduction_factor,
        mode="sum"
    )
    size = Compress(size, merge_indices, remain_indices, merge_targets, top_values, reduction_factor, mode="sum")

    return input_embeddings, None


def Filter(
    embeddings: torch.Tensor,
    att_score: torch.Tensor,
    v_tokens: int,
    reduction_factor: int,
    include_class_token: bool = False,
    include_distill_token: bool = False,
) -> Union[Tuple[torch.Tensor, ...], Tuple[Any, ...]]:
    num_protected = int(include_class_token) + int(include_distill_token)
    total_tokens = embeddings.shape[1]  # noqa: F841 (literal)
    adjusted_reduction = reduction_factor

    if adjusted_reduction <= 0:
        return embeddings, embeddings

    with torch.no_grad():
        att_score_vt = att_score[..., :v_tokens, v_tokens:]
        att_score_tv = att_score[..., v_tokens:, :v_tokens]
        att_score_vv = att_score[..., :v_tokens, :v_tokens]
        att_score_vv_clone = att_score[..., :v_tokens, :v_tokens]
        att_score_list = [att_score_vv, att_score_vt, att_score_tv]
        att_score_vv = att_score_vv.clone()
        diag_indices = torch.arange(v_tokens)
        att_score_vv[..., diag_indices, diag_indices] = -float('inf')
        dir_text2image = att_score[..., :v_tokens, v_tokens:].mean(dim=-1)
        g = 0.6
        att_score_vv = att_score_vv_clone.sum(dim=-1)
        Scores = g * att_score_vv - (1 - g) * dir_text2image

        if num_protected > 0:
            Scores[..., :num_protected] = -float('inf')

        r = adjusted_reduction
        topk_values, topk_indices = torch.topk(Scores, r, dim=-1)
        merge_idx = topk_indices.unsqueeze(-1)
        dst_idx = topk_indices.unsqueeze(-1)  # noqa: F841 (literal)
        batch_size = embeddings.shape[0]
        all_indices = torch.arange(v_tokens, device=embeddings.device).unsqueeze(0).expand(batch_size, -1)
        mask = torch.ones_like(all_indices, dtype=torch.bool)
        mask.scatter_(dim=-1, index=merge_idx.squeeze(-1), value=False)
        remain_idx = all_indices[mask].view(batch_size, -1)

        return merge_idx, remain_idx, att_score_list


def Correlate(
    merge_idx: torch.Tensor,
    att_score_list: torch.Tensor,
    att_score: torch.Tensor,
    r: int
) -> torch.Tensor:
    att_score_vv, att_score_vt, att_score_tv = att_score_list[0], att_score_list[1], att_score_list[2]
    indirect_score = torch.einsum('bij,bjk->bik', att_score_vt, att_score_tv)
    a = 0.6
    Con_scores = a * att_score_vv + (1 - a) * indirect_score
    batch_size, num_tokens, _ = Con_scores.shape
    for i in range(batch_size):
        Con_scores[i].fill_diagonal_(-float('inf'))
    for idx in merge_idx.squeeze(-1):
        att_score_vv[:, idx, idx] = -float('inf')
        indirect_score[:, idx, :] = -float('inf')
        indirect_score[:, :, idx] = -float('inf')
    merge_idx_choose = merge_idx.squeeze(-1)
    choose_att_prob = Con_scores[0, merge_idx_choose[0], :]
    choose_att_prob = choose_att_prob.float()
    threshold_values = torch.quantile(choose_att_prob, 0.998, dim=-1, keepdim=True)
    mask = choose_att_prob > threshold_values
    topk_per_token = mask.sum(dim=-1)
    max_topk = topk_per_token.max().item()
    att_prob = nn.functional.softmax(Con_scores, dim=-1)
    top_values, top_indices = att_prob.topk(max_topk, dim=-1)
    expand_merge_indices = merge_idx.expand(-1, -1, top_indices.shape[-1])
    target_indices = top_indices.gather(dim=-2, index=expand_merge_indices)
    return target_indices, top_values


def Compress(
    x: torch.Tensor,
    merge_idx: torch.Tensor,
    remain_idx: torch.Tensor,
    target_indice: torch.Tensor,
    top_values: torch.Tensor,
    reduction_factor: int,
    mode='mean',
    include_distill_token: bool = False,
) -> torch.Tensor:
        n, t, c = x.shape
        total_score = top_values.sum(dim=-1, keepdim=True)
        merge_weights = top_values / total_score
        merge_indices_choose = merge_idx.squeeze(-1)
        chosen_weights = merge_weights.gather(dim=1, index=merge_indices_choose.unsqueeze(-1).expand(-1, -1, merge_weights.size(-1)))  # noqa: E501
        merge_tokens = x.gather(dim=-2, index=merge_idx.expand(n, reduction_factor, c))
        weighted_tokens = merge_tokens.unsqueeze(2) * chosen_weights.unsqueeze(-1)
        expanded_tokens = weighted_tokens.reshape(n, -1, c)
        flat_indices = target_indice.reshape(n, -1).unsqueeze(-1).expand(-1, -1, c)
        x = x.scatter_add_(1, flat_indices, expanded_tokens)
        remain_idx = remain_idx.unsqueeze(-1)
        final_embeddings = x.gather(dim=-2, index=remain_idx.expand(n, t - reduction_factor, c))
        return final_embeddings


# --- the transcription: llava_llama.py -------------------------------------------------------------------

def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
        is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    L, S = query.size(-2), key.size(-2)
    scale_factor = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    attn_bias = torch.zeros(L, S, dtype=query.dtype)
    if is_causal:
        assert attn_mask is None
        temp_mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
        attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
        attn_bias.to(query.dtype)

    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_bias.masked_fill_(attn_mask.logical_not(), float("-inf"))
        else:
            attn_bias += attn_mask

    if enable_gqa:
        key = key.repeat_interleave(query.size(-3)//key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3)//value.size(-3), -3)

    attn_weight = query @ key.transpose(-2, -1) * scale_factor

    attn_score=attn_weight.mean(dim=1)
    attn_bias = attn_bias.to(attn_weight.device)
    attn_weight += attn_bias
    attn_weight = torch.softmax(attn_weight, dim=-1)
    attn_weight = torch.dropout(attn_weight, dropout_p, train=True)
    return attn_weight @ value,attn_score


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers 4.37 `repeat_kv`."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def published_scores(block, x, theta):
    """`FiCoCo_LlamaSdpaAttention.forward`'s `attn_score` (B, T, T) for the layer input x (B, T, D) at
    positions 0 .. T-1 (in a prefill after a merge, `adjust_position_ids` gives those)."""
    a = block.self_attn
    hidden_states = block.input_layernorm(x)
    bsz, q_len, _ = hidden_states.size()
    query_states = a.q_proj(hidden_states).view(bsz, q_len, a.heads, a.head_dim).transpose(1, 2)
    key_states = a.k_proj(hidden_states).view(bsz, q_len, a.kv_heads, a.head_dim).transpose(1, 2)
    value_states = a.v_proj(hidden_states).view(bsz, q_len, a.kv_heads, a.head_dim).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(a.head_dim, base=theta)(value_states, seq_len=q_len)
    position_ids = torch.arange(q_len)[None]
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
    key_states = repeat_kv(key_states, a.heads // a.kv_heads)
    value_states = repeat_kv(value_states, a.heads // a.kv_heads)
    _, attn_score = scaled_dot_product_attention(query_states, key_states, value_states, is_causal=q_len > 1)
    return attn_score


def published_merge(hidden_states, att_score, start, v_token, rr):
    """`FiCoCo_LlamaDecoderLayer.forward`'s merging branch on the stream after the attention (B, T, D), with
    our adaptation: the published functions get the sequence from the image on (they take its first
    `v_token` tokens as the image), the tokens before it are put back in front."""
    prefix, hidden_states, att_score = hidden_states[:, :start], hidden_states[:, start:], att_score[:, start:, start:]
    tem = hidden_states
    hidden_states_pre = hidden_states[:, :v_token]
    hidden_states_post = hidden_states[:, v_token:]
    if hidden_states.shape[1] - rr > 0 and rr > 0:
        merge_indices, remain_indices, att_score_list = Filter(tem, att_score, v_token, rr, True, False)
        target_indice, top_values = Correlate(merge_indices, att_score_list, att_score, rr)
        hidden_states_pre, _ = merge_ficoco_l(Compress, hidden_states_pre, merge_indices, remain_indices,
                                              target_indice, top_values, rr, None)
        hidden_states = torch.cat([hidden_states_pre, hidden_states_post], dim=1)
    return torch.cat([prefix, hidden_states], dim=1), remain_indices[0]


# --- 1. the rule, case by case ------------------------------------------------------------------------

def random_decoder(seed: int, kv_heads: int) -> Decoder:
    cfg = TextConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=kv_heads, max_position_embeddings=2048)
    g = torch.Generator().manual_seed(seed)
    decoder = Decoder(cfg).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    decoder.setup_rope(2048)
    return decoder


@pytest.mark.parametrize("seed", range(24))
def test_a_merge_equals_the_published_one(seed):
    """Random weights (GQA in every other case), layer inputs, image spans (tokens before and after it; long
    enough for 2 or 3 targets per merged token in every fourth case) and merge counts: our stage inside layer 1 keeps the published remaining tokens, and its tokens are the
    published merged ones, bit for bit."""
    g = torch.Generator().manual_seed(1000 + seed)
    decoder = random_decoder(seed, kv_heads=4 if seed % 2 else 2)
    low, high = (4, 150) if seed % 4 else (502, 700) if seed % 8 else (1002, 1200)  # targets per merged token: 1, 2, 3
    n = int(torch.randint(low, high, (1,), generator=g))
    before, after = int(torch.randint(0, 25, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
    r = int(torch.randint(1, n, (1,), generator=g))  # at most n - 1: the first token is never merged
    t = before + n + after
    x = torch.randn(1, t, decoder.cfg.hidden_size, generator=g)
    block, pos = decoder.layers[1], torch.arange(t)
    cos, sin = decoder.positions(pos)
    with torch.no_grad():
        stream = block.attend(x, cos, sin, pos, prefill=True)  # the residual stream after the attention
        want, remain = published_merge(stream.clone(), published_scores(block, x, decoder.cfg.rope_theta), before, n, r)
        between = Between(x, stream, lambda j, h: decoder.query_key(j, h, cos, sin), pos, x)
        ours, index = apply_stage(FiCoCoL(1, before, n, r), between)
    assert torch.equal(index, torch.cat([torch.arange(before), remain + before, torch.arange(before + n, t)]))
    assert torch.equal(ours, want), (ours - want).abs().max()


def test_the_published_settings():
    """llava_llama.py: r = 14 in every layer after `control_encoding_layer = 4` of 32; the last layer's merge
    reaches nothing, so 26 merge (5 .. 30) and the last layer sees 576 - 364 = 212: our r = 0.368."""
    assert merge_layers(32) == range(5, 31) and merge_layers(4) == range(1, 3) and merge_layers(3) == range(1, 2)
    stages = ficoco_l_schedule(35, 576, 0.368, 32)
    assert [(s.layer, s.start, s.length, s.dropped) for s in stages] == [(k, 35, 576 - 14 * (k - 5), 14) for k in range(5, 31)]
    assert all(s.inside and s.renumber for s in stages)
    attention, mlp = token_counts(stages, 600, 32)
    assert attention == layer_lengths(stages, 600, 32) == [600] * 6 + [600 - 14 * s for s in range(1, 27)]
    assert mlp == [600] * 5 + [600 - 14 * s for s in range(1, 27)] + [600 - 14 * 26]
    assert ficoco_l_schedule(35, 576, 1.0, 32) == ()
    assert merged_per_layer(0.01, 100, 3) == 33  # at least one token left: 100 - 99
    with pytest.raises(ValueError, match="only 2 decoder layers"):
        ficoco_l_schedule(0, 100, 0.5, 2)


# --- 2. end to end ------------------------------------------------------------------------------------

def attend_ref(block, x, theta):
    """The first half of one decoder layer on x (T, D) at positions 0 .. T-1, eagerly: the stream after the
    attention's residual, and the head-averaged logits before the mask (the published `attn_score`)."""
    a, t = block.self_attn, x.shape[0]
    h = rms(x, block.input_layernorm)
    q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(t, a.heads, a.head_dim).transpose(0, 1)
    k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(t, a.kv_heads, a.head_dim).transpose(0, 1)
    v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(t, a.kv_heads, a.head_dim).transpose(0, 1)
    pos = torch.arange(t)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    k, v = (z.repeat_interleave(a.heads // a.kv_heads, 0) for z in (k, v))
    logits = q @ k.transpose(1, 2) / math.sqrt(a.head_dim)
    maps = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return x + F.linear((maps @ v).transpose(0, 1).reshape(t, -1), a.o_proj.weight, a.o_proj.bias), logits.mean(0)


def feed_ref(block, x):
    h, m = rms(x, block.post_attention_layernorm), block.mlp
    gate, up = F.linear(h, m.gate_proj.weight, m.gate_proj.bias), F.linear(h, m.up_proj.weight, m.up_proj.bias)
    return x + F.linear(F.silu(gate) * up, m.down_proj.weight, m.down_proj.bias)


def ficocol_reference(model, prompt, start, length, r, eos_id, max_new_tokens=12):
    """Greedy ids of FiCoCo-L at r on the decoder input `prompt` (T, D) whose image is [start, start + length),
    naively: the prompt once through every layer (the transcribed merge inside each merging layer, the rest
    renumbered), then every answer token through every layer over the prompt's rows as they entered it."""
    layers, theta = model.llm.layers, model.cfg.text.rope_theta
    where = merge_layers(len(layers))
    m, v = merged_per_layer(r, length, len(where)), length
    entered, x = [], prompt  # the prompt's rows each layer saw
    for i, block in enumerate(layers):
        entered.append(x)
        if i in where:
            stream, scores = attend_ref(block, x, theta)
            merged, _ = published_merge(stream[None], scores[None], start, v, m)
            x, v = feed_ref(block, merged[0]), v - m
        else:
            x, _ = layer_ref(block, x, torch.arange(x.shape[0]), theta)
    ids, answer = [int(model.lm_head(rms(x[-1], model.llm.norm)).argmax())], []
    while ids[-1] != eos_id and len(ids) < max_new_tokens:
        answer.append(model.llm.embed_tokens.weight[ids[-1]])
        y = torch.stack(answer)
        for block, rows in zip(layers, entered):  # each layer: its prompt rows, then the answer, contiguous
            y = layer_ref(block, torch.cat([rows, y]), torch.arange(len(rows) + len(y)), theta)[0][len(rows):]
        ids.append(int(model.lm_head(rms(y[-1], model.llm.norm)).argmax()))
    return ids, v


@pytest.mark.parametrize("r", [0.5, 0.1])
def test_cli_greedy_ids_equal_the_naive_reference(capsys, deep_checkpoint, image_path, r):
    """The 4-layer tiny model: merges inside layers 1 and 2."""
    result = run_json(capsys, deep_checkpoint, image_path, "--compressor", "ficoco-l", "--retention-ratio", r)
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        prompt, start, length = prompt_embeds(model, tokenizer, image_path)
        ids, last = ficocol_reference(model, prompt, start, length, r, tokenizer.eos_id)
    assert result["token_ids"] == ids
    assert result["visual_tokens"] == {"before": length, "after": last} and last < length


def test_the_flops_count_every_merge(deep_checkpoint, image_path):
    """The efficiency count of a question: each layer's attention at what entered it, its MLP at what its merge
    left (layers 1 and 2 of 4 merge m each), and the layer-averaged image tokens beside the last layers' ones.
    r = 1 and batches: tests/test_pruning_methods.py."""
    from PIL import Image

    from minillava.batch import generate_batch
    from minillava.eval import efficiency as E
    from minillava.flops import LlmSpec, layered_prefill_flops

    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        (result,) = generate_batch(model, tokenizer, [(Image.open(image_path), QUESTION)], "ficoco-l", 0.25, max_new_tokens=2)
    spec = LlmSpec.from_text("tiny", model.cfg.text)
    n = result.visual_tokens["before"]
    m = merged_per_layer(0.25, n, 2)
    cost = E.question_cost(result, 30, spec, "ficoco-l", 0.25)
    attention, mlp = [n, n, n - m, n - 2 * m], [n, n - m, n - 2 * m, n - 2 * m]
    assert cost.prefill_flops == layered_prefill_flops(spec, [30 + t for t in attention], [30 + t for t in mlp])
    assert cost.prefill_flops < layered_prefill_flops(spec, [30 + t for t in attention])  # the merging layers' MLPs
    assert result.visual_tokens["after"] == n - 2 * m and cost.visual_layer_mean == sum(attention) / 4


def test_float16_scores_do_not_overflow():
    """Logits of about 100 over 35 text tokens: `correlate`'s image-text-image product passes float16's 65504
    (inf in the model's dtype: the threshold is not finite and nothing is merged); the stage scores in float32, so a float16 model's merged
    tokens stay finite and the choice is float32's on the same (float16-rounded) inputs."""
    from minillava.schedule import Between

    torch.manual_seed(0)
    n, h, t, hd, s, v = 1, 2, 80, 8, 5, 40
    q, k = torch.randn(n, h, t, hd) * 12, torch.randn(n, h, t, hd) * 12
    x = torch.randn(n, t, 16)
    stage = FiCoCoL(1, s, v, 10)
    got = {}
    for dtype in (torch.float16, torch.float32):
        qd, kd = q.half().to(dtype), k.half().to(dtype)
        between = Between(x.half().to(dtype), x.half().to(dtype), lambda j, hid: (qd, kd), torch.arange(t), None)
        index, tokens = stage.keep(between)
        assert tokens.dtype == dtype and torch.isfinite(tokens).all(), dtype
        got[dtype] = index, tokens.float()
    a = (q[:, :, s:].half() @ k[:, :, s:].half().transpose(-1, -2) * (1 / math.sqrt(hd))).mean(dim=1)[0]
    assert not torch.isfinite(a[:v, v:] @ a[v:, :v]).all()  # the overflow it guards against, in float16
    (index16, tokens16), (index32, tokens32) = got[torch.float16], got[torch.float32]
    assert torch.equal(index16, index32)
    # the same merge (in float16 scores the quantile is not finite: no target clears it, nothing is merged)
    assert not torch.equal(tokens32, x.half().float()[:, index32])
    torch.testing.assert_close(tokens16, tokens32, rtol=2e-3, atol=2e-3)  # float16's rounding of the copies
