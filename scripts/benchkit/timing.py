"""Timing helpers: every comparison's sides called once to warm up, then alternated (A, B, A, B, ...),
reported as medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from .contention import WATCH


def median(xs) -> float:
    return statistics.median(xs)


def alternate(sides: dict[str, Callable[[], float]], repeats: int, warmup: bool = True,
              label: str = "") -> dict[str, list[float]]:
    """Call each side once (warm-up, not kept), then A, B, A, B, ... `repeats` times; seconds per call.

    Each side returns the seconds it measured itself (so a side can leave its own set-up out). The share
    of the CPU other processes took during each round (A and B) is kept in WATCH.rounds[label]."""
    if warmup:
        for run in sides.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        if WATCH.idle_wait_s:
            WATCH.wait_idle()
        start = WATCH._read()
        for name, run in sides.items():
            samples[name].append(run())
        WATCH.rounds.setdefault(label or ",".join(sides), []).append(WATCH.share(start, WATCH._read()))
    return samples


def wall(fn: Callable) -> Callable[[], float]:
    """A side that times a whole call of `fn`."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run
