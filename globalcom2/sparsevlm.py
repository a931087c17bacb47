"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference"): text-guided pruning of the image tokens at three decoder layers, the pruned tokens'
best share recycled as a few merged tokens. A decoder-side method: a schedule of three stages
(globalcom2/methods.py).

Source version: Gumpest/SparseVLMs tag v1.5 (commit b9619e6, March 2025: fixed per-stage budgets,
`pruning_loc=[2, 6, 15]`). The GlobalCom2 paper names no version; by date (arXiv v1, January 2025) it can
only have run the October 2024 code (commit b72c5d6), whose budget is adaptive, `min(int(rank * scale +
bias), v - 1)` with `rank` the matrix rank of the raters' attention (score.py `attn_postprocess_rank`), at
four places [2, 6, 15, 19]; its scale and bias are published only for LLaVA-1.5's three settings (README:
13.5 / 9 + 6 / 0.8), none for LLaVA-NeXT or for a share of the tokens, and its counts are known only
inside the pass (our KV cache is sized before it). v1.5 is that same algorithm (the same raters, scores,
recycling and `cluster_and_merge`) with the count fixed per stage, which is what a retention ratio needs.
v2.0 ("SparseVLM+", December 2025) postdates every version of the paper.

As v1.5 prunes (llava/model/language_model/modelling_sparse_llama.py, `LlamaDynamicvitModel.forward`,
its inference branch; score.py `attn_postprocess_topk`; utils.py `cluster_and_merge`), with N the image's
tokens and v the image span's tokens before a stage:

