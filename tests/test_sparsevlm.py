"""SparseVLM (`--compressor sparsevlm`, globalcom2/sparsevlm.py) against its published code (Gumpest/SparseVLMs,
tag v1.5).

1. Literal transcriptions of the published functions (llava/model/language_model/: the raters and the
   sparse layer's block of `LlamaDynamicvitModel.forward` in modelling_sparse_llama.py, the attention map
   of `LlamaDynamicvitFlashAttention2.forward`'s `return_logits` branch, score.py `attn_postprocess_topk`,
   utils.py `cluster_and_merge` and `batch_index_select`), with transformers 4.37's rotary helpers
   (tests/test_pdrop.py), run against our stage on many random cases: raters, scores, kept indices, the
   merged tokens, the whole sequence after the stage and its positions.
2. Greedy ids through the CLI against a naive reference decoder (tests/test_fastv.py's eager layers with
   full attention maps) applying the published rule at the published places (scaled to 4 layers).
"""

import math

import pytest
import torch

from globalcom2.sparsevlm import (PUBLISHED, SparseVLMStage, cluster_and_merge, pruning_layers, relation,
                                  sparsevlm_schedule, stage_budgets)
from minillava import generate as gen
from minillava.config import TextConfig
from minillava.llama import Decoder
from minillava.schedule import Between, apply_stage
from tests.test_fastv import QUESTION, deep_checkpoint, layer_ref, prompt_embeds, rms  # noqa: F401 (a fixture)
from tests.test_pdrop import LlamaRotaryEmbedding, apply_rotary_pos_emb
from tests.test_pruning_methods import run_json

# --- the transcription ------------------------------------------------------------------------------------

NOISE = [True]  # cluster_and_merge's tie-breaking noise; the tests that compare numbers exactly turn it off


def batch_index_select(x, idx):  # utils.py, its 3-D branch
    B, N, C = x.size()
    N_new = idx.size(1)
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    idx = idx + offset
    out = x.reshape(B * N, C)[idx.reshape(-1)].reshape(B, N_new, C)
    return out


def index_points(points, idx):  # utils.py
    device = points.device
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).to(device).view(view_shape).repeat(repeat_shape)
    new_points = points[batch_indices, idx, :]
    return new_points


def published_cluster_and_merge(x, cluster_num):  # utils.py
    B, N, C = x.shape

    x1 = x[:, :, None, :]  # ein.rearrange(x, "b l r -> b l () r") (einops is not a dependency here)
    x2 = x[:, None, :, :]  # ein.rearrange(x, "b l r -> b () l r")
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    # get local density
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    # add a little noise to ensure no tokens have the same density.
    density = density + torch.rand(
        density.shape, device=density.device, dtype=density.dtype) * 1e-6 * NOISE[0]

    # get distance indicator
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)

    # select clustering center according to score
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)

    # assign tokens to the nearest center
    dist_matrix = index_points(dist_matrix, index_down)

    idx_cluster = dist_matrix.argmin(dim=1)

    # make sure cluster center merge to itself
    idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)

    # merge tokens
    B, N, C = x.shape
    device = dist_matrix.device
    idx_token = torch.arange(N)[None, :].repeat(B, 1).to(device)  # noqa: F841
    agg_weight = x.new_ones(B, N, 1)  # noqa: F841

    token_weight = x.new_ones(B, N, 1)

    idx_batch = torch.arange(B, device=x.device)[:, None]
    idx = idx_cluster + idx_batch * cluster_num

    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N),
                          source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]

    # average token features
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N),
                        source=source.reshape(B * N, C).type(x.dtype))
    x_merged = x_merged.reshape(B, cluster_num, C)

    return x_merged


def attn_postprocess_topk(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx,
                          retained_tokens, layer_dict, sparse_token_dict):  # score.py (its tables passed in)
    self_attn_weights = self_attn_weights.mean(1)  # B, L[Q], L[K]

    t_token_idx = t_token_idx[1] + text_token_start
    relation_vis_text = self_attn_weights[:, t_token_idx, v_token_start: v_token_start + v_token_num]  # B, L2, L1

    relation_vis_text = relation_vis_text.mean(1)  # B, L1

    relation_vis = relation_vis_text
    s_flag = True       # s_flag controls whether token merge is needed.

    sparse_token_list = sparse_token_dict[retained_tokens]

    if v_token_num != 0:
        mask = torch.zeros_like(relation_vis, dtype=bool)
        _, indices = torch.topk(relation_vis, min(sparse_token_list[layer_dict[layer_idx]], v_token_num - 1), dim=1)
        mask[0][indices] = 1
    else:
        mask = torch.ones_like(relation_vis_text, dtype=bool)
        s_flag = False
    return mask, s_flag, relation_vis_text


