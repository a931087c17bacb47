"""The answers file: append-only JSON lines keyed by question, safe to kill and resume.

One record per question: {"key", "question_id", "prompt", "text", "model_id", "metadata", ...};
a question that could not be answered has an "error" field and an empty text. Every record is
written as one line with one write and flushed, so a kill leaves at most one partial last line,
which reading ignores (that question is answered again).

Under torchrun each rank appends to its own part file (`FILE.rankN.part`); `consolidate` merges the
file and its parts into one file in question order (one record per key, written to a temporary
file and renamed over the original, so a kill leaves either the old or the new file), which makes
a run on K processes byte for byte the run on one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..trust import open_regular
from .files import JSON_ERRORS, DataError, json_problem, write_atomic


def is_failed(record: dict) -> bool:
    return "error" in record


def part_files(output: Path) -> list[Path]:
    """Per-rank files of an interrupted or running torchrun, in rank order."""
    if not output.parent.is_dir():
        return []
    head, tail = f"{output.name}.rank", ".part"
    ranks = [name[len(head):-len(tail)] for name in os.listdir(output.parent) if name.startswith(head) and name.endswith(tail)]
    return [part_file(output, int(r)) for r in sorted(ranks, key=lambda r: (len(r), r)) if r.isdigit()]


def part_file(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}.part")


def read_records(path: Path, missing_ok: bool = True) -> list[dict]:
    """The complete records of an answers file; a partial last line (a kill mid-write) is skipped.

    A malformed line anywhere else is damage, not a kill: DataError naming the line. A missing file
    is no records when `missing_ok` (a run not started yet), else a DataError."""
    if missing_ok and not os.path.lexists(path):
        return []
    with open_regular(path, DataError, "answers file") as f:
        data = f.read()
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or the partial line of an interrupted write
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except JSON_ERRORS as e:
            raise DataError(f"{path}:{number}: not a JSON line ({json_problem(e)}); the answers file is damaged: "
                            "fix or delete that line and run again") from None
        problem = record_problem(record)
        if problem:
            raise DataError(f"{path}:{number}: not an answer record: {problem}")
        records.append(record)
    return records


def record_problem(record) -> str | None:
    """What makes `record` no answer record (ours or LLaVA's), or None: what the harness reads must be there,
    with its type."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("text"), str):
        return "its 'text' must be a string" + ("" if "text" in record else " and is missing")
    if "key" in record and not isinstance(record["key"], str):
        return "its 'key' must be a string"
    if "key" not in record and (isinstance(record.get("question_id"), bool)
                                or not isinstance(record.get("question_id"), (str, int))):
        return "it needs a 'question_id' (a string or an integer)"
    if not isinstance(record.get("metadata", {}), dict):
        return "its 'metadata' must be an object"
    tokens = record.get("visual_tokens", {"before": 0, "after": 0})
    if not (isinstance(tokens, dict) and all(type(tokens.get(k)) is int for k in ("before", "after"))):
        return "its 'visual_tokens' must be an object with integer 'before' and 'after'"
    return None


def assign_keys(records: list[dict]) -> list[dict]:
    """Give keyless records (LLaVA's own answer files) the keys questions get: see `tasks.key_questions`."""
    seen: dict[str, int] = {}
    for record in records:
        if "key" not in record:
            qid = str(record.get("question_id"))
            n = seen.get(qid, 0)
            seen[qid] = n + 1
            record["key"] = qid if n == 0 else f"{qid}#{n}"
    return records


def merge(records: list[dict]) -> dict[str, dict]:
    """One record per key: the first answer, or the first failure if there is no answer."""
    by_key: dict[str, dict] = {}
    for record in records:
        old = by_key.get(record["key"])
        if old is None or (is_failed(old) and not is_failed(record)):
            by_key[record["key"]] = record
    return by_key


def dumps(record: dict) -> str:
    """One JSON line; readable UTF-8, except that a record holding a lone surrogate (JSON escapes in a
    question file can make one) is written with ASCII escapes, the only way it encodes."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record) + "\n"
    return line


def consolidate(output: Path, order: list[str]) -> dict[str, dict]:
    """Merge `output` and its part files into `output`, records in `order` (unknown keys last).

    Returns the merged records by key. Part files are deleted once their records are in `output`."""
    parts = part_files(output)
    records = merge(assign_keys([r for path in [output, *parts] for r in read_records(path)]))
    position = {key: i for i, key in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: position.get(r["key"], len(order)))  # stable: unknowns keep their order
    text = "".join(dumps(r) for r in ordered)
    current = output.read_bytes().decode("utf-8", "replace") if output.exists() else None
    if text != current and (records or current is not None):
        write_atomic(output, text)
    for part in parts:
        part.unlink()
    return records


class AnswerWriter:
    """Appends records to one file, one flushed and fsynced line each."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict):
        self.file.write(dumps(record))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()
