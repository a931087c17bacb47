"""Write a weight-only quantized checkpoint that loads directly (no --quantize needed):

    python -m minillava.apps.quantize --model liuhaotian/llava-v1.6-vicuna-7b --out weights/vicuna-7b-int4 --bits 4

The output is the source checkpoint with its decoder's linears and lm_head in minillava/quant.py's
storage form (int8 + scales, or int4 nibbles + scales_and_zeros, the scales in the dtype of the weight
they replace), every other tensor as it was, in one model.safetensors; config.json gains
`quantization_config` ({"quant_method": "minillava-weight-only", "bits", "group_size"}); the tokenizer
and chat-template files are copied. The source is checked as `load_model` checks it, then streamed:
each tensor is read from the mapped file, quantized a block of rows at a time, written, and its pages
handed back, so memory stays near one matrix. The folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

from .. import quant
from ..config import load_config
from ..generate import USER_ERRORS, fail
from ..quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, Spec
from ..trust import SAFETENSORS_DTYPES, ConfigError, map_file, parse_json, read_regular
from ..weights import DEFAULT_MODEL, internal_name, plan_load, release, resolve_model

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Small files of a checkpoint that travel with it: tokenizer, its added tokens, chat templates.
COPIED = ("tokenizer.model", "*.json", "*.jinja")
NOT_COPIED = ("config.json", "model.safetensors.index.json")


def outputs(plan) -> list[tuple[str, str, torch.dtype, tuple[int, ...]]]:
    """(output key, our name, dtype, shape) of every tensor of the quantized file, in file order."""
    out = []
    for name, e in sorted(plan.layout.items(), key=lambda kv: kv[1].key):
        module = name.removesuffix(".weight")
        if module not in plan.quantized:
            if out and out[-1][0] == e.key:  # one file tensor read as several (OpenGVLab's fused q, k, v)
                raise ConfigError(f"{e.key} holds q, k and v in one tensor, which this command does not write back; "
                                  "quantize while loading instead (--quantize on generate, eval, demo)")
            out.append((e.key, name, e.dtype, e.shape))
            continue
        key = e.key if internal_name(e.key) == name else "lm_head.weight"  # a tied lm_head gets its own tensor
        shapes = plan.spec.shapes(*e.shape)
        for suffix, shape in shapes.items():
            dtype = (torch.int8 if plan.spec.bits == 8 else torch.uint8) if suffix == "weight" else e.dtype
            out.append((key.removesuffix("weight") + suffix, f"{module}.{suffix}", dtype, shape))
    return out


def write_safetensors(path: Path, plan):
    """Stream the quantized tensors into `path` (safetensors: 8-byte header length, JSON header, data)."""
    entries = outputs(plan)
    header, offset = {}, 0
    for key, _, dtype, shape in entries:
        n = dtype.itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "quantization": json.dumps(plan.spec.config_entry())}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    maps = {e.path: map_file(e.path, e.file_size) for e in plan.layout.values()}
    pending: dict[str, torch.Tensor] = {}  # the other tensors of a linear quantized for its weight
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, name, dtype, shape in entries:
            if name in pending:
                tensor = pending.pop(name)
            else:
                e = plan.layout[name if name in plan.layout else name.rpartition(".")[0] + ".weight"]
                mm = maps[e.path]
                view = torch.frombuffer(mm, dtype=e.dtype, count=(e.end - e.start) // e.dtype.itemsize,
                                        offset=e.start).view(e.shape) if e.end > e.start else torch.empty(e.shape, dtype=e.dtype)
                module = name.rpartition(".")[0]
                if module in plan.quantized and not name.endswith(".bias"):  # a bias (Qwen2's q/k/v) stays as it is
                    parts = quant.quantize(view, plan.spec, e.dtype)  # scales in the dtype of the weight they replace
                    tensor = parts.pop(name.rpartition(".")[2])
                    pending.update({f"{module}.{k}": v for k, v in parts.items()})
                else:
                    tensor = view
                release(mm, e.start, e.end)
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), name
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def quantize_checkpoint(model: str, out: Path, spec: Spec) -> Path:
    """Write `model` (a directory, weights/ folder name or hub id) quantized by `spec` into `out`, a new folder."""
    model_dir = resolve_model(model)
    done = load_config(model_dir).quantization
    if done is not None:
        raise ConfigError(f"{model_dir} is already quantized ({done.name}); quantize its full-precision source")
    plan = plan_load(model_dir, spec)  # int4 without a group size gets the one that fits (plan.spec)
    raw = parse_json(read_regular(model_dir / "config.json", 4 << 20), str(model_dir / "config.json"))
    raw["quantization_config"] = plan.spec.config_entry()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same folder: the rename is atomic
    try:
        for pattern in COPIED:
            for src in model_dir.glob(pattern):
                if src.name not in NOT_COPIED and src.is_file():
                    shutil.copyfile(src, tmp / src.name)
        (tmp / "config.json").write_text(json.dumps(raw, indent=1) + "\n")
        write_safetensors(tmp / "model.safetensors", plan)
        os.rename(tmp, out)  # fails if `out` appeared meanwhile: nothing is overwritten
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m minillava.apps.quantize",
        description="Write a weight-only quantized copy of a LLaVA-NeXT checkpoint (the decoder's linear layers "
        "and lm_head: int8 per output channel, or int4 group-wise; the rest as it is) that every command loads "
        "directly with --model OUT. Quantizing while loading (--quantize on generate, eval, visualize, demo) "
        "gives the same weights; this saves the time and the full-precision download's disk.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, folder name under weights/, or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the new checkpoint folder (must not exist)")
    p.add_argument("--bits", required=True, type=int, choices=[8, 4], help="8: int8 per output channel; 4: int4 group-wise")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None, metavar="G",
                   help=f"int4: inputs sharing one scale and zero, one of {', '.join(map(str, GROUP_SIZES))} "
                   f"(default: the largest up to {DEFAULT_GROUP_SIZE} that divides every quantized width)")
    args = p.parse_args(argv)
    try:
        args.spec = Spec.of(args.bits, args.group_size)
    except ValueError:
        p.error("--group-size goes with --bits 4")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    if out.exists() or out.is_symlink():
        return fail(f"--out {out} exists; give a new folder (nothing is overwritten)")
    if not out.parent.is_dir():
        return fail(f"--out {out}: directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        return fail(f"--out {out}: no permission to write in {out.parent}")
    try:
        quantize_checkpoint(args.model, out, args.spec)
    except USER_ERRORS as e:
        return fail(str(e))
    except OSError as e:  # the disk: full, removed, read-only
        return fail(f"cannot write {out}: {e.strerror or e}")
    size = (out / "model.safetensors").stat().st_size
    shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    print(f"wrote {out}: {load_config(out).quantization.name}, model.safetensors {shown}; load it with --model {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
