"""Loading: config defaults of both layouts, the key table, and a clear error for every broken checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillava.config import parse_config
from minillava.trust import ConfigError, WeightsError
from minillava.weights import internal_name, load_model


def test_hub_config_with_missing_sizes_takes_transformers_defaults():
    # llava-hf/llava-v1.6-vicuna-7b-hf's config.json, less the pinpoints: text_config has no sizes.
    cfg = parse_config({
        "model_type": "llava_next",
        "text_config": {"max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05, "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    })
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
    assert (t.vocab_size, t.max_position_embeddings, t.rms_norm_eps, t.rope_theta) == (32064, 4096, 1e-5, 10000.0)
    assert t.num_key_value_heads == 32 and t.head_dim == 128
    assert cfg.vision.patches_per_side == 24 and cfg.vision.hidden_act == "quick_gelu"
    # transformers' default pinpoints, read as (height, width) and stored as (width, height)
    assert cfg.grid_pinpoints == [(672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336)]


def test_transformers5_rope_parameters_and_original_layout():
    cfg = parse_config({"model_type": "llava_next", "text_config": {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}})
    assert cfg.text.rope_theta == 5e5
    original = parse_config({
        "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 32000,
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672], [672, 336]],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_vision_select_layer": -2, "mm_patch_merge_type": "spatial_unpad",
    })
    assert original.layout == "original" and not original.vision_from_shapes
    assert original.vision.num_hidden_layers == 24 and original.vision.image_size == 336
    assert original.grid_pinpoints == [(336, 672), (672, 336)]  # (width, height) as written


@pytest.mark.parametrize("raw, needle", [
    ({"model_type": "llava_next", "vision_feature_select_strategy": "full"}, "full"),
    ({"model_type": "llava_next", "text_config": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}}, "rope scaling"),
    ({"mm_vision_tower": "x", "mm_projector_type": "linear"}, "mlp2x_gelu"),
    ({"mm_vision_tower": "x", "image_aspect_ratio": "pad"}, "anyres"),
    ({"model_type": "llama"}, "neither"),
])
def test_unsupported_configs_are_refused(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(raw)


def test_key_table():
    assert internal_name("model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight") == "vision.encoder.layers.3.mlp.fc1.weight"
    assert internal_name("model.mm_projector.2.bias") == "projector.linear_2.bias"
    assert internal_name("model.layers.0.self_attn.q_proj.weight") == "llm.layers.0.self_attn.q_proj.weight"
    assert internal_name("language_model.lm_head.weight") == "lm_head.weight"
    assert internal_name("model.language_model.norm.weight") == "llm.norm.weight"
    assert internal_name("vision_tower.embeddings.position_ids") is None
    with pytest.raises(WeightsError, match="unexpected key 'foo.bar'"):
        internal_name("foo.bar")


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A writable single-file copy of the tiny checkpoint, and a function to rewrite its tensors."""
    src = checkpoints["tf5"]
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(src / "config.json", out)
    shutil.copy(src / "tokenizer.model", out)
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    save_file(state, out / "model.safetensors")

    def rewrite(edit):
        new = dict(state)
        edit(new)
        save_file(new, out / "model.safetensors")
        return out

    return out, rewrite


def test_single_file_checkpoint_loads(broken):
    out, _ = broken
    assert load_model(out).cfg.text.vocab_size == 416


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("image_newline"), "missing weight 'image_newline'"),
    (lambda s: s.update({"vision_tower.encoder.layers.9.mlp.fc1.weight": torch.zeros(1)}), "unexpected weight 'vision_tower.encoder.layers.9.mlp.fc1.weight'"),
    (lambda s: s.update({"mystery.weight": torch.zeros(1)}), "unexpected key 'mystery.weight'"),
    (lambda s: s.update({"image_newline": torch.zeros(7)}), "'image_newline' has shape [7], the config implies [128]"),
])
def test_broken_weights_name_the_key(broken, edit, needle):
    _, rewrite = broken
    with pytest.raises(WeightsError) as e:
        load_model(rewrite(edit))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_shard_and_garbage_file(checkpoints, tmp_path):
    out = tmp_path / "sharded"
    shutil.copytree(checkpoints["hub"], out)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"{shard.name}: shard named in model.safetensors.index.json is missing"):
        load_model(out)
    shard.write_bytes(b"\x09\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="header: not valid JSON"):
        load_model(out)
    (out / "model.safetensors.index.json").unlink()
    for f in out.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors weights"):
        load_model(out)
    (out / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="convert them to safetensors"):
        load_model(out)


def test_loading_converts_dtype_and_keeps_values(checkpoints):
    a = load_model(checkpoints["hub"], pack=False)
    b = load_model(checkpoints["hub"], dtype=torch.bfloat16, pack=False)
    w32, w16 = a.llm.layers[0].mlp.up_proj.weight, b.llm.layers[0].mlp.up_proj.weight
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, w32.to(torch.bfloat16))


def test_tied_embeddings_share_one_tensor(checkpoints, tmp_path):
    out = tmp_path / "tied"
    shutil.copytree(checkpoints["tf5"], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"].pop("language_model.lm_head.weight")
    state = load_file(shard)
    del state["language_model.lm_head.weight"]
    save_file(state, shard)
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(out)
    assert model.lm_head.weight.data_ptr() == model.llm.embed_tokens.weight.data_ptr()
