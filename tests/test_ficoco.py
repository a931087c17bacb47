"""FiCoCo-V (`--compressor ficoco`, globalcom2/ficoco.py) against its published code.

1. A literal transcription of kawhiiiileo/FiCoCo (commit 8995e93bf5c62435979f500e9d335e4810301656)
   llava/model/multimodal_encoder/FiCoCo_V.py (`merge_ficoco_v`, `find_windows_min_indices`, `Filter`,
   `Correlate`, `Compress`) and of the merge in clip_encoder.py (`FiCoCo_Attention.forward`'s head-averaged
   logits, `FiCoCo_CLIPEncoderLayer.forward`), run against ours on many random cases: one layer's merge
   (several layers in a row on one memory), then a whole random tower, tile by tile.
   Two edits to the transcription, the adaptations docs/methods.md names: the module-level
   `dst_score_global` is reset per tile (`reset`), and its size 576 and the penalty's 144 windows are the
   tile's P and (sqrt(P) // 2)^2 (equal to the published on a 24 x 24 grid, which a case runs).
2. Greedy ids through the CLI against a naive reference: the tower walked tile by tile with the
   transcription's attention and merge at the published places, LLaVA's feature select `[:, 1:]`, the
   tiles' tokens in sequence (thumbnail first), then a naive decoder (tests/test_fastv.py).
"""

import json
import math
from pathlib import Path
from typing import Callable, Tuple, Union, Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from globalcom2.ficoco import FiCoCoV, ficoco_v_merge, ficoco_v_schedule, merge_layers, merged_per_layer
from minillava import generate as gen
from minillava.anyres import tile_image
from minillava.clip import ClipTower
from minillava.config import VisionConfig
from minillava.tokenizer import build_prompt
from minillava.trust import load_image
from tests.test_fastv import QUESTION, deep_checkpoint, fastv_reference  # noqa: F401 (a fixture)
from tests.test_pruning_methods import run_json

# --- the transcription (FiCoCo_V.py, verbatim but for the marked lines) ----------------------------------

P = 576  # edit: the tile's patches (published: 576, the global's size)
WINDOWS = 144  # edit: (sqrt(P) // 2) ** 2 windows (published: 144)
dst_score_global = torch.full((1, 576), float('1000000000'))


