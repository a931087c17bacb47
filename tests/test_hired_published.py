"""HiRED against a literal transcription of its authors' published code.

The reference below is hasanar1f/HiRED, transformers/src/transformers/models/llava_next/
modeling_llava_next.py: `ViT_Attn_Hook.get_attn`, `HiRED_sub_img_budgets`, `HiRED_token_selection`,
`unpad_image` and `pack_HiRED_image_features` (image_newline=None, as `forward` calls it), line for line.
Only what needs the model is replaced by arguments: `get_anyres_image_grid_shape` returns the grid as
(rows, columns) = (gh, gw), `image_sizes` are (h0, w0), the hooked q_proj/k_proj outputs are random.
Attentions are continuous random values, so the ties where topk's order is unspecified do not occur.
"""


import pytest
import torch
import torch.nn.functional as F

from globalcom2.hired import hired_keep, hired_on_grid, hired_paper_sequence
from globalcom2.layout import area_mask, to_grid
from minillava.layout import unpad_area


def published_get_attn(query, key, num_heads):
    batch_size, num_tokens, embedding_dim = query.shape
    head_dim = embedding_dim // num_heads
    query = query.view(batch_size, num_tokens, num_heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, num_tokens, num_heads, head_dim).transpose(1, 2)
    attn = (query @ key.transpose(-2, -1)) * head_dim**-0.5
    attn = F.softmax(attn, dim=-1)
    return attn


def published_sub_img_budgets(spatial_distribution, num_patches, sub_img_budget, num_vision_tokens, grid_shape):
    num_sub_img_patches = num_patches - 1
    num_patch_width, num_patch_height = grid_shape  # get_anyres_image_grid_shape(...) = (gh, gw)
    assert num_patch_width * num_patch_height == num_sub_img_patches
    spatial_distribution = spatial_distribution.reshape(num_patch_height, num_patch_width, -1)
    sum_img_mask = spatial_distribution.sum(dim=-1)
    sum_img_mask = sum_img_mask.reshape(-1)
    budget_ratio = sum_img_mask / sum_img_mask.sum()
    num_topk_others = (budget_ratio * sub_img_budget).int()
    return torch.clamp(num_topk_others, max=num_vision_tokens)


def published_token_selection(top_layer_attn, bottom_layer_attn, num_patches, full_image_patch, num_vision_tokens,
                              token_budget_rate, alpha, grid_shapes):
    top_layer_attn = top_layer_attn[:, :, 0, -num_vision_tokens:]
    bottom_layer_attn = bottom_layer_attn[:, :, 0, -num_vision_tokens:]
    top_layer_attn = torch.split(top_layer_attn, num_patches, dim=0)
    bottom_layer_attn = torch.split(bottom_layer_attn, num_patches, dim=0)
    masks = []
    for idx, top_attn, bottom_attn in zip(range(len(num_patches)), top_layer_attn, bottom_layer_attn):
        bottom_attn = bottom_attn.sum(dim=1)
        top_attn = top_attn.sum(dim=1)
        mask = torch.zeros_like(bottom_attn, dtype=torch.bool)
        num_patch = bottom_attn.shape[0]
        num_total_budget = int(num_patch * num_vision_tokens * token_budget_rate)
        full_img_budget = min(int(num_total_budget * alpha), num_vision_tokens)
        total_sub_img_budget = min(num_total_budget - full_img_budget, (num_patch - 1) * num_vision_tokens)
        full_bottom_attn = bottom_attn[full_image_patch]
        full_top_attn = top_attn[full_image_patch]
        sub_img_attn = bottom_attn[full_image_patch + 1:]
        mask[full_image_patch, full_bottom_attn.topk(full_img_budget, largest=True).indices] = True
        if total_sub_img_budget > 0:
            spatial_distribution = torch.zeros_like(top_attn[full_image_patch], dtype=torch.bool)
            spatial_distribution[full_top_attn.topk(int(num_vision_tokens * (1 - alpha)), largest=True).indices] = True
            sub_img_budgets = published_sub_img_budgets(spatial_distribution, num_patch, total_sub_img_budget,
                                                        num_vision_tokens, grid_shapes[idx])
            for i, num_topk_other in enumerate(sub_img_budgets):
                mask[i + 1, sub_img_attn[i].topk(num_topk_other, largest=True).indices] = True
        masks.append(mask)
    return tuple(masks)


def published_unpad_image(tensor, original_size):
    original_height, original_width = original_size
    if tensor.ndim == 3:
        current_height, current_width = tensor.shape[1:]
    else:
        current_height, current_width = tensor.shape
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        if tensor.ndim == 3:
            unpadded_tensor = tensor[:, padding : current_height - padding, :]
        else:
            unpadded_tensor = tensor[padding : current_height - padding, :]
    else:
        scale_factor = current_height / original_height
        new_width = int(original_width * scale_factor)
        padding = (current_width - new_width) // 2
        if tensor.ndim == 3:
            unpadded_tensor = tensor[:, :, padding : current_width - padding]
        else:
            unpadded_tensor = tensor[:, padding : current_width - padding]
    return unpadded_tensor


