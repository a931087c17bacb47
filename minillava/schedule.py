"""A decoder-side method's schedule for one prompt, and all that follows from it in one place.

A method that prunes between the decoder's layers (FastV; globalcom2/methods.py names them) hands the
decoder a schedule: stages, each before a layer K, each keeping a subset of the prompt's positions
(minillava/llama.py `Decoder.forward` applies them, `Stage` says what one is). From the same stages
come each layer's token count (`layer_lengths`: the KV cache's slots, generate.py `cache_slots`, and the
FLOPs count, eval/efficiency.py) and, after the prefill, what the last stage kept (`kept_positions`,
read from the cache: visualize and scripts/compression_table.py show it on the grid, layout.py `on_grid`).
"""

from __future__ import annotations

import torch

from .trust import ConfigError


def build(method: str, start: int, length: int, ratio: float, n_layers: int) -> tuple:
    """The stages of `method` for a prompt whose image tokens are [start, start + length), checked against
    a decoder of `n_layers` layers (ConfigError where it has too few); () for a method that prunes
    elsewhere. `none` never imports the compression package."""
    if method == "none":
        return ()
    import globalcom2

    stages = globalcom2.schedule(method, start, length, ratio)
    if stages and stages[-1].layer >= n_layers:
        raise ConfigError(f"{method} prunes after decoder layer {stages[-1].layer}, but this model has only {n_layers} "
                          "decoder layers; use another --compressor")
    return stages


def layer_lengths(stages, length: int, n_layers: int) -> list[int]:
    """Positions each decoder layer holds of a `length`-position sequence: all of them up to the first
    stage's layer, then `length` less what the stages before it dropped."""
    out, held = [], length
    drops = {stage.layer: stage.dropped for stage in stages}
    for i in range(n_layers):
        held -= drops.get(i, 0)
        out.append(held)
    return out


def kept_positions(llm, stages, start: int, length: int, prompt_length: int) -> torch.Tensor:
    """Indices into the image's token sequence [start, start + length) (ascending) of what the layers after
    the last stage see, read from that stage's layer's KV cache after the prefill of a `prompt_length`
    prompt: its first slots hold the positions that layer keeps (minillava/llama.py `KVCache`)."""
    last = stages[-1].layer
    pos = llm.layers[last].self_attn.cache.pos[0, : layer_lengths(stages, prompt_length, last + 1)[-1]]
    return pos[(pos >= start) & (pos < start + length)] - start
