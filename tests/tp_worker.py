"""One rank of tests/test_tensor_parallel.py's torchrun launch: every case's answer by the whole model (one
process's numbers, computed here too) and by this rank's tensor-parallel part, compared step by step.

    torchrun --nproc-per-node N tests/tp_worker.py CASES.json IMAGE OUT_DIR

CASES.json: [{"name", "model", "compressors": [...], "quantize": null | "int8" | "int4"}]. Writes
OUT_DIR/rank{R}.json: per case and compressor the greedy ids of both, the largest logit difference over
the prefill and every decode step, and both models' weight bytes.
"""

import json
import sys
from pathlib import Path

import torch

from minillava import generate as gen
from minillava import tensor_parallel
from minillava.quant import Spec
from minillava.trust import load_image

torch.set_num_threads(1)  # both models on the same thread count: the same kernels


def weight_bytes(model) -> int:
    """Bytes of the decoder's parameters and buffers (the KV cache excluded: it is allocated per question)."""
    return sum(t.numel() * t.element_size() for name, t in model.llm.state_dict().items()) + sum(
        t.numel() * t.element_size() for t in model.lm_head.state_dict().values())


def recording(logits: list):
    """Steps whose prefill and decode calls keep each step's logits (B, V) in `logits`."""
    def prefill(*args):
        out = gen.prefill(*args)
        logits.append(out.float())
        return out

    def decode(*args):
        out = gen.decode_one_token(*args)
        logits.append(out.float())
        return out
    return gen.Steps(prefill=prefill, decode=decode)


def answer(model, tok, image, compressor):
    logits = []
    result = gen.generate(model, tok, image, "What is in the picture?", compressor, 0.25, 8,
                          steps=recording(logits))
    return result.token_ids, logits


def main():
    cases, image, out = json.loads(Path(sys.argv[1]).read_text()), load_image(sys.argv[2]), Path(sys.argv[3])
    shard, _ = tensor_parallel.start(int(__import__("os").environ["WORLD_SIZE"]), "cpu")
    report = {}
    for case in cases:
        spec = {None: None, "int8": Spec(8), "int4": Spec(4, 32)}[case["quantize"]]
        whole, tok = gen.load(case["model"], "cpu", torch.float32, quantize=spec)
        part, _ = gen.load(case["model"], "cpu", torch.float32, quantize=spec, shard=shard)
        for compressor in case["compressors"]:
            ids, logits = answer(whole, tok, image, compressor)
            tp_ids, tp_logits = answer(part, tok, image, compressor)
            steps = min(len(logits), len(tp_logits))
            report[f"{case['name']}/{compressor}"] = {
                "ids": ids, "tp_ids": tp_ids,
                "logit_diff": max((a - b).abs().max().item() for a, b in zip(logits[:steps], tp_logits[:steps])),
                "logit_scale": max(a.abs().max().item() for a in logits),
                "bytes": weight_bytes(whole), "tp_bytes": weight_bytes(part),
                "kv_heads": [whole.llm.layers[0].self_attn.kv_heads, part.llm.layers[0].self_attn.kv_heads],
            }
    (out / f"rank{shard.rank}.json").write_text(json.dumps(report))
    tensor_parallel.stop(shard)


if __name__ == "__main__":
    main()
