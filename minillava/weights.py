"""Finding a checkpoint and loading it: one key table for every layout, no second copy in memory.

The model is built on the `meta` device (no memory), then each tensor is read from the
memory-mapped safetensors file straight onto the target device, cast to the target dtype, and
assigned as the parameter. Peak memory is the model's size plus one tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ConfigError, LlavaConfig, load_config, vision_config_from_shapes
from .model import LlavaNext

DEFAULT_MODEL = "liuhaotian/llava-v1.6-vicuna-7b"
WEIGHTS_DIR = Path(os.environ.get("MINILLAVA_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))


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


def read_layout(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Our name -> (file, checkpoint key, shape), from the file headers only."""
    layout = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                name = internal_name(key)
                if name is None:
                    continue
                if name in layout:
                    raise WeightsError(f"{key!r} in {path.name} duplicates {layout[name][1]!r}")
                layout[name] = (path, key, tuple(f.get_slice(key).get_shape()))
    return layout


def load_model(model_dir: str | Path, device="cpu", dtype=torch.float32) -> LlavaNext:
    """Build the model from `model_dir` (config.json + safetensors) on `device` in `dtype`."""
    model_dir = Path(model_dir)
    cfg: LlavaConfig = load_config(model_dir)
    layout = read_layout(checkpoint_files(model_dir))
    if cfg.vision_from_shapes:
        try:
            cfg.vision = vision_config_from_shapes({k: v[2] for k, v in layout.items()})
        except KeyError as e:
            raise WeightsError(f"{model_dir}: vision tower weight {e} is missing") from None
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in layout:
        layout["lm_head.weight"] = layout["llm.embed_tokens.weight"]
    with torch.device("meta"):
        model = LlavaNext(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(layout))
    if missing:
        raise WeightsError(f"{model_dir}: missing weight {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(layout) - set(expected))
    if unexpected:
        raise WeightsError(f"{model_dir}: unexpected weight {layout[unexpected[0]][1]!r} for this config")
    for name, (path, key, shape) in layout.items():
        if shape != tuple(expected[name].shape):
            raise WeightsError(f"{path.name}: {key!r} has shape {list(shape)}, the config implies {list(expected[name].shape)}")

    state = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key, _) in layout.items():
        by_file.setdefault(path, []).append((name, key))
    device = torch.device(device)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name, key in names:
                state[name] = f.get_tensor(key).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model


def resolve_model(name: str) -> Path:
    """A local checkpoint directory for `name`: a directory as given, or a hub id, found under
    weights/<name>/ or downloaded there."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "/", "~")):
        raise WeightsError(f"--model {name}: no such directory, and not a hub id of the form owner/name")
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
