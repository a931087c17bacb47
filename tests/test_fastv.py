"""FastV (`--compressor fastv`): greedy ids through the CLI equal a naive reference written here.

The reference uses only our checkpoint's weights: an eager re-implementation of the LLaMA layer that
returns full attention maps, FastV's selection read off the map of layer K-1 exactly as FastV's code
reads it (pkunlp-icler/FastV, llava-hf/transformers/.../llama/modeling_llama.py,
`LlamaModel.fastv_forward`: head mean, last row, the image span, top round(n (1 - R)), kept order
sorted by position), then every answer token from the whole sequence without a cache, with the dropped
image tokens removed from layers K and up and everything else at its original position.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minillava import generate as gen
from minillava.anyres import tile_image
from minillava.batch import warm_up
from globalcom2.fastv import FastV
from minillava.llama import EMPTY
from minillava.tokenizer import build_prompt
from minillava.weights import load_model
from minillava.trust import load_image
from tests import tiny

QUESTION = "What is in the picture?"
K = 2  # the setting (the paper's K = 2)


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory, tokenizer_path):
    """The tiny model with 4 decoder layers: FastV needs layers after K = 2."""
    hf = tiny.hf_model(seed=5, num_hidden_layers=4)
    return tiny.save_checkpoint(hf, tmp_path_factory.mktemp("deep") / "tf5", "tf5", tokenizer_path, shards=1)


def run_json(capsys, monkeypatch, model_dir, image_path, *extra):
    code = gen.main([str(a) for a in ("--model", model_dir, "--image", image_path, "--prompt", QUESTION,
                                      "--max-new-tokens", 12, "--json", *extra)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


# --- the reference: eager LLaMA layers with full attention maps, from our weights -----------------

def rms(x, norm):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def rope(x, pos, theta):
    """x (H, T, hd) rotated by the angles of positions `pos` (T,), rotate-half layout."""
    hd = x.shape[-1]
    angles = pos[:, None].double() / theta ** (torch.arange(0, hd, 2).double() / hd)  # (T, hd/2)
    cos, sin = angles.cos().repeat(1, 2).float(), angles.sin().repeat(1, 2).float()
    return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin


def layer_ref(block, x, pos, theta):
    """One decoder layer on the rows x (T, D) at ascending positions `pos` (T,): (T, D) and the full
    post-softmax attention maps (H, T, T), causal in row order."""
    a, t = block.self_attn, x.shape[0]
    h = rms(x, block.input_layernorm)
    q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(t, a.heads, a.head_dim).transpose(0, 1)
    k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(t, a.kv_heads, a.head_dim).transpose(0, 1)
    v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(t, a.kv_heads, a.head_dim).transpose(0, 1)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    k, v = (z.repeat_interleave(a.heads // a.kv_heads, 0) for z in (k, v))
    logits = q @ k.transpose(1, 2) / math.sqrt(a.head_dim)
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    maps = logits.softmax(-1)  # (H, T, T)
    x = x + F.linear((maps @ v).transpose(0, 1).reshape(t, -1), a.o_proj.weight, a.o_proj.bias)
    h = rms(x, block.post_attention_layernorm)
    m = block.mlp
    gate, up = F.linear(h, m.gate_proj.weight, m.gate_proj.bias), F.linear(h, m.up_proj.weight, m.up_proj.bias)
    return x + F.linear(F.silu(gate) * up, m.down_proj.weight, m.down_proj.bias), maps


def prompt_embeds(model, tokenizer, image_path):
    """The decoder input as generate builds it for `none`: (T, D), and the image span (start, length)."""
    tiles = tile_image(load_image(str(image_path)), model.cfg.grid_pinpoints, model.cfg.vision.image_size)
    image = model.image_tokens(model.encode_images([tiles])[0])
    chunks = tokenizer.encode_prompt(build_prompt(QUESTION))
    return model.prompt_embeds(chunks, [image])[0], len(chunks[0]), image.shape[0]


def fastv_reference(model, prompt, start, length, r, eos_id, max_new_tokens=12):
    """Greedy ids and the kept prompt positions of FastV with K = 2 and R = 1 - r on the decoder input
    `prompt` (T, D) whose image is [start, start + length), computed naively."""
    layers, theta = model.llm.layers, model.cfg.text.rope_theta
    t = prompt.shape[0]
    x = prompt
    for block in layers[:K]:
        x, maps = layer_ref(block, x, torch.arange(t), theta)
    # fastv_forward: mean over heads of layer K-1's map, last row (the prompt's last token), image span
    image_scores = maps.mean(0)[-1, start : start + length]
    R = 1 - r
    top = image_scores.topk(round(length * (1 - R))).indices + start
    kept = sorted(set(range(start)) | set(top.tolist()) | set(range(start + length, t)))

    ids, seq = [], prompt
    for _ in range(max_new_tokens):
        n = seq.shape[0]
        x = seq
        for block in layers[:K]:  # layers before K: every token
            x, _ = layer_ref(block, x, torch.arange(n), theta)
        rows = torch.tensor(kept + list(range(t, n)))  # from K on: kept prompt tokens + the answer so far
        x = x[rows]
        for block in layers[K:]:
            x, _ = layer_ref(block, x, rows, theta)
        next_id = int(model.lm_head(rms(x[-1], model.llm.norm)).argmax())
        ids.append(next_id)
        if next_id == eos_id:
            break
        seq = torch.cat([seq, model.llm.embed_tokens.weight[next_id][None]])
    return ids, kept


def image_reference(model, tokenizer, image_path, r, max_new_tokens=12):
    prompt, start, length = prompt_embeds(model, tokenizer, image_path)
    ids, kept = fastv_reference(model, prompt, start, length, r, tokenizer.eos_id, max_new_tokens)
    return ids, kept, length


@pytest.mark.parametrize("r", [0.5, 0.25, 0.1])
def test_cli_greedy_ids_equal_the_naive_reference(capsys, monkeypatch, deep_checkpoint, image_path, r):
    result = run_json(capsys, monkeypatch, deep_checkpoint, image_path, "--compressor", "fastv", "--retention-ratio", r)
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        ids, kept, length = image_reference(model, tokenizer, image_path, r)
    assert result["token_ids"] == ids
    assert result["visual_tokens"] == {"before": length, "after": round(length * r)}


def test_cache_holds_what_fastv_keeps(monkeypatch, deep_checkpoint, image_path):
    """Layers before K cache the whole prompt at positions 0 .. T-1; layers from K on cache only the
    kept tokens, packed, at their original positions, in fewer slots; answer tokens follow at T, T+1, ..."""
    monkeypatch.setattr(gen, "CACHE_BUCKET", 16)  # small buckets, so the shorter caches are visible
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    r = 0.25
    with torch.no_grad():
        _, kept, length = image_reference(model, tokenizer, image_path, r, max_new_tokens=1)
        result = gen.generate(model, tokenizer, load_image(str(image_path)), QUESTION, "fastv", r, max_new_tokens=4)
    dropped = length - round(length * r)
    t = len(kept) + dropped
    assert len(result.token_ids) == 4
    answer = list(range(t, t + 3))  # positions of the 3 fed-back answer tokens (the 4th is never fed)
    for i, layer in enumerate(model.llm.layers):
        cache = layer.self_attn.cache
        held = list(range(t)) + answer if i < K else kept + answer
        assert cache.pos[0, : len(held)].tolist() == held
        assert (cache.pos[0, len(held) :] == EMPTY).all()
        assert cache.skipped.tolist() == [0 if i < K else dropped]
        assert cache.k.shape[2] == -(-(t + 4 - (0 if i < K else dropped)) // 16) * 16


def test_r_1_is_plain_llava_next(capsys, monkeypatch, deep_checkpoint, image_path):
    """r = 1: FastV keeps every image token, so answer and prefill logits are exactly `none`'s."""
    fastv = run_json(capsys, monkeypatch, deep_checkpoint, image_path, "--compressor", "fastv", "--retention-ratio", 1)
    none = run_json(capsys, monkeypatch, deep_checkpoint, image_path, "--compressor", "none")
    assert fastv["token_ids"] == none["token_ids"]
    assert fastv["visual_tokens"] == none["visual_tokens"]

    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        embeds, start, length = prompt_embeds(model, tokenizer, image_path)
        model.llm.setup_cache(1, embeds.shape[0])
        plain = gen.prefill(model, embeds[None])
        pruned = gen.prefill(model, embeds[None], (FastV.from_ratio(start, length, 1.0),))
    assert torch.equal(plain, pruned)


