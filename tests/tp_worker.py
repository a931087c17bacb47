"""One rank of tests/test_tensor_parallel.py's torchrun launch: every case's answer by the whole model (one
process's numbers, computed here too) and by this rank's tensor-parallel part, compared step by step.

    torchrun --nproc-per-node N tests/tp_worker.py CASES.json IMAGE OUT_DIR [cpu|cuda]

(cpu: gloo, the default; cuda: nccl, one GPU a rank, as scripts/cuda_check.py's tensor-parallel row runs it)

CASES.json: [{"name", "model", "compressors": [...], "quantize": null | "int8" | "int4", "batch": [the
compressors to run as a batch too], "compile": bool}]. Writes OUT_DIR/rank{R}.json: per case and compressor the greedy ids of both, the largest
logit difference over the prefill and every decode step, and both models' weight bytes (decoder; tower and projector); with "batch" the
same for three questions of unequal prompt lengths answered together (minillava/batch.py generate_batch);
with "compile" the part's ids and logits through torch.compile'd steps (generate.compile_steps), against
the whole model's eager ones and the part's eager ones.
"""

import json
import os
import sys
from pathlib import Path

import torch

from minillava import generate as gen
from minillava import tensor_parallel
from minillava.batch import generate_batch
from minillava.quant import Spec
from minillava.trust import load_image

METHODS = ["none", "globalcom2", "fastv", "pdrop", "ficoco-l"]


def build_cases(root: Path, tokenizer: Path) -> list[dict]:
    """Tiny random checkpoints of four layers (FastV and PyramidDrop need the depth) of each decoder kind,
    written under `root` (`tokenizer`: a sentencepiece model, tests/tiny.py `train_tokenizer`), as CASES:
    LLaMA (4 heads, 4 key/value heads: split 2 + 2), Mistral with one key/value head (replicated on both
    ranks), Qwen2 / OneVision (q/k/v biases, 4 on 2 heads), InternVL (OpenGVLab's layout: its tower's fused
    attn.qkv, replicated; a Qwen2 decoder, 4 on 2 heads; none, globalcom2 and fastv: ~0.5 s of CPU a rank), the LLaMA one
    under int8 and int4 (group 32)."""
    from tests import tiny  # transformers: only where checkpoints are made

    llama = tiny.save_checkpoint(tiny.hf_model(seed=5, num_hidden_layers=4), root / "llama", "hub", tokenizer)
    mistral = tiny.save_mistral_checkpoint(
        tiny.hf_family_model(tiny.mistral_text_config(num_hidden_layers=4, num_key_value_heads=1), seed=3),
        root / "mistral", "hub", tokenizer)
    qwen = tiny.save_ov_checkpoint(tiny.ov_hf_model(seed=4, layers=4), root / "qwen2", "hub",
                                   tiny.train_qwen_tokenizer(root / "tokenizer.json"))
    internvl = tiny.save_iv_checkpoint(tiny.iv_hf_model(seed=6, layers=4), root / "internvl", "original",
                                       tiny.train_internvl_tokenizer(root / "iv-tokenizer.json"))
    return [{"name": "llama", "model": str(llama), "compressors": METHODS, "quantize": None, "batch": ["none", "fastv"]},
            {"name": "mistral-mqa", "model": str(mistral), "compressors": METHODS, "quantize": None, "batch": ["fastv"]},
            {"name": "qwen2", "model": str(qwen), "compressors": METHODS, "quantize": None, "batch": ["globalcom2", "pdrop"]},
            {"name": "internvl", "model": str(internvl), "compressors": ["none", "globalcom2", "fastv"], "quantize": None},
            {"name": "llama-int8", "model": str(llama), "compressors": ["none", "fastv"], "quantize": "int8"},
            {"name": "llama-int4", "model": str(llama), "compressors": ["none"], "quantize": "int4"}]


def tower_bytes(model) -> int:
    """Bytes of the vision tower and projector: whole on every rank (tensor_parallel.py splits the decoder only)."""
    return sum(t.numel() * t.element_size() for m in (model.vision, model.projector) for t in m.state_dict().values())


