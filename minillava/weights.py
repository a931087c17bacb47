"""Finding a checkpoint and loading it: one key table for every layout, no second copy in memory.

The model is built on the `meta` device (no memory); each safetensors file is memory-mapped, and
each tensor either is the mapped file (CPU, same dtype) or is converted from it (see `load_model`).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, LlavaConfig, load_config, vision_config_from_shapes
from .model import LlavaNext

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"  # the repository's weights/ (the tiny model is committed)
WEIGHTS_DIR = Path(os.environ.get("MINILLAVA_WEIGHTS", SHIPPED_DIR))  # where hub checkpoints are looked for and downloaded
# The model trained here on synthetic scenes (scripts/train_tiny.py, 6 MB, committed): it runs offline.
# The real thing is e.g. --model liuhaotian/llava-v1.6-vicuna-7b.
DEFAULT_MODEL = "llava-next-tiny-scenes"


class WeightsError(ValueError):
    """A checkpoint that cannot be found, fetched or loaded; the message names the file or key."""


# Checkpoint key prefix -> our prefix. First match wins, so longer prefixes come first.
KEY_PREFIXES = [
    ("model.vision_tower.vision_tower.vision_model.", "vision."),  # original LLaVA
    ("model.vision_tower.vision_model.", "vision."),  # transformers 4.x, newer saves
    ("model.vision_tower.", "vision."),  # transformers 5, newer saves
    ("vision_tower.vision_model.", "vision."),  # transformers, as published on the hub
    ("vision_tower.", "vision."),  # transformers 5 save_pretrained
    ("model.mm_projector.0.", "projector.linear_1."),  # original
    ("model.mm_projector.2.", "projector.linear_2."),  # original
    ("model.multi_modal_projector.", "projector."),  # transformers, newer saves
    ("multi_modal_projector.", "projector."),  # transformers
    ("model.image_newline", "image_newline"),  # original, transformers newer saves
    ("image_newline", "image_newline"),  # transformers
    ("model.language_model.", "llm."),  # transformers, newer saves
    ("language_model.model.", "llm."),  # transformers
    ("language_model.lm_head.", "lm_head."),  # transformers
    ("lm_head.", "lm_head."),  # original, transformers newer saves
    ("model.", "llm."),  # original: the decoder sits at model.*
]
# Buffers that some checkpoints carry and that we recompute.
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def internal_name(key: str) -> str | None:
    """Our parameter name for a checkpoint key; None for a buffer we ignore. Unknown keys raise."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    for prefix, ours in KEY_PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix) :]
    raise WeightsError(f"unexpected key {key!r} in the checkpoint (not a LLaVA-NeXT weight)")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{index}: unreadable index ({e})") from None
        files = [model_dir / s for s in shards]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{f}: shard named in {index.name} is missing")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    if list(model_dir.glob("*.bin")):
        raise WeightsError(f"{model_dir}: only PyTorch .bin weights; convert them to safetensors first")
    raise WeightsError(f"{model_dir}: no *.safetensors weights")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class Entry:
    """Where one tensor lives: file, its key there, dtype, shape and byte range (from the file start)."""

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, Entry]:
    """The tensor table of a safetensors file: an 8-byte little-endian length, then that much JSON."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    base, entries = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path.name}: {key!r} has dtype {info['dtype']}, which we do not load")
        start, end = info["data_offsets"]
        entries[key] = Entry(path, key, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return entries


def read_layout(files: list[Path]) -> dict[str, Entry]:
    """Our parameter name -> where its tensor is, from the file headers only."""
    layout = {}
    for path in files:
        for key, entry in read_header(path).items():
            name = internal_name(key)
            if name is None:
                continue
            if name in layout:
                raise WeightsError(f"{key!r} in {path.name} duplicates {layout[name].key!r}")
            layout[name] = entry
    return layout


def load_model(model_dir: str | Path, device="cpu", dtype=torch.float32) -> LlavaNext:
    """Build the model from `model_dir` (config.json + safetensors) on `device` in `dtype`.

    The model is built on the meta device, and each file is memory-mapped. A tensor already in the
    target dtype on the CPU becomes the parameter as it is, a view of the file's pages (copy-on-write,
    read on first use): no copy at all. Any other tensor is converted or moved from the map, and the
    pages it was read from are handed back to the kernel at once. Peak memory stays near the size of
    the model in its target dtype.
    """
    model_dir = Path(model_dir)
    cfg: LlavaConfig = load_config(model_dir)
    layout = read_layout(checkpoint_files(model_dir))
    if cfg.vision_from_shapes:
        try:
            cfg.vision = vision_config_from_shapes({k: v.shape for k, v in layout.items()})
        except KeyError as e:
            raise WeightsError(f"{model_dir}: vision tower weight {e} is missing") from None
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in layout:
        layout["lm_head.weight"] = layout["llm.embed_tokens.weight"]
    with torch.device("meta"):
        model = LlavaNext(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(layout))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{model_dir}: missing weight {missing[0]!r}{more}")
    unexpected = sorted(set(layout) - set(expected))
    if unexpected:
        raise WeightsError(f"{model_dir}: unexpected weight {layout[unexpected[0]].key!r} for this config")
    for name, e in layout.items():
        if e.shape != tuple(expected[name].shape):
            raise WeightsError(f"{e.path.name}: {e.key!r} has shape {list(e.shape)}, the config implies {list(expected[name].shape)}")

    device = torch.device(device)
    maps = {path: map_file(path) for path in {e.path for e in layout.values()}}
    state, loaded = {}, {}
    for name, e in layout.items():
        if (e.path, e.key) in loaded:  # tied weights: one tensor, two names
            state[name] = loaded[(e.path, e.key)]
            continue
        mm = maps[e.path]
        if e.end == e.start:  # an empty tensor has no bytes to map
            state[name] = loaded[(e.path, e.key)] = torch.empty(e.shape, dtype=dtype, device=device)
            continue
        view = torch.frombuffer(mm, dtype=e.dtype, count=(e.end - e.start) // e.dtype.itemsize, offset=e.start)
        view = view.view(e.shape)
        if device.type == "cpu" and e.dtype == dtype:
            tensor = view  # the parameter is the mapped file itself
        else:
            tensor = view.to(device, dtype)
            release(mm, e.start, e.end)
        state[name] = loaded[(e.path, e.key)] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model


def map_file(path: Path) -> mmap.mmap:
    """The whole file, mapped copy-on-write: readable and writable in memory, the file never changes."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def release(mm: mmap.mmap, start: int, end: int):
    """Drop the resident pages of bytes [start, end) of a private map (they are re-read if touched)."""
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the range only
    if last > first and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


def resolve_model(name: str) -> Path:
    """A local checkpoint directory for `name`: a directory as given, a folder name under weights/
    (the shipped tiny model), or a hub id, found under weights/<name>/ or downloaded there."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if "/" not in name and name not in ("", ".", ".."):
        for folder in (WEIGHTS_DIR, SHIPPED_DIR):
            if (folder / name / "config.json").is_file():
                return folder / name
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "/", "~")):
        raise WeightsError(f"--model {name}: no such directory, no weights/{name}/, and not a hub id of the form owner/name")
    local = WEIGHTS_DIR / parts[1]
    if (local / "config.json").is_file():
        return local
    try:
        from huggingface_hub import snapshot_download

        print(f"downloading {name} to {local} ...", flush=True)
        snapshot_download(repo_id=name, local_dir=local, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"cannot download {name} ({reason}); on a machine with internet run "
            f"`huggingface-cli download {name} --local-dir {local}` and copy the folder here, or pass --model DIR"
        ) from None
    return local


__all__ = ["ConfigError", "DEFAULT_MODEL", "WeightsError", "load_model", "resolve_model"]
