"""Tensor parallelism (minillava/tensor_parallel.py): N = 2 ranks on gloo against one process.

One torchrun launch (tests/tp_worker.py) runs every case; each rank loads the whole model and its own part
and answers with both. Decoder kinds: Vicuna / LLaMA (4 heads, 4 key/value heads: split 2 + 2), Mistral
with one key/value head (replicated on both ranks), Qwen2 (OneVision: q/k/v biases, 4 on 2 heads); the
methods: none, globalcom2, and the three that read the decoder's attention over all heads (fastv, pdrop, ficoco-l).
InternVL3 (OpenGVLab's layout: InternViT with fused attn.qkv, pixel shuffle, Qwen2 4 on 2 heads): none,
globalcom2, fastv; its tower and projector whole on each rank.
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
from minillava.eval import runner
from minillava.config import TextConfig
from minillava.llama import Decoder
from minillava.quant import Spec
from minillava.tensor_parallel import Shard
from tests import tiny
from tests.test_eval import pope_images, run_pope, untimed  # noqa: F401 (pope_images: a fixture)
from tests.tp_worker import METHODS, build_cases

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5  # float32 logits: the all-reduce sums the two ranks' partial o_proj / down_proj products in another order
# int8 / int4: a float32 model's quantized matmuls run in bfloat16 (minillava/quant.py KERNELS), so each rank's
# partial o_proj / down_proj product is rounded to bfloat16 before the all-reduce, one process's whole sum once:
# bfloat16's rounding of the logits' scale (measured 0.047 for int8), the greedy ids still equal
TOL_QUANTIZED = 0.1


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tokenizer_path):
    return build_cases(tmp_path_factory.mktemp("tp"), tokenizer_path)


def torchrun(n: int, *args) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node n ARGS` on the CPU, one thread a rank, offline."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def reports(cases, tmp_path_factory, image_path):
    out = tmp_path_factory.mktemp("tp-out")
    (out / "cases.json").write_text(json.dumps(cases))
    done = torchrun(2, ROOT / "tests" / "tp_worker.py", out / "cases.json", image_path, out)
    assert done.returncode == 0, done.stderr[:3000]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_give_one_process_s_ids_and_logits(reports):
    rank0, rank1 = reports
    assert rank0.keys() == rank1.keys() and len(rank0) == 3 * len(METHODS) + 3 + 3
    for key, r in rank0.items():
        assert r["tp_ids"] == r["ids"], key
        assert rank1[key]["tp_ids"] == r["ids"], key  # both ranks sampled the same tokens
        assert r["logit_diff"] <= (TOL_QUANTIZED if "-int" in key else TOL), (key, r["logit_diff"])
        assert len(r["ids"]) == 8 or r["ids"][-1] in (2, tiny.OV_BPE + 2), key
    print({k: f"{r['logit_diff']:.1e}" for k, r in rank0.items()})


def test_a_batch_on_two_ranks_gives_one_process_s_ids_and_logits(reports):
    """generate_batch (three questions, two tile grids, unequal prompts: left padding, per-row positions)."""
    rank0, rank1 = reports
    batched = [key for key, r in rank0.items() if "batch_ids" in r]
    assert len(batched) == 5
    for key in batched:
        r = rank0[key]
        assert r["tp_batch_ids"] == r["batch_ids"] == rank1[key]["tp_batch_ids"], key
        assert r["batch_logit_diff"] <= TOL, (key, r["batch_logit_diff"])
    print({k: f"{rank0[k]['batch_logit_diff']:.1e}" for k in batched})


@pytest.mark.slow
def test_compiled_steps_on_two_ranks_give_eager_ids(cases, tmp_path, image_path):
    """--compile with --tensor-parallel: the all-reduce hooks and FastV's gather (functional collectives) trace
    into the compiled prefill and the fullgraph decode step on gloo; ids equal to eager and to one process
    (about 3 minutes on 2 shared cores, most of it compiling)."""
    (tmp_path / "cases.json").write_text(json.dumps([{**cases[0], "compressors": ["none", "fastv"], "compile": True}]))
    done = torchrun(2, ROOT / "tests" / "tp_worker.py", tmp_path / "cases.json", image_path, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        for key, r in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            assert r["compiled_ids"] == r["tp_ids"] == r["ids"], (rank, key)
            assert r["compiled_logit_diff"] <= TOL and r["compiled_vs_eager_diff"] <= TOL, (rank, key, r)
            print(rank, key, f"compiled vs one process {r['compiled_logit_diff']:.1e}, "
                  f"vs eager parts {r['compiled_vs_eager_diff']:.1e}")


def test_each_rank_holds_its_heads_and_about_half_the_decoder(reports):
    rank0, rank1 = reports
    assert rank0["llama/none"]["kv_heads"] == [4, 2]
    assert rank0["mistral-mqa/none"]["kv_heads"] == [1, 1]  # the one key/value head on both ranks
    assert rank0["qwen2/none"]["kv_heads"] == [2, 1]
    assert rank0["internvl/none"]["kv_heads"] == [2, 1]
    for key, r in rank0.items():
        # the embedding and lm_head (2 x 416 x 128 of the tiny model) stay whole; the rest is halved
        assert r["tp_bytes"] < 0.75 * r["bytes"], key
        assert rank1[key]["tp_bytes"] == r["tp_bytes"], key
        # the tower and projector (InternViT's too, read from the fused attn.qkv) are not split: whole on each rank
        assert r["tp_tower_bytes"] == r["tower_bytes"] == rank1[key]["tp_tower_bytes"], key


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


# --- python -m minillava.eval under torchrun: D replicas of N ranks -----------------------------------------

def one_process_answers(capsys, data, out: Path, model) -> dict:
    """The summary line of `python -m minillava.eval pope` in this process, one thread (as each rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_pope(capsys, data, out, model, "--max-new-tokens", 8)[0]
    finally:
        torch.set_num_threads(threads)


def eval_under_torchrun(n: int, data, out: Path, model, *extra) -> subprocess.CompletedProcess:
    return torchrun(n, "-m", "minillava.eval", "pope", "--data", data, "--output", out, "--model", model,
                    "--max-new-tokens", 8, *extra)


def test_eval_on_two_tensor_parallel_ranks_writes_one_process_s_answers(tmp_path, capsys, checkpoints, pope_images):
    """2 processes, --tensor-parallel 2: one replica of 2 ranks; its first rank writes the answers file of
    one process byte for byte (5 answered, 2 unreadable images recorded as failed) and prints the summary once."""
    model = checkpoints["hub"]
    line = one_process_answers(capsys, pope_images, tmp_path / "one.jsonl", model)
    done = eval_under_torchrun(2, pope_images, tmp_path / "tp.jsonl", model, "--tensor-parallel", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tp.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("*.part"))
    stdout = done.stdout.strip().splitlines()
    assert len(stdout) == 2 and untimed(json.loads(stdout[0])) == untimed(line)
    assert json.loads(stdout[0])["efficiency"]["measured"] == 5  # counted once, not once a rank
    assert "on 2 processes: 1 replica of 2 tensor-parallel ranks" in done.stderr
    assert done.stderr.count("failed: not an image") == 2  # said by the writing rank only


def test_eval_fits_int4_groups_to_each_rank_s_widths(tmp_path, checkpoints, pope_images):
    """--quantize int4 without --group-size under --tensor-parallel 2: the group size fits the widths each rank
    holds (o_proj's 64 inputs a rank: 64), as generate's loader (weights.plan_load) does; the whole decoder's
    widths would give 128, which the split then refuses."""
    from minillava.config import load_config
    from minillava.quant import Spec, input_widths

    model = checkpoints["hub"]
    text = load_config(model).text
    assert Spec(4).fit(input_widths(text)).group_size == 128  # what a fit on the whole decoder would take
    done = eval_under_torchrun(2, pope_images, tmp_path / "tp.jsonl", model, "--tensor-parallel", 2,
                               "--quantize", "int4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: --quantize int4 (group size 64)" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[0])["answered"] == 5


@pytest.mark.slow
def test_eval_on_two_replicas_of_two_ranks_resumes_to_one_process_s_answers(tmp_path, capsys, checkpoints, pope_images):
    """4 processes, --tensor-parallel 2: 2 replicas of 2 ranks share the questions the file lacks (resumed after
    3 answers) and give one process's answers file (about 40 s on 2 shared cores)."""
    model = checkpoints["hub"]
    line = one_process_answers(capsys, pope_images, tmp_path / "one.jsonl", model)
    lines = (tmp_path / "one.jsonl").read_bytes().split(b"\n")
    (tmp_path / "tp.jsonl").write_bytes(b"\n".join(lines[:3]) + b"\n")
    done = eval_under_torchrun(4, pope_images, tmp_path / "tp.jsonl", model, "--tensor-parallel", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tp.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("*.part"))
    summary = json.loads(done.stdout.strip().splitlines()[0])
    assert {k: v for k, v in summary.items() if k != "efficiency"} == {k: v for k, v in line.items() if k != "efficiency"}
    assert summary["efficiency"]["measured"] == 3  # questions 5, 6, 7 answered (4 failed), each counted once
    assert "3 already in" in done.stderr and "on 4 processes: 2 replicas of 2 tensor-parallel ranks" in done.stderr


def test_eval_bad_launches_end_in_one_line(capsys, monkeypatch, tmp_path, pope_images, checkpoints):
    """A world that is not D x N processes is refused before any process group; rank 0 says it, the others exit 0."""
    def launch(n: int, world: int | None, rank: int = 0) -> tuple[int, str]:
        for key, value in (("WORLD_SIZE", world), ("RANK", rank)):
            monkeypatch.setenv(key, str(value)) if value is not None else monkeypatch.delenv(key, raising=False)
        code = runner.main(["pope", "--data", str(pope_images), "--output", str(tmp_path / "a.jsonl"),
                            "--model", str(checkpoints["hub"]), "--tensor-parallel", str(n)])
        out, err = capsys.readouterr()
        assert out == "" and not (tmp_path / "a.jsonl").exists()
        return code, err.strip()

    assert launch(2, None) == (1, "error: --tensor-parallel 2 needs at least 2 processes, one per rank: launch it with "
                                  "torchrun --nproc-per-node 2 (or D x 2 for D data-parallel replicas) -m minillava.eval ...")
    assert launch(4, 2)[1].startswith("error: --tensor-parallel 4 needs at least 4 processes, torchrun started 2: ")
    assert launch(3, 4) == (1, "error: --tensor-parallel 3 does not divide torchrun's 4 processes: launch D x 3 of them, "
                               "D data-parallel replicas of 3 tensor-parallel ranks")
    assert launch(3, 4, rank=1) == (0, "")
    assert launch(0, None) == (1, "error: --tensor-parallel must be at least 1, got 0")


@pytest.mark.slow
def test_eval_with_n_that_does_not_divide_the_heads_ends_in_one_line(tmp_path, checkpoints, pope_images):
    """3 processes, --tensor-parallel 3 on a decoder of 4 heads: every rank finds it, rank 0 says it."""
    done = eval_under_torchrun(3, pope_images, tmp_path / "tp.jsonl", checkpoints["hub"], "--tensor-parallel", 3)
    assert done.returncode != 0 and done.stdout == ""
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert said == ["error: --tensor-parallel 3 does not divide the decoder's 4 attention heads"]
    assert not (tmp_path / "tp.jsonl").exists() or (tmp_path / "tp.jsonl").read_text() == ""
