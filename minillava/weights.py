"""Finding a checkpoint and loading it: one key table for every layout, no second copy in memory.

The model is built on the `meta` device (no memory); each safetensors file is memory-mapped, and
each tensor either is the mapped file (CPU, same dtype) or is converted from it (see `load_model`).
The files are opened, and their headers read and checked, by trust.py.
"""

from __future__ import annotations

import mmap
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import llama, quant, tensor_parallel
from .config import LlavaConfig, load_config, vision_config_from_shapes
from .model import Llava
from .quant import Spec, swap_linears
from .trust import ConfigError, Entry, WeightsError, checkpoint_paths, is_hub_id, map_file, read_header, read_index, show
from .validate import check_vision

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"  # the repository's weights/ (the tiny model is committed)
WEIGHTS_DIR = Path(os.environ.get("MINILLAVA_WEIGHTS", SHIPPED_DIR))  # where hub checkpoints are looked for and downloaded
# The model trained here on synthetic scenes (scripts/train_tiny.py, 6 MB, committed): it runs offline.
# The real thing is e.g. --model liuhaotian/llava-v1.6-vicuna-7b.
DEFAULT_MODEL = "llava-next-tiny-scenes"


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
    ("vision_model.", "vision."),  # InternVL, OpenGVLab's layout
    ("mlp1.0.", "projector.layer_norm."),  # InternVL, OpenGVLab's: mlp1 = LayerNorm, Linear, GELU, Linear
    ("mlp1.1.", "projector.linear_1."),
    ("mlp1.3.", "projector.linear_2."),
]
# InternViT's names in both InternVL layouts -> ours (internvit.py: clip.py's), applied in order to the
# tower's names of an InternVL checkpoint only (CLIP's embeddings.position_embedding is another tensor).
INTERNVIT_NAMES = [(re.compile(a), b) for a, b in [
    (r"embeddings\.class_embedding$", "embeddings.cls_token"),  # OpenGVLab's embeddings
    (r"embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"encoder\.layer\.", "encoder.layers."),  # transformers' layers
    (r"\.attention\.projection_layer\.", ".self_attn.out_proj."),
    (r"\.attention\.", ".self_attn."),
    (r"\.layernorm_before\.", ".layer_norm1."),
    (r"\.layernorm_after\.", ".layer_norm2."),
    (r"\.attn\.proj\.", ".self_attn.out_proj."),  # OpenGVLab's layers (attn.qkv: `FUSED`)
    (r"\.attn\.", ".self_attn."),
    (r"\.norm1\.", ".layer_norm1."),
    (r"\.norm2\.", ".layer_norm2."),
    (r"\.ls1$", ".lambda_1"),
    (r"\.ls2$", ".lambda_2"),
]]
FUSED = ".self_attn.qkv."  # OpenGVLab's InternViT: q, k, v in one (3 D, D) linear, read as three row blocks
# Buffers that some checkpoints carry and that we recompute.
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def internal_name(key: str, family: str = "llava-next") -> str | None:
    """Our parameter name for a checkpoint key of a `family` model; None for a buffer we ignore. Unknown
    keys raise."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    for prefix, ours in KEY_PREFIXES:
        if key.startswith(prefix):
            name = ours + key[len(prefix) :]
            if family == "internvl" and name.startswith("vision."):
                for pattern, ours in INTERNVIT_NAMES:
                    name = pattern.sub(ours, name, count=1)
            return name
    raise WeightsError(f"unexpected key {show(key)} in the checkpoint (not a LLaVA-NeXT weight)")


def split_rows(name: str, e: Entry) -> dict[str, Entry]:
    """A fused (3 D, ...) q, k, v tensor as three entries of D rows each, q_proj, k_proj, v_proj: row blocks
    of a row-major tensor are byte ranges of the file, so each is mapped as any other tensor."""
    if not e.shape or e.shape[0] % 3:
        raise WeightsError(f"{show(e.key)} has shape {list(e.shape)}: a fused q, k, v needs rows divisible by 3")
    rows, step = e.shape[0] // 3, (e.end - e.start) // 3
    return {name.replace(FUSED, f".self_attn.{part}_proj."): replace(e, shape=(rows, *e.shape[1:]),
                                                                     start=e.start + i * step, end=e.start + (i + 1) * step)
            for i, part in enumerate("qkv")}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file, or every
    *.safetensors. Each must be a regular file inside the checkpoint (see `trust.checkpoint_paths`)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        names, source = read_index(index), f"shard named in {index.name}"
    else:
        single = model_dir / "model.safetensors"
        names = ["model.safetensors"] if single.exists() else sorted(p.name for p in model_dir.glob("*.safetensors"))
        source = "weights file"
        if not names and list(model_dir.glob("*.bin")):
            raise WeightsError(f"{model_dir}: only PyTorch .bin weights; convert them to safetensors first")
        if not names:
            raise WeightsError(f"{model_dir}: no *.safetensors weights")
    return checkpoint_paths(model_dir, names, source)


def read_layout(files: list[Path], family: str = "llava-next") -> dict[str, Entry]:
    """Our parameter name -> where its tensor is, from the file headers only (a fused q, k, v: three)."""
    layout = {}
    for path in files:
        for key, entry in read_header(path).items():
            name = internal_name(key, family)
            if name is None:
                continue
            for name, entry in (split_rows(name, entry) if FUSED in name else {name: entry}).items():
                if name in layout:
                    raise WeightsError(f"{show(key)} in {path.name} duplicates {show(layout[name].key)}")
                layout[name] = entry
    return layout


@dataclass
class Plan:
    """A checkpoint checked against its config before any weight is read: the model on the meta device
    (its linears already swapped for QuantizedLinear if quantized), where each of its tensors is, and
    which linears are quantized: while loading (from float weights) or stored so (`stored`)."""

    cfg: LlavaConfig
    model: Llava
    layout: dict[str, Entry]
    spec: Spec | None
    quantized: set[str]  # module names (llm.layers.0.self_attn.q_proj, lm_head)
    stored: bool  # the checkpoint holds them quantized (python -m minillava.apps.quantize)


def plan_load(model_dir: str | Path, quantize: Spec | None = None, ranks: int = 1) -> Plan:
    """Read and check config.json and every tensor's name, shape and dtype against it (see `load_model`).
    int4 without a group size gets the one that fits the decoder's widths as each of `ranks`
    tensor-parallel processes holds them (`quant.Spec.fit`); `Plan.spec` says which."""
    model_dir = Path(model_dir)
    cfg: LlavaConfig = load_config(model_dir)
    if quantize is not None and not quantize.chosen:
        if ranks > 1:  # the split itself first: its error says what is wrong, not the widths it would give
            tensor_parallel.check(cfg.text, ranks)
        quantize = quantize.fit(quant.input_widths(cfg.text, ranks))
    if cfg.quantization is not None and quantize not in (None, cfg.quantization):
        raise ConfigError(f"{model_dir} is already quantized to {cfg.quantization.name}; drop --quantize "
                          f"(or quantize the full-precision checkpoint to {quantize.name})")
    spec = quantize or cfg.quantization
    layout = read_layout(checkpoint_files(model_dir), cfg.family)
    if cfg.vision_from_shapes:  # an unknown tower: its sizes are the weights', checked like a config's
        cfg.vision = vision_config_from_shapes({k: v.shape for k, v in layout.items()})
        check_vision(cfg)
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in layout:
        layout["lm_head.weight"] = layout["llm.embed_tokens.weight"]
    with torch.device("meta"):
        model = Llava(cfg)
    quantized = set(swap_linears(model, spec)) if spec else set()
    expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    if spec and cfg.quantization is None:  # quantized while loading: the checkpoint holds each linear's (N, K) float weight
        for name in quantized:
            m = model.get_submodule(name)
            for suffix in spec.shapes(m.out_features, m.in_features):
                del expected[f"{name}.{suffix}"]
            expected[f"{name}.weight"] = ((m.out_features, m.in_features), None)
    missing = sorted(set(expected) - set(layout))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{model_dir}: missing weight {missing[0]!r}{more}")
    unexpected = sorted(set(layout) - set(expected))
    if unexpected:
        raise WeightsError(f"{model_dir}: unexpected weight {layout[unexpected[0]].key!r} for this config")
    for name, e in layout.items():
        shape, kind = expected[name]
        if e.shape != tuple(shape):
            raise WeightsError(f"{e.path.name}: {e.key!r} has shape {list(e.shape)}, the config implies {list(shape)}")
        integer = kind in (torch.int8, torch.uint8)  # a stored quantized weight; everything else is floating point
        if e.dtype != kind if integer else not e.dtype.is_floating_point:
            want = f"{kind} ({spec.name})" if integer else "a floating-point dtype"
            raise WeightsError(f"{e.path.name}: {e.key!r} is {e.dtype}, expected {want}")
    return Plan(cfg, model, layout, spec, quantized, cfg.quantization is not None)


def load_model(model_dir: str | Path, device="cpu", dtype=torch.float32, quantize: Spec | None = None,
               shard: tensor_parallel.Shard | None = None, pack: bool = True) -> Llava:
    """Build the model from `model_dir` (config.json + safetensors) on `device` in `dtype`.

    The model is built on the meta device, and each file is memory-mapped. A tensor already in the
    target dtype on the CPU becomes the parameter as it is, a view of the file's pages (copy-on-write,
    read on first use): no copy at all. Any other tensor is converted or moved from the map, and the
    pages it was read from are handed back to the kernel at once. Peak memory stays near the size of
    the model in its target dtype. The safetensors library (0.8) maps files too, but keeps every page
    it converted from: loading a 1 GiB float32 file as bfloat16 through `safe_open` or
    `safetensors.torch.load_file` peaked 1.5 GiB above the interpreter's start, this 0.53 GiB.

    `quantize` (or the checkpoint's own quantization_config, from python -m minillava.apps.quantize): the
    decoder's linears become weight-only int8 / int4 (minillava/quant.py). A full-precision weight is
    quantized as it is read, a block of rows at a time, and its pages handed back: the full-precision
    model is never held, only one matrix of it at most.

    `shard`: this process's part of a tensor-parallel decoder (minillava/tensor_parallel.py), read as
    slices of the mapped files: the whole checkpoint is checked, but only this rank's part is read.

    `pack` (on the CPU): the decoder's and lm_head's float32 / bfloat16 matrices are laid out for oneDNN's
    matmul (`llama.pack_linears`: decode reads them up to twice as fast), each file page they were read
    from handed back as it goes; False keeps plain tensors (to train, or to read the weights).
    """
    plan = plan_load(model_dir, quantize, shard.size if shard is not None else 1)
    model, layout, spec, quantized = plan.model, plan.layout, plan.spec, plan.quantized
    if quantize is not None and not quantize.chosen and (shard is None or shard.rank == 0):
        print(quant.chosen_note(spec), file=sys.stderr)
    if shard is not None:  # the meta model's decoder split; each tensor below is cut to its part as it is read
        tensor_parallel.check(plan.cfg.text, shard.size, spec)
        tensor_parallel.shard_model(model, shard)
    device = torch.device(device)
    sizes = {e.path: e.file_size for e in layout.values()}
    maps = {path: map_file(path, size) for path, size in sizes.items()}
    state, loaded = {}, {}
    for name, e in layout.items():
        module = name.removesuffix(".weight")
        quantizing = module in quantized and not plan.stored
        if (e.path, e.key, e.start) in loaded and not quantizing:  # tied weights: one tensor, two names
            state[name] = loaded[(e.path, e.key, e.start)]
            continue
        mm = maps[e.path]
        if e.end == e.start:  # an empty tensor has no bytes to map
            state[name] = loaded[(e.path, e.key, e.start)] = torch.empty(e.shape, dtype=dtype, device=device)
            continue
        view = torch.frombuffer(mm, dtype=e.dtype, count=(e.end - e.start) // e.dtype.itemsize, offset=e.start)
        view = view.view(e.shape)
        if quantizing:  # on the device (fast there), a block of rows at a time (quant.ROWS), and packed for
            # its kernel at once: one matrix's storage form at a time, never the whole model's
            layer = model.get_submodule(module)
            move = (lambda w: w.to(device)) if device.type != "cpu" else (lambda w: w)
            storage = (quant.quantize(move(view), spec, dtype) if shard is None
                       else tensor_parallel.quantize_local(name, view, plan.cfg.text, shard, spec, dtype, move))
            for suffix, t in storage.items():
                setattr(layer, suffix, t)
            layer.pack()
            state.update({f"{module}.{k}": getattr(layer, k) for k in spec.shapes(1, 1)})
            release(mm, e.start, e.end)
            continue
        if shard is not None:  # this rank's part: a view of the map (rows), or a copy of its columns
            view = tensor_parallel.local(name, view, plan.cfg.text, shard, spec if plan.stored else None)
        if not e.dtype.is_floating_point:  # a stored quantized weight: as it is (`pack` lays it out for the device)
            tensor = view if device.type == "cpu" else view.to(device)
        elif device.type == "cpu" and e.dtype == dtype:
            tensor = view  # the parameter is the mapped file itself
        else:
            tensor = view.to(device, dtype)
            release(mm, e.start, e.end)
        state[name] = loaded[(e.path, e.key, e.start)] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    # Stored integer weights on the CPU are views of the file; those `pack` repacks for the kernel (int4)
    # are not read again, so their pages are handed back as each is packed.
    views = {name.removesuffix(".weight"): e for name, e in layout.items()
             if not e.dtype.is_floating_point and device.type == "cpu"}
    state.clear()  # each tensor `pack` replaces is freed as it goes: never two copies of the quantized weights
    loaded.clear()
    for name, m in model.named_modules():
        if isinstance(m, quant.QuantizedLinear):
            before = m.weight.data_ptr()
            m.pack()
            if name in views and m.weight.data_ptr() != before:
                e = views[name]
                release(maps[e.path], e.start, e.end)
    for name, m in llama.packable(model) if pack else ():  # a new copy in oneDNN's layout: the file's pages go
        m.pack()
        e = layout[f"{name}.weight"]
        release(maps[e.path], e.start, e.end)
    model.eval().requires_grad_(False)
    return model


def release(mm: mmap.mmap, start: int, end: int):
    """Drop the resident pages of bytes [start, end) of a private map (they are re-read if touched)."""
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the range only
    if last > first and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


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
    if not is_hub_id(name):
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


__all__ = ["DEFAULT_MODEL", "checkpoint_files", "load_model", "plan_load", "read_layout", "resolve_model"]
