"""Weight-only int8 / int4 (minillava/quant.py, minillava/apps/quantize.py): the rounding bounds of the storage
form, every matmul path against a dequantize-and-matmul written here from the documented format, the
quantized checkpoint (written, loaded, equal to quantizing while loading, refused when tampered with), the
command lines' errors, and at LLaVA-1.6-7B's widths (slow) the error against float32 and, for int8,
against transformers' own weight-only int8 (TorchAoConfig, when torchao is installed)."""

import json
import struct

import pytest
import torch
import torch.nn.functional as F

from minillava import quant
from minillava.config import TextConfig, load_config
from minillava.generate import generate, load
from minillava.llama import Decoder
from minillava.quant import QuantizedLinear, Spec
from minillava.apps.quantize import main as quantize_main
from minillava.trust import ConfigError, WeightsError
from minillava.weights import load_model
from tests import conftest

SPECS = [Spec(8), Spec(4, 32), Spec(4, 128)]


def weights(n, k, seed=0, dtype=torch.float32):
    """Random (n, k) weights with a few large outliers, as trained matrices have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w.view(-1)[torch.randint(0, n * k, (n * k // 500,), generator=g)] *= 8
    return w.to(dtype)


# --- the reference: written from the format in quant.py's docstring, sharing no code with it ------------

def reference_weight(tensors: dict, spec: Spec) -> torch.Tensor:
    """The float32 (N, K) weight the stored tensors stand for."""
    if spec.bits == 8:
        return tensors["weight"].float() * tensors["scales"].float()[:, None]
    packed = tensors["weight"].to(torch.int32)
    n = packed.shape[0]
    q = torch.empty(n, packed.shape[1] * 2, dtype=torch.int32)
    q[:, 0::2], q[:, 1::2] = packed // 16, packed % 16  # high nibble first
    sz = tensors["scales_and_zeros"].float()  # (K/G, N, 2)
    group = torch.arange(q.shape[1]) // spec.group_size
    scale, zero = sz[group, :, 0].t(), sz[group, :, 1].t()  # (N, K)
    return (q.float() - 8) * scale + zero


def reference_linear(x, tensors, spec, bias=None):
    y = x.float() @ reference_weight(tensors, spec).t()
    return y if bias is None else y + bias.float()


# --- the storage form ------------------------------------------------------------------------------

def test_int8_rounds_each_weight_to_the_nearest_step():
    w = weights(64, 256)
    t = quant.quantize(w, Spec(8), torch.float32)
    q, s = t["weight"], t["scales"]
    assert q.dtype == torch.int8 and q.shape == (64, 256) and s.shape == (64,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1) == 127).all()  # each row's largest weight is +-127
    assert torch.allclose(s, w.abs().amax(dim=1) / 127)
    assert ((w - q.float() * s[:, None]).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group", [32, 128])
def test_int4_rounds_each_weight_to_the_nearest_step_of_its_group(group):
    w = weights(32, 256, seed=1)
    t = quant.quantize(w, Spec(4, group), torch.float32)
    sz = t["scales_and_zeros"]
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (32, 128) and sz.shape == (256 // group, 32, 2)
    g = w.view(32, 256 // group, group)
    lo, hi = g.amin(-1).t(), g.amax(-1).t()  # (K/G, N)
    assert torch.allclose(sz[..., 0], (hi - lo) / 15) and torch.allclose(sz[..., 1], lo + 8 * sz[..., 0], atol=1e-6)
    step = sz[..., 0].t().repeat_interleave(group, dim=1)  # (N, K)
    assert ((w - reference_weight(t, Spec(4, group))).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(quant.dequantize(t, Spec(4, group), torch.float32), reference_weight(t, Spec(4, group)))


def test_int4_nibble_layout():
    """A row 0, 1, ..., 15, 0, ... (one group of 32: scale 1, zero 8) is stored as bytes 0x01, 0x23, ..."""
    w = (torch.arange(32) % 16).float().repeat(16, 1)
    t = quant.quantize(w, Spec(4, 32), torch.float32)
    assert t["weight"][0, :8].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert t["scales_and_zeros"][0, 0].tolist() == [1.0, 8.0]


def test_zero_rows_and_groups_stay_finite():
    w = weights(16, 128)
    w[3] = 0
    for spec in (Spec(8), Spec(4, 32)):
        back = quant.dequantize(quant.quantize(w, spec, torch.float32), spec, torch.float32)
        assert back.isfinite().all() and (back[3] == 0).all()


# --- the matmul paths against the reference --------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_every_kernel_equals_dequantize_and_matmul(spec, dtype, bias):
    """The CPU's packed kernel and the dequantize-and-matmul path (other devices) give the reference's
    numbers, for one row and a batch of (2, 3) rows. The packed kernels take a float32 model's
    activations, scales (and int4's zeros) and outputs in bfloat16 (quant.KERNELS: float32 ones are no fast
    kernels): within 4e-3 (int8) and 1e-2 (int4) of the output's norm, their rounding (2^-9 relative
    each), not float32's 1e-5, which the dequantize-and-matmul path keeps."""
    w = weights(48, 256, seed=2).to(dtype)
    b = (0.1 * torch.randn(48)).to(dtype) if bias else None
    layer = QuantizedLinear.from_weight(w, spec, b)
    assert layer.kernel == {8: "int8pack", 4: "int4pack_cpu"}[spec.bits]
    stored = quant.quantize(w, spec, dtype)
    fallback = QuantizedLinear(256, 48, bias, spec, dtype)
    for suffix, t in stored.items():
        setattr(fallback, suffix, t)
    fallback.bias = None if b is None else torch.nn.Parameter(b, requires_grad=False)
    assert fallback.kernel == "dequant"
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: 8 bits of mantissa in the products' sums
    for x in (torch.randn(1, 256), torch.randn(2, 3, 256)):
        x = x.to(dtype)
        ref = reference_linear(x, stored, spec, b)
        packed = max(tol, 4e-3 if spec.bits == 8 else 1e-2)  # int4: the zeros' bf16 rounding too, summed over K
        for out, bound in ((layer(x), packed), (fallback(x), tol)):
            assert out.dtype == dtype and out.shape == (*x.shape[:-1], 48)
            assert (out.float() - ref).norm() / ref.norm() < bound


