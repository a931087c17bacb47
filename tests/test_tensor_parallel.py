"""Tensor parallelism (minillava/tensor_parallel.py): N = 2 ranks on gloo against one process.

One torchrun launch (tests/tp_worker.py) runs every case; each rank loads the whole model and its own part
and answers with both. Decoder kinds: Vicuna / LLaMA (4 heads, 4 key/value heads: split 2 + 2), Mistral
with one key/value head (replicated on both ranks), Qwen2 (OneVision: q/k/v biases, 4 on 2 heads); the
methods: none, globalcom2, and the two that rank by the decoder's attention over all heads (fastv, pdrop).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillava import generate as gen
from minillava import tensor_parallel
from minillava.config import TextConfig
from minillava.llama import Decoder
from minillava.quant import Spec
from minillava.tensor_parallel import Shard
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5  # float32 logits: the all-reduce sums the two ranks' partial o_proj / down_proj products in another order
# int8 / int4: a float32 model's quantized matmuls run in bfloat16 (minillava/quant.py KERNELS), so each rank's
# partial o_proj / down_proj product is rounded to bfloat16 before the all-reduce, one process's whole sum once:
# bfloat16's rounding of the logits' scale (measured 0.047 for int8), the greedy ids still equal
TOL_QUANTIZED = 0.1
METHODS = ["none", "globalcom2", "fastv", "pdrop"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("tp")
    llama = tiny.save_checkpoint(tiny.hf_model(seed=5, num_hidden_layers=4), root / "llama", "hub", tokenizer_path)
    mistral = tiny.save_mistral_checkpoint(
        tiny.hf_family_model(tiny.mistral_text_config(num_hidden_layers=4, num_key_value_heads=1), seed=3),
        root / "mistral", "hub", tokenizer_path)
    qwen = tiny.save_ov_checkpoint(tiny.ov_hf_model(seed=4, layers=4), root / "qwen2", "hub",
                                   tiny.train_qwen_tokenizer(root / "tokenizer.json"))
    return [{"name": "llama", "model": str(llama), "compressors": METHODS, "quantize": None},
            {"name": "mistral-mqa", "model": str(mistral), "compressors": METHODS, "quantize": None},
            {"name": "qwen2", "model": str(qwen), "compressors": METHODS, "quantize": None},
            {"name": "llama-int8", "model": str(llama), "compressors": ["none", "fastv"], "quantize": "int8"},
            {"name": "llama-int4", "model": str(llama), "compressors": ["none"], "quantize": "int4"}]


@pytest.fixture(scope="module")
def reports(cases, tmp_path_factory, image_path):
    out = tmp_path_factory.mktemp("tp-out")
    (out / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "tp_worker.py"), str(out / "cases.json"), str(image_path), str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[:3000]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_give_one_process_s_ids_and_logits(reports):
    rank0, rank1 = reports
    assert rank0.keys() == rank1.keys() and len(rank0) == 3 * len(METHODS) + 3
    for key, r in rank0.items():
        assert r["tp_ids"] == r["ids"], key
        assert rank1[key]["tp_ids"] == r["ids"], key  # both ranks sampled the same tokens
        assert r["logit_diff"] <= (TOL_QUANTIZED if "-int" in key else TOL), (key, r["logit_diff"])
        assert len(r["ids"]) == 8 or r["ids"][-1] in (2, tiny.OV_BPE + 2), key
    print({k: f"{r['logit_diff']:.1e}" for k, r in rank0.items()})


def test_each_rank_holds_its_heads_and_about_half_the_decoder(reports):
    rank0, rank1 = reports
    assert rank0["llama/none"]["kv_heads"] == [4, 2]
    assert rank0["mistral-mqa/none"]["kv_heads"] == [1, 1]  # the one key/value head on both ranks
    assert rank0["qwen2/none"]["kv_heads"] == [2, 1]
    for key, r in rank0.items():
        # the embedding and lm_head (2 x 416 x 128 of the tiny model) stay whole; the rest is halved
        assert r["tp_bytes"] < 0.75 * r["bytes"], key
        assert rank1[key]["tp_bytes"] == r["tp_bytes"], key


# --- without processes: the split itself -------------------------------------------------------------------

def text_cfg(**kw) -> TextConfig:
    return TextConfig(**{**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                                num_key_value_heads=2, vocab_size=32), **kw})


@pytest.mark.parametrize("heads,kv,n,expected", [
    (8, 8, 2, [(0, 4), (4, 8)]), (8, 2, 2, [(0, 1), (1, 2)]), (8, 2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),
    (8, 1, 4, [(0, 1)] * 4), (56, 8, 8, [(i, i + 1) for i in range(8)])])
def test_kv_heads_split_or_replicated(heads, kv, n, expected):
    assert [tensor_parallel.kv_range(heads, kv, Shard(r, n)) for r in range(n)] == expected


def test_parts_put_back_together_are_the_whole_decoder():
    """Every rank's q/k/v/o/MLP parts (meta-free: real tensors, no group) concatenate to the whole
    matrices, each query head's part with the key/value head one process pairs it with."""
    cfg = text_cfg()
    torch.manual_seed(0)
    whole = Decoder(cfg)
    parts = []
    for r in range(4):
        d = Decoder(cfg)
        d.load_state_dict(whole.state_dict())
        parts.append(tensor_parallel.shard_model(d, Shard(r, 4)).layers[0])
    w = whole.layers[0]
    assert torch.equal(torch.cat([p.self_attn.q_proj.weight for p in parts]), w.self_attn.q_proj.weight)
    assert torch.equal(torch.cat([p.self_attn.o_proj.weight for p in parts], 1), w.self_attn.o_proj.weight)
    assert torch.equal(torch.cat([p.mlp.gate_proj.weight for p in parts]), w.mlp.gate_proj.weight)
    assert torch.equal(torch.cat([p.mlp.down_proj.weight for p in parts], 1), w.mlp.down_proj.weight)
    hd = cfg.head_dim
    for r, p in enumerate(parts):  # query heads 2r, 2r+1 read key/value head (2r) // 4 in one process
        assert p.self_attn.heads == 2 and p.self_attn.kv_heads == 1
        assert torch.equal(p.self_attn.k_proj.weight, w.self_attn.k_proj.weight[(2 * r // 4) * hd:][:hd])


def test_quantized_parts_are_one_process_s_quantized_weights():
    """int8's column-split rows keep the whole row's scale, int4's groups stay whole: each rank's storage
    form is the part of one process's."""
    from minillava import quant
    cfg = text_cfg(num_attention_heads=4, num_key_value_heads=4, hidden_size=128, intermediate_size=256)
    torch.manual_seed(1)
    for name, shape in (("layers.0.self_attn.o_proj.weight", (128, 128)), ("layers.0.mlp.up_proj.weight", (256, 128))):
        w = torch.randn(shape)
        for spec in (Spec(8), Spec(4, 32)):
            whole = quant.quantize(w, spec, torch.float32)
            for r in range(2):
                part = tensor_parallel.quantize_local(name, w, cfg, Shard(r, 2), spec, torch.float32)
                for k, t in whole.items():
                    expected = tensor_parallel.local(f"{name.removesuffix('.weight')}.{k}", t, cfg, Shard(r, 2), spec)
                    assert torch.equal(part[k], expected), (name, spec, k)


@pytest.mark.parametrize("kw,n,message", [
    (dict(num_attention_heads=8), 3, "does not divide the decoder's 8 attention heads"),
    (dict(num_attention_heads=12, num_key_value_heads=3), 2, "neither divides the decoder's 3 key/value heads"),
    (dict(intermediate_size=90), 4, "does not divide the decoder's MLP width 90"),
])
def test_splits_that_do_not_divide_are_refused(kw, n, message):
    with pytest.raises(tensor_parallel.ConfigError, match=message):
        tensor_parallel.check(text_cfg(**kw), n)


def test_int4_groups_that_do_not_divide_a_shard_are_refused():
    cfg = text_cfg(num_attention_heads=4, num_key_value_heads=4, hidden_size=256, intermediate_size=512)
    tensor_parallel.check(cfg, 2, Spec(4, 128))  # o_proj 128 inputs a rank, down_proj 256: whole groups
    with pytest.raises(tensor_parallel.ConfigError, match="int4 groups of 128 do not divide o_proj's 64 inputs"):
        tensor_parallel.check(cfg, 4, Spec(4, 128))


def test_bad_launches_end_in_one_line(capsys, monkeypatch, image_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["--image", str(image_path), "--prompt", "?", "--tensor-parallel"]
    assert gen.main(args + ["2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: --tensor-parallel 2 runs on 2 processes: launch it with torchrun --nproc-per-node 2 "
                   "-m minillava.generate ...")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert gen.main(args + ["2"]) == 1
    assert capsys.readouterr().err.strip() == "error: --tensor-parallel 2 under torchrun with 4 processes: they must be equal"
    assert gen.main(args + ["0"]) == 1
    assert capsys.readouterr().err.strip() == "error: --tensor-parallel must be at least 1, got 0"


# docs/tensor-parallel.md's table: GB per rank of the released configs, built on the meta device and split
PER_RANK_GB = {("34b", None): [69.5, 36.0, 19.3, 10.9], ("34b", 8): [35.6, 18.8, 10.5, 6.3],
               ("72b", None): [146.4, 76.1, 41.0, 23.5], ("72b", 8): [74.9, 39.8, 22.2, 13.5]}


@pytest.mark.parametrize("size,bits", list(PER_RANK_GB))
def test_per_rank_bytes_of_the_released_34b_and_72b(size, bits):
    from minillava import quant
    from minillava.config import parse_config
    from minillava.model import Llava
    from tests.test_onevision import released
    from tests.test_trust_loaders import REAL

    raw = REAL["34b hf"] if size == "34b" else released("72b", "transformers")
    gb = []
    for n in (1, 2, 4, 8):
        with torch.device("meta"):
            model = Llava(parse_config(raw)).to(torch.bfloat16)
            if bits:
                quant.swap_linears(model, Spec(bits))
        if n > 1:
            tensor_parallel.shard_model(model, Shard(0, n))
        gb.append(round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9, 1))
    assert gb == PER_RANK_GB[size, bits]