def test_grouped_query_attention_decoder_equals_the_naive_reference(tmp_path, tokenizer_path):
    """The decoder alone, on random embeddings, with grouped-query attention (2 key heads for 4)."""
    hf = tiny.hf_model(seed=6, num_hidden_layers=3, num_key_value_heads=2)
    model = load_model(tiny.save_checkpoint(hf, tmp_path / "gqa", "tf5", tokenizer_path, shards=1), pack=False)
    torch.manual_seed(2)
    prompt = torch.randn(40, model.cfg.text.hidden_size)
    fastv = FastV.from_ratio(5, 30, 0.3)
    with torch.no_grad():
        ids, kept = fastv_reference(model, prompt, 5, 30, 0.3, eos_id=-1, max_new_tokens=6)
        model.llm.setup_cache(1, 64, layer_lengths=[64] * K + [64 - fastv.dropped])
        got = [int(gen.prefill(model, prompt[None], (fastv,)).argmax())]
        for step in range(5):
            token = torch.tensor([[got[-1]]])
            got.append(int(gen.decode_one_token(model, token, torch.tensor([40 + step])).argmax()))
    assert got == ids
    assert model.llm.layers[K].self_attn.cache.pos[0, : len(kept)].tolist() == kept


@pytest.mark.parametrize("length", [1, 7, 52, 576, 2928])
@pytest.mark.parametrize("r", [1.0, 0.75, 0.5, 0.25, 0.125, 0.1, 0.05])
def test_kept_count_is_fastv_rounding(length, r):
    """fastv_forward keeps `round(FASTV_image_token_length * (1 - FASTV_r))` with R = 1 - r."""
    assert FastV.from_ratio(0, length, r).keep_count == round(length * (1 - (1 - r)))


