"""`fastervlm-paper` against a literal transcription of FasterVLM's published code, and `fastervlm` against
the published code's own `spatial_unpad` branch (which the published code switches off).

Transcribed from github.com/Theia-4869/FasterVLM (commit f5d5f12):
- llava/model/multimodal_encoder/clip_encoder.py `feature_select` (the [CLS] row of attentions[-2]),
- llava/model/llava_arch.py `encode_images` (mean over heads, topk, index mask) and the anyres part of
  `prepare_inputs_labels_for_multimodal` (both merge types),
- llava/mm_utils.py `select_best_resolution` (their grid rule; the tests state where it differs from LLaVA's).
The projector is per token, so it is applied before the transcription (as our stage receives features).
"""

import pytest
import torch

from globalcom2 import compress
from minillava.anyres import select_best_resolution
from tests.peers_cases import CASES, SIZES, peer_case, tokens


def unpad_image(tensor, original_size):  # llava_arch.py unpad_image, verbatim logic
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        unpadded_tensor = tensor[:, padding:current_height - padding, :]
    else:
        scale_factor = current_height / original_height
        new_width = int(original_width * scale_factor)
        padding = (current_width - new_width) // 2
        unpadded_tensor = tensor[:, :, padding:current_width - padding]
    return unpadded_tensor


def published(image_features, attentions, visual_token_num, grid, image_size, newline, mm_patch_merge_type):
    """encode_images + prepare_inputs_labels_for_multimodal (anyres), one image: the visual sequence."""
    image_attentions = attentions[:, :, 0, 1:]  # feature_select, select_feature == 'patch'
    B, N, C = image_features.shape
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, token_indices, True)
    image_feature, index_mask = image_features, index_masks
    base_image_feature = image_feature[0]
    base_index_mask = index_mask[0]
    image_feature = image_feature[1:]
    index_mask = index_mask[1:]
    height = width = int(N**0.5)
    num_patch_width, num_patch_height = grid  # get_anyres_image_grid_shape: given (see test_grid_rule_differs)
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    index_mask = index_mask.view(num_patch_height, num_patch_width, height, width)
    if 'unpad' in mm_patch_merge_type:
        image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
        index_mask = index_mask.permute(0, 2, 1, 3).contiguous().unsqueeze(0)
        image_feature = image_feature.flatten(1, 2).flatten(2, 3)
        index_mask = index_mask.flatten(1, 2).flatten(2, 3)
        image_feature = unpad_image(image_feature, image_size)
        index_mask = unpad_image(index_mask, image_size)
        image_feature = torch.cat((image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
        index_mask = torch.cat((index_mask, torch.ones(*index_mask.shape[:-1], 1, dtype=torch.bool)), dim=-1)
        image_feature = image_feature.flatten(1, 2).transpose(0, 1)
        index_mask = index_mask.flatten(1, 2).squeeze(0)
        image_feature = image_feature[index_mask]
    else:
        image_feature = image_feature.permute(0, 2, 1, 3, 4).contiguous()
        index_mask = index_mask.permute(0, 2, 1, 3).contiguous()
        image_feature = image_feature.flatten(0, 3)
        index_mask = index_mask.flatten(0, 3)
        image_feature = image_feature[index_mask]
    base_image_feature = base_image_feature[base_index_mask]
    return torch.cat((base_image_feature, image_feature), dim=0), base_index_mask.nonzero()[:, 0]


@pytest.mark.parametrize("grid, side, ratios", CASES)
def test_fastervlm_is_token_for_token_the_published_code(grid, side, ratios):
    for k, size in enumerate(SIZES):
        image, attn = peer_case(grid, size, side, seed=k)
        features = torch.cat([image.thumb[None], image.crops])
        for r in ratios:
            T = int(side * side * r + 0.5)
            for method, merge_type in (("fastervlm-paper", "spatial"), ("fastervlm", "spatial_unpad")):
                ours = compress([image], method, r)[0]
                ref, thumb = published(features, attn, T, grid, size, image.newline, merge_type)
                case = f"{method}, grid {grid}, size {size}, side {side}, r {r}"
                assert torch.equal(tokens(image, ours), ref), case
                assert torch.equal(ours.thumb_keep, thumb), case
            assert ours.crop_merge is None


def test_r_maps_to_the_readme_token_counts():
    """FasterVLM's README: 576 x (1 - 0.9) = 58, x (1 - 0.75) = 144, x (1 - 0.95) = 29 tokens per tile."""
    image, _ = peer_case((2, 2), (672, 672), 24, seed=0)
    for r, T in ((0.1, 58), (0.25, 144), (0.05, 29), (0.5, 288)):
        assert tokens(image, compress([image], "fastervlm-paper", r)[0]).shape[0] == 5 * T


def test_at_r_1_the_default_is_uncompressed_llava_next():
    for grid, size in ((2, 2), (640, 480)), ((3, 1), (1000, 333)), ((1, 2), (300, 1280)):
        image, _ = peer_case(grid, size, 6, seed=1)
        assert torch.equal(tokens(image, compress([image], "fastervlm", 1.0)[0]), tokens(image, compress([image], "none")[0]))


def fastervlm_select_best_resolution(original_size, possible_resolutions):  # mm_utils.py, verbatim logic
    original_width, original_height = original_size
    best_fit = None
    max_effective_ratio = 0
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled_width, scaled_height = int(original_width * scale), int(original_height * scale)
        effective_ratio = (scaled_width * scaled_height) / (width * height)
        if effective_ratio > max_effective_ratio:
            max_effective_ratio = effective_ratio
            best_fit = (width, height)
    return best_fit


LLAVA_16 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (width, height)


def test_grid_rule_differs_from_llava_for_some_sizes():
    """FasterVLM's own `select_best_resolution` maximises the share of the canvas the image fills; LLaVA's
    (our tiler's) the image pixels shown, then the least waste. `fastervlm-paper` runs on our tiler's grid,
    so for these sizes its sequence is the published code's run on LLaVA's grid, not FasterVLM's own."""
    sizes = SIZES + [(100, 100), (300, 300), (400, 300), (800, 480), (1000, 672), (400, 672), (640, 100)]
    ours = {s: select_best_resolution(s, LLAVA_16) for s in sizes}
    theirs = {s: fastervlm_select_best_resolution(s, LLAVA_16) for s in sizes}
    assert {s for s in sizes if ours[s] != theirs[s]} == {
        (100, 100), (300, 300), (400, 300), (800, 480), (1000, 672), (400, 672), (640, 100)}
    assert (ours[1000, 672], theirs[1000, 672]) == ((672, 672), (672, 336))  # 2 x 2 crops vs 2 x 1
    assert all(ours[s] == theirs[s] for s in SIZES)  # the sizes of the sequence tests: same grid either way
