"""What the coverage audit of issue 32 found untested, tested directly (one section per module):

- the refusals of the Python API that no CLI path produces: each guards a contract of a public function
  (`globalcom2.compress_image`, a method's schedule, the tower, the decoder, the tiler, the batch
  engine) against a caller's mistake, with a ValueError (or the error its docstring names) that says
  what is wrong, instead of a wrong answer or an error from deep inside torch. The CLI and the property
  tests (tests/test_props_*.py) never get there: they build these inputs correctly;
- what a checkpoint or the file system can do that the hand-made checkpoints never did: races and
  disk failures staged (minillava/trust.py), Qwen2's tokenizer paths, tokenizer_config.json's and the
  chat template's less common forms, keys saved twice.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageFont

import globalcom2
from globalcom2 import compress_image, visualize as vis
from globalcom2.fastv import FastV
from globalcom2.pdrop import stage_ratios
from globalcom2.probes import hidden_states_needed
from globalcom2.scoring import region_sums
from globalcom2.scores import tile_scores
from globalcom2.sparsevlm import stage_shares
from tests.peers_cases import peer_case
from tests.test_globalcom2 import hand_image
from tests.test_visualize import fake_result

BAD_RATIOS = (0.0, -0.1, 1.5, math.nan)


# --- globalcom2.compress_image ----------------------------------------------------------------------------

def test_scales_only_for_the_methods_that_have_crop_ratios():
    image, _ = peer_case((2, 2), (100, 60), 4, 0)
    with pytest.raises(ValueError, match="scales do not apply to method 'fastervlm'"):
        compress_image(image, "fastervlm", 0.5, scales=[1.0] * 4)
    with pytest.raises(ValueError, match="scales do not apply to method 'none'"):
        compress_image(hand_image(), "none", 1.0, scales=[1.0] * 4)
    with pytest.raises(ValueError, match=r"scales must have one value per crop \(4\), got 3"):
        compress_image(hand_image(), "globalcom2", 0.5, scales=[1.0] * 3)


def test_peer_probes_must_fit_the_grid():
    image, _ = peer_case((2, 2), (100, 60), 4, 0)
    image.probes = {**image.probes, ("cls_attn", -2): image.probes["cls_attn", -2][:3]}  # a tile short
    with pytest.raises(ValueError, match=r"probes must be \(1 \+ 4 tiles, \.\.\., 1 \+ 16 tokens"):
        compress_image(image, "fastervlm", 0.5)


def test_prumerge_needs_the_projector():
    image, _ = peer_case((2, 2), (100, 60), 4, 0)
    image.project = None
    with pytest.raises(ValueError, match="ImageFeatures.project must be given"):
        compress_image(image, "prumerge+", 0.5)


@pytest.mark.parametrize("change, message", [
    ({"grid": (0, 2)}, r"grid \(0, 2\) and size .* must be positive"),
    ({"size": (100, 0)}, r"must be positive"),
    ({"thumb": torch.zeros(16)}, r"thumb must be \(P, D\), got \(16,\)"),
    ({"thumb": torch.zeros(15, 3)}, "thumbnail token count 15 is not a square"),
    ({"area": (0, 9, 0, 8)}, r"unpadded area \(0, 9, 0, 8\) is not a rectangle inside the 8 x 8 crop grid"),
    ({"area": (3, 2, 0, 8)}, "is not a rectangle"),
])
def test_image_shapes_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        compress_image(dataclasses.replace(hand_image(), **change), "globalcom2", 0.5)


def test_given_scores_must_be_finite():
    """A NaN in the thumbnail's scores would make every crop's budget NaN (int(NaN) raises deep in numpy)."""
    image = hand_image()
    image.thumb_scores = image.thumb_scores.clone()
    image.thumb_scores[3] = math.nan
    with pytest.raises(ValueError, match="thumbnail \\[CLS\\] scores contain NaN or inf"):
        compress_image(image, "globalcom2", 0.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        region_sums(torch.tensor([0.0, 1.0, math.inf, 2.0]), (2, 2))


def test_a_score_needs_its_probe():
    image, _ = peer_case((2, 2), (100, 60), 4, 0)
    image.thumb_scores = image.crop_scores = None  # computed from the probes, which lack layer -1's logits
    with pytest.raises(ValueError, match=r"score 'cls_logits' needs the tower probe \('cls_logits', -1\)"):
        compress_image(image, "globalcom2", 0.5)
    with pytest.raises(ValueError, match="needs the tower probe"):
        tile_scores({}, "similarity", True)


def test_features_probe_is_layer_0_only():
    assert hidden_states_needed((("features", 0),), 4) == (3,)  # hidden state -2 of 0 .. 4
    with pytest.raises(ValueError, match=r"the features probe is \('features', 0\), got \('features', -1\)"):
        hidden_states_needed((("features", -1),), 4)


# --- the methods that prune elsewhere: their ratio and name -----------------------------------------------

@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_schedule_ratios_are_checked(ratio):
    for call in (lambda: FastV.from_ratio(5, 20, ratio), lambda: stage_ratios(ratio), lambda: stage_shares(ratio)):
        with pytest.raises(ValueError, match=r"retention ratio must be in \(0, 1\]"):
            call()


def test_sparsevlm_shares_end_at_one():
    """The last segment of the piecewise-linear shares reaches (1, 1): r = 1 keeps everything."""
    assert stage_shares(1.0) == [1.0, 1.0, 1.0]
    assert stage_shares(64 / 576) == pytest.approx([66 / 576, 30 / 576, 17 / 576])


def test_unknown_method_names_every_method():
    with pytest.raises(ValueError) as error:
        globalcom2.method("fastw")
    assert all(name in str(error.value) for name in globalcom2.METHODS)


# --- globalcom2.visualize ---------------------------------------------------------------------------------

def test_font_falls_back_to_the_bitmap_font(monkeypatch):
    """Pillow < 10.1 has no `size` argument (TypeError); without FreeType a sized font fails (OSError)."""
    bitmap = ImageFont.load_default()
    calls = []

    def old_pillow(size=None):
        calls.append(size)
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    assert vis.font(14) is bitmap and calls == [14, None]


def test_draw_refuses_inputs_of_another_grid():
    grid, size, side, tile = (2, 2), (112, 112), 4, 56
    scores, result, kw = fake_result(grid, size, side)
    picture = Image.new("RGB", size)
    with pytest.raises(ValueError, match=r"crop masks of shape \(8, 8\) do not fit grid \(3, 2\)"):
        vis.draw(picture, (3, 2), size, tile, scores, result, "globalcom2", 0.25, **kw)
    with pytest.raises(ValueError, match="15 thumbnail scores for 16 tokens per tile"):
        vis.draw(picture, grid, size, tile, scores[:15], result, "globalcom2", 0.25, **kw)


# --- minillava: the tower, the tiler, the layout, the decoder, the batch engine ---------------------------

@pytest.fixture(scope="module")
def shipped():
    from minillava import generate as gen

    return gen.load(gen.DEFAULT_MODEL)


def test_tower_contracts(shipped):
    from minillava.clip import Tower
    from minillava.model import TOWERS

    model, _ = shipped
    cfg = model.cfg.vision
    with pytest.raises(ValueError, match=r"vision hidden_act 'swish' is not supported \("):
        TOWERS[cfg.model_type](dataclasses.replace(cfg, hidden_act="swish"))
    with pytest.raises(NotImplementedError):  # the base class's: each tower (CLIP, SigLIP) embeds its own way
        Tower.embed(model.vision, torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    n = len(model.vision.encoder.layers)
    with pytest.raises(ValueError, match=rf"hidden states \(-2, {n + 1}\) asked of a tower with {n} layers"):
        model.vision(torch.zeros(1, 3, cfg.image_size, cfg.image_size), (-2, n + 1))
    siglip = TOWERS["siglip"](dataclasses.replace(cfg, model_type="siglip", hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match="a siglip tower has no \\[CLS\\] token, so no \\[CLS\\] query to read"):
        siglip.query_key(-1, torch.zeros(1, 4, cfg.hidden_size))


def test_tiler_contracts():
    from minillava.anyres import select_best_resolution, tile_image

    with pytest.raises(ValueError, match=r"no usable pinpoint for an image of size \(10, 10\) among \[\]"):
        select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match="cannot tile an empty image of size 0x5"):
        tile_image(Image.new("RGB", (0, 5)), [(56, 56)], 56, (0.5,) * 3, (0.5,) * 3)


def test_layout_and_schedule_contracts():
    from minillava.layout import pack
    from minillava.schedule import check_schedule

    grid, newline = torch.zeros(4, 4, 2), torch.zeros(2)
    with pytest.raises(ValueError, match="a kept subset is packed at full resolution: pass size only without keep"):
        pack(torch.zeros(1, 2), grid, (0, 4, 0, 4), newline, keep=torch.ones(4, 4, dtype=torch.bool), size=(2, 2))
    stage = SimpleNamespace(layer=1, inside=True)  # inside a layer: the tower's and the decoder's (FiCoCo-L)
    check_schedule([stage], 4)
    with pytest.raises(ValueError, match="pruned in a prefill of one prompt"):
        check_schedule([stage], 4, shared=False)
    with pytest.raises(ValueError, match=r"each once, ascending; got \[2, 1\]"):
        check_schedule([SimpleNamespace(layer=2), stage], 4)


def test_decoder_and_model_contracts(shipped):
    from minillava import batch, llama

    model, tokenizer = shipped
    assert llama.same_device(torch.device("cpu"), torch.device("cpu"))
    assert not llama.same_device(torch.device("cpu"), torch.device("cuda", 0))
    assert llama.same_device(torch.device("cuda", 1), torch.device("cuda", 1))  # both indexed: torch.cuda is not asked
    assert not llama.same_device(torch.device("cuda", 0), torch.device("cuda", 1))
    fresh = llama.Decoder(model.cfg.text)
    fresh.setup_rope(8)  # RoPE for full-sequence passes (training), no KV cache
    x = torch.zeros(1, 1, model.cfg.text.hidden_size)
    with pytest.raises(RuntimeError, match="decoding past the prompt needs a KV cache: call Decoder.setup_cache first"):
        fresh(x, torch.tensor([3]))
    with pytest.raises(ValueError, match="2 text chunks for 0 images: expected one more chunk than images"):
        model.prompt_embeds([[1], [2]], [])
    with pytest.raises(ValueError, match="2 max_new_tokens for 1 items"):
        batch.generate_batch(model, tokenizer, [(Image.new("RGB", (8, 8)), "?")], "none", 1.0, [4, 4])


# --- minillava.trust: the races and disk failures a test has to stage -------------------------------------

def test_file_races_and_failures(tmp_path, monkeypatch):
    import errno
    import os

    from minillava import trust
    from minillava.trust import ConfigError, WeightsError

    small = tmp_path / "config.json"
    small.write_bytes(b"{}" * 8)
    with pytest.raises(ConfigError, match=r"config.json: 16 bytes, more than the 10 such a file can sensibly have"):
        trust.read_regular(small, 10)
    assert trust.map_file(small, 16)[:] == b"{}" * 8
    # a file that changed since its header was read (issue 32's audit: this raised "mmap closed or invalid")
    with pytest.raises(WeightsError, match=r"changed while loading \(16 bytes, its header said 20\)"):
        trust.map_file(small, 20)
    loop = tmp_path / "model.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(WeightsError, match="model.safetensors: cannot resolve it"):
        trust.inside(tmp_path, "model.safetensors", "the index")

    # between open_regular's check and its open, the file goes, or a folder takes its place
    checked = trust.check_regular
    monkeypatch.setattr(trust, "check_regular", lambda path, error, what: None)
    with pytest.raises(ConfigError, match=r"cannot open file .*gone.json: No such file or directory"):
        trust.open_regular(tmp_path / "gone.json")
    with pytest.raises(ConfigError, match=r"file .*: not a regular file but a directory"):
        trust.open_regular(tmp_path)
    monkeypatch.setattr(trust, "check_regular", checked)

    class FailingDisk:  # the read fails after a good open (EIO: a bad sector, a network file system gone)
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def read(self, n):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    opened = trust.open_regular
    monkeypatch.setattr(trust, "open_regular", lambda path, error: FailingDisk(opened(path, error)))
    with pytest.raises(ConfigError, match=r"config.json: cannot read it \(Input/output error\)"):
        trust.read_regular(small, 100)


# --- minillava.tokenizer: Qwen2's byte-level BPE (OneVision) and tokenizer_config.json --------------------

def test_byte_bpe_tokenizer(tmp_path):
    from minillava.tokenizer import ByteBPETokenizer, PromptError, read_added_tokens
    from minillava.trust import WeightsError
    from tests import tiny

    from tokenizers import Tokenizer as HFTokenizer

    path = tiny.train_qwen_tokenizer(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(path))
    hf.add_tokens(["<image>"])  # an added token that is not special, as transformers' <image> placeholder
    hf.save(str(path))
    tok = ByteBPETokenizer(path)
    image = hf.token_to_id("<image>")
    piece = next(p for p in tok.full.get_vocab() if p.isalpha() and len(p) > 1)  # a BPE piece, not an added token
    assert tok.token_id(piece) == tok.full.token_to_id(piece) and tok.token_id("<image>") == image
    assert tok.token_id("no such piece") is None
    with pytest.raises(PromptError, match=r"the prompt has an unpaired surrogate \\udc80 at character 3, which is not text"):
        tok.encode("abc\udc80")
    # an added token that is not special (tokenizer_config.json's <image>) decodes to its text, a special one to nothing
    im_start = tok.token_id("<|im_start|>")
    assert tok.decode([*tok.encode("a b"), image, im_start]) == "a b<image>"
    with pytest.raises(NotImplementedError, match="use encode_question"):
        tok.encode_prompt("USER: <image>\nhi")
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"added_tokens_decoder": {"x1": {"content": "<a>"}}}')
    with pytest.raises(WeightsError, match="added_tokens_decoder entry 'x1' is not an id -> token object"):
        read_added_tokens(tmp_path)


# --- minillava.conversation: which template a checkpoint is asked in --------------------------------------

def test_template_evidence(tmp_path):
    from minillava.conversation import chat_template_text, choose_template, template_from_name
    from minillava.trust import ConfigError

    # run_llava.py's name rule, on the folder's name (parent_name for a checkpoint-N folder)
    names = {"llava-llama-2-13b-chat": None, "llava-v1.6-34b": "chatml_direct", "llava-v1.6-mistral-7b": "mistral_instruct",
             "llava-v1.6-vicuna-7b": "llava_v1", "something-else": None}
    assert {n: template_from_name(tmp_path / n) for n in names} == names
    assert template_from_name(tmp_path / "llava-v1.6-34b-run" / "checkpoint-200") == "chatml_direct"
    # tokenizer_config.json may hold a list of named templates: all of them are read
    model = tmp_path / "llava-v1.6-vicuna-7b"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "A chat between a curious user ... USER: x ASSISTANT:"}, 3]}')
    assert chat_template_text(model) == "A chat between a curious user ... USER: x ASSISTANT:"
    # its chat template says vicuna_v1, its name and its decoder llava_v1: one family, the chat template's wins
    assert choose_template(model, "original", "llama", 32000, False).name == "vicuna_v1"
    with pytest.raises(ConfigError, match="--conv-template 'vicuna' is not a template; choose one of "):
        choose_template(model, "original", "llama", 32000, False, override="vicuna")


def test_checkpoint_keys(tmp_path):
    """Buffers some checkpoints carry (position_ids, rotary_emb.inv_freq) are skipped; one weight saved
    under two layouts' names (a file merged from two conversions) is refused rather than one picked."""
    from safetensors.torch import save_file

    from minillava.trust import WeightsError
    from minillava.weights import read_layout

    path = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2),
               "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(1)}, path)
    assert list(read_layout([path])) == ["llm.embed_tokens.weight"]
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2), "language_model.model.embed_tokens.weight": torch.zeros(2, 2)},
              path)
    with pytest.raises(WeightsError, match=r"'model.embed_tokens.weight' in model.safetensors duplicates "
                       r"'language_model.model.embed_tokens.weight'|'language_model.model.embed_tokens.weight' in "
                       r"model.safetensors duplicates 'model.embed_tokens.weight'"):
        read_layout([path])
