"""Pruning between layers: what a stage is, and all that follows from a schedule in one place.

Two places prune between layers with one mechanism: the vision tower (minillava/clip.py `Tower.forward`)
and the decoder (minillava/llama.py `Decoder.forward`). Each takes a schedule: stages, each before a
layer K, each reading what the model lends it (`Between`) and keeping a subset of the tokens, or merged
tokens in their place (`Stage`, `apply_stage`). A method that prunes in the decoder (FastV;
globalcom2/methods.py names every method and its place) builds its schedule for one prompt (`build`).
From the same stages come each layer's token counts (`token_counts`: its attention's and its MLP's, for the
FLOPs count, eval/efficiency.py; `layer_lengths`, the first: the KV cache's slots, generate.py `cache_slots`) and, after the prefill, what the last stage kept
(`kept_positions`, from `Decoder.kept`: visualize and scripts/compression_table.py show it on the grid,
layout.py `on_grid`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .trust import ConfigError


@dataclass
class Between:
    """What a stage before layer K reads: layer K-1's input `previous_input` and output `x` (N, T, D), and
    `query_key(i, h)`: layer i's queries and keys (N, H, T, hd) for an input h (the layer's own norm
    applied; the decoder's rotated to the positions `input_pos` (T,), its key heads repeated to the
    query heads). The tower's tokens have no positions (None). `embeds`: the decoder's input (N, T0, D),
    the prompt as it entered layer 0, for a stage that reads the prompt itself (SparseVLM's text raters);
    None in the tower."""

    previous_input: torch.Tensor
    x: torch.Tensor
    query_key: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    input_pos: torch.Tensor | None = None
    embeds: torch.Tensor | None = None


class Stage(Protocol):
    """One stage of a schedule (globalcom2/fastv.py `FastV`). Before layer `layer` it reads `Between` and
    returns the token indices the layers from `layer` on keep, ascending (T',) long, the same for every
    row; or, where it merges or chooses per row, (indices (T',), the tokens (N, T', D) that stand there).
    In the decoder the indices are prompt positions, kept by the layers after (RoPE, mask, cache), or,
    where the stage has `renumber` True (PyramidDrop), the kept tokens renumbered 0 .. T'-1 as a prompt of
    that length (minillava/llama.py `Decoder.forward`). A renumbering stage may also put tokens that stand
    at no single position (SparseVLM's recycled tokens, merged from several) in the sequence: index -1
    there, the merged tokens given, the other indices ascending. `dropped`: how many tokens it removes net
    (removed less added), known before the pass (each later layer's KV cache is sized by it:
    `layer_lengths`).

    A stage may also sit *inside* layer `layer` (an attribute `inside` True; absent means False): between
    that layer's attention and its MLP, where token-merging methods merge (ToMe; FiCoCo-V in the tower,
    globalcom2/ficoco.py; FiCoCo-L in the decoder, globalcom2/ficocol.py). There `Between.previous_input`
    is the layer's input (its own attention is `query_key(layer, previous_input)`) and `x` the stream after
    the attention's residual; the layer's MLP, and every later layer, see what the stage keeps, and the
    layer's own KV cache what entered it."""

    layer: int
    dropped: int

    def keep(self, between: Between) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def check_schedule(schedule: Sequence[Stage], n_layers: int, shared: bool = True):
    """A schedule prunes before (or inside) layers 1 .. n_layers - 1, each layer at most once, ascending; in the
    decoder only a prefill of positions shared by the rows (`shared`)."""
    layers = [stage.layer for stage in schedule]
    if not layers:
        return
    if not shared:
        raise ValueError("tokens are pruned in a prefill of one prompt (positions (T,) shared by the rows)")
    if layers != sorted(set(layers)) or not 0 < layers[0] <= layers[-1] < n_layers:
        raise ValueError(f"a schedule prunes before layers 1 .. {n_layers - 1}, each once, ascending; got {layers}")


def apply_stage(stage: Stage, between: Between) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens (N, T', D) the layers from `stage.layer` on see, and the indices (T',) they stand at (-1:
    an added token, `Stage`)."""
    kept = stage.keep(between)
    index, merged = kept if isinstance(kept, tuple) else (kept, None)
    if (index < 0).any() and (merged is None or not getattr(stage, "renumber", False)):
        raise ValueError(f"a stage before layer {stage.layer} added tokens (index -1) without giving them, or "
                         "without renumbering (an added token has no position of its own)")
    if len(index) != between.x.shape[1] - stage.dropped:
        raise ValueError(f"a stage before layer {stage.layer} said it drops {stage.dropped} of "
                         f"{between.x.shape[1]} tokens but kept {len(index)}")
    return (between.x[:, index] if merged is None else merged), index


def build(method: str, start: int, length: int, ratio: float, n_layers: int) -> tuple:
    """The stages of `method` for a prompt whose image tokens are [start, start + length), checked against
    a decoder of `n_layers` layers (ConfigError where it has too few); () for a method that prunes
    elsewhere. `none` never imports the compression package."""
    if method == "none":
        return ()
    import globalcom2

    try:
        stages = globalcom2.schedule(method, start, length, ratio, n_layers)
    except ValueError as e:  # e.g. a decoder too shallow for the method's layers
        raise ConfigError(str(e)) from None
    if stages and stages[-1].layer >= n_layers:
        raise ConfigError(f"{method} prunes after decoder layer {stages[-1].layer}, but this model has only {n_layers} "
                          "decoder layers; use another --compressor")
    return stages


def layer_lengths(stages, length: int, n_layers: int) -> list[int]:
    """Positions each decoder layer's attention (and KV cache) holds of a `length`-position sequence: all of
    them up to the first stage's layer, then `length` less what the stages before it dropped (a stage inside
    a layer: from the next layer on)."""
    return token_counts(stages, length, n_layers)[0]


def token_counts(stages, length: int, n_layers: int) -> tuple[list[int], list[int]]:
    """Tokens each of `n_layers` layers' attention and MLP see, from a `length`-token input, through `stages`
    (a tower's or a decoder's): the MLP of a layer with a stage inside it sees what the stage keeps."""
    attention, mlp, held = [], [], length
    for i in range(n_layers):
        stage = next((st for st in stages if st.layer == i), None)
        inside = getattr(stage, "inside", False)
        held -= stage.dropped if stage is not None and not inside else 0
        attention.append(held)
        held -= stage.dropped if inside else 0
        mlp.append(held)
    return attention, mlp


def kept_positions(llm, start: int, length: int) -> torch.Tensor:
    """Indices into the image's token sequence [start, start + length) (ascending) of what the layers after
    the last stage saw in the last scheduled prefill (`Decoder.kept`: the prompt positions they hold);
    every index when the last prefill had no stage (a method that prunes nothing at this r: SparseVLM at 1)."""
    pos = llm.kept
    if pos is None:
        return torch.arange(length, device=llm.embed_tokens.weight.device)
    return pos[(pos >= start) & (pos < start + length)] - start
