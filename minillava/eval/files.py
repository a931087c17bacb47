"""Reading benchmark files with errors that name the file and line."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


class DataError(ValueError):
    """A benchmark file that is missing or malformed; str(e) is one line naming the file (and line)."""


def require(path: Path, what: str) -> Path:
    """`path` if it exists, else a DataError saying what was expected there."""
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    return path


def read_jsonl(path: Path, what: str = "question file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    rows = []
    with open(require(path, what), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def read_json(path: Path, what: str):
    """A whole JSON document; a syntax error names its line."""
    with open(require(path, what), encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_tsv(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, {column: value}) for each row of a tab-separated file with a header line."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # MMBench keeps base64 images in a column
    with open(require(path, what), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names
                raise DataError(f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} fields, "
                                f"the header has {len(reader.fieldnames)}")
            rows.append((reader.line_num, row))
    return rows


def field(row: dict, name: str, path: Path, number: int):
    """row[name], or a DataError naming the file, line and missing field."""
    if name not in row:
        raise DataError(f"{path}:{number}: missing field {name!r}")
    return row[name]
