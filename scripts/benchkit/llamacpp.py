"""Rows 14a-c: llama.cpp beside our decode (issue 29). The decode rows' random decoder is written as GGUF
(the `gguf` package's writer) in F16, Q8_0 and Q4_0 and run through llama-cpp-python at the same thread
count, its decode steps alternated with ours in bfloat16, int8 and int4 (our kernels at the same weight
widths); the bytes each side's step reads give each its bytes-read ceiling. Optional: without the
`llamacpp` extra (pip install -e '.[llamacpp]', which builds llama.cpp from its source) the section says
so in one line.

The GGUF file is the model llama.cpp's own converter would write from transformers' LlamaForCausalLM
(vendor/llama.cpp/conversion/llama.py in llama-cpp-python 0.3.36's source): its tensor names, and q_proj /
k_proj rows permuted (`LlamaModel.permute`) from transformers' rotate-half RoPE to GGML's adjacent pairs.
`gguf_logits_check` holds it to ours: llama.cpp's logits of a prompt against ours on the same weights
(tests/test_llamacpp.py: F32 at a tolerance)."""

from __future__ import annotations

import gc
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from minillava.generate import CACHE_BUCKET, decode_one_token, prefill, sample
from minillava.model import Llava
from minillava.quant import quantize_model

from .contention import watched
from .decoders import build_decoders, clone_as
from .fmt import fmt_dict
from .machine import bare_copy
from .plan import Plan
from .quant import quant_specs, step_bytes
from .timing import alternate

# our side -> the llama.cpp type at the same weight width
PAIRS = {"bfloat16": "F16", "int8": "Q8_0", "int4": "Q4_0"}
VOCAB_SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as LLaMA's tokenizer has them


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("gguf") is not None