- raters (`forward`, "select text tokens", once, on the decoder's input embeddings): M = softmax over the
  text of (image embeds) (text embeds)^T, mean over the image tokens; the text tokens whose M is above
  its mean (`t_token_idx`); the text is everything after the image. `raters`.
- after decoder layer K in `pruning_loc` (before our layer K + 1): layer K's attention on its input at
  the current positions, q k^T * hd^-1/2 in the model's dtype, causal, softmax, mean over heads; its rows
  of the raters (at the current text start), columns of the image span, mean over those rows
  (`attn_postprocess_topk`, the flash branch's `return_logits`). `relation`.
- the image span keeps its top min(budget[s], v - 1) by that score, in position order (`mask[0][indices]
  = 1`); the text and the tokens before the image all kept.
- recycling (`forward`, "merge and cluster"): of the v - k pruned image tokens, the int(0.3 (v - k)) + 1
  with the highest score, in that (descending) order, of layer K's output, are clustered into
  int(that / 10) + 1 tokens (`cluster_and_merge`: DPC-kNN density peaks, each token to its nearest
  centre, each cluster's mean) placed after the kept image tokens; they count as image tokens for the
  next stage (`v_token_num = pred_score_vis.sum() + cluster_num`).
- the sequence is renumbered 0 .. T'-1 (`position_ids[:, :len(select_token_idx[0]) + cluster_num]`), and
  a decode step in those layers sits at that layer's cache length (the attention's `position_ids =
  past_key_value.get_usable_length(...)`): the stage's `renumber` (minillava/llama.py, KVCache.shift).

Our knob: r names the published settings by their layer-averaged share, as SparseVLM names them
(score.py: "192" keeps [300, 200, 110] of 576, its comment `2*576 4*300 10*200 16*110` the average over
LLaVA's 32 layers; "128" [303, 110, 36]; "64" [66, 30, 17]): r = 1/3, 2/9, 1/9. Each stage's budget is
round(N b_s(r)), b_s piecewise linear in r through (0, 0), the three published lists / 576 at r = 1/9,
2/9, 1/3, and (1, 1); so N = 576 at those r gives the published budgets exactly. r = 1 is the empty
schedule (the published `min(budget, v - 1)` always drops and recycles one token, so no budget keeps all).
The share the last layers see (kept + recycled) is what `visual_tokens.after` reports. Layers: the
published K = 2, 6, 15 of 32 scale as K_s = max(floor(K L / 32 + 1/2), K_{s-1} + 1), so 32 layers give
2, 6, 15 and the tiny model's 4 give 0, 1, 2 (stages before layers 1, 2, 3); a decoder where K_3 > L - 2
(under 4 layers) is refused.

Departures: the noise `torch.rand(...) * 1e-6` that `cluster_and_merge` adds to the densities to break
ties is left out (deterministic answers; it decides only between densities within 1e-6, and in half
precision it rounds away); grouped-query attention repeats the key heads (the published code runs
LLaMA's equal heads); on LLaVA-NeXT the image span is the whole image sequence (thumbnail, crops, their
newlines), the published code being written for LLaVA-1.5's one 576-token span (`image_shape`); rows of a
batch are ranked by the first row, as the published `mask[0]` (generate_batch runs decoder methods one
question at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PRUNING_LOC = (2, 6, 15)  # the published layers K (of 32) whose attention ranks and after which it prunes
PUBLISHED = {  # score.py sparse_token_dict, tokens of 576 kept at each stage, by the setting's name
    192: (300, 200, 110),
    128: (303, 110, 36),
    64: (66, 30, 17),
}
RECYCLE_SHARE, CLUSTER_DIVISOR = 0.3, 10  # "Top 30%" of the pruned, int(n / 10) + 1 clusters


def stage_shares(ratio: float) -> list[float]:
    """b_s(r) for the three stages: piecewise linear through (0, 0), the published lists / 576 at
    r = 64/576, 128/576, 192/576, and (1, 1)."""
    if not 0.0 < ratio <= 1.0:  # NaN fails too
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio!r}")
    points = [(0.0, (0.0, 0.0, 0.0))] + [(n / 576, tuple(b / 576 for b in PUBLISHED[n])) for n in (64, 128, 192)]
    points.append((1.0, (1.0, 1.0, 1.0)))
    for (r0, b0), (r1, b1) in zip(points, points[1:]):  # pragma: no branch (never exhausted: see below)
        if ratio <= r1:  # the last segment ends at r = 1, so every checked ratio stops in one
            break
    w = (ratio - r0) / (r1 - r0)
    return [x0 + w * (x1 - x0) for x0, x1 in zip(b0, b1)]


def stage_budgets(length: int, ratio: float) -> list[int]:
    """Each stage's budget of the image's `length` tokens: round(N b_s(r)); the published lists at N = 576."""
    return [round(length * b) for b in stage_shares(ratio)]


def pruning_layers(n_layers: int) -> list[int]:
    """The layers K whose attention ranks (the stage prunes before K + 1): 2, 6, 15 of 32, scaled."""
    out: list[int] = []
    for k in PRUNING_LOC:
        out.append(max(math.floor(k * n_layers / 32 + 0.5), out[-1] + 1 if out else 0))
    if out[-1] > n_layers - 2:
        raise ValueError(f"sparsevlm prunes after three distinct decoder layers (2, 6, 15 of 32, scaled), but this "
                         f"model has only {n_layers} decoder layers; use another --compressor")
    return out


def raters(embeds: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """The text raters (indices into the text after the image) from the decoder's input (B, T, D) whose
    image is [start, start + length): `LlamaDynamicvitModel.forward`, first row."""
    v_t = embeds[:1, start : start + length]
    t_t = embeds[:1, start + length :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)  # (1, text)
    return torch.where(m_v_t > m_v_t.mean())[1]


def relation(q: torch.Tensor, k: torch.Tensor, start: int, length: int, rater_rows: torch.Tensor) -> torch.Tensor:
    """(B, length): the image span's post-softmax attention from the raters' rows (positions in the current
    sequence), mean over heads, then over the raters. Only those rows of the causal map are computed."""
    logits = q[:, :, rater_rows] @ k.transpose(2, 3) * (1 / math.sqrt(q.shape[-1]))  # (B, H, R, T)
    causal = torch.arange(k.shape[2], device=k.device)[None, :] > rater_rows[:, None]
    maps = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1).mean(1)  # (B, R, T)
    return maps[:, :, start : start + length].mean(1)


def cluster_and_merge(x: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """utils.py `cluster_and_merge` without its tie-breaking noise: (B, n, C) -> (B, cluster_num, C)."""
    b, n, c = x.shape
    dist_matrix = (x[:, :, None] - x[:, None]).norm(dim=-1, p=2) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    rows = torch.arange(b, device=x.device)[:, None]
    idx_cluster = dist_matrix[rows, index_down].argmin(dim=1)  # each token's nearest centre
    idx_cluster[rows.expand(b, cluster_num).reshape(-1), index_down.reshape(-1)] = (
        torch.arange(cluster_num, device=x.device)[None].expand(b, cluster_num).reshape(-1))
    idx = idx_cluster + rows * cluster_num
    token_weight = x.new_ones(b, n, 1)
    all_weight = token_weight.new_zeros(b * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(b * n), source=token_weight.reshape(b * n, 1))
    norm_weight = token_weight / (all_weight + 1e-6)[idx]
    merged = x.new_zeros(b * cluster_num, c)
    merged.index_add_(dim=0, index=idx.reshape(b * n), source=(x * norm_weight).reshape(b * n, c).type(x.dtype))
    return merged.reshape(b, cluster_num, c)


@dataclass(frozen=True)
class SparseVLMStage:
    """One stage: before decoder layer `layer` (the published K + 1), of the image span [start, start +
    length) keep the `keep_count` best by the raters' attention in layer K, and recycle the best
    `recycle` of the rest into `clusters` merged tokens after them. `image` is the image's token count
    in the decoder's input (the raters read it there)."""

    layer: int
    start: int
    length: int  # v: the image span now (kept and recycled tokens of the stages before)
    keep_count: int  # min(budget, v - 1)
    image: int  # N
    renumber: bool = True  # the kept sequence renumbered 0 .. T'-1, decoded at each layer's cache length

    @property
    def recycle(self) -> int:
        return int((self.length - self.keep_count) * RECYCLE_SHARE) + 1

    @property
    def clusters(self) -> int:
        return int(self.recycle / CLUSTER_DIVISOR) + 1

    @property
    def dropped(self) -> int:
        return self.length - self.keep_count - self.clusters

    def keep(self, between) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (T',), tokens (B, T', D)): the text and the kept image tokens of layer K's output at
        their indices, the merged tokens after the kept image tokens at -1 (minillava/schedule.py)."""
        x, end, device = between.x, self.start + self.length, between.x.device
        text = raters(between.embeds, self.start, self.image) + end  # the raters' rows now
        q, k = between.query_key(self.layer - 1, between.previous_input)
        score = relation(q, k, self.start, self.length, text)[0]  # (v,): first row, as mask[0]
        chosen = torch.zeros(self.length, dtype=torch.bool, device=device)
        chosen[score.topk(self.keep_count).indices] = True
        kept, pruned = torch.where(chosen)[0], torch.where(~chosen)[0]
        best = score[pruned].topk(self.recycle).indices  # descending score, the published order
        merged = cluster_and_merge(x[:, self.start + pruned[best]], self.clusters)
        index = torch.cat([torch.arange(self.start, device=device), kept + self.start,
                           torch.full((self.clusters,), -1, device=device), torch.arange(end, x.shape[1], device=device)])
        tokens = torch.cat([x[:, : self.start], x[:, kept + self.start], merged, x[:, end:]], dim=1)
        return index, tokens


def sparsevlm_schedule(start: int, length: int, ratio: float, n_layers: int) -> tuple[SparseVLMStage, ...]:
    """SparseVLM's three stages for a prompt whose image tokens are [start, start + length); none at r = 1."""
    layers, budgets = pruning_layers(n_layers), stage_budgets(length, ratio)
    if ratio == 1.0:
        return ()
    stages, v = [], length
    for k, budget in zip(layers, budgets):
        stage = SparseVLMStage(k + 1, start, v, min(budget, v - 1), length)
        stages.append(stage)
        v = stage.keep_count + stage.clusters
    return tuple(stages)
