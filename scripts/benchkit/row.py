"""A row of the table: what was compared, both sides' values, the ratio against its target, and the helpers
its note is built with."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .contention import CpuWatch
from .timing import median


@dataclass
class Row:
    key: str
    what: str
    against: str
    ours: str  # formatted value of our side
    theirs: str  # formatted value of the other side
    ratio: float | None
    target: str  # e.g. "<= 1.0"
    passed: bool | None
    note: str = ""


def check(ratio: float | None, target: str) -> bool | None:
    if ratio is None or not math.isfinite(ratio):
        return None
    op, bound = target.split()
    return ratio <= float(bound) if op == "<=" else ratio >= float(bound)


def make_row(key, what, against, ours, theirs, ratio, target, note="") -> Row:
    return Row(key, what, against, ours, theirs, ratio, target, check(ratio, target), note)


def paired(a: list[float], b: list[float]) -> str:
    """The ratio within each alternation round (A and B measured back to back): robust to slow drifts."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    if len(ratios) < 2:
        return ""
    return f"per-round ratios {', '.join(f'{x:.3g}' for x in ratios)} (median {median(ratios):.3g})"


def noise(r: dict, *labels: str) -> str:
    """What other processes took of the CPU while these numbers were measured."""
    shares = [x for label in labels for x in r.get("contention", {}).get(label, []) if math.isfinite(x)]
    if not shares:
        return ""
    mean = sum(shares) / len(shares)
    flag = "NOISY: " if mean > CpuWatch.IDLE_SHARE else ""
    return f"{flag}other processes took {mean:.0%} of the CPU on average (max {max(shares):.0%}) meanwhile"


def join_notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
