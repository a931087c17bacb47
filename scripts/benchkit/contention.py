"""How much of the CPU other processes take while we time something (WATCH, one per process), and
optionally waiting for a quiet machine before each timed round."""

from __future__ import annotations

import os
import time


class CpuWatch:
    """How much of the machine's CPU other processes take while we time something (a shared machine adds
    noise that alternating sides only partly cancels), and optionally waiting for a quiet machine.

    Others' share = (busy CPU time of the whole machine from /proc/stat, steal included, minus this
    process's own CPU time) / (wall time x cores)."""

    def __init__(self):
        self.rounds: dict[str, list[float]] = {}  # label -> others' share during each alternation round
        self.idle_wait_s = 0.0  # wait up to this long before each round for others' share < IDLE_SHARE
        self.waited_s = 0.0

    IDLE_SHARE = 0.1

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is already in user): all but idle, iowait
        busy = (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def share(self, start, end) -> float:
        if start is None or end is None or end[0] <= start[0]:
            return float("nan")
        others = (end[1] - start[1]) - (end[2] - start[2])
        return max(others, 0.0) / ((end[0] - start[0]) * (os.cpu_count() or 1))

    def wait_idle(self, log=None) -> None:
        deadline = time.perf_counter() + self.idle_wait_s
        while time.perf_counter() < deadline:
            start = self._read()
            time.sleep(2.0)
            busy = self.share(start, self._read())
            if not busy > self.IDLE_SHARE:  # NaN (no /proc) counts as quiet
                return
            self.waited_s += 2.0
            if log:
                log(f"waiting for a quiet machine: other processes use {busy:.0%} of the CPU")


WATCH = CpuWatch()


class watched:
    """Context: note the share of the CPU other processes took during the block in WATCH.rounds[label]."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.start = WATCH._read()

    def __exit__(self, *exc):
        WATCH.rounds.setdefault(self.label, []).append(WATCH.share(self.start, WATCH._read()))
