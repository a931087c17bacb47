"""Issue 29: on the CPU, load_model lays the decoder's matrices out for oneDNN's matmul (llama.Linear.pack):
the same answers as the plain tensors, the tied head and the tower left plain, compiled graphs calling them."""

import pytest
import torch

from minillava import llama
from minillava.generate import generate
from minillava.quant import QuantizedLinear, Spec, quantize_model
from minillava.weights import load_model

pytestmark = pytest.mark.skipif(not llama.ONEDNN, reason="PyTorch built without oneDNN: nothing is packed")


def decoder_linears(model):
    return [m for m in model.llm.modules() if isinstance(m, llama.Linear)] + [model.lm_head]


def logits(model, embeds):
    with torch.no_grad():
        model.llm.setup_cache(embeds.shape[0], 32)
        return model.logits(model.llm(embeds, torch.arange(embeds.shape[1]), prefill=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_packs_the_decoder_and_keeps_its_numbers(checkpoints, dtype):
    packed, plain = load_model(checkpoints["hub"], dtype=dtype), load_model(checkpoints["hub"], dtype=dtype, pack=False)
    assert all(m.packed for m in decoder_linears(packed)) and not any(m.packed for m in decoder_linears(plain))
    assert not any(p.is_mkldnn for p in packed.vision.parameters()) and not packed.llm.embed_tokens.weight.is_mkldnn
    embeds = torch.randn(2, 9, packed.cfg.text.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    got, want = logits(packed, embeds), logits(plain, embeds)
    if dtype == torch.bfloat16:  # F.linear in bfloat16 is oneDNN's already: the same sums
        assert torch.equal(got, want)
    else:  # oneDNN's float32 sums against MKL's
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for m, p in zip(decoder_linears(packed), decoder_linears(plain)):
        assert torch.equal(m.weight.to_dense(), p.weight)


@pytest.mark.parametrize("compressor", ["none", "globalcom2"])
def test_generate_packed_equals_plain(checkpoints, image_path, compressor):
    from minillava.generate import load
    from minillava.trust import load_image

    (packed, tok), (plain, _) = load(str(checkpoints["hub"])), load(str(checkpoints["hub"]), pack=False)
    runs = [generate(m, tok, load_image(image_path), "What is in the picture?", compressor, 0.5, 12).token_ids
            for m in (packed, plain)]
    assert runs[0] == runs[1] and len(runs[0]) == 12


def test_tied_head_stays_plain(tmp_path):
    """A tied lm_head is the embedding table too, which an index reads: neither is packed."""
    from tests import tiny

    qwen_tok = tiny.train_qwen_tokenizer(tmp_path / "qwen")
    hf = tiny.ov_hf_model(seed=1, tie=True, layers=2)
    model = load_model(tiny.save_ov_checkpoint(hf, tmp_path / "tied", "original", qwen_tok))
    assert not model.lm_head.packed and model.lm_head.weight.data_ptr() == model.llm.embed_tokens.weight.data_ptr()
    assert all(m.packed for m in model.llm.modules() if isinstance(m, llama.Linear))


def test_quantize_reads_packed_weights(checkpoints):
    packed, plain = load_model(checkpoints["hub"]), load_model(checkpoints["hub"], pack=False)
    quantize_model(packed, Spec(8)), quantize_model(plain, Spec(8))
    assert isinstance(packed.llm.layers[0].mlp.up_proj, QuantizedLinear)
    for name, t in plain.state_dict().items():
        assert torch.equal(packed.state_dict()[name], t), name


def test_compiled_steps_call_the_packed_weights():
    """torch.compile cannot lower oneDNN's op on the opaque packed weight: compiled graphs call it as the
    custom op minillava::packed_linear, the same numbers as eager, the weights still packed."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        layer = llama.Linear(32, 48, bias=True).to(dtype).requires_grad_(False)
        layer.pack()
        x = torch.randn(3, 5, 32, dtype=dtype)
        compiled = torch.compile(lambda x: torch.nn.functional.silu(layer(x)) * 2, fullgraph=True, dynamic=True)
        with torch.inference_mode():
            assert torch.equal(compiled(x), torch.nn.functional.silu(layer(x)) * 2) and layer.packed
            assert compiled(x[:1, :1]).shape == (1, 1, 48)  # another shape: the fake op's


def test_without_onednn_nothing_is_packed(checkpoints, monkeypatch):
    monkeypatch.setattr(llama, "ONEDNN", False)
    assert not any(m.packed for m in decoder_linears(load_model(checkpoints["hub"])))
