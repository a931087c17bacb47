"""Reading benchmark files with errors that name the file and line; writing files atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import sys
from pathlib import Path

from ..trust import check_regular, open_regular


class DataError(ValueError):
    """A benchmark file that is missing or malformed; str(e) is one line naming the file (and line)."""


# What json.loads raises on text it cannot read: JSONDecodeError, UnicodeDecodeError (bytes) and an integer
# of more digits than Python converts (ValueError), and RecursionError on nesting past the recursion limit
# (a line of 100,000 "[": issue 32). Every reader of an evaluation file catches all of them.
JSON_ERRORS = (ValueError, RecursionError)


def json_problem(error: Exception) -> str:
    """Why json.loads refused a text, in a few words for a DataError."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return " ".join(str(error).split(";")[0].split())  # a number too long; not UTF-8


def require(path: Path, what: str) -> Path:
    """`path` if it is a regular file, else a DataError saying what was expected there.

    Only its stat is read: a FIFO or device is refused without being opened."""
    check_regular(path, DataError, what)
    return path


def read_bytes(path: Path, what: str) -> bytes:
    with open_regular(path, DataError, what) as f:
        return f.read()


def read_text(path: Path, what: str) -> str:
    """A regular file's UTF-8 text (a BOM dropped); other bytes are a DataError naming the line."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); "
                        f"save the {what} as UTF-8") from None


def read_jsonl(path: Path, what: str = "question file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    rows = []
    for number, line in enumerate(read_text(path, what).split("\n"), 1):  # "\n" only: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except JSON_ERRORS as e:
            raise DataError(f"{path}:{number}: not a JSON line ({json_problem(e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def read_json(path: Path, what: str):
    """A whole JSON document; a syntax error names its line."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except JSON_ERRORS as e:
        line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path}{line}: not valid JSON ({json_problem(e)})") from None


def read_tsv(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, {column: value}) for each row of a tab-separated file with a header line.

    Every row must have as many fields as the header (a short row is damage, not empty cells)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # MMBench keeps base64 images in a column
    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""), delimiter="\t")
    rows = []
    try:
        for row in reader:
            extra, short = row.pop(None, []), sum(v is None for v in row.values())  # csv's long/short row marks
            if extra or short:
                raise DataError(f"{path}:{reader.line_num}: {len(row) + len(extra) - short} fields, "
                                f"the header has {len(row)}")
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not a tab-separated row ({e})") from None
    return rows


def field(row: dict, name: str, path: Path, number: int, kinds: type | tuple[type, ...] | None = None):
    """row[name], or a DataError naming the file, line and missing field (or its wrong type, if `kinds`)."""
    if name not in row:
        raise DataError(f"{path}:{number}: missing field {name!r}")
    value = row[name]
    if kinds is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
        names = " or ".join({str: "a string", int: "an integer", dict: "an object", list: "a list"}[k]
                            for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise DataError(f"{path}:{number}: field {name!r} must be {names}, got {json.dumps(value)[:40]}")
    return value


def write_atomic(path: Path, data: str | bytes):
    """Replace `path` with `data` (str as UTF-8) so that a crash or a full disk leaves either the old
    file or the new one: write a temporary file in the same folder, fsync it, rename it over `path`.
    The temporary file is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # same folder: the rename stays atomic
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
