"""Finding a checkpoint and loading it: one key table for every layout, no second copy in memory.

The model is built on the `meta` device (no memory); each safetensors file is memory-mapped, and
each tensor either is the mapped file (CPU, same dtype) or is converted from it (see `load_model`).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import (ConfigError, LlavaConfig, check_vision, load_config, open_regular, parse_json,
                     read_regular, show, vision_config_from_shapes)
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
    raise WeightsError(f"unexpected key {show(key)} in the checkpoint (not a LLaVA-NeXT weight)")


MAX_INDEX_BYTES = 64 << 20  # model.safetensors.index.json: a 70B model's is about 100 KB


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file, or every
    *.safetensors. Each must be a regular file inside the checkpoint (see `inside`)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        weight_map = parse_json(read_regular(index, MAX_INDEX_BYTES, WeightsError), str(index), WeightsError)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index}: weight_map must be a JSON object of tensor name -> shard file name")
        names, source = sorted(set(weight_map.values())), f"shard named in {index.name}"
    else:
        single = model_dir / "model.safetensors"
        names = ["model.safetensors"] if single.exists() else sorted(p.name for p in model_dir.glob("*.safetensors"))
        source = "weights file"
        if not names and list(model_dir.glob("*.bin")):
            raise WeightsError(f"{model_dir}: only PyTorch .bin weights; convert them to safetensors first")
        if not names:
            raise WeightsError(f"{model_dir}: no *.safetensors weights")
    files = [inside(model_dir, name, source) for name in names]
    for f in files:
        if not f.exists():
            raise WeightsError(f"{f}: {source} is missing")
        if not f.is_file():  # a FIFO or a device would hang or stream forever
            raise WeightsError(f"{f}: {source} is not a regular file")
    return files


def inside(model_dir: Path, name: str, source: str) -> Path:
    """`model_dir / name`, refused unless it stays in the checkpoint: `name` is a plain relative path
    (not absolute, no `..`) and the file it resolves to, symlinks followed, lies in `model_dir`. A hub
    cache snapshot (`models--owner--name/snapshots/REV/`) links its files to `../../blobs/`, so there
    the repository's cache folder is the bound."""
    if not name or "\0" in name or "\\" in name or Path(name).is_absolute() or ".." in Path(name).parts:  # \\: Windows' separator
        raise WeightsError(f"{model_dir}: {source} {show(name)} is not a plain file name inside the checkpoint")
    path = model_dir / name
    try:
        root, target = model_dir.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise WeightsError(f"{path}: cannot resolve it ({e})") from None
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        root = root.parent.parent
    if not target.is_relative_to(root):
        raise WeightsError(f"{path}: {source} resolves to {target}, outside the checkpoint {root}; copy the file in")
    return path


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class Entry:
    """Where one tensor lives: file, its key there, dtype, shape, byte range (from the file start), and
    the file's size when the header was checked."""

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    file_size: int


# Cap on the JSON header, checked before a byte of it is read. safetensors allows 100 MB
# (MAX_HEADER_SIZE in safetensors/src/tensor.rs), but a hostile header that size parses into about
# 1 GB of Python objects in half a minute; real ones are far smaller (LLaVA-NeXT-34B's shards: tens
# of KB; even 90k tensors, a 671B mixture of experts in one file, would take about 14 MB).
MAX_HEADER_BYTES = 16 << 20


def read_header(path: Path) -> dict[str, Entry]:
    """The tensor table of a safetensors file: an 8-byte little-endian length n, then n bytes of JSON
    (UTF-8, an object of name -> {dtype, shape, data_offsets}), then the data.

    Nothing of the file is trusted. The rules are safetensors' own (`SafeTensors::read_metadata` and
    `Metadata::validate` in safetensors/src/tensor.rs): n capped and inside the file; the
    entries, sorted by offset, tile the data region exactly from 0 with no gap or overlap, each as long
    as its shape x dtype; the data region ends at the end of the file. Stricter than safetensors:
    the cap on n is lower (MAX_HEADER_BYTES), a key twice in the header is refused (which copy counts
    would depend on the reader), and only the dtypes we load pass.
    """
    with open_regular(path, WeightsError) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise WeightsError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: header length {n} is over the limit of {MAX_HEADER_BYTES} bytes (real headers are far smaller); not a checkpoint we load")
        if 8 + n > size:
            raise WeightsError(f"{path}: header length {n} is past the end of the file ({size} bytes); truncated or not safetensors")
        raw = f.read(n)
    header = parse_json(raw, f"{path}: header", WeightsError)
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header must be a JSON object, got {show(header)}")
    metadata = header.pop("__metadata__", None) or {}  # optional, null allowed (an Option in safetensors)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: __metadata__ must be an object of strings")
    entries = [header_entry(path, key, info, 8 + n, size) for key, info in header.items()]
    end = 8 + n  # the data region starts right after the header
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != end:
            raise WeightsError(f"{path.name}: {show(e.key)} starts at byte {e.start - 8 - n} of the data, expected {end - 8 - n} "
                               "(tensors must follow each other with no gap or overlap)")
        end = e.end
    if end != size:
        raise WeightsError(f"{path.name}: the tensors need {end - 8 - n} data bytes but the file has {size - 8 - n}; "
                           "truncated, or bytes no tensor accounts for")
    return {e.key: e for e in entries}


