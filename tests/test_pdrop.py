"""PyramidDrop (`--compressor pdrop`, globalcom2/pdrop.py) against its published code.

1. A literal transcription of `LlamaModel.pdrop_rank_drop` (Cooperx521/PyramidDrop,
   llava/model/modeling_llama_pdrop.py; its inference branch, right padding, batch of one), with the
   transformers 4.37 helpers it calls (`LlamaRotaryEmbedding`, `apply_rotary_pos_emb`,
   `_prepare_4d_causal_attention_mask`), run against our stage on many random cases: the kept sequence
   and its renumbered positions.
2. Greedy ids through the CLI against a naive reference decoder (tests/test_fastv.py's eager layers with
   full attention maps) that applies the published rule at the published places: at each stage the
   attention of the prompt's last token in the next layer, the image's int(N ratio) best tokens, the kept
   sequence renumbered, every answer token decoded at the next contiguous position.
"""

from pathlib import Path
import math

import pytest
import torch
from torch import nn

from globalcom2.pdrop import PDropStage, pdrop_schedule, stage_layers, stage_ratios
from minillava import generate as gen
from minillava.config import TextConfig
from minillava.llama import Decoder
from minillava.schedule import Between, apply_stage
from tests.test_fastv import QUESTION, deep_checkpoint, layer_ref, prompt_embeds, rms  # noqa: F401 (a fixture)
from tests.test_pruning_methods import run_json

IGNORE_INDEX = -100


# --- the transcription: transformers 4.37's helpers as PyramidDrop's code calls them ---------------------

def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim=1):
    cos = cos[position_ids].unsqueeze(unsqueeze_dim)
    sin = sin[position_ids].unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim, self.base = dim, base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(max_position_embeddings, device, torch.get_default_dtype())

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


def _prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length):
    """transformers' AttentionMaskConverter(is_causal=True).to_4d for a 2D mask of ones or zeros."""
    bsz, tgt_len = input_shape
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    min_value = torch.finfo(dtype).min
    causal = torch.full((tgt_len, tgt_len), min_value, device=device)
    cond = torch.arange(causal.size(-1), device=device)
    causal.masked_fill_(cond < (cond + 1).view(causal.size(-1), 1), 0)
    causal = causal.to(dtype)[None, None].expand(bsz, 1, tgt_len, tgt_len + past_key_values_length)
    expanded = attention_mask[:, None, None, :].expand(bsz, 1, tgt_len, attention_mask.shape[-1]).to(dtype)
    inverted = (1.0 - expanded).masked_fill((1.0 - expanded).to(torch.bool), min_value)
    return causal.masked_fill(inverted.bool(), min_value)


class PublishedAttention:
    """What pdrop_rank_drop reads of `self.layers[rank_layer].self_attn`, from one of our blocks."""

    def __init__(self, block, theta):
        a = block.self_attn
        self.num_heads, self.num_key_value_heads, self.head_dim = a.heads, a.kv_heads, a.head_dim
        self.q_proj, self.k_proj, self.v_proj = a.q_proj, a.k_proj, a.v_proj
        self.rotary_emb = LlamaRotaryEmbedding(a.head_dim, base=theta)


class PublishedLayer:
    def __init__(self, block, theta):
        self.self_attn = PublishedAttention(block, theta)
        self.input_layernorm = block.input_layernorm