MISSING = ("llama.cpp not run: llama_cpp (or gguf) cannot be imported; pip install -e '.[llamacpp]' builds it from "
           "source (cmake and a C++ compiler, about 20 minutes on 2 cores)")


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q_proj / k_proj rows (heads x hd, K) from rotate-half order (pair i with i + hd/2) to GGML's
    adjacent pairs (2i, 2i+1): llama.cpp's converter `LlamaModel.permute` (conversion/llama.py)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Llava, path: Path, kind: str) -> Path:
    """Write `model`'s decoder and lm_head (float weights) as a GGUF llama model of type `kind` (F32, F16,
    Q8_0, Q4_0: every 2-D weight in it, the norms in F32, as llama-quantize's pure types), with a
    placeholder vocabulary of the decoder's size (the benchmark feeds token ids, never text)."""
    import gguf

    t = model.cfg.text
    qtype = gguf.GGMLQuantizationType[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("minillava-bench-decoder")
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_hidden_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(t.num_key_value_heads)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_rope_freq_base(t.rope_theta)
    w.add_rope_dimension_count(t.head_dim)
    w.add_vocab_size(t.vocab_size)
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}[kind])  # llama_ftype's ALL_F32, MOSTLY_*
    w.add_tokenizer_model("llama")
    # byte tokens (as many as fit): llama.cpp's SPM vocabulary looks "\n" up among them when loading
    tokens = [*VOCAB_SPECIAL, *(f"<0x{i:02X}>" for i in range(256))][: t.vocab_size]
    types = ([2, 3, 3] + [6] * 256)[: t.vocab_size]  # UNKNOWN, CONTROL, CONTROL, BYTE ...; then NORMAL
    w.add_token_list(tokens + [f"t{i}" for i in range(len(tokens), t.vocab_size)])
    w.add_token_scores([0.0] * t.vocab_size)
    w.add_token_types(types + [1] * (t.vocab_size - len(types)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def tensor(name: str, x: torch.Tensor):
        x = x.detach().float()
        if x.dim() == 1 or kind == "F32":
            w.add_tensor(name, x.numpy())
        elif kind == "F16":
            w.add_tensor(name, x.half().numpy())
        else:
            w.add_tensor(name, gguf.quants.quantize(x.numpy(), qtype), raw_dtype=qtype)

    llm = model.llm
    tensor("token_embd.weight", llm.embed_tokens.weight)
    for i, layer in enumerate(llm.layers):
        a, m = layer.self_attn, layer.mlp
        tensor(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        tensor(f"blk.{i}.attn_q.weight", permute(a.q_proj.weight, a.heads))
        tensor(f"blk.{i}.attn_k.weight", permute(a.k_proj.weight, a.kv_heads))
        tensor(f"blk.{i}.attn_v.weight", a.v_proj.weight)
        tensor(f"blk.{i}.attn_output.weight", a.o_proj.weight)
        tensor(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        tensor(f"blk.{i}.ffn_gate.weight", m.gate_proj.weight)
        tensor(f"blk.{i}.ffn_up.weight", m.up_proj.weight)
        tensor(f"blk.{i}.ffn_down.weight", m.down_proj.weight)
    tensor("output_norm.weight", llm.norm.weight)
    tensor("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_step_bytes(path: Path) -> int:
    """Bytes of weights a llama.cpp decode step reads from the file: every tensor but the embedding, and
    one embedding row."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1])  # one row of the (vocab, width) table
        else:
            total += int(t.n_bytes)
    return total


def open_llama(path: Path, threads: int, context: int, logits_all: bool = False, f32_cache: bool = False):
    """llama_cpp.Llama on `path` at `threads` threads (prompt and decode alike), quiet."""
    import llama_cpp

    kwargs = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False, **kwargs)


def last_argmax(llm) -> int:
    """The argmax of llama.cpp's logits of the last position evaluated (read in place: Llama.eval copies
    them out only with logits_all)."""
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, V) of the prompt `ids` from position 0 (needs logits_all)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@torch.inference_mode()
def our_logits(model: Llava, ids: list[int]) -> np.ndarray:
    """Our logits (T, V) of the prompt `ids` from position 0, in the model's dtype, as float32."""
    t = torch.tensor(ids)
    model.llm.setup_cache(1, -(-len(ids) // CACHE_BUCKET) * CACHE_BUCKET)
    hidden = model.llm(model.embed(t)[None], torch.arange(len(ids)), prefill=True)
    return model.logits(hidden[0]).float().numpy()


def compare_logits(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Largest |difference| over the logits' standard deviation, and how many positions agree on the argmax."""
    return {"max_abs": float(np.abs(ours - theirs).max()), "std": float(ours.std()),
            "rel": float(np.abs(ours - theirs).max() / ours.std()),
            "argmax_equal": int((ours.argmax(-1) == theirs.argmax(-1)).sum()), "positions": int(ours.shape[0])}


@torch.inference_mode()
def bench_llamacpp(plan: Plan, log) -> dict:
    """Rows 14a-c: decode tokens/s at batch 1 of ours (bfloat16, int8, int4: eager steps, as row 12) and of
    llama.cpp (F16, Q8_0, Q4_0) on the same random decoder, alternated in one run; the bytes each step
    reads, the bare copy's bandwidth before and after, and llama.cpp's F16 logits against ours on the
    F16-rounded weights."""
    if not available():
        log(MISSING)
        return {"missing": MISSING}
    prompt, n, threads = plan.decode_prompt, plan.new_tokens, plan.threads
    cache = -(-(prompt + n) // CACHE_BUCKET) * CACHE_BUCKET
    t0 = time.perf_counter()
    base, hf = build_decoders(plan.text)
    del hf
    ours = {"bfloat16": clone_as(base, torch.bfloat16)}
    for name, spec in quant_specs(plan.text).items():
        ours[name] = quantize_model(clone_as(base, torch.bfloat16), spec)
    tmp = tempfile.TemporaryDirectory(prefix="bench-gguf-")
    files = {kind: write_gguf(base, Path(tmp.name) / f"{kind}.gguf", kind) for kind in PAIRS.values()}
    f16_ours = clone_as(clone_as(base, torch.float16), torch.float32)  # the F16 file's weights, computed in float32
    del base
    gc.collect()
    log(f"built ours (bfloat16, int8, int4) and wrote GGUF {', '.join(files)} in {time.perf_counter() - t0:.1f} s")
    ids_in = torch.randint(3, plan.text.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    theirs = {kind: open_llama(path, threads, cache) for kind, path in files.items()}

    check_llm = open_llama(files["F16"], threads, cache, logits_all=True)
    logits = compare_logits(our_logits(f16_ours, ids_in[:32]), llama_logits(check_llm, ids_in[:32]))
    del check_llm, f16_ours
    gc.collect()
    log(f"llama.cpp F16 logits against ours on the F16 weights (32 positions): {fmt_dict(logits)}")

    def our_side(name: str) -> Callable[[], float]:
        model = ours[name]

        def run() -> float:
            model.llm.setup_cache(1, cache)
            next_id = sample(prefill(model, model.embed(torch.tensor(ids_in))[None]), 0.0, 1.0, None)
            t0 = time.perf_counter()
            for step in range(n - 1):
                next_id = sample(decode_one_token(model, next_id.view(1, 1), torch.tensor([prompt + step])), 0.0, 1.0, None)
                int(next_id)
            return time.perf_counter() - t0

        return run

    def their_side(kind: str) -> Callable[[], float]:
        llm = theirs[kind]

        def run() -> float:
            llm.reset()
            llm.eval(ids_in)
            token = last_argmax(llm)
            t0 = time.perf_counter()
            for _ in range(n - 1):
                llm.eval([token])  # greedy, as our side: the argmax of the last position's logits
                token = last_argmax(llm)
            return time.perf_counter() - t0

        return run

    sides = {name: our_side(name) for name in PAIRS} | {f"llama.cpp {kind}": their_side(kind) for kind in PAIRS.values()}
    with watched("copy"):
        copy = bare_copy(plan.copy_bytes, plan.repeats["copy"])
    samples = alternate(sides, plan.repeats["decode"], label="llamacpp")
    with watched("copy"):
        copy += bare_copy(plan.copy_bytes, plan.repeats["copy"])
    log(f"decode samples (s for {n - 1} tokens): {fmt_dict(samples)}")
    import llama_cpp

    result = {"samples": samples, "tokens_timed": n - 1, "copy_bytes_per_s": copy, "threads": threads,
              "bytes": {name: step_bytes(m) for name, m in ours.items()}
              | {f"llama.cpp {kind}": gguf_step_bytes(path) for kind, path in files.items()},
              "logits_f16": logits, "llama_cpp_version": llama_cpp.__version__}
    del theirs
    gc.collect()
    tmp.cleanup()
    return result