def select_raters(hidden_states, v_token_start, text_token_start):  # LlamaDynamicvitModel.forward, "select text tokens"
    v_t = hidden_states[:, v_token_start: text_token_start, :]
    t_t = hidden_states[:, text_token_start:, :]
    m_v_t = v_t @ t_t.transpose(1, 2)  # [1, 576, 53]
    m_v_t = m_v_t.softmax(2).mean(1)  # [1, 53]
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    return t_token_idx


def attn_logits_of(block, hidden_states, position_ids, theta):
    """LlamaDynamicvitFlashAttention2.forward, `return_logits` (prefill, no padding), on our block's weights:
    the full post-softmax map (B, H, L, L) of the layer's input (its input_layernorm applied, as the
    decoder layer does before calling it)."""
    a = block.self_attn
    hidden_states = block.input_layernorm(hidden_states)
    bsz, q_len, _ = hidden_states.size()
    query_states = a.q_proj(hidden_states)
    key_states = a.k_proj(hidden_states)
    value_states = a.v_proj(hidden_states)
    query_states = query_states.view(bsz, q_len, a.heads, a.head_dim).transpose(1, 2)
    key_states = key_states.view(bsz, q_len, a.kv_heads, a.head_dim).transpose(1, 2)
    value_states = value_states.view(bsz, q_len, a.kv_heads, a.head_dim).transpose(1, 2)
    kv_seq_len = key_states.shape[-2]
    cos, sin = LlamaRotaryEmbedding(a.head_dim, base=theta)(value_states, seq_len=kv_seq_len)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
    L, S = query_states.size(-2), key_states.size(-2)
    scale_factor = 1 / math.sqrt(query_states.size(-1))
    attn_bias = torch.zeros(L, S, dtype=query_states.dtype)
    temp_mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
    attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
    attn_bias.to(query_states.dtype)
    attn_logits = query_states @ key_states.transpose(2, 3) * scale_factor
    attn_logits += attn_bias.to(query_states.device)
    attn_logits = torch.softmax(attn_logits, dim=-1)
    return attn_logits


def published_sparse_layer(attn_logits, layer_output, position_ids, v_token_start, v_token_num, text_token_start,
                           image_shape, t_token_idx, layer_idx, retained_tokens, layer_dict, sparse_token_dict):
    """LlamaDynamicvitModel.forward's inference block after a sparse layer (B = 1, pre_prompt_length_list =
    [v_token_start]); returns the new hidden states, position_ids, v_token_num and what it scored."""
    B = layer_output.shape[0]
    pre_prompt_length_list = [v_token_start]
    hidden_states = layer_output
    layer_outputs = (layer_output, None)
    pred_score_vis, s_flag, relation_vis_text = attn_postprocess_topk(attn_logits, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx, retained_tokens, layer_dict, sparse_token_dict)  # noqa: E501
    policy = torch.ones(B, hidden_states.shape[1], dtype=hidden_states.dtype, device=hidden_states.device)
    policy[:, v_token_start:text_token_start] = pred_score_vis.type(dtype=hidden_states.dtype)

    for batch in range(len(pre_prompt_length_list)):
        # keep pre prompt
        prompt_length = pre_prompt_length_list[batch]
        policy[batch, :prompt_length, ] = 1
        # keep question
        text_token_start = prompt_length + image_shape
        policy[batch, text_token_start:, ] = 1

    total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
    merged = None
    # merge and cluster
    if s_flag and total_sparse_token_idx.shape[1] > 0:

        total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
        total_sparse_token = batch_index_select(layer_outputs[0], total_sparse_token_idx)

        merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
        merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
        merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1  # Top 30%
        merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]

        merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
        cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
        if (cluster_num == 0):
            cluster_num = merge_token_stage2.shape[1]

        merge_sparse_token = published_cluster_and_merge(merge_token_stage2, cluster_num)
        merged = merge_sparse_token

        select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)  # B, L_new
        select_token = batch_index_select(layer_outputs[0], select_token_idx)
        select_vis_token_num = pred_score_vis.sum()
        select_and_merge_token = torch.cat((select_token[:, :v_token_start + select_vis_token_num, :],
                                            merge_sparse_token,
                                            select_token[:, v_token_start + select_vis_token_num:, :]),
                                           dim=1)

        layer_outputs = (select_and_merge_token, layer_outputs[1])  # B, L, C
        position_ids = position_ids[:, :len(select_token_idx[0]) + cluster_num]
        # update
        v_token_num = pred_score_vis.sum() + cluster_num  # B == 1
    else:
        select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)  # B, L_new
        layer_outputs = (batch_index_select(layer_outputs[0], select_token_idx), layer_outputs[1])  # B, L, C
        position_ids = position_ids[:, :len(select_token_idx[0])]
        v_token_num = pred_score_vis.sum()  # B == 1
    return layer_outputs[0], position_ids, int(v_token_num), pred_score_vis, relation_vis_text, merged