class PublishedModel:
    """The attributes pdrop_rank_drop reads (`self.layers`, `self.image_token_posi`, `prompt_len`,
    `image_tokens`, `image_token_ratio_list`, `config`, `training`)."""

    def __init__(self, decoder, image_start, prompt_len, image_tokens, ratios):
        self.layers = {i: PublishedLayer(b, decoder.cfg.rope_theta) for i, b in enumerate(decoder.layers)}
        self.image_token_posi, self.prompt_len, self.image_tokens = [image_start], [prompt_len], [image_tokens]
        self.image_token_ratio_list = ratios
        self.config = type("Config", (), {"tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048})()
        self.training = False

    # transcribed from modeling_llama_pdrop.py `pdrop_rank_drop`, the training branch left out
    def pdrop_rank_drop(self, cur_num, rank_layer, features, position_ids, attention_mask, labels):
        _labels = labels
        _position_ids = position_ids
        _attention_mask = attention_mask

        if position_ids is None:
            position_ids = torch.arange(0, features.shape[1], dtype=torch.long, device=features.device).unsqueeze(0)

        batch_size = features.shape[0]
        image_tokens = [int(cur_image_token * self.image_token_ratio_list[cur_num]) for cur_image_token in self.image_tokens]
        keep_length = [int(cur_image_token * self.image_token_ratio_list[cur_num + 1]) for cur_image_token in self.image_tokens]

        features_list = []
        attention_mask_list = []
        labels_list = []

        if attention_mask is None:
            attention_mask = torch.ones((batch_size, features.shape[1]), dtype=torch.bool, device=features.device)
        else:
            attention_mask = attention_mask.bool()
        if labels is None:
            labels = torch.full((batch_size, features.shape[1]), IGNORE_INDEX, device=features.device)

        hidden_states = features.clone().detach()
        self_attn = self.layers[rank_layer].self_attn
        hidden_states = self.layers[rank_layer].input_layernorm(hidden_states)

        num_heads = self_attn.num_heads
        num_key_value_heads = self_attn.num_key_value_heads
        head_dim = self_attn.head_dim

        bsz, q_len, _ = hidden_states.size()

        query_states = self_attn.q_proj(hidden_states)
        key_states = self_attn.k_proj(hidden_states)
        value_states = self_attn.v_proj(hidden_states)

        query_states = query_states.view(bsz, q_len, num_heads, head_dim).transpose(1, 2)
        key_states = key_states.view(bsz, q_len, num_key_value_heads, head_dim).transpose(1, 2)
        value_states = value_states.view(bsz, q_len, num_key_value_heads, head_dim).transpose(1, 2)

        kv_seq_len = key_states.shape[-2]
        cos, sin = self_attn.rotary_emb(value_states, seq_len=kv_seq_len)

        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)

        eager_attention_mask = _prepare_4d_causal_attention_mask(
            attention_mask, (batch_size, q_len), hidden_states, past_key_values_length=0
        ).to(device=query_states.device)

        features = [cur_features[cur_attention_mask] for cur_features, cur_attention_mask in zip(features, attention_mask)]
        labels = [cur_labels[cur_attention_mask] for cur_labels, cur_attention_mask in zip(labels, attention_mask)]
        attention_mask = [cur_attention_mask[cur_attention_mask] for cur_attention_mask, cur_attention_mask in zip(attention_mask, attention_mask)]  # noqa: B020,E501

        for i in range(batch_size):
            image_index = self.image_token_posi[i]
            cur_key_states = key_states[i]
            cur_query_states = query_states[i]
            cur_eager_attention_mask = eager_attention_mask[i]

            prompt_total_len = self.prompt_len[i] + image_tokens[i]
            text_query_states = cur_query_states[:, prompt_total_len - 1, :].unsqueeze(1)
            text_eager_attention_mask = cur_eager_attention_mask[:, prompt_total_len - 1, :].unsqueeze(1)

            attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(head_dim)
            attn_weights = attn_weights + text_eager_attention_mask
            attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)

            attention_avg_head = torch.mean(attn_weights, dim=0)
            attention_avg_head = attention_avg_head[:, image_index:image_index + image_tokens[i]]
            attention_avg_text = torch.mean(attention_avg_head, dim=0)

            top_rank_index = attention_avg_text.topk(keep_length[i]).indices
            top_rank_index = top_rank_index + image_index
            top_rank_index = top_rank_index.sort().values

            start_index = image_index + image_tokens[i]
            new_input_embeds = torch.cat([features[i][:image_index, :], features[i][top_rank_index, :], features[i][start_index:, :]], dim=0)  # noqa: E501
            new_labels = torch.cat([labels[i][:image_index], labels[i][top_rank_index], labels[i][start_index:]], dim=0)
            new_attention_mask = torch.cat([attention_mask[i][:image_index], attention_mask[i][top_rank_index], attention_mask[i][start_index:]], dim=0)  # noqa: E501

            features_list.append(new_input_embeds)
            attention_mask_list.append(new_attention_mask)
            labels_list.append(new_labels)

        tokenizer_model_max_length = getattr(self.config, 'tokenizer_model_max_length', 2048)
        if tokenizer_model_max_length is not None:
            new_input_embeds = [x[:tokenizer_model_max_length] for x in features_list]
            new_attention_mask = [x[:tokenizer_model_max_length] for x in attention_mask_list]
            new_labels = [x[:tokenizer_model_max_length] for x in labels_list]

        max_len = max(x.shape[0] for x in new_input_embeds)

        embeds_padded = []
        labels_paded = []
        attention_mask_padded = []
        position_ids = torch.zeros((batch_size, max_len), dtype=position_ids.dtype, device=position_ids.device)
        for i, (cur_new_embed, cur_new_labels) in enumerate(zip(new_input_embeds, new_labels)):
            cur_len_emb = cur_new_embed.shape[0]
            dif = max_len - cur_len_emb
            cur_new_embed = torch.cat([cur_new_embed, torch.zeros((dif, cur_new_embed.shape[1]), dtype=cur_new_embed.dtype, device=cur_new_embed.device)], dim=0)  # noqa: E501
            cur_new_labels = torch.cat([cur_new_labels, torch.full((dif,), IGNORE_INDEX, dtype=cur_new_labels.dtype, device=cur_new_labels.device)], dim=0)  # noqa: E501
            cur_attention_mask = new_attention_mask[i]
            cur_attention_mask = torch.cat([cur_attention_mask, torch.full((dif,), False, dtype=cur_attention_mask.dtype, device=cur_attention_mask.device)], dim=0)  # noqa: E501
            embeds_padded.append(cur_new_embed)
            labels_paded.append(cur_new_labels)
            attention_mask_padded.append(cur_attention_mask)
            cur_len = new_attention_mask[i].sum().item()
            position_ids[i, :cur_len] = torch.arange(0, cur_len, dtype=position_ids.dtype, device=position_ids.device)

        new_input_embeds = torch.stack(embeds_padded, dim=0)
        new_input_embeds = new_input_embeds.to(features[0].dtype)
        new_attention_mask = torch.stack(attention_mask_padded, dim=0)
        new_labels = torch.stack(labels_paded, dim=0)
        if _position_ids is None:
            position_ids = None
        if _labels is None:
            new_labels = None
        if _attention_mask is None:
            new_attention_mask = None
        else:
            new_attention_mask = new_attention_mask.to(dtype=_attention_mask.dtype)
        return position_ids, new_attention_mask, new_input_embeds, new_labels


