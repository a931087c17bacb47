"""The KV cache's mask is linear in the cache length (issue 10): no length x length table."""

import resource

import pytest
import torch

from minillava.config import TextConfig
from minillava import llama
from minillava.llama import EMPTY, Decoder


def small_decoder(layers: int = 2) -> Decoder:
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                     num_attention_heads=2, max_position_embeddings=2**20)
    return Decoder(cfg).eval()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_a_million_position_cache_allocates_no_square_mask():
    """2**20 positions: the old boolean tril was 2**40 bytes (1 TiB). Now every buffer is linear in L
    and the whole cache (k, v, positions, RoPE table) fits in a few hundred MB; a decode step at the
    far end of the cache works and sees only what was written."""
    length = 2**20
    dec = small_decoder()
    rss0 = peak_rss_mb()
    with torch.no_grad():
        dec.setup_cache(1, length)
        assert dec.cache_length == length
        buffers = dict(dec.named_buffers())
        assert max(b.numel() for b in buffers.values()) == 8 * length  # k, v (1, 2, L, 4), RoPE (2, L, 4)
        # bytes per position, all buffers: per layer k and v (2 heads x 4 dims, float32) and the
        # position (int64), and the RoPE table's cos and sin (4 dims, float32)
        per_position = sum(b.numel() * b.element_size() for b in buffers.values()) / length
        assert per_position == pytest.approx(2 * (2 * 2 * 4 * 4 + 8) + 2 * 4 * 4)  # + a counter per row and layer

        embeds = torch.randn(1, 5, 8)
        dec(embeds, torch.arange(5), prefill=True)
        far = dec(torch.randn(1, 1, 8), torch.tensor([length - 1]))  # positions 5 .. L-2 never written
    assert torch.isfinite(far).all()
    cache = dec.layers[0].self_attn.cache
    assert cache.pos[0, :5].tolist() == list(range(5)) and cache.pos[0, length - 1] == length - 1
    assert (cache.pos[0, 5 : length - 1] == EMPTY).all()  # masked: never attended to
    assert peak_rss_mb() - rss0 < 1024  # the square mask alone would be 1 TiB


def test_cached_steps_equal_a_full_pass():
    """Prefill then single steps through the position-table mask give the logits of one causal pass."""
    dec = small_decoder(layers=3)
    embeds = torch.randn(1, 11, 8)
    with torch.no_grad():
        dec.setup_rope(11)
        full = dec(embeds, torch.arange(11), prefill=True)
        dec.setup_cache(1, 16)
        steps = [dec(embeds[:, :6], torch.arange(6), prefill=True)]
        steps += [dec(embeds[:, t : t + 1], torch.tensor([t])) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_new_prefill_forgets_the_previous_question():
    """One cache for two prompts (as the benchmark does): the second answer does not see the first's
    longer prompt in the slots beyond its own."""
    dec = small_decoder()
    long, short = torch.randn(1, 9, 8), torch.randn(1, 4, 8)
    with torch.no_grad():
        dec.setup_cache(1, 16)
        dec(long, torch.arange(9), prefill=True)
        dec(short, torch.arange(4), prefill=True)
        reused = dec(torch.ones(1, 1, 8), torch.tensor([4]))
        dec.setup_cache(1, 16)
        dec(short, torch.arange(4), prefill=True)
        fresh = dec(torch.ones(1, 1, 8), torch.tensor([4]))
    assert torch.equal(reused, fresh)


def test_a_cache_of_the_same_shape_is_kept_not_reallocated():
    """setup_cache for the next question keeps buffers of the same shape (a compiled decode step's CUDA
    graph reads them at fixed addresses); another shape, dtype or slot count gets new ones. A kept cache
    is started afresh by the prefill, so the next question's logits are those of a fresh cache."""
    dec = small_decoder()
    with torch.no_grad():
        dec.setup_cache(2, 32)
        first = [layer.self_attn.cache for layer in dec.layers]
        rope = dec.rope
        dec(torch.randn(2, 9, 8), torch.arange(9), prefill=True)  # a longer question leaves slots behind
        dec.setup_cache(2, 32)
        assert all(layer.self_attn.cache is c for layer, c in zip(dec.layers, first)) and dec.rope is rope
        embeds, pos, step = torch.randn(2, 4, 8), torch.arange(4), torch.randn(2, 1, 8)
        kept = dec(embeds, pos, prefill=True)
        kept_step = dec(step, torch.tensor([4]))  # sees the 4 new slots only, not the 9 of before
        for batch, length, dtype, slots in ((1, 32, None, None), (2, 64, None, None), (2, 32, torch.float64, None),
                                            (2, 32, None, [32, 16])):
            dec.setup_cache(batch, length, dtype=dtype, layer_lengths=slots)
            assert dec.layers[-1].self_attn.cache is not first[-1]
        dec.setup_rope(32)  # no caches at all
        dec.setup_cache(2, 32)
        fresh = dec(embeds, pos, prefill=True)
        fresh_step = dec(step, torch.tensor([4]))
    assert torch.equal(kept, fresh) and torch.equal(kept_step, fresh_step)


def test_an_eager_cpu_step_reads_only_the_filled_slots(monkeypatch):
    """Issue 21: an eager decode step on the CPU attends to the slots up to the last one written, not
    the whole cache; every slot it leaves out is masked, so its output equals the step over the whole
    cache that a compiled step takes. Left-padded rows (per-row positions, PAD) included."""
    dec = small_decoder(layers=2)
    embeds = torch.randn(3, 6, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3], [-1, 0, 1, 2, 3, 4]])
    lengths = torch.tensor([[6], [4], [5]])

    def steps(whole: bool):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: whole)  # compiled steps keep every slot
        seen = []
        monkeypatch.setattr(llama, "attend", lambda q, k, v, *a: seen.append(k.shape[2]) or attend(q, k, v, *a))
        with torch.no_grad():
            dec.setup_cache(3, 32)
            dec(embeds, pos, prefill=True)
            out = [dec(torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(s)), lengths + s) for s in range(3)]
        monkeypatch.undo()
        return torch.cat(out, dim=1), seen

    attend = llama.attend
    filled, filled_slots = steps(whole=False)
    whole, whole_slots = steps(whole=True)
    # 2 layers a call: the prefill's 6 new keys, then each step's slots up to its own
    assert filled_slots == [6, 6, 7, 7, 8, 8, 9, 9] and whole_slots == [6, 6] + [32] * 6
    # float rounding only (2e-7 here): a different number of masked (zero) terms, and the filled steps'
    # one-token attention against the whole cache's F.scaled_dot_product_attention
    torch.testing.assert_close(filled, whole, rtol=1e-6, atol=1e-6)


