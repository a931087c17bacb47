"""scripts/bench.py: the quick mode's functions on tiny shapes (no timed assertions), and the cost formulas by hand."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minillava.config import TextConfig, VisionConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def tiny_plan(bench):
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14)
    text = TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=4096)
    quick = bench.make_plan("quick")
    return dataclasses.replace(
        quick, vision=vision, tiles=2, text=text, prefill_lengths=(16, 32), decode_prompt=8, new_tokens=4,
        repeats={k: 1 for k in quick.repeats}, matmul_n=64, copy_bytes=1 << 20, ckpt_vision=vision, ckpt_text=text,
        ckpt_shards=2, compile=False,
    )


def test_tiny_run_writes_every_row_json_and_png(bench, tmp_path):
    results = bench.run(tiny_plan(bench), tmp_path, log=lambda msg: None)
    rows = {row["key"]: row for row in results["rows"]}
    from benchkit import llamacpp  # on sys.path once bench.py is loaded

    assert set(rows) == {"1", "2", "3a", "3b", "4", "5", "6", "7", "8", "9", "10", "11a", "11b", "12a", "12b", "12c", "12d",
                         "13", *(("14a", "14b", "14c") if llamacpp.available() else ("14",))}
    if "14" in rows:  # without the llamacpp extra: one row that says so
        assert rows.pop("14")["note"] == llamacpp.MISSING
    for row in rows.values():
        assert row["ratio"] is not None and row["ratio"] > 0, row
        assert isinstance(row["passed"], bool), row
    assert rows["9"]["note"].count("float32") >= 1  # the float32 load is reported apart

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["plan"]["representative"] is False
    assert [r["key"] for r in saved["rows"]] == [r["key"] for r in results["rows"]]
    assert len(saved["theory"]["rows"]) == 2 * len(bench.RATIOS)
    # the decoder-side methods, every layer counted: FastV at r keeps round(2928 r) from layer 2 of 32 on
    fastv = {(t["model"], t["r"]): t for t in saved["theory"]["decoder"] if t["method"] == "fastv"}
    seven = fastv["LLaVA-NeXT-7B", 0.25]
    assert seven["stage_layers"] == [2] and seven["last_share"] == round(2928 * 0.25) / 2928
    assert seven["mean_share"] == (2 * 2928 + 30 * round(2928 * 0.25)) / (32 * 2928)
    pdrop = {(t["model"], t["r"]): t for t in saved["theory"]["decoder"] if t["method"] == "pdrop"}
    assert pdrop["LLaVA-NeXT-13B", 0.1]["stage_layers"] == [10, 20, 30]
    # FiCoCo-L merges inside layers 5 .. 30 of 32: each one's MLP counted after its merge
    ficocol = {(t["model"], t["r"]): t for t in saved["theory"]["decoder"] if t["method"] == "ficoco-l"}
    assert ficocol["LLaVA-NeXT-7B", 0.5]["stage_layers"] == list(range(5, 31))
    # the tower methods: FiCoCo-V at r = 0.5 merges 26 of each tile's tokens in layers 12 .. 22 (290 left of 576)
    ficoco = {(t["model"], t["r"]): t for t in saved["theory"]["tower"] if t["method"] == "ficoco"}
    assert ficoco["LLaVA-NeXT-7B", 0.5]["image_tokens"] == 5 * 290
    assert ficoco["LLaVA-NeXT-7B", 0.5]["tower_tflops"] < ficoco["LLaVA-NeXT-7B", 0.5]["whole_tower_tflops"]
    assert saved["token_counts"]["none"] == 2928  # 576 + 48 rows of (48 tokens + newline)
    text = (tmp_path / "bench.md").read_text()
    assert "NOT representative" in text and "| 9 |" in text and "LLaVA-NeXT-13B" in text
    with Image.open(tmp_path / "bench.png") as png:
        assert png.format == "PNG" and png.width == 1200


def test_prefill_flops_of_one_layer_by_hand(bench):
    # d = 4, f = 8, 2 heads of 2, vocab 10, T = 3 tokens, one layer.
    spec = bench.LlmSpec("hand", layers=1, hidden=4, intermediate=8, heads=2, kv_heads=2, vocab=10)
    flops = bench.prefill_flops(spec, 3)
    # q, k, v, o: 4 matrices 4 x 4; gate, up, down: 3 matrices 4 x 8 -> 64 + 96 = 160 MACs a token, x 3 tokens x 2
    assert flops["linear"] == 2 * 3 * (4 * 16 + 3 * 32) == 960
    # Q K^T and A V over the full 3 x 3 square: 9 pairs x 2 heads x 2 dims, 2 matmuls, 2 FLOPs a MAC
    assert flops["attention"] == 2 * 2 * 9 * 2 * 2 == 144
    assert flops["lm_head"] == 2 * 4 * 10 == 80  # the last position only
    assert flops["total"] == 1184
    # causal: 6 of the 9 pairs
    assert bench.prefill_flops(spec, 3, causal=True)["attention"] == 2 * 2 * 6 * 2 * 2 == 96
    # K and V, one layer, 3 positions x 4 values, 2 bytes each
    assert bench.kv_cache_bytes(spec, 3) == 2 * 3 * 4 * 2 == 48


def test_paper_figures_follow_from_r_times_2880_tokens(bench):
    spec = bench.LLAVA_7B
    for r, (tflops, mb) in bench.PAPER_7B.items():
        tokens = round(r * 2880)
        assert bench.prefill_flops(spec, tokens)["total"] / 1e12 == pytest.approx(tflops, rel=0.02)
        if r < 1:  # the paper's 100% KV figure (1536 MB) is the odd one out, see explain()
            assert bench.kv_cache_bytes(spec, tokens) / 1e6 == pytest.approx(mb, rel=0.01)
    t = 1234
    assert bench.solve_tokens(spec, bench.prefill_flops(spec, t)["total"]) == pytest.approx(t, abs=0.01)


def test_token_counts_of_a_672_image(bench):
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(1))
    counts = bench.image_token_counts(scores[0], scores[1:], (2, 2), (672, 672))
    assert counts["none"] == 2928
    assert counts["globalcom2@0.25"] < counts["globalcom2@0.5"] < counts["globalcom2@1"] <= counts["none"]
    assert counts["globalcom2@0.25"] >= 144 + 48  # thumbnail int(576 r) and the 48 newlines at least


def test_sides_alternate_after_one_warm_up_each(bench):
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or 1.0) for name in "AB"}
    samples = bench.alternate(sides, 3)
    assert calls == ["A", "B"] + ["A", "B"] * 3
    assert samples == {"A": [1.0] * 3, "B": [1.0] * 3}


def test_targets_and_arguments(bench):
    assert bench.check(0.5, "<= 0.6") is True and bench.check(1.4, ">= 1.5") is False
    assert bench.check(None, "<= 1.0") is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "vision,bogus"])


def test_an_interrupted_run_still_writes_what_it_measured(bench, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what main's SIGTERM handler raises

    monkeypatch.setattr(bench, "bench_decode", killed)
    results = bench.run(tiny_plan(bench), tmp_path, sections=("compression", "prefill", "decode"), log=lambda m: None)
    assert results["interrupted"] is True
    assert [row["key"] for row in results["rows"]] == ["3a", "3b", "5", "7"]
    assert "**Interrupted**" in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["interrupted"] is True
