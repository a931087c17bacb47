"""`visionzip-paper` against a literal transcription of VisionZip's published code, and `visionzip` against
the same with LLaVA-NeXT's unpadding and newlines on the crop grid (the only difference).

Transcribed from github.com/dvlab-research/VisionZip (commit 3151f6d):
- visionzip/utils.py `CLIPAttention_forward` (metric: the keys, mean over heads),
- visionzip/clip_encoder.py `CLIPVisionTower_VisionZip.forward` (dominant and contextual tokens),
- visionzip/llava_arch.py `restore_image_features_sorted` and the anyres part of
  `prepare_inputs_labels_for_multimodal_visionzip` (mm_patch_merge_type 'spatial_unpad', LLaVA-1.6's).
`restore_image_features_sorted` hard-codes 24 x 24 patches per tile (CLIP ViT-L/14-336); below it is the
tile's side, so that smaller towers can be compared too (side 24 runs it as published). The published
code also needs a 24-layer tower (`apply_info` sets the metric only at layer 22; on another depth the
metric is never set and `forward` raises AttributeError); ours takes layer -2 on any depth.
"""

import pytest
import torch

from globalcom2 import compress
from globalcom2.visionzip import visionzip_split
from tests.peers_cases import CASES, SIZES, peer_case, tokens


def published_tower(attn_weights, hidden_states, keys, dominant_num, contextual_num):
    """clip_encoder.py CLIPVisionTower_VisionZip.forward after the tower pass (dominant_num excludes [CLS])."""
    bsz, tgt_len, embed_dim = keys.shape
    heads = attn_weights.shape[1]
    raw_key_states = keys.view(bsz, tgt_len, heads, embed_dim // heads).transpose(1, 2).contiguous()  # _shape
    metric = raw_key_states.mean(1)  # utils.py CLIPAttention_forward
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    return hidden_states_save, all_indices


def restore_image_features_sorted(image_feature, cur_keep_idx, width, height, side):
    """llava_arch.py, with the hard-coded 24 (patches per tile side) and 576 as `side` and side * side."""
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    cur_keep_idx_sorted, _ = cur_keep_idx.sort(dim=1)
    cur_keep_idx_sorted_restore = cur_keep_idx_sorted[:, 1:] - 1
    restored_features = torch.zeros((num_img, side * side, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool)
    mask.scatter_(1, cur_keep_idx_sorted_restore, True)
    kept_features = image_feature[:, 1:num_keep, :]
    restored_features[mask] = kept_features.reshape(-1, feature_dim)
    assert width * height == restored_features.shape[0], "width * height must equal num_img"
    restored_features = restored_features.view(height, width, side, side, feature_dim)
    restored_features = restored_features.permute(0, 2, 1, 3, 4).contiguous()
    restored_features = restored_features.view(height, side, width * side, feature_dim)
    restored_features = restored_features.view(height * side, width * side, feature_dim)
    grid_with_newline = restored_features  # the newline is computed and never used
    mask = mask.view(height, width, side, side)
    mask = mask.permute(0, 2, 1, 3).contiguous()
    mask = mask.view(height * side, width * side)
    mask_all = mask
    image_feature_select = grid_with_newline[mask_all]
    raw_img_feature_merge = image_feature[:, -num_extra:, ].reshape(-1, feature_dim)
    cls_img_feature_merge = image_feature[:, 0, ]
    return torch.cat([image_feature_select, cls_img_feature_merge, raw_img_feature_merge]), mask


def published(image, attn, dominant, contextual):
    """visionzip(model, dominant, contextual) on one LLaVA-NeXT image: the visual sequence."""
    hidden, keys = image.probes["hidden", -2], image.probes["keys", -2]
    side = int(image.thumb.shape[0] ** 0.5)
    save, keep_idx = published_tower(attn, hidden, keys, dominant - 1, contextual)  # main.py: dominant - 1
    image_feature = image.project(save)  # encode_images_visionzip_multi: mm_projector after the tower
    base_image_feature = image_feature[0]
    image_feature = image_feature[1:]
    cur_keep_idx = keep_idx[1:]
    num_patch_width, num_patch_height = image.grid
    image_feature, mask = restore_image_features_sorted(image_feature, cur_keep_idx, num_patch_width, num_patch_height, side)
    return torch.cat((base_image_feature, image_feature), dim=0), mask


def unpadded(image, mask, sequence, T):
    """The published sequence with the crop grid unpadded and a newline closing each row (our default)."""
    top, bottom, left, right = image.area
    n_grid = int(mask.sum())
    grid = torch.zeros(*mask.shape, sequence.shape[1])
    grid[mask] = sequence[T : T + n_grid]
    area, keep = grid[top:bottom, left:right], mask[top:bottom, left:right]
    rows = [torch.cat([area[i][keep[i]], image.newline[None]]) for i in range(bottom - top)]
    return torch.cat([sequence[:T], *rows, sequence[T + n_grid :]])


@pytest.mark.parametrize("grid, side, ratios", CASES)
def test_visionzip_is_token_for_token_the_published_code(grid, side, ratios):
    for k, size in enumerate(SIZES):
        image, attn = peer_case(grid, size, side, seed=k)
        for r in ratios:
            T = max(int(side * side * r + 0.5), 2)
            dominant, contextual = visionzip_split(T)
            ref, mask = published(image, attn, dominant, contextual)
            case = f"grid {grid}, size {size}, side {side}, r {r}"
            paper = compress([image], "visionzip-paper", r)[0]
            assert torch.equal(tokens(image, paper), ref), case
            default = compress([image], "visionzip", r)[0]
            assert torch.equal(tokens(image, default), unpadded(image, mask, ref, T)), case


def test_split_follows_the_published_54_to_10():
    assert visionzip_split(64) == (54, 10)  # README: visionzip(model, dominant=54, contextual=10)
    assert [visionzip_split(T) for T in (32, 128, 58, 144, 288, 6)] == [(27, 5), (108, 20), (49, 9), (121, 23), (243, 45), (5, 1)]


def test_merges_say_which_positions_each_token_stands_for():
    image, attn = peer_case((2, 1), (1000, 333), 6, seed=3)
    out = compress([image], "visionzip-paper", 0.25)[0]
    P = 36
    T = 9
    dominant, contextual = visionzip_split(T)
    # every thumbnail position is kept, or went into one of the thumbnail's contextual tokens (places T-ctx .. T-1)
    kept = torch.zeros(P, dtype=torch.bool)
    kept[out.thumb_keep] = True
    assert torch.equal(kept, out.thumb_merge < 0)
    assert set(out.thumb_merge[~kept].tolist()) <= set(range(dominant, T))
    assert int((out.thumb_merge >= 0).sum()) == P - (dominant - 1)  # all but the dominant patches ([CLS] has none)
    # crops: kept positions are not merged; every merged position points at a crop contextual token
    assert not (out.crop_keep & (out.crop_merge >= 0)).any()
    assert ((out.crop_keep) | (out.crop_merge >= 0)).all()
    assert out.crop_merge.max() < tokens(image, out).shape[0] and out.crop_merge[out.crop_merge >= 0].min() >= T + int(out.crop_keep.sum()) + 2