def test_one_token_attention_is_sdpas_to_rounding(monkeypatch):
    """Issue 29: an eager one-token step on the CPU computes its attention as scores, softmax and values
    (`llama.one_token_attention`) instead of F.scaled_dot_product_attention. Against that call with
    enable_gqa, grouped and plain heads, a mask with holes, batch 3: float32 within 1e-5 (2e-7 measured);
    in bfloat16 its error against float64 is no larger than 1.5x the kernel's own (both are the output's
    rounding, 2e-3 of its largest value), where a missing scale, a wrong head grouping or an ignored mask
    is off by 0.1 or more. A prefill, and off the CPU's path (ENABLE_GQA_DEVICES emptied), still call
    the kernel."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    for heads, kv, hd, slots in ((8, 8, 16, 37), (8, 2, 32, 150), (32, 8, 128, 144)):
        q = torch.randn(3, heads, 1, hd, generator=g, dtype=torch.float64)
        k, v = torch.randn(2, 3, kv, slots, hd, generator=g, dtype=torch.float64)
        mask = torch.rand(3, 1, 1, slots, generator=g) > 0.3
        mask[..., -1] = True  # a step always sees its own slot
        ref = sdpa(q, k, v, attn_mask=mask, enable_gqa=kv < heads)
        f32 = [t.float() for t in (q, k, v)]
        torch.testing.assert_close(llama.attend(*f32, mask, False), sdpa(*f32, attn_mask=mask, enable_gqa=kv < heads),
                                   rtol=1e-5, atol=1e-5)
        b16 = [t.bfloat16() for t in (q, k, v)]
        ours = (llama.attend(*b16, mask, False).double() - ref).abs().max()
        kernel = (sdpa(*b16, attn_mask=mask, enable_gqa=kv < heads).double() - ref).abs().max()
        assert ours <= 1.5 * kernel, (heads, kv, ours, kernel)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    llama.attend(*f32, mask, False)
    assert not calls  # the one-token step did not call the kernel
    llama.attend(f32[0].expand(3, heads, 4, hd), *f32[1:], None, True)
    monkeypatch.setattr(llama, "ENABLE_GQA_DEVICES", ())
    llama.attend(*f32, mask, False)
    assert len(calls) == 2


def test_packed_linear_gives_f_linear_numbers():
    """Issue 29: a packed Linear (oneDNN's layout) gives F.linear's numbers: bit for bit in bfloat16 (F.linear
    there is oneDNN's too), to float rounding in float32 (oneDNN's sums, not MKL's), on any number of rows,
    3-d and non-contiguous inputs, with a bias; the state dict keeps nn.Linear's names and unpack gives
    back the very weight; an unpacked Linear is F.linear."""
    from minillava import llama

    if not llama.ONEDNN:
        pytest.skip("PyTorch built without oneDNN: nothing is packed")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layer = llama.Linear(64, 96, bias=True).to(dtype).requires_grad_(False)
        weight = layer.weight.clone()
        inputs = [torch.randn(rows, 1, 64, dtype=dtype) for rows in (1, 2, 8, 16, 300)]
        inputs.append(torch.randn(64, 5, dtype=dtype).t())  # non-contiguous
        want = [torch.nn.functional.linear(x, weight, layer.bias) for x in inputs]
        assert not layer.packed and all(torch.equal(layer(x), w) for x, w in zip(inputs, want))
        layer.pack()
        assert layer.packed and layer.weight.shape == (96, 64) and layer.weight.dtype == dtype
        assert set(layer.state_dict()) == {"weight", "bias"}
        for x, w in zip(inputs, want):
            got = layer(x)
            if dtype == torch.bfloat16:
                assert torch.equal(got, w), x.shape
            else:
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
        layer.unpack()
        assert not layer.packed and torch.equal(layer.weight, weight)