onednn = pytest.mark.skipif(not quant.onednn_int8_exact(), reason="no exact oneDNN uint8 x int8 matmul on this CPU")


@onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_onednn_kernel_equals_dequantize_and_matmul(dtype, bias, monkeypatch):
    """CPU int8 through oneDNN's uint8 x int8 matmul, each activation row as two uint8 rows (quant.KERNELS):
    the layer's output within 2e-4 of the reference's norm for float32 activations (one uint8 row alone,
    without its residual, is ~1e-2 off; the bf16 cast of the other int8 kernel 2.4e-3) and within the
    bf16 rounding of the output, 4e-3, for bfloat16; for one row, a batch of (2, 3) rows, rows with outliers
    100x the rest, and a zero row (exactly the bias). Matrices from ONEDNN_INT8_MIN numbers take it; the
    threshold is lowered here to keep the test small."""
    monkeypatch.setattr(quant, "ONEDNN_INT8_MIN", 0)
    w = weights(48, 256, seed=3).to(dtype)
    b = (0.1 * torch.randn(48)).to(dtype) if bias else None
    layer = QuantizedLinear.from_weight(w, Spec(8), b)
    assert layer.kernel == "int8onednn" and layer.weight.numel() == 0  # the packed copy replaces it
    stored = quant.quantize(w, Spec(8), dtype)
    bound = 2e-4 if dtype == torch.float32 else 4e-3
    spikes = torch.randn(4, 256)
    spikes[:, [3, 77, 200]] *= 100
    for x in (torch.randn(1, 256), torch.randn(2, 3, 256), spikes):
        x = x.to(dtype)
        out, ref = layer(x), reference_linear(x, stored, Spec(8), b)
        assert out.dtype == dtype and out.shape == (*x.shape[:-1], 48)
        assert (out.float() - ref).norm() / ref.norm() < bound
    zero = layer(torch.zeros(2, 256, dtype=dtype))
    assert torch.equal(zero, torch.zeros_like(zero) if b is None else b.expand(2, 48))


def test_int8_kernel_by_size(monkeypatch):
    """On the CPU the int8 kernel depends on the weight's size: oneDNN's from ONEDNN_INT8_MIN numbers
    (2048 x 2048, the 0.95B decoder's smallest), `_weight_int8pack_mm` below, where oneDNN's per-call cost
    of splitting the activations outweighs its faster reads (quant.KERNELS); and on the probe: a CPU
    whose oneDNN int8 sums saturate keeps `_weight_int8pack_mm` at any size."""
    small = QuantizedLinear.from_weight(weights(48, 256), Spec(8))
    big = QuantizedLinear.from_weight(weights(2048, 2048), Spec(8))
    assert small.kernel == "int8pack"
    assert big.kernel == ("int8onednn" if quant.onednn_int8_exact() else "int8pack")
    monkeypatch.setattr(quant, "onednn_int8_exact", lambda: False)
    assert QuantizedLinear.from_weight(weights(2048, 2048), Spec(8)).kernel == "int8pack"


