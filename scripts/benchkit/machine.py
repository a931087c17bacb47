"""The machine: what it is (CPU, cores, versions, load) and what it does at best (a bare matmul's FLOP/s,
a bare copy's bytes/s), the yardsticks of rows 5 and 6."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_facts() -> dict:
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_1min_at_start": loadavg(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bare_matmul(n: int, repeats: int, dtype=torch.float32) -> list[float]:
    """FLOP/s of `torch.matmul` of two n x n matrices, one sample per call (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        out.append(2 * n**3 / (time.perf_counter() - t0))
    return out


def bare_copy(nbytes: int, repeats: int) -> list[float]:
    """Bytes/s of `dst.copy_(src)` counting read + written bytes (2 x size, the STREAM 'copy' convention;
    the write-allocate read the CPU may add is not counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        out.append(2 * src.nbytes / (time.perf_counter() - t0))
    return out