# --- 1. the rule, case by case ------------------------------------------------------------------------

TEXT = TextConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=1024)


def test_cluster_and_merge_equals_the_published_without_its_noise():
    """Random token sets (some with repeated tokens, whose densities tie): the same merged tokens, exactly;
    with the published noise on, how often the result is still the same is printed (it can differ only
    where densities are within 1e-6)."""
    g = torch.Generator().manual_seed(0)
    same_with_noise, cases = 0, 24
    for case in range(cases):
        n = int(torch.randint(1, 100, (1,), generator=g))
        x = torch.randn(2, n, 16, generator=g)
        if case % 3 == 0 and n > 4:
            x[:, n // 2 :] = x[:, : n - n // 2]  # duplicates
        k = int(n / 10) + 1
        NOISE[0] = False
        want = published_cluster_and_merge(x, k)
        NOISE[0] = True
        assert torch.equal(cluster_and_merge(x, k), want)
        same_with_noise += torch.equal(published_cluster_and_merge(x, k), want)
    print(f"cluster_and_merge with the published noise equal to ours in {same_with_noise} of {cases} cases")


@pytest.mark.parametrize("seed", range(16))
def test_a_stage_equals_the_published_sparse_layer(seed):
    """Random decoder weights, prompts (tokens before the image, the image, text after it), ratios and
    stages: layer K's attention map as the published attention computes it, the raters, scores, kept
    image tokens, merged tokens and the sequence after the stage with its positions 0 .. T'-1."""
    g = torch.Generator().manual_seed(seed)
    decoder = Decoder(TEXT).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    decoder.setup_rope(1024)
    n = int(torch.randint(8, 400, (1,), generator=g))  # N: the image's tokens in the decoder's input
    before, after = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(2, 40, (1,), generator=g))
    r = [1 / 9, 2 / 9, 1 / 3, 0.5, 0.25, 0.1, 0.05, 0.8][seed % 8]
    cur = seed % 3
    stages = sparsevlm_schedule(before, n, r, TEXT.num_hidden_layers)
    stage = stages[cur]
    v, t = stage.length, before + stage.length + after
    embeds = torch.randn(1, before + n + after, TEXT.hidden_size, generator=g)
    x_in = torch.randn(1, t, TEXT.hidden_size, generator=g)  # layer K's input
    k_layer = stage.layer - 1
    pos = torch.arange(t)
    with torch.no_grad():
        cos, sin = decoder.positions(pos)
        x_out = decoder.layers[k_layer](x_in, cos, sin, pos, prefill=True)
        # published
        NOISE[0] = False
        raters = select_raters(embeds, before, before + n)
        logits = attn_logits_of(decoder.layers[k_layer], x_in, pos[None], TEXT.rope_theta)
        budgets = {0: tuple(stage_budgets(n, r))}
        layer_dict = {s.layer - 1: i for i, s in enumerate(stages)}
        ref, ref_pos, ref_v, mask, scores, merged = published_sparse_layer(
            logits, x_out, pos[None], before, v, before + v, v, raters, k_layer, 0, layer_dict, budgets)
        NOISE[0] = True
        # ours
        between = Between(x_in, x_out, lambda j, h: decoder.query_key(j, h, cos, sin), pos, embeds)
        ours, index = apply_stage(stage, between)
        q, k = decoder.query_key(k_layer, x_in, cos, sin)
        our_scores = relation(q, k, before, v, raters[1] + before + v)
    torch.testing.assert_close(our_scores, scores, rtol=1e-6, atol=1e-9)
    kept = torch.where(mask[0])[0]
    assert torch.equal(index[before : before + len(kept)], kept + before)
    assert len(kept) == stage.keep_count and merged.shape[1] == stage.clusters
    torch.testing.assert_close(ours[:, before + len(kept) : before + len(kept) + stage.clusters], merged, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ref_pos[0], torch.arange(ours.shape[1])) and ref_v == stage.keep_count + stage.clusters
    assert (index == -1).sum() == stage.clusters and len(index) == t - stage.dropped
    if cur < 2:
        assert stages[cur + 1].length == ref_v


def test_the_published_settings():
    """score.py: 192 -> [300, 200, 110], 128 -> [303, 110, 36], 64 -> [66, 30, 17] of 576 at layers 2, 6, 15
    of 32: our r = 1/3, 2/9, 1/9; r = 1 prunes nothing; shallow decoders refused."""
    for name, budgets in PUBLISHED.items():
        assert stage_budgets(576, name / 576) == list(budgets)
    assert pruning_layers(32) == [2, 6, 15] and pruning_layers(4) == [0, 1, 2]
    stages = sparsevlm_schedule(35, 576, 1 / 3, 32)
    assert [(s.layer, s.length, s.keep_count, s.recycle, s.clusters) for s in stages] == [
        (3, 576, 300, 83, 9), (7, 309, 200, 33, 4), (16, 204, 110, 29, 3)]
    assert sparsevlm_schedule(35, 576, 1.0, 32) == ()
    with pytest.raises(ValueError, match="only 3 decoder layers"):
        sparsevlm_schedule(35, 576, 0.5, 3)
    with pytest.raises(ValueError, match="retention ratio"):
        sparsevlm_schedule(35, 576, 0.0, 32)