@onednn
def test_int8_onednn_loads_from_a_checkpoint_and_compiles(written, hub, monkeypatch):
    """The written int8 checkpoint loaded with every linear on the oneDNN kernel: the same logits as
    quantizing while loading (the checkpoint's file pages of each weight handed back once it is packed, as
    for int4), near the int8pack kernel's; and one layer under torch.compile(fullgraph=True) through the
    custom op minillava::int8_onednn equals eager (the opaque packed weight cannot be traced)."""
    before = logits_of(load_model(written[8]))
    monkeypatch.setattr(quant, "ONEDNN_INT8_MIN", 0)
    stored, on_load = load_model(written[8]), load_model(hub, quantize=Spec(8))
    assert stored.lm_head.kernel == on_load.lm_head.kernel == "int8onednn"
    after = logits_of(stored)
    assert torch.equal(after, logits_of(on_load))
    # int8pack rounds every linear's activations and outputs to bf16 (4e-3 a layer), here over 2 layers and the head: 8.8e-3
    assert (after - before).norm() / before.norm() < 2e-2
    layer = stored.lm_head
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_rows_off_the_kernels_block_are_padded_in_memory(dtype):
    """50 outputs (no multiple of the CPU kernel's 16): the packing gets 14 zero rows, the outputs are
    sliced back to 50 and equal the reference within the packed kernel's bound above; the storage form
    (what a checkpoint holds) keeps 50 rows."""
    spec, w = Spec(4, 32), weights(50, 256, seed=4).to(dtype)
    stored = quant.quantize(w, spec, dtype)
    assert stored["weight"].shape == (50, 128) and stored["scales_and_zeros"].shape == (8, 50, 2)
    layer = QuantizedLinear.from_weight(w, spec)
    assert layer.kernel == "int4pack_cpu" and layer.scales_and_zeros.shape == (8, 64, 2)
    for x in (torch.randn(1, 256), torch.randn(2, 3, 256)):
        x = x.to(dtype)
        out, ref = layer(x), reference_linear(x, stored, spec)
        assert out.shape == (*x.shape[:-1], 50) and (out.float() - ref).norm() / ref.norm() < 2e-2


def test_decoder_and_lm_head_linears_are_quantized_not_embedding_norms_tower():
    t = TextConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    model = torch.nn.Module()
    model.llm, model.lm_head = Decoder(t), torch.nn.Linear(128, 64, bias=False)
    model.projector = torch.nn.Linear(128, 128)
    quant.quantize_model(model, Spec(8))
    names = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert len(names) == 2 * 7 + 1 and "lm_head" in names and "projector" not in names
    assert isinstance(model.llm.embed_tokens, torch.nn.Embedding) and isinstance(model.projector, torch.nn.Linear)


# --- checkpoints: quantize while loading, write, load, validate --------------------------------------

@pytest.fixture(scope="module")
def hub(checkpoints):
    return checkpoints["hub"]


