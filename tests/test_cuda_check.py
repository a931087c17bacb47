"""scripts/cuda_check.py on the CPU: its checks run (small sizes) and the table and the summary line come
out; a check that fails gives a failed row, its traceback on stderr and a non-zero exit, the others still
run; the device is synchronised after each check; without CUDA and without --device cpu it refuses in one
line. What it checks on CUDA cannot be run here."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cuda_check.py"


def run(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by check: [result, pass/fail, detail]."""
    lines = stdout.strip().splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["check", "result", "pass/fail", "detail"]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in (line.split(" | ") for line in lines[1:-1])}


@pytest.fixture
def cuda_check(monkeypatch):
    """The script as a module (its checks callable in this process)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("cuda_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_one_error_line():
    proc = run()
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CUDA is not available") and "--device cpu" in lines[0]


def test_unknown_check_is_a_usage_error():
    proc = run("--device", "cpu", "--only", "decoders,nope")
    assert proc.returncode == 2 and "unknown check nope" in proc.stderr and "Traceback" not in proc.stderr


DECODER_ROWS = ["default dtype", "greedy mha float32", "greedy gqa float32", "padded gqa", "greedy qwen2 float32",
                "padded qwen2"]


def test_fast_checks_on_cpu(tmp_path):
    """The checks that compile nothing, and the JSON file (about 15 s; the others are in the slow test):
    each decoder kind's greedy ids equal transformers' (float32: no near-tie to excuse), a padded batch
    gives each row its own ids, attention and sampling agree with torch's references."""
    out = tmp_path / "check.json"
    proc = run("--device", "cpu", "--quick", "--only", "decoders,attention,sampling", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert list(table) == [*DECODER_ROWS, "attention float32", "sampling"]
    assert all(cells[1] == "pass" for cells in table.values()), proc.stdout
    assert all(table[f"greedy {kind} float32"][0] == "ids equal" for kind in ("mha", "gqa", "qwen2"))
    assert table["sampling"][0] == "100/100 draws = torch.multinomial"
    saved = json.loads(out.read_text())
    assert saved["dtype"] == "float32" and [r["check"] for r in saved["rows"]] == list(table)
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("cuda_check: 8/8 passed in ") and "on cpu, float32, torch" in summary
    assert saved["summary"] == summary


def test_a_failing_check_fails_alone_with_its_traceback(cuda_check, monkeypatch, capsys):
    """A check that raises gives one failed row and its traceback on stderr; the checks after it run;
    the device is synchronised after every check (so an asynchronous CUDA error lands in its own row);
    the summary names the failure and the exit code is 1."""
    order = []

    def broken(run):
        order.append("sampling")
        raise ValueError("the kernel said no")

    def fine(run):
        order.append("attention")
        return [cuda_check.Row("attention float32", "fine", True)]

    monkeypatch.setitem(cuda_check.CHECKS, "sampling", broken)
    monkeypatch.setitem(cuda_check.CHECKS, "attention", fine)
    monkeypatch.setattr(cuda_check, "sync", lambda device: order.append("sync"))
    assert cuda_check.main(["--device", "cpu", "--only", "sampling,attention"]) == 1
    out, err = capsys.readouterr()
    table = rows(out)
    assert table["sampling"][:2] == ["error", "FAIL"] and "ValueError: the kernel said no" in table["sampling"][2]
    assert table["attention float32"][1] == "pass"
    assert "Traceback (most recent call last)" in err and "raise ValueError(\"the kernel said no\")" in err
    assert order == ["sampling", "attention", "sync"]  # a check that raised never reached its sync
    assert out.strip().splitlines()[-1].startswith("cuda_check: 1/2 passed (FAILED: sampling) in ")


def test_checks_judge_what_they_measure(cuda_check):
    """No row is passed unconditionally: each check's rows come from its measurements (the int4 row once
    read `ok = True`). Here: the int4 layer row fails when its kernel's output is wrong."""
    run = cuda_check.Run(torch.device("cpu"), torch.float32, (torch.float32,), cuda_check.QUICK, Path("."))
    assert cuda_check.layer_row(run, cuda_check.Spec(4, 128))[0].ok
    real = cuda_check.QuantizedLinear.forward
    try:
        cuda_check.QuantizedLinear.forward = lambda self, x: 1.05 * real(self, x)  # 5% off
        assert not cuda_check.layer_row(run, cuda_check.Spec(4, 128))[0].ok
    finally:
        cuda_check.QuantizedLinear.forward = real


def test_tensor_parallel_row_says_why_it_did_not_run(cuda_check, tmp_path):
    run = cuda_check.Run(torch.device("cpu"), torch.float32, (torch.float32,), cuda_check.QUICK, tmp_path)
    row, = cuda_check.check_tensor_parallel(run)
    assert (row.check, row.result, row.ok) == ("tensor-parallel", "not run: on the CPU", True)


@pytest.mark.slow
def test_tensor_parallel_row_on_gloo(cuda_check, tmp_path):
    """The row two GPUs run, on the CPU: the same worker and judgement over gloo (about 40 s)."""
    run = cuda_check.Run(torch.device("cpu"), torch.float32, (torch.float32,), cuda_check.QUICK, tmp_path)
    row = cuda_check.tensor_parallel_row(run, "cpu")
    # per rank 21 cases (llama, mistral-mqa, qwen2 x 5 methods, internvl x 3, llama-int8 x 2, llama-int4) + 5 batches
    assert row.ok and row.result == "52/52 ids = one process", row
    assert "2 ranks over gloo" in row.detail and "llama, mistral-mqa, qwen2, internvl, llama-int8, llama-int4" in row.detail


@pytest.mark.slow
def test_whole_script_on_cpu():
    """Every check at the quick sizes (8 to 12 minutes on 2 shared cores: most of it compiling)."""
    proc = run("--device", "cpu", "--quick", timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert list(table) == ["gpu-tests", *DECODER_ROWS, "attention float32", "sampling", "compile", "compile-batch",
                           "batch", "prefill", "decode", "int8-layer", "int4-layer", "int8", "int4", "second-gpu",
                           "tensor-parallel"]
    assert "skipped" in table["gpu-tests"][0]  # no accelerator here
    assert all(cells[1] == "pass" for cells in table.values()), proc.stdout
    for check in ("compile", "compile-batch"):  # the README's command and a batch of 8: nothing after warm-up
        assert table[check][0] == "0 compiles, 0 recordings after warm-up"
    assert "ids equal to eager 6/6" in table["compile"][2] and "max_new_tokens 512" in table["compile"][2]
    assert "ids equal to eager 16/16" in table["compile-batch"][2]
    assert "answers identical" in table["batch"][2]
    assert "ids equal" in table["decode"][2]
    assert table["int8"][0].startswith("6/6 answers = 16-bit")  # float32 on the CPU: int8 changes no answer
    assert table["second-gpu"][0] == "not run: one GPU"
    assert table["tensor-parallel"][0] == "not run: on the CPU"
