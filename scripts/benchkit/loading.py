"""Row 9: loading a random checkpoint (transformers' hub layout) in a fresh process, its peak RSS."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .fmt import GB, fmt_dict
from .plan import PINPOINTS, Plan

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose minillava the fresh process imports


CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from minillava.quant import Spec
from minillava.weights import load_model

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

torch.set_num_threads(int(sys.argv[4]))
dtype = getattr(torch, sys.argv[3])
before = status()["VmRSS"]
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
bits, _, group = (sys.argv[5] if len(sys.argv) > 5 else "").partition(":")  # "4:128", "8", or nothing
model = load_model(sys.argv[2], "cpu", dtype, Spec(int(bits), int(group) if group else None) if bits else None)
load_s = time.perf_counter() - t0
after_load = status()
step = 4096
touched = 0.0
with torch.inference_mode():
    for p in [*model.parameters(), *model.buffers()]:  # one value per page of every weight (quantized ones are buffers)
        if p.is_meta or p.is_mkldnn:  # the RoPE table, made by setup_cache; a packed weight (llama.Linear.pack),
            continue  # written whole by its reorder: resident already
        flat = p.detach().reshape(-1)
        touched += float(flat[:: max(step // p.element_size(), 1)].float().sum())
after_touch = status()
print(json.dumps({
    "rss_before": before, "hwm_reset": reset, "load_s": load_s,
    "hwm_load": after_load["VmHWM"], "rss_after_load": after_load["VmRSS"],
    "hwm_touch": after_touch["VmHWM"], "rss_after_touch": after_touch["VmRSS"],
    "model_bytes": sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()] if not p.is_meta),
    "dtype": str(model.dtype),
}))
"""


def write_checkpoint(plan: Plan, out: Path) -> Path:
    """A random LLaVA-NeXT checkpoint in transformers' hub layout, sharded safetensors in plan.ckpt_dtype."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from tests import tiny

    v, t = plan.ckpt_vision, plan.ckpt_text
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                       image_size=v.image_size, patch_size=v.patch_size),
        text_config=LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                                rms_norm_eps=t.rms_norm_eps),
        image_grid_pinpoints=[[h, w] for w, h in PINPOINTS],
    )
    dtype = getattr(torch, plan.ckpt_dtype)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(cfg)
    model = model.to(dtype).to_empty(device="cpu")  # allocated once, in the checkpoint's dtype
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    tokenizer = tiny.train_tokenizer(out.parent / "tokenizer.model")
    tiny.save_checkpoint(model, out, "hub", tokenizer, shards=plan.ckpt_shards)
    del model
    gc.collect()
    return out


def run_loader(ckpt: Path, dtype: str, threads: int, quantize: str = "") -> dict:
    """Load `ckpt` with minillava.weights.load_model in a fresh interpreter (`quantize`: "4:128", "8" or
    "" for none); its RSS figures (bytes)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ckpt), dtype, str(threads), quantize],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_loading(plan: Plan, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        t0 = time.perf_counter()
        ckpt = write_checkpoint(plan, Path(tmp) / "ckpt")
        files = sorted(ckpt.glob("*.safetensors"))
        ckpt_bytes = sum(f.stat().st_size for f in files)
        log(f"wrote a {ckpt_bytes / GB:.2f} GB {plan.ckpt_dtype} checkpoint ({len(files)} shards) in "
            f"{time.perf_counter() - t0:.1f} s")
        result = {"ckpt_bytes": ckpt_bytes, "shards": len(files), "dtype": plan.ckpt_dtype,
                  "own_dtype": run_loader(ckpt, plan.ckpt_dtype, plan.threads)}
        log(f"load in {plan.ckpt_dtype}: {fmt_dict(result['own_dtype'])}")
        if plan.load_float32 and plan.ckpt_dtype != "float32":
            result["float32"] = run_loader(ckpt, "float32", plan.threads)
            log(f"load in float32: {fmt_dict(result['float32'])}")
    return result