@pytest.fixture(scope="module")
def written(hub, tmp_path_factory):
    """The tiny hub checkpoint written as int8 and as int4 (group 32) by python -m minillava.apps.quantize."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for bits, extra in ((8, []), (4, ["--group-size", "32"])):
        assert quantize_main(["--model", str(hub), "--out", str(root / f"int{bits}"), "--bits", str(bits), *extra]) == 0
        out[bits] = root / f"int{bits}"
    return out


def logits_of(model, n=12):
    ids = torch.arange(3, 3 + n)
    model.llm.setup_cache(1, 64)
    return model.logits(model.llm(model.embed(ids)[None], torch.arange(n), prefill=True))


@pytest.mark.parametrize("bits", [8, 4])
def test_written_checkpoint_loads_as_quantizing_while_loading(written, hub, bits, image_path):
    spec = Spec(8) if bits == 8 else Spec(4, 32)
    stored, on_load = load_model(written[bits]), load_model(hub, quantize=spec)
    assert stored.cfg.quantization == spec
    assert isinstance(stored.lm_head, QuantizedLinear) and stored.lm_head.kernel == on_load.lm_head.kernel
    assert torch.equal(logits_of(stored), logits_of(on_load))  # float32 source: the very same tensors
    config = json.loads((written[bits] / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "minillava-weight-only", "bits": bits,
                                             "group_size": spec.group_size}
    assert (written[bits] / "tokenizer.model").is_file()
    model, tok = load(str(written[bits]))
    from PIL import Image

    answer = generate(model, tok, Image.open(image_path), "What is in the picture?", max_new_tokens=6)
    model2, tok2 = load(str(hub), quantize=spec)
    assert answer.token_ids == generate(model2, tok2, Image.open(image_path), "What is in the picture?",
                                        max_new_tokens=6).token_ids


def test_quantized_checkpoint_bytes(written, hub):
    """int8 halves and int4 quarters the decoder's linears; the rest is unchanged (float32 here)."""
    full = sum(p.stat().st_size for p in hub.glob("*.safetensors"))
    model = load_model(hub)
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and quant.QUANTIZED.fullmatch(n))
    size8, size4 = ((written[b] / "model.safetensors").stat().st_size for b in (8, 4))
    rows = sum(m.out_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and quant.QUANTIZED.fullmatch(n))
    headers = 0.005 * full  # the files' JSON headers differ (shards, key names)
    assert abs((full - size8) - (linears * 3 - rows * 4)) < headers  # float32 -> int8, plus a float32 scale per row
    assert abs((full - size4) - (linears * 3.5 - linears / 32 * 8)) < headers  # -> 4 bits, plus 2 float32 per 32


def rewrite(src, dst, change):
    """A copy of checkpoint `src` in `dst` with its one safetensors file's header changed by `change`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    path = dst / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = change(header, data[8 + n :])
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return dst


def test_tampered_quantized_checkpoints_are_refused(written, tmp_path):
    key = "language_model.model.layers.0.mlp.up_proj"

    def float_weight(header, body):  # an int8 weight relabelled as 8-bit something else
        header[f"{key}.weight"]["dtype"] = "BOOL"
        return body

    with pytest.raises(WeightsError, match=r"up_proj.weight' is torch.bool, expected torch.int8"):
        load_model(rewrite(written[8], tmp_path / "a", float_weight))

    def int_scales(header, body):  # float32 scales read as int32
        header[f"{key}.scales"]["dtype"] = "I32"
        return body

    with pytest.raises(WeightsError, match=r"up_proj.scales' is torch.int32, expected a floating-point dtype"):
        load_model(rewrite(written[8], tmp_path / "b", int_scales))

    def rename_scales(header, body):  # the scales under another name: missing where the config wants them
        header[f"{key}.zeros"] = header.pop(f"{key}.scales")
        return body

    with pytest.raises(WeightsError, match="missing weight 'llm.layers.0.mlp.up_proj.scales'"):
        load_model(rewrite(written[8], tmp_path / "c", rename_scales))

    config = json.loads((written[4] / "config.json").read_text())
    for i, (bad, message) in enumerate([
            ({"quant_method": "bitsandbytes", "bits": 4}, "only 'minillava-weight-only'"),
            ({"quant_method": "minillava-weight-only", "bits": 3, "group_size": 32}, "bits must be 8 or 4"),
            ({"quant_method": "minillava-weight-only", "bits": 4, "group_size": 100}, "group_size must be one of"),
            ({"quant_method": "minillava-weight-only", "bits": 8, "group_size": 32}, "must be null for 8 bits"),
            ({"quant_method": "minillava-weight-only", "bits": 4, "group_size": 32, "x": 1}, "unknown key"),
            ("int4", "must be a JSON object")]):
        with pytest.raises(ConfigError, match=message):
            load_model(with_config(written[4], tmp_path / f"cfg{i}", {**config, "quantization_config": bad}))
    # group 64 said, group 32 stored: the scales' shapes disagree with the config
    said = {**config, "quantization_config": {**config["quantization_config"], "group_size": 64}}
    with pytest.raises(WeightsError, match="scales_and_zeros' has shape"):
        load_model(with_config(written[4], tmp_path / "group", said))


def with_config(src, dst, config: dict):
    """A copy of checkpoint `src` in `dst` with another config.json."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_float_checkpoint_with_integer_weights_is_refused(hub, tmp_path):
    src_header_key = "language_model.model.layers.1.self_attn.o_proj.weight"

    def as_int(header, body):  # float32 bytes relabelled int32: same length, not a float weight
        header[src_header_key]["dtype"] = "I32"
        return body

    files = sorted(hub.glob("*.safetensors"))
    single = tmp_path / "single"
    single.mkdir()
    from safetensors.torch import load_file, save_file

    state = {}
    for f in files:
        state.update(load_file(f))
    save_file(state, single / "model.safetensors")
    for f in hub.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            (single / f.name).write_bytes(f.read_bytes())
    with pytest.raises(WeightsError, match="o_proj.weight' is torch.int32, expected a floating-point dtype"):
        load_model(rewrite(single, tmp_path / "bad", as_int))


