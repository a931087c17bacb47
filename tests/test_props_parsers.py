"""The untrusted-input parsers on generated files: safetensors headers, config.json, tokenizer files
(tokenizer.model, tokenizer.json, tokenizer_config.json and added_tokens.json), conversation templates, and
the question file of every evaluation task. Each file is a real one mutated (bytes flipped, cut or
inserted; a value anywhere in its JSON replaced by any JSON), or arbitrary bytes or JSON.

Every parse is a clean refusal (the module's error class, one line) or a parse that is right (the
properties checked below); never another exception, and within the time and memory limits of
tests/test_trust_loaders.py (`limits`: SIGALRM and RLIMIT_AS around every test).
"""

import json
import struct
from pathlib import Path

import pytest
from hypothesis import strategies as st

from minillava.config import load_config, parse_config
from minillava.conversation import TEMPLATES, chat_template_text, choose_template, template_from_chat_template
from minillava.eval.answers import read_records
from minillava.eval.files import DataError
from minillava.eval.runner import baseline
from minillava.eval.tasks import TASKS
from minillava.tokenizer import ByteBPETokenizer, Tokenizer, read_added_tokens
from minillava.trust import ConfigError, WeightsError, read_header
from minillava.validate import check_vision
from tests import tiny
from tests.strategies import budgets, check
from tests.test_trust_loaders import GOOD, SHIPPED_CONFIG, limits, safetensors_bytes  # noqa: F401 (limits: autouse)

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in the picture? Ünïcode 猫, 42."

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@st.composite
def mutated(draw, base: bytes, most: int = 6) -> bytes:
    """`base` with a few bytes replaced, cut or inserted."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, most))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["set", "cut", "insert"]))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at: at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def paths(value, prefix=()):
    """Every path to a value inside nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


@st.composite
def edited(draw, base):
    """`base` (JSON) with the value at one of its paths replaced by any JSON, or that key deleted."""
    value = json.loads(json.dumps(base))
    path = draw(st.sampled_from(list(paths(value))[1:]))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return value


def one_line(error: Exception):
    text = str(error)
    assert text and "\n" not in text and len(text) < 1000, text


# --- safetensors headers ------------------------------------------------------------------------------------

def header_case(tmp, data: bytes):
    path = tmp / "model.safetensors"
    path.write_bytes(data)
    try:
        entries = read_header(path)
    except WeightsError as e:
        return one_line(e)
    (n,) = struct.unpack("<Q", data[:8])
    spans = sorted((e.start, e.end) for e in entries.values())
    assert all(8 + n <= s <= t <= len(data) for s, t in spans)  # inside the data region
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap
    for e in entries.values():
        numel = 1
        for d in e.shape:
            numel *= d
        assert e.end - e.start == numel * e.dtype.itemsize


HEADERS = st.one_of(
    st.binary(max_size=64),
    mutated(safetensors_bytes(GOOD)),
    st.builds(lambda h, data: safetensors_bytes(h, data), st.dictionaries(st.text(max_size=6), JSON, max_size=3),
              st.binary(max_size=32)),
    st.builds(lambda name, info, data: safetensors_bytes({name: info}, data), st.text(max_size=4),
              st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "x"]),
                                     "shape": st.lists(st.integers(-2, 4), max_size=3),
                                     "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2)}),
              st.binary(max_size=40)),
)


@budgets(500)
def test_safetensors_headers(n, tmp_path):
    check(lambda data: header_case(tmp_path, data), n, data=HEADERS)


# --- config.json --------------------------------------------------------------------------------------------

def config_case(raw):
    try:
        cfg = parse_config(raw)
    except ConfigError as e:
        return one_line(e)
    assert cfg.grid_pinpoints
    if not cfg.vision_from_shapes:  # else the tower's sizes come from the weights, checked there
        check_vision(cfg)  # what parse_config returns passes the checks again
        assert all(w % cfg.vision.image_size == 0 == h % cfg.vision.image_size for w, h in cfg.grid_pinpoints)


OV_CONFIG = tiny.ov_hf_config().to_dict()


def with_value(base, path, value):
    raw = json.loads(json.dumps(base))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return raw