def test_fastv_needs_layers_after_k(capsys, monkeypatch, checkpoints, image_path):
    """The default tiny checkpoint has 2 decoder layers: nothing to prune after layer 2, one error line."""
    code = gen.main(["--model", str(checkpoints["hub"]), "--image", str(image_path), "--prompt", QUESTION,
                     "--compressor", "fastv"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("error: fastv prunes after decoder layer 2") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_compiled_steps_give_the_eager_ids(monkeypatch, deep_checkpoint, image_path):
    """--compile with fastv: the compiled prefill prunes, the compiled decode step (fullgraph) runs on
    layers with different cache lengths and their own position tables; same greedy ids as eager.
    About 40 s alone on 2 cores."""
    monkeypatch.setattr(gen, "CACHE_BUCKET", 16)  # layers from K on get fewer slots than those before
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    image = load_image(str(image_path))
    eager = gen.generate(model, tokenizer, image, QUESTION, "fastv", 0.25, max_new_tokens=8)
    steps = gen.compile_steps(model)
    warm_up(model, steps, tokenizer, [(image, QUESTION)], "fastv", 0.25, 8)
    compiled = gen.generate(model, tokenizer, image, QUESTION, "fastv", 0.25, max_new_tokens=8, steps=steps)
    assert compiled.token_ids == eager.token_ids