def cli(capsys, module: str, *args) -> tuple[int, str, str]:
    """`python -m module args` in this process: exit code, stdout, stderr."""
    import importlib

    main = importlib.import_module({"minillava.eval": "minillava.eval.runner"}.get(module, module)).main
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line_errors(hub, written, tmp_path, capsys):
    before = set(tmp_path.iterdir())
    code, _, err = cli(capsys, "minillava.apps.quantize", "--model", str(hub), "--out", str(tmp_path / "x"), "--bits", "8",
                       "--group-size", "32")
    assert code == 2 and "--group-size goes with --bits 4" in err
    for args, message in [
        (["--out", str(written[8]), "--bits", "8"], "exists; give a new folder"),
        (["--out", str(tmp_path / "no" / "x"), "--bits", "8"], "does not exist; create it first"),
        (["--model", str(written[8]), "--out", str(tmp_path / "y"), "--bits", "8"], "is already quantized (int8)"),
        (["--out", str(tmp_path / "z"), "--bits", "4", "--group-size", "256"], "has 128 inputs: use --group-size 128"),
    ]:
        args = args if "--model" in args else ["--model", str(hub), *args]
        code, out, err = cli(capsys, "minillava.apps.quantize", *args)
        lines = err.strip().splitlines()
        assert code == 1 and out == "" and len(lines) == 1 and message in lines[0], err
    assert set(tmp_path.iterdir()) == before  # nothing half-written, no temporary folder left
    code, _, err = cli(capsys, "minillava.generate", "--model", str(written[4]), "--image", str(tmp_path / "x.png"),
                       "--prompt", "x", "--quantize", "int8")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: ")
    code, _, err = cli(capsys, "minillava.generate", "--model", str(hub), "--image", "x.png", "--prompt", "x",
                       "--group-size", "64")
    assert code == 2 and "--group-size goes with --quantize int4" in err
    for module in ("minillava.generate", "minillava.eval", "minillava.apps.visualize", "minillava.apps.demo", "minillava.apps.quantize"):
        code, out, _ = cli(capsys, module, "--help")
        assert code == 0 and "--group-size" in out


def test_int4_group_size_fits_the_widths():
    """Without --group-size: the largest of 32, 64, 128 dividing every quantized input width (o_proj's and
    down_proj's per tensor-parallel rank); one line naming int8 when none does; a given one as it is."""
    llava7b, tiny = TextConfig(), TextConfig(hidden_size=192, intermediate_size=512, num_attention_heads=8)
    assert quant.input_widths(llava7b) == {4096, 11008} and Spec(4).fit(quant.input_widths(llava7b)) == Spec(4, 128)
    assert Spec(4).fit(quant.input_widths(tiny)) == Spec(4, 64)  # the shipped tiny model: 192 and 512
    assert quant.input_widths(llava7b, ranks=4) == {4096, 1024, 2752} and Spec(4).fit({4096, 1024, 2752}) == Spec(4, 64)
    assert Spec(4).fit({4096, 96}) == Spec(4, 32) and Spec(4, 256).fit({96}) == Spec(4, 256) and Spec(8).fit({7}) == Spec(8)
    with pytest.raises(ConfigError, match=r"^int4 needs input widths divisible by 32, but the decoder's are 80, 4096: "
                                          r"use --quantize int8$"):
        Spec(4).fit({4096, 80})


