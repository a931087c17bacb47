"""Hostile checkpoints, configs, tokenizers and prompts (issue 10, the loaders): each is refused with
one line naming the file and key, never a traceback, a hang, a huge allocation or a wrong model.

Every input is made here in tmp_path. Every test runs under a time limit (SIGALRM) and an address
space limit (RLIMIT_AS), so a regression fails instead of hanging or swapping the machine.
"""

import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minillava import generate as gen
from minillava import weights
from minillava.config import load_config, parse_config
from minillava.tokenizer import PromptError, Tokenizer, build_prompt
from minillava.trust import ConfigError, WeightsError, read_header
from minillava.validate import BOUNDS
from minillava.weights import checkpoint_files, load_model, resolve_model
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = json.loads((ROOT / "weights" / "llava-next-tiny-scenes" / "config.json").read_text())
SECONDS = 60  # per test; the slowest here loads the tiny model a few times
EXTRA_BYTES = 2 << 30  # address space a test may add: the tiny model needs MBs, a hostile size TBs


@pytest.fixture(autouse=True)
def limits():
    """SIGALRM after SECONDS, and RLIMIT_AS (soft) at what the process maps now plus EXTRA_BYTES."""

    def hang(signum, frame):
        raise TimeoutError(f"still running after {SECONDS} s: a hang")

    mapped = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    old_handler = signal.signal(signal.SIGALRM, hang)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + EXTRA_BYTES, old_as[1]))
    signal.alarm(SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, old_as)


def one_line(error: BaseException, *needles):
    text = str(error)
    assert "\n" not in text and len(text) < 600, text
    for n in needles:
        assert n in text, text


# --- safetensors headers ------------------------------------------------------------------------

GOOD = {  # two tensors that tile 14 data bytes exactly
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F16", "shape": [3], "data_offsets": [8, 14]},
}


def safetensors_bytes(header=None, data=b"\0" * 14, raw: bytes | None = None, n: int | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if n is None else n) + body + data


def edit(key, field, value):
    header = json.loads(json.dumps(GOOD))
    if field is None:
        header[key] = value
    else:
        header[key][field] = value
    return header


def test_a_good_file_passes(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(GOOD))
    entries = read_header(path)
    assert {k: (e.start, e.end, e.shape) for k, e in entries.items()} == {"a": (8 + len(json.dumps(GOOD)), 16 + len(json.dumps(GOOD)), (2,)),
                                                                       "b": (16 + len(json.dumps(GOOD)), 22 + len(json.dumps(GOOD)), (3,))}