# found by this test's campaign: a model_type (or the class named in architectures) that is a list or an
# object was looked up in a table and raised TypeError (unhashable), not ConfigError (config.py `_names`)
UNHASHABLE = [with_value(SHIPPED_CONFIG, ("text_config", "model_type"), []),
              with_value(SHIPPED_CONFIG, ("vision_config", "model_type"), {}),
              {**tiny.ov_original_config(tiny.ov_hf_config()), "architectures": [[]]}]


@budgets(500)
def test_configs(n):
    raws = st.one_of(edited(SHIPPED_CONFIG), edited(OV_CONFIG), edited(tiny.ov_original_config(tiny.ov_hf_config())), JSON)
    check(config_case, n, explicit=[dict(raw=raw) for raw in UNHASHABLE], raw=raws)


def config_file_case(tmp, data: bytes):
    (tmp / "config.json").write_bytes(data)
    try:
        load_config(tmp)
    except ConfigError as e:
        one_line(e)


@budgets(300)
def test_config_files(n, tmp_path):
    base = (ROOT / "weights" / "llava-next-tiny-scenes" / "config.json").read_bytes()
    check(lambda data: config_file_case(tmp_path, data), n,
          data=st.one_of(mutated(base), st.binary(max_size=64), st.just(b"[" * 100_000), st.just(b"1" * 5000)))


# --- tokenizers and templates -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return tiny.train_tokenizer(root / "tokenizer.model").read_bytes(), \
        json.loads(tiny.train_qwen_tokenizer(root / "tokenizer.json").read_text())


def works(tokenizer):
    """A tokenizer that loaded encodes and decodes a question without an exception."""
    ids = tokenizer.encode(QUESTION)
    assert all(type(i) is int and 0 <= i < tokenizer.n_pieces for i in ids)
    assert isinstance(tokenizer.decode(ids), str)


def sentencepiece_case(tmp, data: bytes):
    path = tmp / "tokenizer.model"
    path.write_bytes(data)
    try:
        tokenizer = Tokenizer(path)
    except WeightsError as e:
        return one_line(e)
    works(tokenizer)


@budgets(300)
def test_sentencepiece_models(n, tmp_path, tokenizer_files):
    # found by this test's campaign: a piece whose text is not UTF-8 (one byte of "<0x27>" set to 0xE4)
    # made sentencepiece raise UnicodeDecodeError, which Tokenizer let through (it caught RuntimeError only)
    not_utf8 = tokenizer_files[0].replace(b"<0x27>", b"<0x\xe47>", 1)
    assert not_utf8 != tokenizer_files[0]  # byte fallback: every <0xNN> piece is there
    check(lambda data: sentencepiece_case(tmp_path, data), n, explicit=[dict(data=not_utf8)],
          data=st.one_of(mutated(tokenizer_files[0]), st.binary(max_size=64)))