# --- 1. the rule, case by case ------------------------------------------------------------------------

TEXT = TextConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=512)


@pytest.mark.parametrize("seed", range(12))
def test_a_stage_keeps_what_pdrop_rank_drop_keeps(seed):
    """Random decoder weights, hidden states, image spans and stages (the three of layer_list, each at the
    counts int(N ratio[s]) -> int(N ratio[s + 1])): the same kept sequence and positions 0 .. T'-1."""
    g = torch.Generator().manual_seed(seed)
    decoder = Decoder(TEXT).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    decoder.setup_rope(512)
    n = int(torch.randint(20, 200, (1,), generator=g))  # N: the image's tokens before any drop
    before, after = (int(v) for v in torch.randint(1, 30, (2,), generator=g))
    r = [0.5, 0.25, 0.125, 0.1, 0.3, 1.0][seed % 6]
    ratios = stage_ratios(r)
    cur = seed % 3  # the stage
    length = int(n * ratios[cur])
    t = before + length + after
    x = torch.randn(1, t, TEXT.hidden_size, generator=g)
    rank_layer = stage_layers(TEXT.num_hidden_layers)[cur]
    model = PublishedModel(decoder, before, before + after, n, ratios)
    with torch.no_grad():
        pos, mask, ref, _ = model.pdrop_rank_drop(cur, rank_layer, x, torch.arange(t)[None], None, None)
        stage = PDropStage(rank_layer, before, length, int(n * ratios[cur + 1]))
        cos, sin = decoder.positions(torch.arange(t))
        between = Between(x, x, lambda j, h: decoder.query_key(j, h, cos, sin), torch.arange(t))
        ours, index = apply_stage(stage, between)
    assert mask is None and torch.equal(ours, ref)
    assert torch.equal(pos[0], torch.arange(ours.shape[1]))
    assert len(index) == t - stage.dropped


def test_the_published_settings():
    """scripts/v1_6: layer_list [8, 16, 24] of 32 layers, ratios [0.5, 0.25, 0.125] (1.0 prepended): our
    r = 0.125 on a 32-layer decoder; the counts of LLaVA-NeXT-7B's 2928-token image."""
    assert stage_layers(32) == [8, 16, 24] and stage_ratios(0.125) == [1.0, 0.5, 0.25, 0.125]
    stages = pdrop_schedule(40, 2928, 0.125, 32)
    assert [(s.layer, s.length, s.keep_count, s.renumber) for s in stages] == [
        (8, 2928, 1464, True), (16, 1464, 732, True), (24, 732, 366, True)]
    assert stage_layers(4) == [1, 2, 3] and stage_layers(40) == [10, 20, 30]
    with pytest.raises(ValueError, match="only 3 decoder layers"):
        stage_layers(3)


# --- 2. end to end ------------------------------------------------------------------------------------

