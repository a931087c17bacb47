"""The CUDA-only branches, run on the CPU (issue 30): what each does on a GPU, checked here without one.

Each test runs the very function the CUDA branch calls, on CPU tensors (in float16 / bfloat16 where the
GPU would), against something we did not write: torch's own reference (float32 / float64 math,
torch.multinomial, F.scaled_dot_product_attention with enable_gqa), the kernel source a layout comes from,
or the meta functions of the CUDA ops (FakeTensorMode: fake CUDA tensors on a CPU-only torch). A branch
that only reads `torch.cuda` is run with that read monkeypatched. What only a GPU can tell is in
scripts/cuda_check.py.
"""

from __future__ import annotations

import json
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minillava import batch as engine
from minillava import generate as gen
from minillava import llama
from minillava.config import TextConfig
from tests import tiny

CUDA = torch.device("cuda")


# --- the default dtype ----------------------------------------------------------------------------------

def checkpoint_with(tmp_path, **keys):
    """A checkpoint directory holding only a config.json (transformers' layout, tests/tiny's sizes) with
    `keys` set at the top level, or in text_config for keys prefixed text_."""
    config = tiny.hf_config().to_dict()
    config.pop("dtype", None), config["text_config"].pop("dtype", None)
    for key, value in keys.items():
        (config["text_config"] if key.startswith("text_") else config)[key.removeprefix("text_")] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("keys, major, expected", [
    ({"torch_dtype": "float16"}, 9, torch.float16),  # llava-hf's LLaVA-1.6: as saved
    ({"torch_dtype": "float16"}, 7, torch.float16),
    ({"torch_dtype": "bfloat16"}, 8, torch.bfloat16),  # lmms-lab's OneVision (Qwen2): never float16
    ({"torch_dtype": "bfloat16"}, 7, torch.float32),  # no native bfloat16 (V100, T4): float32, not float16
    ({"dtype": "bfloat16"}, 9, torch.bfloat16),  # the key transformers writes since 4.56
    ({"text_torch_dtype": "bfloat16"}, 7, torch.float32),  # said by text_config only
    ({"torch_dtype": "torch.float16"}, 8, torch.float16),
    ({"torch_dtype": "float32"}, 8, torch.bfloat16),
    ({}, 8, torch.bfloat16),  # unstated
    ({}, 7, torch.float32),
    ({"torch_dtype": "int8"}, 8, torch.bfloat16),  # unknown: ignored, not refused
])
def test_default_dtype_on_cuda_follows_the_checkpoint(tmp_path, monkeypatch, keys, major, expected):
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: asked.append(d) or SimpleNamespace(major=major))
    assert gen.default_dtype(checkpoint_with(tmp_path, **keys), torch.device("cuda", 1)) == expected
    assert asked in ([], [torch.device("cuda", 1)])  # the model's GPU is asked, not the current one


def test_default_dtype_rocm_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")  # every ROCm GPU computes in bfloat16
    assert gen.default_dtype(checkpoint_with(tmp_path, torch_dtype="bfloat16"), CUDA) == torch.bfloat16
    # the CPU's rule is unchanged: float32 for a model that fits, whatever the checkpoint says
    assert gen.default_dtype(gen.resolve_model(gen.DEFAULT_MODEL), torch.device("cpu")) == torch.float32