def published_pack(image_features, image_sizes, grid_shapes, side, image_features_masks):
    new_image_features = []
    for image_idx, (image_feature, image_features_mask) in enumerate(zip(image_features, image_features_masks)):
        base_image_feature = image_feature[0]
        base_image_mask = image_features_mask[0]
        reduced_base_image_feature = base_image_feature[base_image_mask.bool()]
        image_feature = image_feature[1:]
        other_images_mask = image_features_mask[1:]
        height = width = side
        num_patch_width, num_patch_height = grid_shapes[image_idx]  # get_anyres_image_grid_shape(...) = (gh, gw)
        image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
        other_images_mask = other_images_mask.view(num_patch_height, num_patch_width, height, width)
        image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
        other_images_mask = other_images_mask.permute(0, 2, 1, 3).contiguous()
        image_feature = image_feature.flatten(1, 2).flatten(2, 3)
        other_images_mask = other_images_mask.flatten(0, 1).flatten(1, 2)
        image_feature = published_unpad_image(image_feature, image_sizes[image_idx])
        other_images_mask = published_unpad_image(other_images_mask, image_sizes[image_idx])
        image_feature = image_feature.flatten(1, 2)
        other_images_mask = other_images_mask.flatten()
        reduced_image_feature = image_feature[:, other_images_mask.bool()]
        reduced_image_feature = reduced_image_feature.transpose(0, 1)
        image_feature = torch.cat((reduced_base_image_feature, reduced_image_feature), dim=0)
        new_image_features.append(image_feature)
    return torch.cat(new_image_features, dim=0)


def case(grid, side, heads, seed):
    """Hooked q/k of layers 0 and -2 for every tile, and features that name themselves [tile, position]."""
    g = torch.Generator().manual_seed(seed)
    T, P, D = 1 + grid[0] * grid[1], side * side, heads * 4
    qk = [torch.randn(T, 1 + P, D, generator=g) * 2 for _ in range(4)]
    early, final = published_get_attn(qk[0], qk[1], heads), published_get_attn(qk[2], qk[3], heads)
    tile, pos = torch.meshgrid(torch.arange(T), torch.arange(P), indexing="ij")
    return early, final, torch.stack([tile, pos], dim=-1).float()  # (T, H, 1+P, 1+P) x 2, (T, P, 2)


def run_published(early, final, features, grid, size, side, r, alpha=0.5):
    gw, gh = grid
    T = features.shape[0]
    if r < 1.0:  # `forward`: token dropping only if token_budget_rate < 1.0
        masks = published_token_selection(early, final, [T], 0, side * side, r, alpha, [(gh, gw)])
    else:
        masks = (torch.ones(T, side * side, dtype=torch.bool),)
    return masks[0], published_pack([features], [(size[1], size[0])], [(gh, gw)], side, masks)


GRIDS = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]
SIZES = [(640, 480), (480, 640), (1000, 333), (333, 1000), (800, 799), (1280, 300), (300, 1280)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("side, heads", [(6, 2), (6, 4), (8, 3), (12, 2), (24, 2)])
def test_hired_is_token_for_token_the_published_code(grid, side, heads):
    C = grid[0] * grid[1]
    for k, size in enumerate(SIZES):
        early, final, features = case(grid, side, heads, seed=k)
        for r in (1.0, 0.5, 0.25, 0.1):
            what = f"grid {grid}, side {side}, size {size}, r {r}"
            keep = hired_keep(early[:, :, 0], final[:, :, 0], r)
            if (side * side) % C and r < 1.0:
                # `HiRED_sub_img_budgets` reshapes the (P,) marks to (gh, gw, -1): it raises unless C | P
                # (P = 576 and every LLaVA-NeXT grid divide; the tiny model's P = 64 with 1 x 3 does not).
                with pytest.raises(RuntimeError):
                    run_published(early, final, features, grid, size, side, r)
                continue
            mask, sequence = run_published(early, final, features, grid, size, side, r)
            assert torch.equal(keep, mask), what
            assert torch.equal(hired_paper_sequence(features, keep, grid, size), sequence), what
            thumb, crops = hired_on_grid(keep, grid, unpad_area(grid, size, side))
            assert torch.equal(thumb, mask[0].nonzero().flatten()), what
            valid = area_mask(unpad_area(grid, size, side), crops.shape, crops.device)
            assert torch.equal(crops, to_grid(mask[1:], grid, side) & valid), what


def test_uneven_chunks_split_as_evenly_as_the_published_reshape_would():
    # P = 64, C = 3: chunks [0, 22), [22, 43), [43, 64) (p * C // P); marks only in the first chunk.
    from globalcom2.hired import crop_budgets

    early = torch.zeros(64)
    early[:22] = torch.linspace(2, 1, 22)
    early[22:] = torch.rand(42) * 0.5
    assert crop_budgets(early, 3, 30, alpha=1 - 22 / 64).tolist() == [30, 0, 0]


def test_budgets_and_dtypes():
    early, final, _ = case((2, 2), 24, 2, seed=0)
    e, f = early[:, :, 0], final[:, :, 0]
    keep = hired_keep(e, f, 0.25)  # LLaVA-NeXT's numbers: 5 tiles, 720 tokens, 360 to the thumbnail
    assert keep[0].sum() == 360 and keep[1:].sum() <= 360 and keep[1:].sum() >= 360 - 4
    for dtype in (torch.float64, torch.bfloat16):
        keep_d = hired_keep(e.to(dtype), f.to(dtype), 0.25)
        assert keep_d.shape == keep.shape and keep_d[0].sum() == 360
    assert torch.equal(hired_keep(e.double(), f.double(), 0.25), keep)
    assert hired_keep(e, f, 1.0).all()
