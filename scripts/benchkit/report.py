"""The report of one run: its rows, bench.md, bench.json and bench.png."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from .markdown import markdown
from .plot import plot
from .rows import build_rows


def to_json(obj):
    """Plain JSON: tensors dropped (the raw scores are not worth the bytes), dataclasses as dicts."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if dataclasses.is_dataclass(obj):
        return to_json(dataclasses.asdict(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write(r: dict, out: Path) -> str:
    """Build the rows into `r` (as dicts) and write bench.md, bench.json and bench.png into `out`; bench.md's text."""
    rows = build_rows(r)
    r["rows"] = [dataclasses.asdict(row) for row in rows]
    text = markdown(r, rows)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(to_json(r), indent=1))
    plot(r, rows, out / "bench.png")
    return text
