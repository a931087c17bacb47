"""FiCoCo-L (`--compressor ficoco-l`): filter, correlate, compress, inside the decoder's layers.

Source: kawhiiiileo/FiCoCo at commit 8995e93bf5c62435979f500e9d335e4810301656,
llava/model/language_model/FiCoCo_L.py (`Filter`, `Correlate`, `Compress`, `merge_ficoco_l`) and their call
in llava/model/language_model/llava_llama.py (`scaled_dot_product_attention`, `FiCoCo_LlamaSdpaAttention`,
`FiCoCo_LlamaDecoderLayer.forward`, `FiCoCo_LlamaModel.forward`; module constants `r = 14`,
`control_encoding_layer = 4`, `v2llm = 576`). At that commit `FiCoCo_L.py` does not import: the last line of
`Compress` is indented less than its body (IndentationError); the notebook checkpoint beside it
(.ipynb_checkpoints/FiCoCo_L-checkpoint.py) has the same body under `merge_mode = 'one2auto_topk'`,
`merge_type = 'weighted'`, so that is the code we follow. tests/test_ficocol.py runs a literal
transcription of those functions against ours.

The rule, in each decoder layer with python index > `control_encoding_layer`, between the attention's
residual and the MLP (a stage `inside` the layer, minillava/schedule.py), for a span of v image tokens
followed by the text (everything after the span):

  scores   the layer's attention logits q k^T / sqrt(hd), before the causal mask and the softmax,
           averaged over heads, A (the published `scaled_dot_product_attention` returns `attn_weight.mean(dim=1)`
           before adding the mask), in the model's dtype; V = A[span, span], VT = A[span, text], TV = A[text, span]
  filter   s_i = 0.6 sum_j V_ij - 0.4 mean_t VT_it; the span's first token protected (-inf, the published
           `include_class_token` True); the r largest s are merged (`topk` order), the rest kept in position order
  correlate  C = 0.6 V + 0.4 VT TV, its diagonal -inf; k = max over merged rows of #{C_ij > quantile_0.998(C_i)}
           (float32); each merged token's targets are the k largest of softmax(C) in its row, its weights those
           values over their sum
  compress each merged token's weighted copies added to its targets (a sum: `merge_ficoco_l` passes sizes of
           ones and never divides), then the kept tokens (a target that is itself merged loses what it got)

The published code after that merge (`FiCoCo_LlamaModel.forward`) shrinks the span by r per merging layer
(`self.v_token -= rr`) and renumbers the sequence (`adjust_position_ids`: positions 0 .. T'-1 in the next
layers): the stage's `renumber`, as PyramidDrop's.

Adaptations (documented in docs/methods.md):
  - the span: the published code takes the prompt's first `v2llm = 576` positions as the image (on LLaVA-1.5's
    template that is the system prompt and the first 541 image tokens; the rest of the image counts as
    text). Ours is the image's own tokens [start, start + n) (on LLaVA-NeXT the whole image sequence:
    thumbnail, crops, newlines) and the text is what follows it; the tokens before the image take no part.
  - decode positions: the published attention subtracts r from the shared `position_ids` in every merging
    layer (`position_ids -= rr`), so layer K decodes r positions below the end of what its cache holds, and
    attends without a mask. Ours decodes each layer at its cache's next position (the shift is what was
    merged before the layer, as PyramidDrop's); one-token answers are unaffected.
  - the last layer's merge is not run: its MLP output of image tokens reaches nothing (the logits read the
    last text token; its cache was written before the merge), so answers are the same and it costs less.
  - rows: the published `Correlate` takes k from the batch's first row; each of our rows its own (a decoder
    method's rows are prefilled one by one: minillava/batch.py).
  - grouped-query attention (Mistral, Yi, Qwen2) repeats the key heads, as the published attention's
    `repeat_kv` before the scores.

The budget knob, one rule: r is the share of the image's n tokens the last layer sees. The published code
merges r = 14 tokens in every layer after layer 4 of 32; the layers that change the answer are 5 .. 30
(M = 26; see the last-layer note). Ours merges from layer round(5 L / 32) (at least 1) to L - 2:
    m = min(round((1 - r) n / M), (n - 1) // M) per layer,
so the last layer sees n - M m (the published 14 of 576 on 32 layers: 212 tokens, our r = 0.368). r = 1
merges nothing (plain LLaVA-NeXT). A decoder of fewer than 3 layers has no layer to merge in and refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

G = 0.6  # `Filter`: g, the redundancy's weight against the text's attention
A = 0.6  # `Correlate`: a, the direct attention's weight against the one through the text
QUANTILE = 0.998  # `Correlate`: the threshold's quantile
FIRST = 5  # the first merging layer of 32: `layer_idx > control_encoding_layer = 4`


def merge_layers(n_layers: int) -> range:
    """Decoder layers (python index) whose merge reaches the answer: from round(5 L / 32) (at least 1) to L - 2."""
    return range(max(math.floor(FIRST * n_layers / 32 + 0.5), 1), n_layers - 1)


def merged_per_layer(ratio: float, length: int, layers: int) -> int:
    """Tokens merged in each of `layers` layers so that about `ratio` of `length` remain, at least one kept."""
    if not 0.0 < ratio <= 1.0:  # NaN fails too
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio!r}")
    return min(round((1 - ratio) * length / layers), (length - 1) // layers)


def ficoco_l_schedule(start: int, length: int, ratio: float, n_layers: int) -> tuple:
    """FiCoCo-L's stages for a prompt whose image tokens are [start, start + length); () where r merges nothing."""
    where = merge_layers(n_layers)
    if not len(where):
        raise ValueError("ficoco-l prunes inside the decoder's layers from 5 of 32 (scaled, at least 1) to the last "
                         f"but one, so it needs 3 or more, but this model has only {n_layers} decoder layers; "
                         "use another --compressor")
    m = merged_per_layer(ratio, length, len(where))
    if m <= 0:
        return ()
    return tuple(FiCoCoL(layer, start, length - s * m, m) for s, layer in enumerate(where))