def bpe_case(tmp, raw):
    path = tmp / "tokenizer.json"
    path.write_bytes(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
    try:
        tokenizer = ByteBPETokenizer(path)
    except WeightsError as e:
        return one_line(e)
    works(tokenizer)


@budgets(300)
def test_byte_bpe_tokenizers(n, tmp_path, tokenizer_files):
    base = tokenizer_files[1]
    check(lambda raw: bpe_case(tmp_path, raw), n,
          raw=st.one_of(edited(base), mutated(json.dumps(base).encode()), JSON))


def tokenizer_config_case(tmp, name: str, raw):
    for old in tmp.iterdir():
        old.unlink()
    (tmp / name).write_bytes(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
    try:
        added, special, add_bos = read_added_tokens(tmp)
    except WeightsError as e:
        one_line(e)
    else:
        assert all(type(t) is str and type(i) is int and i >= 0 for t, i in added.items())
        assert special <= set(added.values()) and type(add_bos) is bool
    try:
        text = chat_template_text(tmp)
    except ConfigError as e:
        return one_line(e)
    assert text is None or isinstance(text, str)
    found = template_from_chat_template(text or "")
    assert found is None or found in TEMPLATES
    try:
        template = choose_template(tmp, "transformers", "llama", 32064, False)
    except ConfigError as e:
        return one_line(e)
    assert template in TEMPLATES.values()


TOKENIZER_CONFIG = {"add_bos_token": True, "chat_template": "{{ 'USER: ' + m + ' ASSISTANT:' }}",
                    "added_tokens_decoder": {"32000": {"content": "<image>", "special": True}}}


@budgets(400)
def test_tokenizer_configs_and_chat_templates(n, tmp_path):
    check(lambda name, raw: tokenizer_config_case(tmp_path, name, raw), n,
          name=st.sampled_from(["tokenizer_config.json", "added_tokens.json", "chat_template.json",
                                "chat_template.jinja"]),
          raw=st.one_of(edited(TOKENIZER_CONFIG), JSON, st.binary(max_size=64),
                        st.dictionaries(st.text(max_size=8), st.integers(-1, 1 << 21), max_size=3)))


# --- question files of every task ---------------------------------------------------------------------------

FIELDS = ["question_id", "text", "image", "category", "id", "conversations", "question", "index", "hint",
          "answer", "A", "B", "C", "D", "label"]  # what the tasks read (minillava/eval/tasks.py)
ROWS = st.dictionaries(st.sampled_from(FIELDS), st.one_of(JSON, st.text(max_size=12)), max_size=6)


def rows_file(rows, kind: str) -> bytes:
    if kind == "jsonl":
        return "\n".join(json.dumps(r) for r in rows).encode()
    if kind == "json":
        return json.dumps(rows).encode()
    header = sorted({k for r in rows for k in r}) or ["index"]
    lines = ["\t".join(header)] + ["\t".join(str(r.get(k, "")).replace("\t", " ").replace("\n", " ") for k in header)
                                   for r in rows]
    return "\n".join(lines).encode()


def task_case(tmp, task: str, data: bytes):
    t = TASKS[task]
    root = tmp / task
    root.mkdir(exist_ok=True)
    (root / t.questions_file).parent.mkdir(parents=True, exist_ok=True)
    (root / t.questions_file).write_bytes(data)
    if t.images_dir:
        (root / t.images_dir).mkdir(parents=True, exist_ok=True)
    try:
        questions = t.load(root)
    except DataError as e:
        return one_line(e)
    assert len({q.key for q in questions}) == len(questions)  # every question its own key
    assert all(isinstance(q.prompt, str) for q in questions)


@st.composite
def question_files(draw):
    task = draw(st.sampled_from(sorted(t for t in TASKS if TASKS[t].needs_data)))
    rows = draw(st.lists(ROWS, max_size=4))
    kind = {".jsonl": "jsonl", ".json": "json", ".tsv": "tsv"}[Path(TASKS[task].questions_file).suffix]
    data = draw(st.one_of(st.just(rows_file(rows, kind)), mutated(rows_file(rows, kind)), st.binary(max_size=64),
                          st.just(b"[" * 100_000), st.just(b'{"question_id": ' + b"1" * 5000 + b"}")))
    return task, data


# found by this test: a line of 100,000 "[" (nesting past Python's recursion limit) and a number of 5,000
# digits escaped the readers of evaluation files as RecursionError and ValueError (eval/files.py JSON_ERRORS)
DEEP, LONG = b"[" * 100_000, b'{"question_id": ' + b"1" * 5000 + b"}"


@budgets(500)
def test_question_files_of_every_task(n, tmp_path):
    found = [dict(case=(task, data)) for task in ("gqa", "scienceqa") for data in (DEEP, LONG)]
    check(lambda case: task_case(tmp_path, *case), n, explicit=found, case=question_files())


def records_case(tmp, data: bytes):
    """The answers file (`--output`, resumed) and a `--compare` file: records or a DataError."""
    path = tmp / "answers.jsonl"
    path.write_bytes(data)
    try:
        records = read_records(path)
    except DataError as e:
        one_line(e)
    else:
        assert all(isinstance(r, dict) for r in records)
    try:
        metrics, efficiency = baseline(path, "gqa")
    except DataError as e:
        return one_line(e)
    assert isinstance(metrics, dict) and (efficiency is None or isinstance(efficiency, dict))


RECORD = {"key": "1", "question_id": 1, "prompt": "x", "text": "yes", "model": "m", "task": "gqa",
          "metrics": {"accuracy": 50.0}}


@budgets(400)
def test_answer_and_compare_files(n, tmp_path):
    line = json.dumps(RECORD).encode() + b"\n"
    check(lambda data: records_case(tmp_path, data), n,
          explicit=[dict(data=DEEP + b"\n"), dict(data=LONG + b"\n")],
          data=st.one_of(mutated(line * 2), st.binary(max_size=64),
                         st.builds(lambda r: json.dumps(r).encode() + b"\n", edited(RECORD))))
