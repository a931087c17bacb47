"""Every command's refusal of a flag value it cannot use, before anything is loaded (issue 32, the
coverage audit: these are the user's mistakes that no other test made): exit code 2 with argparse's
usage and one `error:` line naming the flag, or, for `--device cuda` on a machine without CUDA, exit
code 1 with one `error:` line. Nothing is loaded, so each case costs milliseconds.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from tests.test_quantize import cli

USAGE = [  # (module, arguments, what the error line says)
    ("minillava.generate", ["--image", "x.png", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("minillava.apps.demo", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("minillava.apps.demo", ["--port", "70000"], "--port must be in 1..65535"),
    ("minillava.apps.demo", ["--port", "0"], "--port must be in 1..65535"),
    ("minillava.eval.synthetic", ["--out", "x", "--n", "0"], "--n must be at least 1"),
    ("minillava.eval", ["synthetic", "--score-only"], "--score-only needs --answers FILE.jsonl (or --output)"),
    ("minillava.eval", ["synthetic"], "--output FILE.jsonl is required"),
    ("minillava.eval", ["synthetic", "--output", "a.jsonl", "--answers", "b.jsonl"], "--answers goes with --score-only"),
    ("minillava.eval", ["synthetic", "--output", "a.jsonl", "--limit", "-1"], "--limit must be >= 0"),
    ("minillava.eval", ["synthetic", "--output", "a.jsonl", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("minillava.eval", ["synthetic", "--output", "a.jsonl", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
]


@pytest.mark.parametrize("module, args, message", USAGE, ids=[f"{m} {' '.join(a[-2:])}" for m, a, _ in USAGE])
def test_flag_values_are_refused(capsys, tmp_path, monkeypatch, module, args, message):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and relative names resolve here
    code, out, err = cli(capsys, module, *args)
    assert code == 2 and out == "", err
    assert f"error: {message}" in err.strip().splitlines()[-1], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("module, args", [
    ("minillava.apps.demo", []),
    ("minillava.apps.visualize", ["--image", "x.png", "--out", "x.png"]),
    ("minillava.eval", ["synthetic", "--output", "a.jsonl"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_cuda_asked_without_cuda(capsys, tmp_path, monkeypatch, module, args):
    monkeypatch.chdir(tmp_path)
    # the demo imports Gradio (its extra) before it looks at --device: a stand-in spares 15 s of import
    monkeypatch.setitem(sys.modules, "gradio", sys.modules.get("gradio") or types.ModuleType("gradio"))
    code, out, err = cli(capsys, module, *args, "--device", "cuda")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == ["error: --device cuda was asked for but CUDA is not available here; use --device cpu"]
    assert list(tmp_path.iterdir()) == []