# --- 2. end to end ------------------------------------------------------------------------------------

def sparsevlm_reference(model, prompt, start, length, r, eos_id, max_new_tokens=12):
    """Greedy ids of SparseVLM at r on the decoder input `prompt` (T, D) whose image is [start, start +
    length), computed naively: full attention maps, the published rule after each pruning layer, every
    answer token from the whole sequence without a cache, the pruned layers renumbered."""
    layers, theta = model.llm.layers, model.cfg.text.rope_theta
    ks, budgets = pruning_layers(len(layers)), stage_budgets(length, r)
    rows = torch.where((prompt[start : start + length] @ prompt[start + length :].T).softmax(1).mean(0)
                       > (prompt[start : start + length] @ prompt[start + length :].T).softmax(1).mean(0).mean())[0]
    stored, x, v = {}, prompt, length  # stored: layer -> the prompt as that layer's input holds it
    for i, block in enumerate(layers):
        out, maps = layer_ref(block, x, torch.arange(x.shape[0]), theta)
        if i in ks:
            rel = maps.mean(0)[rows + start + v, start : start + v].mean(0)
            keep = min(budgets[ks.index(i)], v - 1)
            chosen = torch.zeros(v, dtype=torch.bool)
            chosen[rel.topk(keep).indices] = True
            pruned = torch.where(~chosen)[0]
            best = rel[pruned].topk(int(len(pruned) * 0.3) + 1).indices
            NOISE[0] = False
            merged = published_cluster_and_merge(out[None, start + pruned[best]], int(len(best) / 10) + 1)[0]
            NOISE[0] = True
            out = torch.cat([out[:start], out[start + torch.where(chosen)[0]], merged, out[start + v :]])
            v = keep + merged.shape[0]
            stored[i + 1] = out
        x = out
    ids, seq, t = [], prompt, prompt.shape[0]
    for _ in range(max_new_tokens):
        x, answer = seq, seq.shape[0] - t
        for i, block in enumerate(layers):
            if i in stored:  # the prompt as the stage left it, then the answer so far
                x = torch.cat([stored[i], x[x.shape[0] - answer :]])
            x, _ = layer_ref(block, x, torch.arange(x.shape[0]), theta)
        next_id = int(model.lm_head(rms(x[-1], model.llm.norm)).argmax())
        ids.append(next_id)
        if next_id == eos_id:
            break
        seq = torch.cat([seq, model.llm.embed_tokens.weight[next_id][None]])
    return ids, v


@pytest.mark.parametrize("r", [0.25])
def test_cli_greedy_ids_equal_the_naive_reference(capsys, deep_checkpoint, image_path, r):
    """The 4-layer tiny model: ranked by layers 0, 1, 2, pruned before layers 1, 2, 3."""
    result = run_json(capsys, deep_checkpoint, image_path, "--compressor", "sparsevlm", "--retention-ratio", r)
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        prompt, start, length = prompt_embeds(model, tokenizer, image_path)
        ids, last = sparsevlm_reference(model, prompt, start, length, r, tokenizer.eos_id)
    assert result["token_ids"] == ids
    assert result["visual_tokens"] == {"before": length, "after": last}


def test_the_flops_count_every_stage_and_its_added_tokens(deep_checkpoint, image_path):
    """Each layer counted at the tokens its stage left (kept and recycled); r = 1 and batches:
    tests/test_pruning_methods.py."""
    from PIL import Image

    from minillava.batch import generate_batch
    from minillava.eval import efficiency as E
    from minillava.flops import LlmSpec, layered_prefill_flops

    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        # generate_batch's Result: it carries the timings the count reads (own_prefill, first_token)
        (result,) = generate_batch(model, tokenizer, [(Image.open(image_path), QUESTION)], "sparsevlm", 0.25, max_new_tokens=2)
    spec = LlmSpec.from_text("tiny", model.cfg.text)
    n = result.visual_tokens["before"]
    stages = sparsevlm_schedule(0, n, 0.25, 4)
    per = [n] + [s.keep_count + s.clusters for s in stages]  # layers 0 | 1 | 2 | 3
    assert result.visual_tokens["after"] == per[-1]
    assert E.question_cost(result, 30, spec, "sparsevlm", 0.25).prefill_flops == layered_prefill_flops(
        spec, [30 + c for c in per])