def reset(patches):  # edit: a fresh dst_score_global per tile (published: once, at import)
    global dst_score_global, P, WINDOWS
    P, WINDOWS = patches, (math.isqrt(patches) // 2) ** 2
    dst_score_global = torch.full((1, P), float('1000000000'))


def merge_ficoco_v(
    Compress: Callable,
    input_embeddings: torch.Tensor,
    merge_indices: torch.Tensor,
    remain_indices: torch.Tensor,
    top_values: torch.Tensor,
    merge_targets: torch.Tensor,
    reduction_factor: int,
    size: torch.Tensor = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    if size is None:
        size = torch.ones_like(input_embeddings[..., 0, None])

    input_embeddings = Compress(
        input_embeddings * size,
        merge_indices,
        remain_indices,
        top_values,
        merge_targets,
        reduction_factor,
    )
    size = Compress(size, merge_indices, remain_indices, top_values, merge_targets, reduction_factor)

    input_embeddings = input_embeddings / size
    return input_embeddings, size


def find_windows_min_indices(tensor, sx, sy):
    b, N = tensor.size()
    n = int(math.sqrt(N))
    tensor = tensor.view(b, n, n)
    h_window = n // sy
    w_window = n // sx
    tensor = tensor[:, :h_window * sy, :w_window * sx]
    tensor_reshaped = tensor.view(b, h_window, sy, w_window, sx)
    tensor_reshaped = tensor_reshaped.permute(0, 1, 3, 2, 4).contiguous()
    tensor_reshaped = tensor_reshaped.view(b, h_window, w_window, sy * sx)
    _, min_indices = tensor_reshaped.min(dim=-1, keepdim=True)
    return min_indices


def Filter(
    att_score: torch.Tensor,
    metric: torch.Tensor,
    reduction_factor: int,
    include_class_token: bool = False,
) -> Union[Tuple[torch.Tensor, ...], Tuple[Any, ...]]:
    num_protected = int(include_class_token)  # noqa: F841
    total_tokens = att_score.shape[1]  # noqa: F841
    adjusted_reduction = reduction_factor

    if adjusted_reduction <= 0:
        return att_score, att_score
    global dst_score_global
    dst_score_global = dst_score_global.to(att_score.device)

    with torch.no_grad():
        att_score = att_score.unsqueeze(0)
        cls_patch_similarity = att_score[:, 0, 1:] if include_class_token else torch.zeros_like(att_score[:, 0, 1:])
        patch_to_patch_similarity = att_score[..., 1:, 1:].mean(dim=-1)
        beta = 0.35

        cls_patch_similarity = F.normalize(cls_patch_similarity, p=2, dim=-1)
        patch_to_patch_similarity = F.normalize(patch_to_patch_similarity, p=2, dim=-1)

        dst_score = beta * cls_patch_similarity - (1 - beta) * patch_to_patch_similarity
        token_num = dst_score.shape[1]
        remaining_indices = (dst_score_global != float('inf')).nonzero(as_tuple=True)[1]
        remaining_count = remaining_indices.numel()
        if remaining_count >= token_num:
            dst_score_global[0, remaining_indices[:token_num]] = dst_score
        else:
            dst_score_global[0, remaining_indices[:remaining_count]] = dst_score[0, :remaining_count]
        dst_score_pre = dst_score_global
        sx = 2
        sy = 2
        b, N = dst_score_pre.size()
        n = int(math.sqrt(N))
        hsy = n // sy
        wsx = n // sx
        rand_idx = find_windows_min_indices(dst_score_pre, sx, sy)
        idx_buffer_view = torch.zeros(b, hsy, wsx, sy * sx, device=dst_score.device, dtype=torch.int64)
        idx_buffer_view.scatter_(dim=-1, index=rand_idx, src=-torch.ones_like(rand_idx, dtype=rand_idx.dtype))
        idx_buffer_view = idx_buffer_view.view(b, hsy, wsx, sy, sx).transpose(2, 3).reshape(b, hsy * sy, wsx * sx)
        if (hsy * sy) < n or (wsx * sx) < n:
            idx_buffer = torch.zeros(b, n, n, device=dst_score.device, dtype=torch.int64)
            idx_buffer[:, :(hsy * sy), :(wsx * sx)] = idx_buffer_view
        else:
            idx_buffer = idx_buffer_view
        rand_idx = idx_buffer.reshape(b, -1).argsort(dim=1)
        rand_idx = rand_idx[:, :WINDOWS]  # edit: published 144
        rand_id_filtered = rand_idx[rand_idx < token_num]
        enhence_num = 2  # noqa: F841
        rand_id_filtered = rand_id_filtered.flatten()
        dst_score[0, rand_id_filtered] = torch.where(dst_score[0, rand_id_filtered] > 0,
                                                     dst_score[0, rand_id_filtered] / 2,
                                                     dst_score[0, rand_id_filtered] * 2)
        dst_non_zero_values = dst_score[dst_score != float('inf')]

        large_value_tensor = torch.full((1,), float('inf'), device=dst_score.device, dtype=dst_score.dtype)
        dst_non_zero_values = torch.cat((large_value_tensor, dst_non_zero_values), dim=0)
        dst_score_global[0, rand_id_filtered] = float('inf')
        inf_indices = (dst_score_global == float('inf')).nonzero(as_tuple=True)[1]  # noqa: F841
        order_indices = dst_non_zero_values.argsort(dim=-1, descending=False)[..., None].unsqueeze(0)
        merge_indices = order_indices[..., :reduction_factor, :]
        remain_indices = order_indices[..., reduction_factor:, :]
        return order_indices, merge_indices, remain_indices, att_score


def Correlate(
    merge_indices: torch.Tensor,
    att_scores: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    merge_indices_choose = merge_indices.squeeze(-1)
    choose_att_prob = att_scores[0, merge_indices_choose[0], :]
    threshold_values = torch.quantile(choose_att_prob, 0.998, dim=-1, keepdim=True)
    mask = choose_att_prob > threshold_values
    topk_per_token = mask.sum(dim=-1)
    max_topk = topk_per_token.max().item()
    att_prob = nn.functional.softmax(att_scores, dim=-1)
    top_values, top_indices = att_prob.topk(max_topk, dim=-1)
    expand_merge_indices = merge_indices.expand(-1, -1, top_indices.shape[-1])
    target_indices = top_indices.gather(dim=-2, index=expand_merge_indices)
    return target_indices, top_values


def Compress(
    input_embeddings: torch.Tensor,
    merge_indices: torch.Tensor,
    remain_indices: torch.Tensor,
    top_values: torch.Tensor,
    merge_targets: torch.Tensor,
    reduction_factor: int,
) -> torch.Tensor:
    merge = True  # noqa: F841
    num_samples, num_pairs, num_features = input_embeddings.shape
    unmerged_tokens = input_embeddings.gather(dim=-2, index=remain_indices.expand(num_samples, num_pairs - reduction_factor, num_features))
    source_tokens = input_embeddings.gather(dim=-2, index=merge_indices.expand(num_samples, reduction_factor, num_features))
    if merge_targets.shape[-1] != 0:
        total_scores = top_values.sum(dim=-1, keepdim=True)
        merge_weights = top_values / total_scores
        merge_indices_choose = merge_indices.squeeze(-1)
        chosen_weights = merge_weights.gather(dim=1, index=merge_indices_choose.unsqueeze(-1).expand(-1, -1, merge_weights.size(-1)))
        weighted_tokens = source_tokens.unsqueeze(2) * chosen_weights.unsqueeze(-1)
        expanded_tokens = weighted_tokens.reshape(num_samples, -1, num_features)
        flat_indices = merge_targets.reshape(num_samples, -1).unsqueeze(-1).expand(-1, -1, num_features)
        max_length = unmerged_tokens.shape[1]
        flat_indices = torch.where(flat_indices >= max_length, flat_indices - reduction_factor, flat_indices)
        unmerged_tokens.scatter_add_(1, flat_indices, expanded_tokens)

    final_embeddings = unmerged_tokens
    return final_embeddings


def published_merge(hidden_states, att_score, rr):
    """FiCoCo_CLIPEncoderLayer.forward's merge block (merge_visual True, idx_now > control_encoding_layer)."""
    order_indices, merge_indices, remain_indices, att_prob = Filter(att_score, None, rr, True)
    target_indices, top_values = Correlate(merge_indices, att_prob)
    hidden_states, _ = merge_ficoco_v(Compress, hidden_states, merge_indices, remain_indices, top_values,
                                      target_indices, rr, None)
    return hidden_states


def published_layer(layer, hidden_states, merge, rr):
    """FiCoCo_CLIPEncoderLayer.forward with FiCoCo_Attention.forward (bsz 1, no masks, size None) on our
    layer's weights."""
    a = layer.self_attn
    residual = hidden_states
    hidden_states = layer.layer_norm1(hidden_states)
    bsz, tgt_len, embed_dim = hidden_states.size()
    shape = lambda t, seq: t.view(bsz, seq, a.heads, a.head_dim).transpose(1, 2).contiguous()  # noqa: E731 CLIPAttention._shape
    query_states = a.q_proj(hidden_states) * a.head_dim ** -0.5
    key_states = shape(a.k_proj(hidden_states), -1)
    value_states = shape(a.v_proj(hidden_states), -1)
    proj_shape = (bsz * a.heads, -1, a.head_dim)
    query_states = shape(query_states, tgt_len).view(*proj_shape)
    key_states = key_states.view(*proj_shape)
    value_states = value_states.view(*proj_shape)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    att_score = attn_weights.mean(dim=0)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_output = torch.bmm(attn_weights, value_states)
    attn_output = attn_output.view(bsz, a.heads, tgt_len, a.head_dim).transpose(1, 2).reshape(bsz, tgt_len, embed_dim)
    hidden_states = residual + a.out_proj(attn_output)
    if merge:
        hidden_states = published_merge(hidden_states, att_score, rr)
    residual = hidden_states
    hidden_states = layer.mlp(layer.layer_norm2(hidden_states))
    return residual + hidden_states


def published_tower(tower, pixels, ratio, feature_layer=-2):
    """Hidden state `feature_layer` of every tile (a list: the tiles' lengths may differ... they do not), each
    tile alone (batch 1, a fresh memory), merging where the published code merges under our r rule."""
    n_layers = len(tower.encoder.layers)
    where = merge_layers(n_layers, feature_layer)
    patches = tower.cfg.patches_per_side ** 2
    rr = merged_per_layer(ratio, patches, len(where))
    out = []
    for tile in pixels:
        reset(patches)
        x = tower.embed(tile[None])
        for idx, layer in enumerate(tower.encoder.layers[: where.stop]):
            x = published_layer(layer, x, idx >= where.start and rr > 0, rr)
        out.append(x[0])
    return torch.stack(out)


# --- 1. the rule, case by case ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(16))
def test_a_merge_equals_the_published_one(seed):
    """Random logits and tokens on grids of 4 x 4 .. 24 x 24 (the published 576, 144 windows, included),
    odd sides too; several layers in a row on one memory (its first four layers use every position):
    the merged tokens, in order, equal."""
    g = torch.Generator().manual_seed(seed)
    side = [4, 5, 7, 8, 12, 24][seed % 6]
    patches = side * side
    layers = int(torch.randint(1, 6, (1,), generator=g))
    r = max(1, int(torch.randint(1, patches // (layers + 1) + 1, (1,), generator=g)))
    reset(patches)
    memory = torch.full((patches,), 1e9)
    t = patches + 1
    x = torch.randn(t, 32, generator=g)
    for _ in range(layers):
        att = torch.randn(t, t, generator=g) * 3
        if seed % 2:  # a sharper row now and then: several targets per merged token
            att[:, :3] += 8
        ref = published_merge(x[None].clone(), att.clone(), r)[0]
        ours = ficoco_v_merge(x.clone(), att.clone(), memory, r)
        assert torch.equal(ours, ref)
        assert torch.equal(memory, dst_score_global[0])
        x, t = ours + 0.1 * torch.randn(ours.shape, generator=g), t - r


@pytest.mark.parametrize("seed", range(4))
def test_the_tower_equals_the_published_walk_tile_by_tile(seed):
    """A random 6-layer CLIP tower, 3 tiles of 8 x 8 patches: merges inside layers 3 and 4 (python index;
    feature layer -2 = hidden state 5), each tile alone."""
    g = torch.Generator().manual_seed(seed)
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                       image_size=112, patch_size=14)
    tower = ClipTower(cfg).eval()
    with torch.no_grad():
        for name, p in tower.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name and name.endswith("weight")
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        pixels = torch.randn(3, 3, 112, 112, generator=g)
        ratio = [0.5, 0.4, 0.35, 0.7][seed]
        stages = ficoco_v_schedule(ratio, 64, 6, -2, True)
        assert [s.layer for s in stages] == [3, 4] and all(isinstance(s, FiCoCoV) and s.inside for s in stages)
        ours = tower(pixels, (-2,), stages)[-2]
        ref = published_tower(tower, pixels, ratio)
    assert ours.shape == ref.shape == (3, 65 - 2 * merged_per_layer(ratio, 64, 2), 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_the_published_settings_and_the_rule():
    """LLaVA-1.5's tower (24 layers, 576 patches, feature layer -2): merging layers 12 .. 22 (idx_now > 11,
    the last layer's merge never read), 42 a layer at r = 0.198: 114 tokens a tile."""
    assert merge_layers(24, -2) == range(12, 23)
    assert merged_per_layer(0.198, 576, 11) == 42 and 576 - 11 * 42 == 114
    assert ficoco_v_schedule(1.0, 576, 24, -2, True) == ()
    assert [s.dropped for s in ficoco_v_schedule(0.5, 576, 24, -2, True)] == [26] * 11
    assert merge_layers(4, -2) == range(2, 3) and merge_layers(3, -2) == range(1, 2)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        ficoco_v_schedule(0.5, 576, 24, -2, False)
    with pytest.raises(ValueError, match="2-layer tower"):
        ficoco_v_schedule(0.5, 16, 2, -2, True)
    with pytest.raises(ValueError, match="on this tower r >= 0.5$"):  # one merging layer: at most half
        ficoco_v_schedule(0.45, 16, 3, -2, True)
    assert [s.dropped for s in ficoco_v_schedule(0.5, 16, 3, -2, True)] == [8]
    assert [s.dropped for s in ficoco_v_schedule(0.09, 576, 24, -2, True)] == [48] * 11
    with pytest.raises(ValueError, match="r >= 0.0833"):
        ficoco_v_schedule(0.05, 576, 24, -2, True)


# --- 2. end to end ------------------------------------------------------------------------------------

def reference_prompt(model, tokenizer, image_path, r):
    """The decoder input with FiCoCo-V at r, built naively: each tile through the published walk, LLaVA's
    `[:, 1:]`, the projector, the tiles' tokens in sequence (thumbnail first, crops in order)."""
    tiles = tile_image(load_image(str(image_path)), model.cfg.grid_pinpoints, model.cfg.vision.image_size)
    states = published_tower(model.vision, tiles.pixels.to(model.dtype), r)
    features = model.projector(states[:, 1:])
    order = [tiles.thumb, *(i for i in range(len(features)) if i != tiles.thumb)]
    image = torch.cat([features[i] for i in order])
    chunks = tokenizer.encode_prompt(build_prompt(QUESTION))
    return model.prompt_embeds(chunks, [image])[0], len(chunks[0]), image.shape[0]


@pytest.mark.parametrize("r", [0.5, 0.7])
def test_cli_greedy_ids_equal_the_naive_reference(capsys, deep_checkpoint, image_path, r):
    """The tiny tower (3 layers, 4 x 4 patches, feature layer -2): one merge inside layer 1, 8 (r = 0.5)
    or 5 (r = 0.7) tokens of every tile's 17."""
    result = run_json(capsys, deep_checkpoint, image_path, "--compressor", "ficoco", "--retention-ratio", r)
    none = run_json(capsys, deep_checkpoint, image_path, "--compressor", "none")
    model, tokenizer = gen.load(str(deep_checkpoint), dtype=torch.float32, pack=False)
    with torch.no_grad():
        prompt, start, length = reference_prompt(model, tokenizer, image_path, r)
        ids, _ = fastv_reference(model, prompt, start, length, 1.0, tokenizer.eos_id)  # r = 1: nothing pruned
    assert result["token_ids"] == ids
    assert result["visual_tokens"] == {"before": none["visual_tokens"]["before"], "after": length}
    assert length % (16 - merged_per_layer(r, 16, 1)) == 0  # every tile: 1 + 16 - m tokens, less the first


def test_what_cannot_run_refuses(capsys, deep_checkpoint, image_path):
    """r = 1 and batches: tests/test_pruning_methods.py."""
    code = gen.main(["--model", str(deep_checkpoint), "--image", str(image_path), "--prompt", QUESTION,
                     "--compressor", "ficoco", "--retention-ratio", "0.25"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ficoco at r = 0.25 would merge 12 of 17 tokens in tower layer 1")
    assert len(err.strip().splitlines()) == 1


def test_visualize_refuses_a_tower_method_in_one_line(capsys, tmp_path):
    """Merged tokens stand for several patches: nothing on the grid to mark, so one error line, no file."""
    from minillava.apps import visualize as vis

    out = tmp_path / "kept.png"
    scene = Path(__file__).parent.parent / "examples" / "scene.png"
    assert vis.main(["--image", str(scene), "--out", str(out), "--compressor", "ficoco", "--retention-ratio", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ficoco merges tokens inside the vision tower") and len(err.splitlines()) == 1
    assert not out.exists()


class Counted:
    """A tower stage whose own reading (its scores, its merge) is counted apart, by `counts` (FLOPs per call)."""

    def __init__(self, stage, counts: list):
        self.stage, self.counts = stage, counts

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def keep(self, between):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            kept = self.stage.keep(between)
        self.counts.append(counter.get_total_flops())
        return kept


@pytest.mark.parametrize("method, r", [("none", 1.0), ("ficoco", 0.5), ("globalcom2", 0.25)])
def test_the_tower_count_is_a_direct_count(method, r):
    """The efficiency's `tower_tflops` (eval/efficiency.py `tile_flops`: the patch embedding and the layers up
    to the feature layer at the schedule's `token_counts`) against torch's own FlopCounterMode over the tower
    as it runs on the shipped model's tiles: every layer whole, or FiCoCo-V's merging layer with its
    attention before and its MLP after the merge; what the stages read to choose is counted apart and left out."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from minillava.compression import tower_schedule
    from minillava.eval import efficiency as E

    model, _ = gen.load(gen.DEFAULT_MODEL, dtype=torch.float32, pack=False)
    pixels = model.tile(load_image(str(Path(__file__).parent.parent / "examples" / "scene.png"))).pixels
    reads: list[int] = []
    stages = tuple(Counted(s, reads) for s in tower_schedule(model, method, r))
    # torch's own formula for attention (torch.utils.flop_counter.sdpa_flop_count), given the CPU's kernel it lacks
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        model.vision(pixels, (model.cfg.vision_feature_layer,), stages)
    assert len(reads) == len(stages) == (method == "ficoco")
    assert counter.get_total_flops() - sum(reads) == len(pixels) * E.tile_flops(model, method, r)
