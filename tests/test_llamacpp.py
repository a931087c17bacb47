"""scripts/benchkit/llamacpp.py: the GGUF file the bench writes for llama.cpp is our decoder. llama.cpp's
logits of a prompt, from the F32 file with an F32 KV cache, against ours on the same weights; skipped
without the llamacpp extra (never in CI)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from minillava.config import TextConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from benchkit import llamacpp  # noqa: E402
from benchkit.decoders import build_decoders  # noqa: E402

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama_cpp and gguf not installed (the llamacpp extra)")

# float32 both sides; what is left is the order of the sums (ggml's and MKL's) and softmax / RoPE in float32
TOLERANCE = 1e-5  # of the logits' standard deviation (measured: 2.2e-6)


@pytest.fixture(scope="module")
def decoder():
    """A 2-layer LLaMA with grouped KV heads (4 on 2), random weights."""
    text = TextConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    ours, _ = build_decoders(text)
    return ours


def test_f32_gguf_gives_our_logits(decoder, tmp_path):
    path = llamacpp.write_gguf(decoder, tmp_path / "f32.gguf", "F32")
    ids = torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    theirs = llamacpp.llama_logits(llamacpp.open_llama(path, 1, 64, logits_all=True, f32_cache=True), ids)
    got = llamacpp.compare_logits(llamacpp.our_logits(decoder, ids), theirs)
    assert got["rel"] < TOLERANCE and got["argmax_equal"] == 24, got


def test_without_the_permutation_the_logits_differ(decoder, tmp_path, monkeypatch):
    """The q/k row permutation is what makes llama.cpp's RoPE ours: leaving it out breaks the agreement."""
    monkeypatch.setattr(llamacpp, "permute", lambda w, heads: w)
    path = llamacpp.write_gguf(decoder, tmp_path / "f32.gguf", "F32")
    ids = list(range(3, 27))
    theirs = llamacpp.llama_logits(llamacpp.open_llama(path, 1, 64, logits_all=True, f32_cache=True), ids)
    assert llamacpp.compare_logits(llamacpp.our_logits(decoder, ids), theirs)["rel"] > 100 * TOLERANCE


@pytest.mark.parametrize("kind", ["F16", "Q8_0", "Q4_0"])
def test_the_bench_files_load_and_read_their_bytes(decoder, tmp_path, kind):
    """Each type the bench runs loads in llama.cpp and reads fewer bytes a step the fewer bits it has."""
    path = llamacpp.write_gguf(decoder, tmp_path / f"{kind}.gguf", kind)
    llm = llamacpp.open_llama(path, 1, 64)
    llm.eval([1, 5, 9])
    assert 0 <= llamacpp.last_argmax(llm) < 320
    f32 = llamacpp.gguf_step_bytes(llamacpp.write_gguf(decoder, tmp_path / "f32.gguf", "F32"))
    ratio = {"F16": 0.5, "Q8_0": 34 / 128, "Q4_0": 18 / 128}[kind]  # bytes per weight over 4: F16 2, Q8_0 34/32, Q4_0 18/32
    assert llamacpp.gguf_step_bytes(path) == pytest.approx(f32 * ratio, rel=0.02)