def pdrop_reference(model, prompt, start, length, r, eos_id, max_new_tokens=12):
    """Greedy ids of PyramidDrop at r on the decoder input `prompt` (T, D) whose image is [start, start +
    length), computed naively: every answer token from the whole sequence without a cache."""
    layers, theta = model.llm.layers, model.cfg.text.rope_theta
    where, ratios = stage_layers(len(layers)), stage_ratios(r)
    t = prompt.shape[0]
    kept, x, rows = {}, prompt, list(range(t))  # rows: the prompt positions x holds
    for i, block in enumerate(layers):
        if i in where:  # the next layer's attention map of the prompt's last token, renumbered positions
            s = where.index(i)
            _, maps = layer_ref(block, x, torch.arange(len(rows)), theta)
            now, keep = int(length * ratios[s]), int(length * ratios[s + 1])
            top = (maps.mean(0)[-1, start : start + now].topk(keep).indices.sort().values + start).tolist()
            pick = list(range(start)) + top + list(range(start + now, len(rows)))
            x, rows = x[pick], [rows[j] for j in pick]
            kept[i] = list(rows)
        x, _ = layer_ref(block, x, torch.arange(len(rows)), theta)
    ids, seq = [], prompt
    for _ in range(max_new_tokens):
        n = seq.shape[0]
        x, rows = seq, list(range(n))
        for i, block in enumerate(layers):
            if i in kept:  # the prompt as the stage kept it, every answer token, contiguous positions
                new = kept[i] + list(range(t, n))
                x, rows = x[[rows.index(j) for j in new]], new
            x, _ = layer_ref(block, x, torch.arange(len(rows)), theta)
        next_id = int(model.lm_head(rms(x[-1], model.llm.norm)).argmax())
        ids.append(next_id)
        if next_id == eos_id:
            break
        seq = torch.cat([seq, model.llm.embed_tokens.weight[next_id][None]])
    return ids, kept[where[-1]]


@pytest.mark.parametrize("r", [0.5, 0.125])
def test_cli_greedy_ids_equal_the_naive_reference(capsys, deep_checkpoint, image_path, r):
    """The 4-layer tiny model: stages before layers 1, 2, 3."""
    result = run_json(capsys, deep_checkpoint, image_path, "--compressor", "pdrop", "--retention-ratio", r)
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        prompt, start, length = prompt_embeds(model, tokenizer, image_path)
        ids, kept = pdrop_reference(model, prompt, start, length, r, tokenizer.eos_id)
    assert result["token_ids"] == ids
    assert result["visual_tokens"] == {"before": length, "after": int(length * stage_ratios(r)[-1])}
    assert sum(start <= k < start + length for k in kept) == result["visual_tokens"]["after"]


def test_the_flops_count_every_stage(deep_checkpoint, image_path):
    """The efficiency count of a question sums each layer at what its stage left it (layers 0 | 1 | 2 | 3
    at N | N r^(1/3) | ...); r = 1 and batches: tests/test_pruning_methods.py."""
    from PIL import Image

    from minillava.batch import generate_batch
    from minillava.eval import efficiency as E
    from minillava.flops import LlmSpec, layered_prefill_flops

    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        # generate_batch's Result: it carries the timings the count reads (own_prefill, first_token)
        (result,) = generate_batch(model, tokenizer, [(Image.open(image_path), QUESTION)], "pdrop", 0.25, max_new_tokens=2)
    spec = LlmSpec.from_text("tiny", model.cfg.text)
    n, ratios = result.visual_tokens["before"], stage_ratios(0.25)
    cost = E.question_cost(result, 30, spec, "pdrop", 0.25)
    assert cost.prefill_flops == layered_prefill_flops(spec, [30 + int(n * x) for x in ratios])


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_visualize_draws_what_the_last_pruned_layers_keep(method):
    """The picture of a multi-stage decoder method: the image tokens the last stage's layers hold, on the
    grid (SparseVLM's recycled tokens, merged from several, have no cell), and generate's token counts."""
    from PIL import Image

    from minillava.apps.visualize import kept_picture

    model, tokenizer = gen.load(gen.DEFAULT_MODEL, dtype=torch.float32, pack=False)
    image = Image.open(Path(__file__).parent.parent / "examples" / "scene.png")
    question = "What digit is on the red card?"
    picture = kept_picture(model, image, method, 0.25, tokenizer=tokenizer, prompt=question)
    result = gen.generate(model, tokenizer, image, question, method, 0.25, max_new_tokens=1)
    assert (picture.before, picture.after) == (result.visual_tokens["before"], result.visual_tokens["after"])
    start = len(tokenizer.encode_question(question)[0])
    kept = model.llm.kept  # the prompt positions the last layers saw (-1: a recycled token)
    on_grid = int(((kept >= start) & (kept < start + picture.before)).sum())
    assert 0 < on_grid <= picture.after and picture.image.width > 400


def test_visualize_a_decoder_method_that_prunes_nothing_at_r_1():
    """SparseVLM's schedule at r = 1 is empty: the picture keeps everything (found by the property tests,
    where it raised TypeError reading the kept positions of a prefill without stages)."""
    from PIL import Image

    from minillava.apps.visualize import kept_picture

    model, tokenizer = gen.load(gen.DEFAULT_MODEL, dtype=torch.float32, pack=False)
    image = Image.open(Path(__file__).parent.parent / "examples" / "scene.png")
    picture = kept_picture(model, image, "sparsevlm", 1.0, tokenizer=tokenizer, prompt=QUESTION)
    assert picture.before == picture.after == 336
