"""PruMerge+ against a literal transcription of the code HiRED's authors ran as their baseline.

The reference is hasanar1f/HiRED, prumerge_llava_next.py: `complement_idx`, `outlier_dectection` and
`token_prune_merge_advanced_plus` (if_adaptive=True), and the `forward` loop that reduces every tile on
its own and concatenates them. Changes, all forced by the missing model: the hooked q_proj/k_proj
outputs of layer 23 and the feature-layer features are arguments (random); `arange(0, 575, ...)` is
`arange(0, P - 1, ...)` (575 = 576 - 1 for CLIP-L's P = 576); the 32 merged neighbours is `k`, so that
small tiles can run; it also returns `idx` (which positions, in which order) for the comparison.

Our input is what the tower gives: the per-head post-softmax [CLS] row of layer -1 (computed here the
way CLIP does it from the same q, k) and the keys. Kept positions and their order must be equal; the
merged vectors equal up to float rounding (sums in another order). Values are continuous random, so
the ties where topk's order is unspecified do not occur.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from globalcom2.prumerge import (
    NEIGHBOURS,
    outlier_counts,
    prumerge_attention,
    prumerge_merge,
    prumerge_paper_sequence,
    prumerge_plus,
)


def complement_idx(idx, dim):
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for i in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def outlier_dectection(attn):
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = Q3 + 1.5 * IQR
    outlier_indices = np.where((attn_np > upper_bound))[0]
    ratio = len(outlier_indices) / len(attn_np)
    return ratio


def token_prune_merge_advanced_plus(image_features, desired_layer_k, desired_layer_q, k=32):
    B, N, C = image_features.shape
    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C**-0.5
    attn = F.softmax(attn, dim=-1)
    cls_attn = attn[:, 0, 1:]
    reduction_ratio = outlier_dectection(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    step_length = int(1 / reduction_ratio)
    arithmetic_sequence = torch.arange(0, N - 1, int(step_length / 3))
    original_tensor_1d = idx.flatten()
    filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d])
    concatenated_tensor = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)
    idx = concatenated_tensor
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    Key_wo_cls = desired_layer_k[:, 1:]
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
    compl = complement_idx(idx, N)
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)
    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i + 1:, :].unsqueeze(0)
            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i + 1:, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b, :, :].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i + 1:].unsqueeze(0)
            rest_x_others_attn = torch.cat(
                [before_i_x_others_attn, after_i_x_others_attn, non_topk_attn[b, :].unsqueeze(0)], dim=1
            )
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(k), dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_center = x_others[b, i, :] + weighted_avg
            updated_x_others[b, i, :] = updated_center
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    updated_x_others = torch.cat([updated_x_others, extra_one_token], dim=1)
    image_features = updated_x_others
    return image_features, idx


def published_image(features, keys, queries, k):
    """`forward`: every tile on its own (`for img in pixel_values`), concatenated in tile order."""
    out = [token_prune_merge_advanced_plus(f[None], kk[None], q[None], k) for f, kk, q in zip(features, keys, queries)]
    return torch.cat([o[0] for o in out], dim=1)[0], [o[1][0] for o in out]


def probe(queries, keys, heads):
    """The tower's ("cls_attn", layer) probe: per-head softmax(q_cls . k_j / sqrt(head_dim)), (T, heads, 1 + P)."""
    T, P1, D = keys.shape
    q = queries[:, 0].view(T, heads, 1, D // heads)
    kh = keys.view(T, P1, heads, D // heads).transpose(1, 2)  # (T, heads, 1 + P, hd)
    return torch.softmax((q @ kh.transpose(-2, -1))[:, :, 0] * (D // heads) ** -0.5, dim=-1)


def case(tiles, side, heads, seed, spread=1.0, head_dim=8):
    """Features, keys and queries of one width D (the published scale C^-0.5 takes the features' width)."""
    g = torch.Generator().manual_seed(seed)
    P, D = side * side, heads * head_dim
    queries = torch.randn(tiles, 1 + P, D, generator=g) * spread
    keys = torch.randn(tiles, 1 + P, D, generator=g)
    features = torch.randn(tiles, P, D, generator=g)
    return features, keys, queries


@pytest.mark.parametrize("tiles", [3, 5])
@pytest.mark.parametrize("side, heads, k", [(6, 2, 8), (7, 4, 16), (8, 2, 32), (8, 4, 8), (10, 3, 32)])
def test_prumerge_plus_is_the_published_code(tiles, side, heads, k):
    ran = 0
    for seed in range(4):
        features, keys, queries = case(tiles, side, heads, seed, spread=1.5)
        attn = probe(queries, keys, heads)
        if (outlier_counts(prumerge_attention(attn)) == 0).any():
            continue  # a tile without outliers: see test_a_tile_without_outliers
        sel = prumerge_plus(attn, keys, neighbours=k)
        ref, idx = published_image(features, keys, queries, k)
        for t in range(tiles):
            assert torch.equal(sel.order[t, : sel.count[t]], idx[t]), f"tile {t}, seed {seed}"
            assert (sel.order[t, sel.count[t]:] == -1).all()
        ours = prumerge_paper_sequence(sel, features)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        ran += 1
    assert ran >= 2


def test_a_tile_without_outliers():
    """Equal attention everywhere: no patch is above Q3 + 1.5 IQR."""
    features, keys, queries = case(2, 6, 2, seed=0)
    queries[1] = 0.0  # tile 1: all logits 0, uniform attention
    with pytest.raises(ZeroDivisionError):  # published: step_length = int(1 / reduction_ratio)
        token_prune_merge_advanced_plus(features[1:], keys[1:], queries[1:], k=8)
    sel = prumerge_plus(probe(queries, keys, 2), keys, neighbours=8)
    assert sel.count[1] == 1 and sel.order[1, 0] == 0  # the limit ratio -> 0: position 0 only
    tokens, extra = prumerge_merge(sel, features)
    P = 36
    torch.testing.assert_close(extra[1], features[1, 1:].sum(0) / (P + 1))  # attention 1 / (1 + P) each
    assert torch.count_nonzero(sel.weights[1, 0]) == 1 + 8
    # tile 0 still equals the published code
    ref, idx = token_prune_merge_advanced_plus(features[:1], keys[:1], queries[:1], k=8)
    assert torch.equal(sel.order[0, : sel.count[0]], idx[0])
    torch.testing.assert_close(torch.cat([tokens[0, : sel.count[0]], extra[:1]]), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_real_shape():
    """CLIP-L's shape (576 patches, 16 heads, width 1024, 32 neighbours), two tiles: as published."""
    features, keys, queries = case(2, 24, 16, seed=1, head_dim=64)
    sel = prumerge_plus(probe(queries, keys, 16), keys)
    ref, idx = published_image(features, keys, queries, NEIGHBOURS)
    for t in range(2):
        assert torch.equal(sel.order[t, : sel.count[t]], idx[t])
    torch.testing.assert_close(prumerge_paper_sequence(sel, features), ref, rtol=1e-5, atol=1e-5)


def test_merge_weights_and_dtypes():
    features, keys, queries = case(3, 8, 4, seed=5, head_dim=16)
    attn = probe(queries, keys, 4)
    sel = prumerge_plus(attn, keys, neighbours=8)
    for t in range(3):
        w, kept = sel.weights[t, : sel.count[t]], sel.order[t, : sel.count[t]]
        assert ((w > 0).sum(1) == 1 + 8).all() and torch.equal(w[torch.arange(len(kept)), kept], torch.ones(len(kept)))
        assert torch.equal(sel.extra[t] > 0, ~torch.isin(torch.arange(64), kept))
        assert (sel.weights[t, sel.count[t]:] == 0).all()
        assert torch.equal(sel.kept[t].nonzero().flatten(), kept.sort().values)
    for dtype in (torch.float64, torch.bfloat16):
        other = prumerge_plus(attn.to(dtype), keys.to(dtype), neighbours=8)
        assert other.weights.dtype == torch.float32
        if dtype == torch.float64:
            assert torch.equal(other.order, sel.order)
        out = prumerge_paper_sequence(other, features.to(dtype))
        assert out.dtype == dtype and out.shape[0] == int(other.count.sum()) + 3