@dataclass(frozen=True)
class FiCoCoL:
    """One layer's merge (minillava/schedule.py `Stage`, `inside` the layer): of the image span [start,
    start + length), `dropped` tokens merged into the others."""

    layer: int
    start: int
    length: int  # the span's tokens before this merge
    dropped: int  # r: tokens merged
    renumber: bool = True  # the sequence after the merge renumbered 0 .. T'-1 (`adjust_position_ids`)
    inside: bool = True  # between the layer's attention and its MLP

    def keep(self, between) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (T',), tokens (N, T', D)): every token but the merged ones, at its position, the span's
        kept tokens holding what was merged into them. Every head's logits from the image on, (N, H, S, S),
        are materialized for their mean, as the published attention does (LLaVA-NeXT-7B, 32 heads, S = 3000:
        0.6 GB in bfloat16 for the moment of the merge)."""
        x, s, end = between.x, self.start, self.start + self.length  # x (N, T, D): after the attention
        q, k = between.query_key(self.layer, between.previous_input)  # (N, H, T, hd) each
        att = (q[:, :, s:] @ k[:, :, s:].transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]))).mean(dim=1)
        # the scores from here on in float32 (S x S, not per head): `correlate`'s product of two logit blocks sums
        # over the text and can pass float16's 65504 (inf: the quantile threshold is not finite, nothing merges);
        # the published code stays in the model's dtype. Float32 models are unchanged (bit for bit, as tested).
        att = att.float()
        rows, kept = [], None
        for i in range(x.shape[0]):  # (N = 1 in a prefill of a decoder method; each row its own choice)
            merge, remain = filter_tokens(att[i], self.length, self.dropped)
            targets, weights = correlate(att[i], self.length, merge)
            rows.append(compress(x[i, s:end], merge, remain, targets, weights))
            kept = remain if kept is None else kept
        device = x.device
        index = torch.cat([torch.arange(s, device=device), kept + s, torch.arange(end, x.shape[1], device=device)])
        return index, torch.cat([x[:, :s], torch.stack(rows), x[:, end:]], dim=1)


def filter_tokens(att: torch.Tensor, v: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`Filter`: of att (S, S) (the span's v tokens first, then the text), the r tokens to merge (`topk`
    order) and the kept ones (ascending)."""
    score = G * att[:v, :v].sum(dim=-1) - (1 - G) * att[:v, v:].mean(dim=-1)  # (v,)
    score[0] = -math.inf  # the published call protects the first token (`include_class_token`)
    merge = score.topk(r, dim=-1).indices
    keep = torch.ones(v, dtype=torch.bool, device=att.device)
    keep[merge] = False
    return merge, keep.nonzero()[:, 0]


def correlate(att: torch.Tensor, v: int, merge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Correlate`: each merged token's k targets (r, k) and every span row's top-k softmax values (v, k)."""
    direct, through = att[:v, :v], att[:v, v:] @ att[v:, :v]  # (v, v): token to token, and by way of the text
    con = A * direct + (1 - A) * through
    con.fill_diagonal_(-math.inf)
    chosen = con[merge].float()  # torch.quantile takes float32 or float64
    threshold = torch.quantile(chosen, QUANTILE, dim=-1, keepdim=True)
    k = int((chosen > threshold).sum(dim=-1).max())
    values, indices = F.softmax(con, dim=-1).topk(k, dim=-1)
    return indices[merge], values


def compress(x: torch.Tensor, merge: torch.Tensor, remain: torch.Tensor, targets: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor:
    """`Compress` (the weighted `one2auto_topk` branch): the span x (v, c), each merged row's weighted copies
    added at its targets, then the kept rows (v - r, c)."""
    out = x.clone()
    if targets.shape[-1]:  # k = 0 where no entry clears the threshold: the merged tokens are only dropped
        weights = (values / values.sum(dim=-1, keepdim=True))[merge].to(x.dtype)  # (r, k), in the tokens' dtype
        copies = (x[merge][:, None] * weights[..., None]).reshape(-1, x.shape[-1])  # (r k, c)
        out.scatter_add_(0, targets.reshape(-1)[:, None].expand(-1, x.shape[-1]), copies)
    return out[remain]