def test_generate_command_with_quantize(hub, image_path, capsys):
    """--quantize int4 alone: the group size fitted to the widths, said on stderr, the answer of giving it."""
    run = ("minillava.generate", "--model", str(hub), "--image", str(image_path), "--prompt", "What is it?",
           "--max-new-tokens", "4", "--quantize", "int4", "--json")
    code, out, err = cli(capsys, *run)
    assert code == 0, err
    group = Spec(4).fit(quant.input_widths(load_config(hub).text)).group_size
    assert f"note: --quantize int4 (group size {group}): the largest group size up to 128" in err
    code, given, err = cli(capsys, *run, "--group-size", str(group))
    assert code == 0 and "note:" not in err
    assert json.loads(out)["token_ids"] == json.loads(given)["token_ids"] and len(json.loads(out)["token_ids"]) >= 1


def test_quantize_command_fits_the_group_size(hub, tmp_path, capsys):
    """apps.quantize --bits 4 alone writes (and says) the group size that fits: 128 for the hub model's 128 / 256."""
    code, out, _ = cli(capsys, "minillava.apps.quantize", "--model", str(hub), "--out", str(tmp_path / "q"), "--bits", "4")
    assert code == 0 and "int4 (group size 128)" in out
    assert load_config(tmp_path / "q").quantization == Spec(4, 128)


def test_batched_answers_equal_one_by_one(hub, image_path):
    from PIL import Image

    from minillava.batch import generate_batch

    model, tok = load(str(hub), quantize=Spec(4, 32))
    image = Image.open(image_path)
    items = [(image, q) for q in ("What is in the picture?", "Is there a cat?", "Describe the image in detail.")]
    batched = generate_batch(model, tok, items, "globalcom2", 0.5, 6)
    for (im, q), b in zip(items, batched):
        assert b.token_ids == generate(model, tok, im, q, "globalcom2", 0.5, 6).token_ids


@pytest.mark.slow
@pytest.mark.parametrize("spec", [Spec(8), Spec(4, 32)], ids=lambda s: f"int{s.bits}")
def test_compiled_decode_equals_eager(hub, image_path, spec):
    from PIL import Image

    from minillava.batch import warm_up
    from minillava.generate import compile_steps

    model, tok = load(str(hub), quantize=spec)
    image = Image.open(image_path)
    eager = generate(model, tok, image, "What is in the picture?", "globalcom2", 0.5, 8).token_ids
    steps = compile_steps(model)
    warm_up(model, steps, tok, [(image, "What is in the picture?")], "globalcom2", 0.5, 8)
    assert generate(model, tok, image, "What is in the picture?", "globalcom2", 0.5, 8, steps=steps).token_ids == eager


# --- LLaVA-1.6-7B's widths, random weights -------------------------------------------------------------

BIG = TextConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                 num_attention_heads=32, max_position_embeddings=256, rms_norm_eps=1e-5)