def header_entry(path: Path, key: str, info, base: int, size: int) -> Entry:
    """One header entry, its types checked and its length equal to shape x dtype size."""
    where = f"{path.name}: {show(key)}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where} must be an object with dtype, shape and data_offsets, got {show(info)}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise WeightsError(f"{where} has dtype {show(dtype)}, which we do not load ({', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise WeightsError(f"{where} has shape {show(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise WeightsError(f"{where} has data_offsets {show(offsets)}, not two non-negative integers")
    start, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end < start or end - start != nbytes:
        raise WeightsError(f"{where} has data_offsets [{start}, {end}] ({end - start} bytes) but shape {show(shape)} "
                           f"of {dtype} needs {nbytes}")
    return Entry(path, key, SAFETENSORS_DTYPES[dtype], tuple(shape), base + start, base + end, size)


def read_layout(files: list[Path]) -> dict[str, Entry]:
    """Our parameter name -> where its tensor is, from the file headers only."""
    layout = {}
    for path in files:
        for key, entry in read_header(path).items():
            name = internal_name(key)
            if name is None:
                continue
            if name in layout:
                raise WeightsError(f"{show(key)} in {path.name} duplicates {show(layout[name].key)}")
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
    if cfg.vision_from_shapes:  # an unknown tower: its sizes are the weights', checked like a config's
        cfg.vision = vision_config_from_shapes({k: v.shape for k, v in layout.items()})
        check_vision(cfg)
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
    sizes = {e.path: e.file_size for e in layout.values()}
    maps = {path: map_file(path, size) for path, size in sizes.items()}
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


def map_file(path: Path, size: int) -> mmap.mmap:
    """The whole file, mapped copy-on-write: readable and writable in memory, the file never changes.
    `size` is the length its header was checked against: a file changed since is refused."""
    with open_regular(path, WeightsError) as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if len(mm) != size:
        mm.close()
        raise WeightsError(f"{path}: changed while loading ({len(mm)} bytes, its header said {size})")
    return mm


def release(mm: mmap.mmap, start: int, end: int):
    """Drop the resident pages of bytes [start, end) of a private map (they are re-read if touched)."""
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the range only
    if last > first and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


# A hub repository id, owner/name, by huggingface_hub's rules (`validate_repo_id`): letters, digits,
# "_", "-", "."; no "--" or ".." anywhere; "-" and "." neither first nor last; at most 96 per part.
HUB_PART = r"(?!.*(?:--|\.\.))(?![-.])[\w.-]{1,96}(?<![-.])"
HUB_ID = re.compile(rf"{HUB_PART}/{HUB_PART}", re.ASCII)


def hub_folder(repo_id: str) -> Path:
    """Where hub id `owner/name` lives here: weights/owner--name/ (the hub cache's models--owner--name
    naming). The owner is part of it, so `someone/llava-next-tiny-scenes` is never the shipped
    `llava-next-tiny-scenes/`, and as hub ids cannot contain "--", no two ids share a folder."""
    owner, name = repo_id.split("/")
    return WEIGHTS_DIR / f"{owner}--{name}"


def resolve_model(name: str) -> Path:
    """A local checkpoint directory for `name`: a directory as given, a folder name under weights/
    (the shipped tiny model), or a hub id owner/name, found in weights/owner--name/ or downloaded there."""
    try:
        path = Path(name).expanduser()
        if path.is_dir():
            return path
        if "/" not in name and name not in ("", ".", ".."):
            for folder in (WEIGHTS_DIR, SHIPPED_DIR):
                if (folder / name / "config.json").is_file():
                    return folder / name
    except (OSError, RuntimeError):  # a name no file can have (too long, ~unknown-user): only a hub id is left
        pass
    if not HUB_ID.fullmatch(name):
        raise WeightsError(f"--model {show(name)}: no such directory, no folder of that name in weights/, "
                           "and not a hub id of the form owner/name")
    local = hub_folder(name)
    if (local / "config.json").is_file():
        return local
    try:
        from huggingface_hub import constants, snapshot_download

        if constants.HF_HUB_OFFLINE:  # say why at once, without announcing a download that cannot start
            raise RuntimeError("HF_HUB_OFFLINE is set")
        print(f"downloading {name} to {local} ...", file=sys.stderr, flush=True)  # stdout is the answer (or --json)
        snapshot_download(repo_id=name, local_dir=local, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"cannot download {name} ({reason}); on a machine with internet run "
            f"`huggingface-cli download {name} --local-dir {local}` and copy the folder here, or pass --model DIR"
        ) from None
    return local


__all__ = ["ConfigError", "DEFAULT_MODEL", "WeightsError", "load_model", "resolve_model"]
