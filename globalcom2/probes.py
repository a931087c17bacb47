"""What a compressor reads from the vision tower besides the features: [CLS] attention, keys, hidden states.

A method declares its needs as data, (kind, layer) pairs, `layer` a python index into the tower's
encoder layers (-2: the penultimate layer, whose output is LLaVA's feature layer; -1: the last):

    ("cls_logits", l)  (N, 1 + P) float32: the pre-softmax logits q_cls . k_j / sqrt(head_dim) of the
                       [CLS] query against every key of layer l ([CLS] itself in column 0), mean over
                       heads. GlobalCom2's token score is layer -1's, patch columns only (docs/globalcom2.md, "Inputs").
    ("cls_attn", l)    (N, heads, 1 + P) float32: the post-softmax attention row of the [CLS] query in
                       layer l, every key; transformers' eager `attentions[l][:, :, 0, :]`.
    ("keys", l)        (N, 1 + P, D) tower dtype: layer l's k_proj output, before the head split.
    ("hidden", l)      (N, 1 + P, D) tower dtype: layer l's output (transformers' `hidden_states[l % L + 1]`,
                       L layers; ("hidden", -2) is `hidden_states[-2]`, LLaVA's feature layer).
    ("features", 0)    (N, 1 + P, D) tower dtype: the hidden state the model feeds its projector, whichever
                       it is (`feature_layer`, a `hidden_states` index: LLaVA-NeXT's -2, a SigLIP tower's
                       last); the layer of the key is always 0. `FEATURES`; the similarity score reads it.

A tower without [CLS] (SigLIP) gives every kind without the [CLS] entry: 1 + P becomes P (its
`has_cls` is False; globalcom2.ImageFeatures carries it). The attention kinds need a [CLS] query.

All of them come from the tower's hidden states (`hidden_states_needed` says which) and, for the
attention kinds, the layer's [CLS] query and keys for its input (`query_key(layer, x)`, the tower's:
minillava/clip.py `ClipTower.query_key`). One query row, never the T x T attention matrix.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

KINDS = ("cls_logits", "cls_attn", "keys", "hidden", "features")
ATTENTION_KINDS = ("cls_logits", "cls_attn", "keys")  # read from the layer's input through its q and k
FEATURES = ("features", 0)  # the projector's input (the model's feature layer)


def _check(needs, n_layers: int):
    for kind, layer in needs:
        if kind not in KINDS:
            raise ValueError(f"unknown tower probe {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "features" and layer != 0:
            raise ValueError(f"the features probe is {FEATURES}, got {(kind, layer)}")
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"probe layer {layer} is outside the tower's {n_layers} layers")


def hidden_states_needed(needs, n_layers: int, feature_layer: int = -2) -> tuple[int, ...]:
    """The tower's hidden states (0: embeddings, i: output of layer i) that `needs` are computed from:
    a layer's input for the attention kinds, its output for "hidden", `feature_layer` (a hidden-state
    index) for "features"."""
    _check(needs, n_layers)
    return tuple(sorted({feature_layer % (n_layers + 1) if kind == "features" else layer % n_layers + (kind == "hidden")
                         for kind, layer in needs}))


def cls_logits(q_cls: Tensor, k: Tensor) -> Tensor:
    """Pre-softmax logits of the [CLS] query against every key, float32: q_cls (N, heads, 1, hd),
    k (N, heads, T, hd) -> (N, heads, T)."""
    return (q_cls.float() @ k.float().transpose(-1, -2)).squeeze(2) / math.sqrt(q_cls.shape[-1])


def tower_probes(needs, states: dict[int, Tensor], query_key: Callable[[int, Tensor], tuple[Tensor, Tensor]],
                 n_layers: int, feature_layer: int = -2) -> dict:
    """{(kind, layer): tensor} for each of `needs`, keyed as asked, from the hidden states `states`
    ({i: (N, 1 + P, D)}, at least `hidden_states_needed(needs, n_layers, feature_layer)`) of N tiles."""
    _check(needs, n_layers)
    qk = {}  # layer -> its [CLS] query and keys, computed once for every kind that reads them
    out = {}
    for kind, layer in needs:
        i = layer % n_layers
        if kind == "features":
            h = feature_layer % (n_layers + 1)
            out[kind, layer] = states[h] if h in states else states[feature_layer]  # keyed either way
            continue
        if kind == "hidden":
            out[kind, layer] = states[i + 1]
            continue
        if i not in qk:
            qk[i] = query_key(i, states[i])
        q_cls, k = qk[i]
        if kind == "keys":
            out[kind, layer] = k.transpose(1, 2).flatten(2)  # (N, T, D): the heads side by side, as k_proj gave them
        elif kind == "cls_attn":
            out[kind, layer] = cls_logits(q_cls, k).softmax(dim=-1)
        else:
            out[kind, layer] = cls_logits(q_cls, k).mean(dim=1)
    return out