@pytest.mark.slow
@torch.inference_mode()
def test_error_at_7b_widths():
    """One decoder layer and lm_head at Vicuna-7B's widths, bfloat16 activations: each quantized linear
    equals the reference; the layer's output error against bfloat16 and the greedy (top-1) agreement of
    the logits are recorded (printed at the end of the run; a random model's logits have near-ties, so
    agreement says more compared between int8 and int4 than alone), and int8 must beat int4 on both."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.llm, model.lm_head = Decoder(BIG), torch.nn.Linear(4096, 32000, bias=False)
    for i, (name, p) in enumerate(model.named_parameters()):
        p.copy_(weights(*p.shape, seed=i) if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    model = model.to(torch.bfloat16).eval()
    x = (torch.randn(1, 64, 4096) * 0.5).to(torch.bfloat16)
    model.llm.setup_rope(64)
    pos = torch.arange(64)

    def run(m):
        h = m.llm.layers[0](x, *m.llm.positions(pos), pos, True)
        return h, m.lm_head(m.llm.norm(h)).float()

    h0, logits0 = run(model)
    found = {}
    for spec in (Spec(8), Spec(4, 128)):
        reference = {n: reference_weight(quant.quantize(m.weight, spec, torch.bfloat16), spec)
                     for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        q = quant.quantize_model(__import__("copy").deepcopy(model), spec)
        for n, w in reference.items():  # each linear against the reference, four rows of activations
            layer = q.get_submodule(n)
            inp = torch.randn(4, layer.in_features).to(torch.bfloat16)
            ref = inp.float() @ w.t()
            assert (layer(inp).float() - ref).norm() / ref.norm() < 2e-2, n
        h, logits = run(q)
        layer_error = ((h.float() - h0.float()).norm() / (h0.float() - x.float()).norm()).item()  # of the layer's update
        agree = (logits.argmax(-1) == logits0.argmax(-1)).float().mean().item()
        conftest.QUANT.append((f"7B widths, {spec.name}: layer update error vs bfloat16", layer_error))
        conftest.QUANT.append((f"7B widths, {spec.name}: greedy agreement of 64 positions' logits", agree))
        found[spec.bits] = layer_error, agree
    assert found[8][0] < found[4][0] and found[8][1] >= found[4][1]


@pytest.mark.slow
@torch.inference_mode()
def test_int8_equals_transformers_torchao(tmp_path):
    """transformers' own weight-only int8 (TorchAoConfig(Int8WeightOnlyConfig()), torchao's per-channel
    int8) on a LlamaForCausalLM at 7B widths (one layer): the per-row scales agree to rounding, the
    integers but for a small share one step apart, and the logits are close (all recorded)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import LlamaConfig, LlamaForCausalLM, TorchAoConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                      num_attention_heads=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
                                          dtype=torch.bfloat16, device_map="cpu").eval()
    full = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    w = full.model.layers[0].mlp.up_proj.weight.clone()
    quant.quantize_model(full.model, Spec(8))  # its names: layers.N.* (lm_head apart)
    full.lm_head = QuantizedLinear.from_weight(full.lm_head.weight, Spec(8))
    theirs, mine = hf.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj
    # both scale each row by its largest magnitude; torchao's float32 scale and ours, stored in bfloat16 and
    # computed as amax / 127, differ by rounding only
    their_s = theirs.scale.flatten().float()
    rel = ((their_s - mine.scales.float()).abs() / their_s).max().item()
    conftest.QUANT.append(("7B widths, int8: largest relative scale difference from torchao's", rel))
    assert rel < 0.01
    ours_q, their_q = quant.quantize(w, Spec(8), torch.bfloat16)["weight"].float(), theirs.qdata.float()
    differ = ours_q != their_q  # rounding of the scales moves a value near a half-way point by one
    assert differ.float().mean() < 0.01 and ((ours_q - their_q).abs() <= 1).all()
    conftest.QUANT.append(("7B widths, int8: share of integers rounded apart from torchao's", differ.float().mean().item()))
    ids = torch.randint(0, 32000, (1, 32))
    a, b = hf(ids).logits.float(), full(ids).logits.float()
    conftest.QUANT.append(("7B widths, int8: logits vs transformers+torchao int8 (max abs)", (a - b).abs().max().item()))
    conftest.QUANT.append(("7B widths, int8: greedy agreement with transformers+torchao int8",
                           (a.argmax(-1) == b.argmax(-1)).float().mean().item()))



def test_readme_memory_columns_of_the_7b():
    """README's int8 / int4 columns for Vicuna-7B: the model built on the meta device, its decoder's linears
    and lm_head swapped for the storage form, every other tensor in bfloat16 (docs/checkpoints.md)."""
    from minillava.config import KNOWN_TOWERS, LlavaConfig
    from minillava.model import Llava

    text = TextConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=4096)
    sizes = []
    for spec in (None, Spec(8), Spec(4, 128)):
        with torch.device("meta"):
            model = Llava(LlavaConfig(vision=KNOWN_TOWERS["openai/clip-vit-large-patch14-336"], text=text))
            model = model.to(torch.bfloat16)
            if spec:
                quant.swap_linears(model, spec)
        sizes.append(round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9, 1))
    assert sizes == [14.1, 7.5, 4.4]


def test_a_failed_write_leaves_nothing(hub, tmp_path, capsys, monkeypatch):
    """The disk full (or removed) while writing, or a folder this user may not write in: one error line,
    and neither the output nor the temporary folder beside it is left."""
    from minillava.apps import quantize as app

    def disk_full(path, plan):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app, "write_safetensors", disk_full)
    code, out, err = cli(capsys, "minillava.apps.quantize", "--model", str(hub), "--out", str(tmp_path / "q"), "--bits", "8")
    assert (code, out) == (1, "") and err.strip().splitlines() == [f"error: cannot write {tmp_path / 'q'}: No space left on device"]
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(app.os, "access", lambda path, mode: False)
    code, out, err = cli(capsys, "minillava.apps.quantize", "--model", str(hub), "--out", str(tmp_path / "q"), "--bits", "8")
    assert code == 1 and err.strip().splitlines() == [f"error: --out {tmp_path / 'q'}: no permission to write in {tmp_path}"]
    assert list(tmp_path.iterdir()) == []