@pytest.mark.parametrize("content, needles", [
    (safetensors_bytes(edit("a", "data_offsets", [-8, 0])), ["'a'", "data_offsets"]),
    (safetensors_bytes(edit("a", "data_offsets", [])), ["'a'", "data_offsets"]),
    (safetensors_bytes(edit("a", "data_offsets", [0, 4, 8])), ["'a'", "data_offsets"]),
    (safetensors_bytes(edit("a", "data_offsets", [0.0, 8.0])), ["'a'", "data_offsets"]),
    (safetensors_bytes(edit("a", "data_offsets", [False, True])), ["'a'", "data_offsets"]),
    (safetensors_bytes(edit("a", "data_offsets", "0-8")), ["'a'", "data_offsets"]),
    (safetensors_bytes(edit("a", "data_offsets", [8, 0])), ["'a'", "[8, 0]"]),
    (safetensors_bytes(edit("a", "shape", [3])), ["'a'", "needs 12"]),  # length != shape x dtype
    (safetensors_bytes(edit("a", "shape", [2**62, 2**62])), ["'a'", "needs"]),  # no overflow in Python
    (safetensors_bytes(edit("a", "shape", [-2])), ["'a'", "shape"]),
    (safetensors_bytes(edit("a", "shape", ["2"])), ["'a'", "shape"]),
    (safetensors_bytes(edit("a", "shape", 2)), ["'a'", "shape"]),
    (safetensors_bytes(edit("a", "dtype", "F8_E4M3")), ["'a'", "F8_E4M3"]),
    (safetensors_bytes(edit("a", "dtype", 5)), ["'a'", "dtype"]),
    (safetensors_bytes(edit("a", None, 5)), ["'a'", "must be an object"]),
    (safetensors_bytes(edit("b", "data_offsets", [4, 10])), ["'b'", "no gap or overlap"]),  # overlaps a
    (safetensors_bytes(edit("b", "data_offsets", [10, 16]), data=b"\0" * 16), ["'b'", "no gap or overlap"]),
    (safetensors_bytes(edit("b", "data_offsets", [0, 6])), ["no gap or overlap"]),  # both at 0
    (safetensors_bytes(edit("b", "data_offsets", [8000, 8006])), ["'b'", "no gap or overlap"]),  # past the end
    (safetensors_bytes(GOOD, data=b"\0" * 10), ["need 14 data bytes but the file has 10"]),  # truncated data
    (safetensors_bytes(GOOD, data=b"\0" * 20), ["need 14 data bytes but the file has 20"]),  # bytes nobody accounts for
    (safetensors_bytes(edit("__metadata__", None, {"format": 1})), ["__metadata__"]),
    (safetensors_bytes(raw=b"[1, 2]"), ["header must be a JSON object"]),
    (safetensors_bytes(raw=b"null"), ["header must be a JSON object"]),
    (safetensors_bytes(raw=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                           b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data=b"\0" * 8), ["'a' appears twice"]),
    (safetensors_bytes(raw=b'{"\xff": 1}'), ["not UTF-8"]),
    (safetensors_bytes(raw=b"{not json"), ["not valid JSON"]),
    (safetensors_bytes(raw=b"[" * 200_000 + b"]" * 200_000), ["not valid JSON"]),  # nesting: RecursionError
    (safetensors_bytes(raw=b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'), ["not valid JSON"]),
    (safetensors_bytes(GOOD, n=2**64 - 1), ["over the limit"]),  # never allocated (RLIMIT_AS would fail it)
    (safetensors_bytes(GOOD, n=2**40), ["over the limit"]),
    (safetensors_bytes(GOOD, n=16 << 20), ["past the end of the file"]),
    (safetensors_bytes(GOOD, n=(16 << 20) + 1), ["over the limit"]),
    (b"\x05\x00", ["shorter than its 8-byte header length"]),
    (b"", ["shorter than its 8-byte header length"]),
], ids=lambda v: f"{len(v)}B-{hash(v) % 10**6:06d}" if isinstance(v, bytes) else "-")
def test_hostile_headers_are_refused(tmp_path, content, needles):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as e:
        read_header(path)
    one_line(e.value, *needles)


def rewrite_header(path: Path, change):
    """Apply `change(header)` to a real safetensors file's header, keeping its data bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    change(header)
    path.write_bytes(safetensors_bytes(header, data=blob[8 + n :]))


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    """A writable copy of the tiny checkpoint in the hub layout (two shards and an index)."""
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hub"], out)
    return out


def first_key(shard: Path) -> str:
    return sorted(k for k in read_header(shard) if k != "__metadata__")[0]


def test_a_checkpoint_whose_tensor_reads_the_header_is_refused(ckpt):
    """Offsets moved back by the tensor's length: before, it loaded header bytes as weights, exit 0."""
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    key = first_key(shard)

    def shift(header):
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [start - (end - start), start] if start else [end, 2 * end - start]

    rewrite_header(shard, shift)
    with pytest.raises(WeightsError) as e:
        load_model(ckpt)
    one_line(e.value, shard.name)


@pytest.mark.parametrize("name, needle", [
    ("/etc/passwd", "not a plain file name inside the checkpoint"),
    ("../outside.safetensors", "not a plain file name inside the checkpoint"),
    ("sub/../../outside.safetensors", "not a plain file name inside the checkpoint"),
    ("", "not a plain file name inside the checkpoint"),
    ("link.safetensors", "outside the checkpoint"),  # a symlink out of the directory
    ("fifo.safetensors", "not a regular file"),  # would block open() forever
    ("missing.safetensors", "is missing"),
])
def test_index_shards_stay_inside_the_checkpoint(ckpt, tmp_path, name, needle):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(safetensors_bytes(GOOD))
    (ckpt / "link.safetensors").symlink_to(outside)
    os.mkfifo(ckpt / "fifo.safetensors")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError) as e:
        load_model(ckpt)
    one_line(e.value, needle)


@pytest.mark.parametrize("content, needle", [
    (b'{"weight_map": {"a": 5}}', "weight_map must be"),
    (b'{"weight_map": []}', "weight_map must be"),
    (b"[]", "weight_map must be"),
    (b'{"weight_map": {}, "weight_map": {}}', "appears twice"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_broken_indexes_are_refused(ckpt, content, needle):
    (ckpt / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(WeightsError) as e:
        checkpoint_files(ckpt)
    one_line(e.value, needle)


def test_unindexed_weights_must_be_regular_files_inside(ckpt, tmp_path):
    (ckpt / "model.safetensors.index.json").unlink()
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    os.mkfifo(ckpt / "model.safetensors")
    with pytest.raises(WeightsError, match="not a regular file"):
        load_model(ckpt)
    (ckpt / "model.safetensors").unlink()
    (tmp_path / "elsewhere.safetensors").write_bytes(safetensors_bytes(GOOD))
    (ckpt / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(WeightsError, match="outside the checkpoint"):
        load_model(ckpt)


def test_a_hub_cache_snapshot_loads_through_its_blob_links(checkpoints, tmp_path):
    """The hub cache's layout (snapshots/REV/* -> ../../blobs/*) is inside its repository folder."""
    repo = tmp_path / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(checkpoints["hub"].iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    assert load_model(snapshot).cfg.text.vocab_size == tiny.VOCAB


# --- config.json -----------------------------------------------------------------------------------

DELETE = object()


def config_with(path: str, value, base=SHIPPED_CONFIG) -> dict:
    cfg = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


@pytest.mark.parametrize("path, value, needle", [
    ("text_config.num_hidden_layers", 1_000_000, "text_config.num_hidden_layers = 1000000 is outside"),
    ("text_config.num_hidden_layers", 0, "text_config.num_hidden_layers = 0"),
    ("text_config.num_hidden_layers", -4, "text_config.num_hidden_layers = -4"),
    ("text_config.num_hidden_layers", 4.0, "text_config.num_hidden_layers must be an integer, got 4.0"),
    ("text_config.num_hidden_layers", True, "text_config.num_hidden_layers must be an integer, got True"),
    ("text_config.num_hidden_layers", "4", "text_config.num_hidden_layers must be an integer"),
    ("text_config.hidden_size", float("nan"), "text_config.hidden_size must be an integer, got nan"),
    ("text_config.vocab_size", 10**7, "text_config.vocab_size"),
    ("text_config.max_position_embeddings", 10**9, "text_config.max_position_embeddings"),
    ("text_config.intermediate_size", 0, "text_config.intermediate_size"),
    ("text_config.rms_norm_eps", float("nan"), "text_config.rms_norm_eps must be a finite number > 0"),
    ("text_config.rms_norm_eps", 0, "text_config.rms_norm_eps"),
    ("text_config.rms_norm_eps", float("inf"), "text_config.rms_norm_eps"),
    ("text_config.rms_norm_eps", "1e-5", "text_config.rms_norm_eps"),
    ("text_config.rope_theta", -1.0, "text_config.rope_theta"),
    ("text_config.tie_word_embeddings", "false", "text_config.tie_word_embeddings must be true or false"),
    ("text_config.hidden_act", "gelu", "text_config.hidden_act"),
    ("text_config.num_attention_heads", 7, "hidden_size 192 is not divisible by num_attention_heads 7"),
    ("text_config.num_key_value_heads", 3, "num_attention_heads 8 is not a multiple of num_key_value_heads 3"),
    ("text_config.num_key_value_heads", 16, "num_attention_heads 8 is not a multiple of num_key_value_heads 16"),
    ("text_config.head_dim", 25, "head_dim 25 is odd"),
    ("text_config.bos_token_id", 512, "bos_token_id 512 is not below vocab_size 512"),
    ("text_config.eos_token_id", [], "eos_token_id is an empty list"),
    ("text_config.eos_token_id", ["2"], "text_config.eos_token_id must be an integer"),
    ("text_config.rope_parameters", 5, "rope_parameters must be a JSON object"),
    ("text_config.rope_scaling", "linear", "rope_scaling must be a JSON object"),
    ("text_config", 5, "text_config must be a JSON object, got 5"),
    ("text_config", [], "text_config must be a JSON object"),
    ("vision_config", "clip", "vision_config must be a JSON object"),
    ("vision_config.num_hidden_layers", 10**6, "vision_config.num_hidden_layers"),
    ("vision_config.hidden_act", "relu", "vision_config.hidden_act 'relu' is not supported"),
    ("vision_config.num_attention_heads", 3, "vision_config.hidden_size 128 is not divisible"),
    ("vision_config.patch_size", 15, "image_size 112 must be a multiple of patch_size 15"),
    ("vision_config.patch_size", 1, "at most 64 patches per side"),
    ("vision_config.num_channels", 4, "vision_config.num_channels = 4"),
    ("vision_config.layer_norm_eps", -1e-5, "vision_config.layer_norm_eps"),
    ("vision_feature_layer", -30, "vision_feature_layer -30 is outside the tower's hidden states -5 .. 4"),
    ("vision_feature_layer", 5, "vision_feature_layer 5 is outside"),
    ("vision_feature_layer", True, "vision_feature_layer True"),
    ("vision_feature_layer", [-2], "only a single layer"),
    ("vision_feature_select_strategy", "full", "only 'default'"),
    ("projector_hidden_act", "relu", "projector_hidden_act 'relu'"),
    ("multimodal_projector_bias", "yes", "multimodal_projector_bias must be true or false"),
    ("image_grid_pinpoints", [], "image_grid_pinpoints must be a list of 1 to"),
    ("image_grid_pinpoints", 5, "image_grid_pinpoints must be a list"),
    ("image_grid_pinpoints", [[112, 224]] * 5000, "image_grid_pinpoints must be a list of 1 to 1024"),
    ("image_grid_pinpoints", [[0, 112]], "[0, 112] is not a pair of positive integers"),
    ("image_grid_pinpoints", [[-112, 224]], "is not a pair of positive integers"),
    ("image_grid_pinpoints", [["112", "224"]], "is not a pair of positive integers"),
    ("image_grid_pinpoints", [[112.0, 224]], "is not a pair of positive integers"),
    ("image_grid_pinpoints", [[112]], "is not a pair of positive integers"),
    ("image_grid_pinpoints", [[112, 100]], "must be multiples of the tile size 112"),
    ("image_grid_pinpoints", [[112 * 1000, 112 * 1000]], "at most 16777216 pixels"),
])
def test_hostile_configs_name_the_key(path, value, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(json.loads(json.dumps(config_with(path, value))))
    one_line(e.value, needle)


@pytest.mark.parametrize("path, value, needle", [
    ("mm_vision_tower", ["openai/clip-vit-large-patch14-336"], "mm_vision_tower must be a string"),
    ("mm_vision_select_layer", -30, "vision_feature_layer -30 is outside the tower's hidden states -25 .. 24"),
    ("mm_projector_type", 5, "mm_projector_type 5"),
    ("image_grid_pinpoints", None, "image_grid_pinpoints must be a list"),
    ("image_grid_pinpoints", [[336, 600]], "must be multiples of the tile size 336"),
    ("num_hidden_layers", 10**6, "num_hidden_layers = 1000000 is outside"),
    ("hidden_act", "relu", "hidden_act 'relu'"),
])
def test_hostile_original_layout_configs(path, value, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(config_with(path, value, base=REAL["original 7b"]))
    one_line(e.value, needle)


def test_a_million_layers_fail_before_anything_is_built():
    """Before, a million modules were built (minutes, GBs) before the weights' check failed."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"outside \\[1, {BOUNDS['num_hidden_layers'][1]}\\]"):
        parse_config(config_with("text_config.num_hidden_layers", 1_000_000))
    assert time.perf_counter() - t0 < 1.0


VISION_L336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
               "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000, "model_type": "clip_vision_model"}
PINPOINTS_HF = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
REAL = {  # the published config.json files' relevant keys (llava-hf/..., liuhaotian/...)
    "vicuna 7b hf": {"model_type": "llava_next", "image_grid_pinpoints": PINPOINTS_HF, "vision_config": VISION_L336,
                     "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                                     "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05,
                                     "torch_dtype": "float16", "vocab_size": 32064},
                     "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"},
    "mistral 7b hf": {"model_type": "llava_next", "image_grid_pinpoints": PINPOINTS_HF, "vision_config": VISION_L336,
                      "text_config": {"architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
                                      "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
                                      "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                                      "vocab_size": 32064, "hidden_act": "silu"},
                      "vision_feature_layer": -2, "vision_feature_select_strategy": "default"},
    "34b hf": {"model_type": "llava_next", "image_grid_pinpoints": PINPOINTS_HF, "vision_config": VISION_L336,
               "text_config": {"architectures": ["LlamaForCausalLM"], "eos_token_id": 7, "hidden_size": 7168,
                               "intermediate_size": 20480, "max_position_embeddings": 4096, "model_type": "llama",
                               "num_attention_heads": 56, "num_hidden_layers": 60, "num_key_value_heads": 8,
                               "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0, "vocab_size": 64064},
               "vision_feature_layer": -2, "vision_feature_select_strategy": "default"},
    "original 7b": {"architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                    "hidden_size": 4096, "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                    "intermediate_size": 11008, "max_position_embeddings": 4096, "mm_hidden_size": 1024,
                    "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
                    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
                    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava_llama",
                    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                    "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
                    "vocab_size": 32000},
    "original 34b": {"architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 7, "hidden_act": "silu",
                     "hidden_size": 7168, "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                     "intermediate_size": 20480, "max_position_embeddings": 4096, "mm_projector_type": "mlp2x_gelu",
                     "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                     "num_attention_heads": 56, "num_hidden_layers": 60, "num_key_value_heads": 8,
                     "rms_norm_eps": 1e-05, "rope_theta": 5000000.0, "vocab_size": 64000},
}


@pytest.mark.parametrize("name", list(REAL))
def test_published_configs_still_load(name):
    cfg = parse_config(REAL[name])
    t = cfg.text
    assert t.head_dim * t.num_attention_heads == t.hidden_size and cfg.vision.image_size == 336
    if "34b" in name:
        assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (60, 7168, 56, 8)
        assert t.eos_token_id == 7 and t.rope_theta == 5e6
    if "mistral" in name:
        assert t.max_position_embeddings == 32768 and t.num_key_value_heads == 8


def test_the_shipped_and_test_configs_load(checkpoints):
    load_config(ROOT / "weights" / "llava-next-tiny-scenes")
    for layout in tiny.LAYOUTS:
        load_config(checkpoints[layout])


@pytest.mark.parametrize("content, needle", [
    (b'{"model_type": "llava_next", "text_config": {"vocab_size": 5\xff}}', "not UTF-8"),
    (b"[1, 2, 3]", "config.json must be a JSON object"),
    (b'"llava"', "config.json must be a JSON object"),
    (b'{"model_type": "llava_next", "model_type": "llama"}', "'model_type' appears twice"),
    (b"", "not valid JSON"),
    (b'{"model_type": "llava_next", "text_config": {"vocab_size": ' + b"9" * 5000 + b"}}", "not valid JSON"),
])
def test_unreadable_config_files(tmp_path, content, needle):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    one_line(e.value, needle)


def test_a_fifo_config_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)


def test_a_vision_tower_sized_from_hostile_weights_is_checked(checkpoints, tmp_path):
    """Original layout, unknown tower: its sizes come from the tensors, so they pass the same checks."""
    out = tmp_path / "original"
    shutil.copytree(checkpoints["original"], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["mm_vision_select_layer"] = -30  # the tiny tower has 3 layers: this wrapped silently before
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(out)
    one_line(e.value, "vision_feature_layer -30 is outside the tower's hidden states -4 .. 3")


# --- tokenizer files ---------------------------------------------------------------------------------


@pytest.fixture
def model_copy(checkpoints, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(checkpoints["hub"], out)
    return out


@pytest.mark.parametrize("make, needle", [
    (lambda good: b"", "empty tokenizer file"),
    (lambda good: good[: len(good) // 3], "not a sentencepiece model"),
    (lambda good: b"\x00garbage" * 100, "not a sentencepiece model"),
    (lambda good: b"{}", "not a sentencepiece model"),
])
def test_broken_tokenizers_are_weights_errors(model_copy, capfd, make, needle):
    tok = model_copy / "tokenizer.model"
    tok.write_bytes(make(tok.read_bytes()))
    with pytest.raises(WeightsError) as e:
        gen.load(str(model_copy))
    one_line(e.value, "tokenizer.model", needle)
    assert capfd.readouterr().err == ""  # sentencepiece logged to stderr on an empty model


def test_a_fifo_tokenizer_does_not_hang(model_copy):
    (model_copy / "tokenizer.model").unlink()
    os.mkfifo(model_copy / "tokenizer.model")
    with pytest.raises(WeightsError, match="tokenizer.model: not a regular file"):
        gen.load(str(model_copy))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = tiny.SP_VOCAB - 1
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError) as e:
        gen.load(str(model_copy))
    one_line(e.value, f"{tiny.SP_VOCAB} pieces", f"vocab_size is {tiny.SP_VOCAB - 1}")


def test_a_tokenizer_without_bos_is_refused(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny.LINES * 5), model_writer=buf, vocab_size=60,
                                   bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="no BOS or EOS"):
        Tokenizer(tmp_path / "tokenizer.model")


# --- prompts --------------------------------------------------------------------------------------


QUESTIONS = ["What is in the picture?", "Hi", "", "  two  spaces ", "Line one\nline two", "é ü 😀 ∑"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_normal_questions_keep_their_ids(tokenizer_path, question):
    """The ids of every question without `<image>` are what splitting the prompt at `<image>` gave."""
    tok = Tokenizer(tokenizer_path)
    before, after = build_prompt(question).split("<image>")
    assert tok.encode_prompt(build_prompt(question)) == [[tok.bos_id] + tok.encode(before), tok.encode(after)]


@pytest.mark.parametrize("question", ["<image>", "What is <image> here?", "<image>\n<image> and <image>"])
def test_image_in_the_question_is_text(tokenizer_path, question):
    tok = Tokenizer(tokenizer_path)
    chunks = tok.encode_prompt(build_prompt(question))
    assert len(chunks) == 2  # one image slot: the template's
    assert chunks[1] == tok.encode(f"\n{question} ASSISTANT:")
    assert chunks[0] == tok.encode_prompt(build_prompt("x"))[0]


@pytest.mark.parametrize("question", ["\ud800", "ok \udcff then", "a\udfffb"])
def test_lone_surrogates_are_prompt_errors(tokenizer_path, question):
    with pytest.raises(PromptError) as e:
        Tokenizer(tokenizer_path).encode_prompt(build_prompt(question))
    one_line(e.value, "unpaired surrogate")


def test_generate_reexports_prompt_error():
    assert gen.PromptError is PromptError and PromptError in gen.USER_ERRORS


# --- identity --------------------------------------------------------------------------------------


def test_a_hub_id_never_resolves_to_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        resolve_model("someone/llava-next-tiny-scenes")
    one_line(e.value, "someone--llava-next-tiny-scenes")
    assert resolve_model("llava-next-tiny-scenes").name == "llava-next-tiny-scenes"  # the bare name still is


def test_a_hub_id_is_stored_under_owner_and_name(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    shutil.copytree(checkpoints["hub"], tmp_path / "alice--tiny")
    assert resolve_model("alice/tiny") == tmp_path / "alice--tiny"
    with pytest.raises(WeightsError):  # bob's repository of the same name is not alice's
        resolve_model("bob/tiny")


@pytest.mark.parametrize("name", ["a/../b", "a--b/c", "../x", "a/b/c", "-a/b", "a/b.", "a/" + "b" * 97, "x/\n",
                                  "~no-such-user-here/x", "a" * 5000, "\0", "x/\ud800"])
def test_malformed_hub_ids(name, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # "../x" is a directory if the cwd's parent has an x: make sure not
    with pytest.raises(WeightsError) as e:
        resolve_model(name)
    one_line(e.value, "not a hub id")


def test_downloading_is_announced_on_stderr(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    def fake_download(repo_id, local_dir, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(WeightsError, match="no network in tests"):
        resolve_model("alice/tiny")
    out, err = capsys.readouterr()
    assert out == "" and f"downloading alice/tiny to {tmp_path / 'alice--tiny'}" in err


# --- the command line --------------------------------------------------------------------------------


def run_module(args, tmp_path, stdin_fifo=False):
    """`python -m minillava.generate ARGS` with 4 GiB of address space and 120 s: (code, stdout, stderr)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "minillava.generate", *args], capture_output=True,
                          env=env, timeout=120, preexec_fn=limit, cwd=tmp_path)
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def assert_one_error(code, err, *needles):
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_refuses_a_hostile_checkpoint_in_one_line(checkpoints, image_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hub"], ckpt)
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    key = first_key(shard)
    rewrite_header(shard, lambda h: h[key].update(data_offsets=[0, 2**40]))  # a TB past the end of the file
    code, out, err = run_module(["--model", str(ckpt), "--image", str(image_path), "--prompt", "x", "--json"], tmp_path)
    assert_one_error(code, err, shard.name, key)
    assert out == ""
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    code, _, err = run_module(["--model", str(ckpt), "--image", str(image_path), "--prompt", "x"], tmp_path)
    assert_one_error(code, err, "config.json: not a regular file")


def test_cli_refuses_a_prompt_that_is_not_text(checkpoints, image_path, tmp_path):
    # a byte that is not UTF-8 on the command line arrives as a lone surrogate (surrogateescape)
    code, out, err = run_module(["--model", str(checkpoints["hub"]), "--image", str(image_path),
                                 "--prompt", os.fsencode("what \udcff")], tmp_path)
    assert_one_error(code, err, "unpaired surrogate")


def run_main(capsys, *args):
    code = gen.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_main_answers_a_question_naming_the_image(checkpoints, image_path, capsys):
    code, out, err = run_main(capsys, "--model", checkpoints["hub"], "--image", image_path, "--prompt", "What is <image>?",
                              "--max-new-tokens", 2, "--json")
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 2


@pytest.mark.parametrize("path, value, needle", [
    ("rms_norm_eps", math.nan, "text_config.rms_norm_eps must be a finite number > 0, got nan"),
    ("num_hidden_layers", 10**6, "text_config.num_hidden_layers = 1000000 is outside"),
])
def test_main_with_a_hostile_config_prints_one_line(checkpoints, image_path, tmp_path, capsys, path, value, needle):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hub"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"][path] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_main(capsys, "--model", ckpt, "--image", image_path, "--prompt", "x")
    assert_one_error(code, err, needle)
    assert out == ""
