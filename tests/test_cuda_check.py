"""scripts/cuda_check.py on the CPU: every check runs (small sizes) and the table comes out; without CUDA
and without --device cpu it refuses in one line. What it checks on CUDA cannot be run here."""

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_one_error_line():
    proc = run()
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CUDA is not available") and "--device cpu" in lines[0]


def test_unknown_check_is_a_usage_error():
    proc = run("--device", "cpu", "--only", "greedy,nope")
    assert proc.returncode == 2 and "unknown check nope" in proc.stderr and "Traceback" not in proc.stderr


def test_greedy_check_on_cpu(tmp_path):
    """The fastest check alone, and the JSON file (about 12 s; the others are in the slow test)."""
    out = tmp_path / "check.json"
    proc = run("--device", "cpu", "--quick", "--only", "greedy", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert list(table) == ["greedy"]
    assert table["greedy"][:2] == ["ids equal", "pass"]  # float32 on the CPU: no near-tie to excuse
    saved = json.loads(out.read_text())
    assert saved["dtype"] == "float32" and saved["rows"] == [
        {"check": "greedy", "result": "ids equal", "ok": True, "detail": table["greedy"][2]}]
    assert proc.stdout.strip().splitlines()[-1].startswith("1/1 passed")


@pytest.mark.slow
def test_whole_script_on_cpu():
    """Every check at the quick sizes (5 to 8 minutes on 2 shared cores: most of it compiling)."""
    proc = run("--device", "cpu", "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert list(table) == ["gpu-tests", "greedy", "compile", "batch", "prefill", "decode", "int8", "int4"]
    assert "skipped" in table["gpu-tests"][0]  # no accelerator here
    assert all(cells[1] == "pass" for cells in table.values()), proc.stdout
    assert table["compile"][0] == "0 compiles, 0 recordings after warm-up"
    assert "ids equal to eager 20/20" in table["compile"][2] and "cache lengths [256]" in table["compile"][2]
    assert "answers identical" in table["batch"][2]
    assert "ids equal" in table["decode"][2]
    assert table["int8"][0].startswith("20/20 answers = 16-bit")  # float32 on the CPU: int8 changes no answer
