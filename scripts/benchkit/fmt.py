"""Numbers as text: shared by the measurements' log lines and the report."""

from __future__ import annotations


GB = 1e9


def fmt_dict(d: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    return ", ".join(f"{k}: {fmt(v)}" for k, v in d.items())


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3g} s"
