"""The commands shown in README.md and docs/*.md still parse with the current command lines.

Every fenced ```bash / ```sh block (each line, continuation lines ending in a backslash joined) and
every ```console block (its `$ ` lines) is read; each simple command of the form
`python -m minillava.<module> ...`, `python -m globalcom2... ...`, `python scripts/<x>.py ...` or
`torchrun ... -m minillava.<module> ...` is handed to that CLI's `parse_args(argv)`, which builds the
argparse parser and checks the flags without loading a model or running anything. Exit code 0
(`--help`) passes; an argparse error (code 2) fails, naming the file and line. Placeholders such as `M`,
`DIR` or `FILE.jsonl` are fine wherever argparse accepts them; shell variables take the values in
`SHELL_VALUES`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# CLI -> module whose parse_args(argv) parses its command line without side effects; None would skip a
# CLI without such an entry (every CLI the docs show has one now).
PARSERS = {
    "minillava.generate": "minillava.generate",
    "minillava.apps.visualize": "minillava.apps.visualize",
    "minillava.apps.demo": "minillava.apps.demo",
    "minillava.eval": "minillava.eval.runner",
    "minillava.eval.synthetic": "minillava.eval.synthetic",
    "minillava.apps.quantize": "minillava.apps.quantize",
    "scripts/bench.py": "bench",
    "scripts/compression_table.py": "compression_table",
    "scripts/cuda_check.py": "cuda_check",
    "scripts/profile_decode.py": "profile_decode",
    "scripts/tiny_checkpoint.py": "tiny_checkpoint",
    "scripts/train_tiny.py": "train_tiny",
}

# Values of the shell variables the docs' loops use (docs/evaluation.md); any other $NAME becomes NAME.
SHELL_VALUES = {"task": "textvqa", "r": "0.25", "EVAL": "playground/data/eval"}

# The docs show at least this many such commands; fewer means the extraction broke, not that all passed.
MIN_COMMANDS = 30


def fenced_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for every shell command in the page's bash and console blocks."""
    out, lang, pending, start, heredoc = [], None, "", 0, None
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if heredoc is not None:  # the body of `cmd <<'EOF'` is not a command
            if stripped == heredoc:
                heredoc = None
            continue
        if stripped.startswith("```"):
            lang = None if lang is not None else (stripped[3:].strip() or "text")
            pending = ""
            continue
        if lang in ("bash", "sh", "shell"):
            text = stripped
        elif lang == "console":
            if pending:
                text = stripped
            elif stripped.startswith("$ "):
                text = stripped[2:]
            else:
                continue
        else:
            continue
        if not pending:
            start = n
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        command, pending = pending + text, ""
        if m := re.search(r"<<-?\s*'?(\w+)'?", command):
            heredoc = m.group(1)
        if command and not command.startswith("#"):
            out.append((start, command))
    return out


def substitute(command: str) -> str:
    command = re.sub(r"\$\{[^}]*\}", "DIR", command)  # ${DIR[$task]} and the like: a folder name
    return re.sub(r"\$(\w+)", lambda m: SHELL_VALUES.get(m.group(1), m.group(1)), command)


def simple_commands(command: str) -> list[list[str]]:
    """The words of each simple command of a line, redirections and env assignments left out."""
    command = re.sub(r"(?<![\w-])\d*>>?\s*\S+", " ", substitute(command))  # 2>/dev/null, > file
    words = shlex.split(command, comments=True)
    out, current = [], []
    for w in words:
        if w in ("|", "||", "&&", ";"):
            out.append(current)
            current = []
        else:
            current.append(w)
    out.append(current)
    for c in out:
        while c and re.fullmatch(r"\w+=\S*", c[0]):
            del c[0]
    return [c for c in out if c]


def cli_call(words: list[str]) -> tuple[str, list[str]] | None:
    """(CLI name, its arguments) for a command this test checks, else None."""
    if words[0] == "torchrun" and "-m" in words:
        i = words.index("-m")
        module, args = words[i + 1], words[i + 2:]
    elif words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        module, args = words[2], words[3:]
    elif words[0] in ("python", "python3") and len(words) > 1 and words[1].startswith("scripts/"):
        return words[1], words[2:]
    else:
        return None
    if module.split(".")[0] in ("minillava", "globalcom2"):
        return module, args
    return None


def all_calls() -> list[tuple[str, int, str, list[str]]]:
    calls = []
    for page in PAGES:
        for line, command in fenced_commands(page):
            for words in simple_commands(command):
                if (call := cli_call(words)) is not None:
                    calls.append((str(page.relative_to(ROOT)), line, *call))
    return calls


def parse(module_name: str, argv: list[str]) -> str | None:
    """None if argv parses (or asks for --help), else argparse's message."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    module = importlib.import_module(module_name)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def test_every_shown_command_parses():
    calls = all_calls()
    assert len(calls) >= MIN_COMMANDS, f"only {len(calls)} commands found in the README and docs"
    problems, checked = [], 0
    for page, line, cli, argv in calls:
        if cli not in PARSERS:
            problems.append(f"{page}:{line}: {cli} is not a known command line; add it to PARSERS")
            continue
        if PARSERS[cli] is None:
            continue
        checked += 1
        if (message := parse(PARSERS[cli], argv)) is not None:
            problems.append(f"{page}:{line}: {cli} {shlex.join(argv)}\n    {message}")
    assert not problems, "commands in the docs that no longer parse:\n" + "\n".join(problems)
    assert checked >= MIN_COMMANDS


def test_the_extraction_reads_what_the_docs_show(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "pip install -e . && python -m minillava.generate --image a.png \\\n"
        "    --prompt \"x\"   # comment\n"
        "python - <<'EOF'\nimport minillava\nEOF\n"
        "```\n"
        "```console\n"
        "$ OMP_NUM_THREADS=1 python scripts/bench.py --quick 2>/dev/null | tee x\n"
        "output line, not a command\n"
        "```\n"
        "```\npython -m minillava.generate --not-checked\n```\n"
    )
    commands = fenced_commands(page)
    assert [line for line, _ in commands] == [2, 4, 9]
    calls = [cli_call(w) for _, c in commands for w in simple_commands(c)]
    assert [c for c in calls if c] == [("minillava.generate", ["--image", "a.png", "--prompt", "x"]),
                                       ("scripts/bench.py", ["--quick"])]


@pytest.mark.parametrize("argv, ok", [(["--image", "a.png", "--prompt", "x"], True),
                                      (["--image", "a.png", "--prompt", "x", "--no-such-flag"], False),
                                      (["--help"], True)])
def test_a_broken_command_is_caught(argv, ok):
    assert (parse("minillava.generate", argv) is None) == ok