def weight_bytes(model) -> int:
    """Bytes of the decoder's parameters and buffers (the KV cache excluded: it is allocated per question)."""
    return sum(t.numel() * t.element_size() for name, t in model.llm.state_dict().items()) + sum(
        t.numel() * t.element_size() for t in model.lm_head.state_dict().values())


def recording(logits: list, steps: gen.Steps | None = None):
    """`steps` (default eager) whose prefill and decode calls keep each step's logits (B, V) in `logits`."""
    steps = steps or gen.Steps()

    def prefill(*args):
        out = steps.prefill(*args)
        logits.append(out.float())
        return out

    def decode(*args):
        out = steps.decode(*args)
        logits.append(out.float())
        return out
    return gen.Steps(prefill=prefill, decode=decode, compiled=steps.compiled)


def answer(model, tok, image, compressor, steps=None):
    logits = []
    result = gen.generate(model, tok, image, "What is in the picture?", compressor, 0.25, 8,
                          steps=recording(logits, steps))
    return result.token_ids, logits


def answer_batch(model, tok, image, compressor):
    """Three questions together: two images of different tile grids, prompts of different lengths."""
    items = [(image, "What is in the picture?"), (image.crop((0, 0, 60, 90)), "Describe the colours in detail, please."),
             (image, "Is it dark?")]
    logits = []
    results = generate_batch(model, tok, items, compressor, 0.25, 8, steps=recording(logits))
    return [r.token_ids for r in results], logits


def largest_difference(logits: list, tp_logits: list) -> float:
    steps = min(len(logits), len(tp_logits))
    return max((a - b).abs().max().item() for a, b in zip(logits[:steps], tp_logits[:steps]))


def main():
    torch.set_num_threads(1)  # both models on the same thread count: the same kernels
    cases, image, out = json.loads(Path(sys.argv[1]).read_text()), load_image(sys.argv[2]), Path(sys.argv[3])
    shard, device = tensor_parallel.start(int(os.environ["WORLD_SIZE"]), sys.argv[4] if len(sys.argv) > 4 else "cpu")
    report = {}
    for case in cases:
        spec = {None: None, "int8": Spec(8), "int4": Spec(4, 32)}[case["quantize"]]
        whole, tok = gen.load(case["model"], device, torch.float32, quantize=spec)
        part, _ = gen.load(case["model"], device, torch.float32, quantize=spec, shard=shard)
        compiled = gen.compile_steps(part) if case.get("compile") else None  # compiles at its first call
        for compressor in case["compressors"]:
            ids, logits = answer(whole, tok, image, compressor)
            tp_ids, tp_logits = answer(part, tok, image, compressor)
            r = report[f"{case['name']}/{compressor}"] = {
                "ids": ids, "tp_ids": tp_ids,
                "logit_diff": largest_difference(logits, tp_logits),
                "logit_scale": max(a.abs().max().item() for a in logits),
                "bytes": weight_bytes(whole), "tp_bytes": weight_bytes(part),
                "tower_bytes": tower_bytes(whole), "tp_tower_bytes": tower_bytes(part),
                "kv_heads": [whole.llm.layers[0].self_attn.kv_heads, part.llm.layers[0].self_attn.kv_heads],
            }
            if compressor in case.get("batch", ()):
                (batch_ids, batch_logits), (tp_batch_ids, tp_batch_logits) = (
                    answer_batch(m, tok, image, compressor) for m in (whole, part))
                r.update(batch_ids=batch_ids, tp_batch_ids=tp_batch_ids,
                         batch_logit_diff=largest_difference(batch_logits, tp_batch_logits))
            if compiled is not None:
                compiled_ids, compiled_logits = answer(part, tok, image, compressor, compiled)
                r.update(compiled_ids=compiled_ids, compiled_logit_diff=largest_difference(logits, compiled_logits),
                         compiled_vs_eager_diff=largest_difference(tp_logits, compiled_logits))
    (out / f"rank{shard.rank}.json").write_text(json.dumps(report))
    tensor_parallel.stop(shard)


if __name__ == "__main__":
    main()
