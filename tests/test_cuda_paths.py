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
from minillava.quant import (TINYGEMM_ROWS, QuantizedLinear, Spec, dequantize, int4_cuda_matmul, int8_matmul,
                             quantize_int4, unpack_tinygemm)
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


# --- int8 on CUDA: dequantize-and-matmul ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int8_cuda_form_sums_scaled_weights(dtype):
    """Outputs near 35 from rows whose largest weight is about 0.05: 700 times it, past float16's
    65504 / 127 = 516 for a sum of raw integers. gpt-fast's F.linear(x, q.to(dtype)) * scales then
    gives inf (checked below, so the inputs do reach it); ours stays within float16's rounding of a
    float32 reference made from the same stored integers (tensors in, F.linear in float32)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05 / 3
    layer = QuantizedLinear.from_weight(w, Spec(8))
    x = 10 * torch.sign(w[:8])  # row i's output i sums |w| of a whole row: about 35
    ref = F.linear(x, dequantize({"weight": layer.weight, "scales": layer.scales}, Spec(8), torch.float32))
    assert ref.diagonal().min() > 30
    old = F.linear(x.to(dtype), layer.weight.to(dtype)) * layer.scales.to(dtype)
    if dtype == torch.float16:
        assert (~old.isfinite()).sum() == 8  # each large output overflowed the old form
    got = int8_matmul(x.to(dtype), layer.weight, layer.scales)
    layer.kernel = "dequant"  # the layer's CUDA branch, on the CPU
    via_layer = layer(x.to(dtype))
    assert torch.equal(got, via_layer) and got.dtype == dtype and got.isfinite().all()
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # a few roundings of the dtype, relative
    assert ((got.float() - ref).abs().max() / ref.abs().max()) < tol


def test_int8_float32_form_is_unchanged():
    """float32 (the CPU's dequantize path for several rows) keeps its numbers, bit for bit."""
    torch.manual_seed(1)
    layer = QuantizedLinear.from_weight(torch.randn(48, 64), Spec(8))
    x = torch.randn(5, 64)
    assert torch.equal(int8_matmul(x, layer.weight, layer.scales), F.linear(x, layer.weight.float()) * layer.scales)


# --- int4 on CUDA: tinygemm's packing, and the rows it is used for ---------------------------------------

def pack_like_cuda(storage: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """aten._convert_weight_to_int4pack on CUDA, transcribed from its kernel as written
    (aten/src/ATen/native/cuda/int4mm.cu, `matrix_to_m16n8k16_Bint4_layout`, the NVIDIA branch): grid
    (k super-tile, n-tile), 32 lanes t, inner k-tiles two at a time; n0 = nTile * 8 + t / 4;
    ks = kBase0 + t % 4, + 4, kBase1 + t % 4, + 4 with kBase0 = (kOuterTile * InnerKTiles + innerKTile)
    * 16 / 2 and kBase1 = kBase0 + 8; the int32 = v3 low << 28 | v2 low << 24 | v1 low << 20 | v0 low << 16
    | v3 high << 8 | v2 high << 4 | v1 high | v0 high >> 4 (high: the byte & 0xF0)."""
    n, k_bytes = storage.shape
    n_tiles, supers = n // 8, k_bytes * 2 // (inner_k_tiles * 16)
    out = torch.zeros(n_tiles, supers, 32, inner_k_tiles // 2, dtype=torch.int64)
    t = torch.arange(32)
    w = storage.long()
    for k_outer in range(supers):
        for inner in range(0, inner_k_tiles, 2):
            n0 = torch.arange(n_tiles)[:, None] * 8 + t // 4  # (n-tile, lane)
            base0 = (k_outer * inner_k_tiles + inner) * 16 // 2
            k0, k2 = base0 + t % 4, base0 + 8 + t % 4
            v0, v1, v2, v3 = (w[n0, k] for k in (k0, k0 + 4, k2, k2 + 4))
            out[:, k_outer, :, inner // 2] = ((v3 & 0xF) << 28 | (v2 & 0xF) << 24 | (v1 & 0xF) << 20 | (v0 & 0xF) << 16
                                              | (v3 & 0xF0) << 8 | (v2 & 0xF0) << 4 | (v1 & 0xF0) | (v0 & 0xF0) >> 4)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the bits as int32


@pytest.mark.parametrize("n, k", [(16, 32), (48, 128), (64, 256), (128, 512)])
def test_unpack_tinygemm_inverts_the_cuda_packing(n, k):
    for tiles in (2, 4, 8):
        if k % (tiles * 16):
            continue
        storage = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
        packed = pack_like_cuda(storage, tiles)
        # the shape the real op gives (its meta function)
        assert packed.shape == torch.ops.aten._convert_weight_to_int4pack(storage.to("meta"), tiles).shape
        assert torch.equal(unpack_tinygemm(packed), storage)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int4_cuda_form_for_many_rows(dtype):
    """More than TINYGEMM_ROWS rows (a prefill): the weight from the kernel's packing, dequantized, and
    F.linear in the activations' dtype, against float32 from the storage form; activations large enough
    that outputs reach hundreds (an unscaled or wrongly unpacked weight would be far off)."""
    torch.manual_seed(2)
    spec, w = Spec(4, 64), torch.randn(96, 256) * 0.05
    weight, sz = quantize_int4(w, spec.group_size, torch.bfloat16)  # CUDA keeps scales in bfloat16 (pack)
    packed = pack_like_cuda(weight, 8)
    x = 50 * torch.randn(TINYGEMM_ROWS + 72, 256)
    ref = F.linear(x, dequantize({"weight": weight, "scales_and_zeros": sz}, spec, torch.float32))
    got = int4_cuda_matmul(x.to(dtype), packed, sz, spec)
    assert got.dtype == dtype and ref.abs().max() > 100
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((got.float() - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_cuda_pack_and_kernel_contracts(group):
    """QuantizedLinear on (fake) CUDA: pack's call of aten._convert_weight_to_int4pack and forward's of
    aten._weight_int4pack_mm at a decode step and at TINYGEMM_ROWS rows pass the checks of the ops' meta
    functions (dtypes, ranks, sizes; torch/_meta_registrations.py), at LLaVA-1.6-7B's MLP widths, for
    float16 and bfloat16 models."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode():
        for dtype in (torch.float16, torch.bfloat16):
            layer = QuantizedLinear(4096, 11008, False, Spec(4, group), dtype, "cuda")
            layer.pack()
            assert layer.kernel == "int4pack_cuda" and layer.scales_and_zeros.dtype == torch.bfloat16
            for rows in (1, TINYGEMM_ROWS):
                y = layer(torch.empty(rows, 4096, dtype=dtype, device="cuda"))
                assert y.shape == (rows, 11008) and y.dtype == dtype and y.device.type == "cuda"


def test_int4_cuda_pads_a_head_off_16_rows(monkeypatch):
    """InternVL3's head (151,674 rows, 10 past a multiple of 16) on CUDA: pack gives tinygemm 151,680 rows
    (the ops' meta functions take them, fake CUDA tensors at the 1B's width 896). Then forward's slice and
    the many-rows branch in numbers, on the CPU with the
    CUDA packing transcribed (`pack_like_cuda`) in place of the op: a 314-row layer against float32 from
    its storage form."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minillava import quant

    with torch.no_grad(), FakeTensorMode():
        layer = QuantizedLinear(896, 151674, False, Spec(4, 128), torch.bfloat16, "cuda")
        layer.pack()
        assert layer.kernel == "int4pack_cuda" and layer.scales_and_zeros.shape == (7, 151680, 2)
        # the kernel's output (fake CUDA tensors cannot be sliced on a CPU-only torch: the slice is checked below)
        y = int4_cuda_matmul(torch.empty(1, 896, dtype=torch.bfloat16, device="cuda"), layer.weight,
                             layer.scales_and_zeros, layer.spec)
        assert y.shape == (1, 151680)

    monkeypatch.setitem(quant.KERNELS, ("cpu", 4), "int4pack_cuda")
    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack", pack_like_cuda)
    torch.manual_seed(3)
    spec, w = Spec(4, 64), (torch.randn(314, 256) * 0.05).bfloat16()
    stored = quant.quantize(w, spec, torch.bfloat16)  # the layer's own integers and scales
    layer = QuantizedLinear.from_weight(w, spec)
    assert layer.kernel == "int4pack_cuda" and layer.weight.shape[0] == 320 // 8
    x = 50 * torch.randn(TINYGEMM_ROWS + 8, 256)
    ref = F.linear(x, dequantize(stored, spec, torch.float32))
    got = layer(x.bfloat16())
    assert got.shape == (TINYGEMM_ROWS + 8, 314) and ref.abs().max() > 100
    assert ((got.float() - ref).abs().max() / ref.abs().max()) < 1e-2


# --- the compiled decode step on CUDA -------------------------------------------------------------------

def test_cuda_decode_step_keeps_cuda_graphs_and_tunes_one_row_products(monkeypatch):
    """compile_steps on CUDA gives the decode step what mode="reduce-overhead" gave it (CUDA graphs) and
    inductor's coordinate_descent_tuning (gpt-fast's flag: a one-row product becomes a reduction an int8
    weight's dequantization fuses into); on the CPU the defaults, as before."""
    from torch._inductor import list_mode_options

    assert gen.decode_options(torch.device("cpu")) is None
    options = gen.decode_options(CUDA)
    assert list_mode_options("reduce-overhead").items() <= options.items() and options["coordinate_descent_tuning"]
    torch.compile(lambda x: x, options=options)  # torch.compile checks every name against inductor's config
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn.__name__, kw)) or fn)
    vision = SimpleNamespace(compile=lambda **kw: compiled.append(("vision", kw)))
    steps = gen.compile_steps(SimpleNamespace(device=torch.device("cuda", 1), vision=vision))
    assert compiled == [("vision", {"dynamic": True}), ("prefill", {"dynamic": True}),
                        ("decode_one_token", {"options": options, "fullgraph": True})] and steps.compiled


# --- attention with grouped KV heads --------------------------------------------------------------------

def reference_attention(q, k, v, mask):
    """torch's documented math (F.scaled_dot_product_attention's docstring), in float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_grouped_attention_is_enable_gqa(dtype):
    """The fold (a decode step's G query heads of a key head as G x T rows of one) against the call it
    replaces, F.scaled_dot_product_attention(..., attn_mask, enable_gqa=True): equal up to the order of
    float sums (the kernels block M = T and M = G T rows differently), both as close to float64 math."""
    torch.manual_seed(3)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for b, h, kv, t, s in [(2, 8, 2, 1, 40), (3, 28, 4, 1, 300), (2, 4, 2, 5, 33), (1, 32, 8, 3, 100)]:
        q, k, v = (torch.randn(b, n, m, 64, dtype=dtype) for n, m in ((h, t), (kv, s), (kv, s)))
        mask = (torch.arange(s)[None, None, :] <= torch.randint(0, s, (b, t))[:, :, None])[:, None]
        mask[..., 0] = True  # every row sees a key
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        got = llama.grouped_attention(q, k, v, mask)
        ref = reference_attention(q, k, v, mask)
        assert got.shape == want.shape and got.dtype == dtype
        assert (got.float() - want.float()).abs().max() <= ulp
        assert (got.double() - ref).abs().max() <= (want.double() - ref).abs().max() + ulp


def gqa_decoder(seed=0) -> llama.Decoder:
    """A random decoder with grouped KV heads (8 query heads on 2) and Qwen2's q, k, v biases."""
    torch.manual_seed(seed)
    cfg = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, qkv_bias=True)
    dec = llama.Decoder(cfg).eval()
    tiny.randomise(dec)
    return dec


@torch.inference_mode()
def run_padded_batch(dec: llama.Decoder) -> torch.Tensor:
    """A left-padded batch of 3 prompts (lengths 9, 4, 6) prefilled, then 5 cached decode steps; logits."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randn(n, 64, generator=g) for n in (9, 4, 6)]
    embeds, pos = engine.pad_left(prompts)
    dec.setup_cache(3, 32)
    out = [dec(embeds, pos, prefill=True)[:, -1:]]
    lengths = torch.tensor([9, 4, 6])
    for s in range(5):
        out.append(dec(torch.randn(3, 1, 64, generator=g), (lengths + s)[:, None]))
    return torch.cat(out, dim=1)


def test_decoder_off_the_cpu_never_passes_a_mask_with_enable_gqa(monkeypatch):
    """The whole decoder (padded prefill, cached steps) as it runs off the CPU (llama.attend's branch for
    CUDA, taken here by emptying ENABLE_GQA_DEVICES): every attention call is one any backend takes (no
    enable_gqa at all), and the outputs are the CPU path's up to float32 rounding."""
    dec = gqa_decoder()
    want = run_padded_batch(dec)
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa, q.shape[1] == k.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(llama, "ENABLE_GQA_DEVICES", ())
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = run_padded_batch(dec)
    assert len(calls) == 2 * 6 and all(masked and not gqa and heads_match for masked, gqa, heads_match in calls)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- sampling -------------------------------------------------------------------------------------------

def test_draw_gives_torch_multinomials_ids():
    """generate.draw against torch.multinomial(probs, 1) from the same generator state: the same ids, seed
    after seed (full distributions, nucleus-cut ones with zeros, a one-hot row)."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(3 * torch.randn(3, 500, generator=g, dtype=torch.float64), -1)
        if seed % 3 == 0:
            probs[:, 250:] = 0
        probs[2] = torch.nn.functional.one_hot(torch.tensor(seed % 500), 500)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(gen.draw(probs, torch.Generator().manual_seed(seed)), want)
    # sample() itself, with temperature and top_p, draws as before: the multinomial of its probabilities
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(9))
    for seed in range(50):
        ids = gen.sample(logits, 0.7, 0.9, torch.Generator().manual_seed(seed))
        assert ids.shape == (2,) and set(ids.tolist()) <= set(range(300))


# --- TokenReader ----------------------------------------------------------------------------------------

def test_token_reader_event_follows_the_model_device(monkeypatch):
    """On cuda:1 the ids' copy is queued on cuda:1's current stream (Copy.cu), so the event that says it
    landed must be recorded there, whatever the current device is. Event and streams are faked: only
    where the reader records is checked."""
    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: empty(*a, **kw))  # no pinned memory here
    reader = gen.TokenReader(torch.device("cuda", 1), 3, 2)
    reader.start(0, torch.tensor([5, 7]))
    assert recorded == [("stream of", torch.device("cuda", 1))] and reader.read(0) == [5, 7]


def test_lmms_model_makes_its_gpu_current(monkeypatch):
    pytest.importorskip("lmms_eval")
    from minillava.apps.lmms import Refused, choose_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert choose_device("cuda:1", 1, 0) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert choose_device("cuda", 2, 1) == torch.device("cuda", 1)  # data parallel: the local rank's
    assert choose_device("cpu", 1, 0) == torch.device("cpu") and len(current) == 2
    with pytest.raises(Refused):
        choose_device("cuda:x", 1, 0)


# --- the out-of-memory retry ----------------------------------------------------------------------------

def test_retry_alone_runs_after_the_failed_batch_is_released():
    """A batch that runs out of memory is answered one key at a time; when each retry starts, nothing of
    the failed batch is alive any more (the tensors its frames held). Inside the `except` block they
    were: its traceback holds those frames."""
    alive_at_retry, held = [], []

    def run(keys):
        activations = torch.zeros(1000)  # what the failed batch's frames hold
        held.append(weakref.ref(activations))
        if len(keys) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        alive_at_retry.append(held[0]() is not None)
        if keys == ["huge"]:
            raise torch.cuda.OutOfMemoryError("too large alone")
        return [f"answer {keys[0]}"]

    out = engine.retry_alone(run, ["a", "huge", "b"])
    assert alive_at_retry == [False, False, False]
    assert out[0] == "answer a" and out[2] == "answer b"
    assert isinstance(out[1], torch.cuda.OutOfMemoryError) and out[1].__traceback__ is None
    assert engine.retry_alone(run, ["c"]) == ["answer c"]
    (alone,) = engine.retry_alone(run, ["huge"])
    assert isinstance(alone, torch.cuda.OutOfMemoryError) and str(alone) == "too large alone"



def test_a_tensor_parallel_rank_does_not_retry_alone(monkeypatch):
    """eval's `answer_batch` with retry=False (a tensor-parallel rank, eval/runner.py `answer`): an
    out-of-memory batch raises at once, one call, instead of answering question by question while the
    rank's partners wait in the batch's collectives; with retry (one process) each question again alone."""
    from types import SimpleNamespace

    from minillava.eval import runner

    calls = []

    def generate_batch(model, tokenizer, items, *a, **k):
        calls.append(len(items))
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return ["answer"]

    monkeypatch.setattr(runner, "generate_batch", generate_batch)
    args = SimpleNamespace(compressor="none", retention_ratio=1.0, seed=0)
    batch = [SimpleNamespace(prompt="?"), SimpleNamespace(prompt="?")]
    opened = ["image", "image"]
    settings = {"max_new_tokens": 1}
    assert runner.answer_batch(args, None, batch, settings, None, None, None, opened) == ["answer", "answer"]
    assert calls == [2, 1, 1]
    calls.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        runner.answer_batch(args, None, batch, settings, None, None, None, opened, retry=False)
    assert calls == [2]


# --- warm-up at the real shapes -------------------------------------------------------------------------

def recording_steps(seen: list) -> gen.Steps:
    """Eager steps that note the shapes each call is compiled for (the KV cache's slots included)."""
    def prefill(model, embeds, schedule=(), input_pos=None):
        seen.append(("prefill", tuple(embeds.shape), None if input_pos is None else input_pos.dim(),
                     model.llm.cache_length))
        return gen.prefill(model, embeds, schedule, input_pos)

    def decode(model, token, pos):
        seen.append(("decode", tuple(token.shape), tuple(pos.shape), model.llm.cache_length))
        return gen.decode_one_token(model, token, pos)

    return gen.Steps(prefill, decode, compiled=True)


def test_warm_up_runs_the_shapes_the_answers_run():
    """warm_up on the first batch compiles every shape its answers then use: the prefill's (a padded batch,
    and rows of one length), the decode step's batch and KV-cache length (512 slots here for 128 answer
    tokens, not the 256 of a fixed warm-up), for one question as for a batch of 3."""
    from PIL import Image

    model, tok = gen.load(gen.DEFAULT_MODEL)
    images = [Image.new("RGB", size, colour) for size, colour in (((448, 448), "red"), ((300, 500), "blue"),
                                                                  ((500, 300), "green"))]
    questions = ["What digit is on the red card?", "What is the largest digit?", "Which card is red?"]
    for items in ([(images[0], questions[0])], list(zip(images, questions))):
        warm, real = [], []
        engine.warm_up(model, recording_steps(warm), tok, items, "globalcom2", 0.25, 128)
        engine.generate_batch(model, tok, items, "globalcom2", 0.25, 128, steps=recording_steps(real))
        if len(items) == 1:
            gen.generate(model, tok, *items[0], "globalcom2", 0.25, 128, steps=recording_steps(real))
        assert set(real) <= set(warm), set(real) - set(warm)
        assert {s[-1] for s in real} == {512}


# --- what a CUDA run synchronises and measures (the coverage audit, issue 32) -----------------------------

def test_timings_and_peaks_synchronise_the_gpu(monkeypatch):
    """On CUDA the phase timings wait for the GPU (generate._sync) and the eval's Meter reads the GPU's
    peak allocated and reserved memory after a sync, from a peak reset at its start, on the model's GPU."""
    from minillava.eval import efficiency as E

    gpu, calls = torch.device("cuda", 1), []
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda d, name=name: calls.append((name, d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("allocated", d)) or 3 * E.MIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: calls.append(("reserved", d)) or 5 * E.MIB)
    gen._sync(gpu)
    assert calls == [("synchronize", gpu)]
    meter = E.Meter(gpu)
    peaks = meter.stop()
    assert calls[1:] == [("synchronize", gpu), ("reset_peak_memory_stats", gpu), ("synchronize", gpu),
                         ("allocated", gpu), ("reserved", gpu)]
    assert (peaks["peak_allocated_mib"], peaks["peak_reserved_mib"]) == (3.0, 5.0) and peaks["wall_s"] >= 0


def test_peak_rss_without_proc(monkeypatch):
    """Where /proc cannot be written or read (macOS, a locked-down container) the CPU peak is getrusage's:
    kB on Linux, bytes on macOS; the reset is then a no-op."""
    import resource
    import sys
    from pathlib import Path

    from minillava.eval import efficiency as E

    def no_proc(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", no_proc)
    monkeypatch.setattr(Path, "read_text", no_proc)
    E.reset_peak_rss()
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert E.peak_rss_bytes() >= usage * (1 if sys.platform == "darwin" else 1024)
