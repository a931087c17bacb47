"""Hostile input and output paths (issue 10, input/output part): each made here, each refused cleanly.

Classes: image formats that shell out (EPS -> Ghostscript), URLs (endless, trickling, malformed,
redirected), files that are not regular files or are the run's own inputs, malformed question and
answer files, writes that fail half way, questions that raise, seeds out of range. Anything that
could hang runs under `deadline` (SIGALRM), so a regression fails instead of hanging; anything that
could grow memory is bounded by the hostile server itself (it stops after URL_SERVER_MAX bytes).
"""

import base64
import contextlib
import errno
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from minillava import batch as engine
from minillava import trust
from minillava.trust import ImageError, load_image
from minillava.eval import TASKS, runner
from minillava.eval.answers import read_records
from minillava.eval.files import DataError, read_json, read_jsonl, read_tsv, write_atomic
from minillava.generate import PromptError
from tests.test_eval import llava_answers, one_error_line, pope_data, write_json, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail with TimeoutError if the block takes longer (SIGALRM interrupts blocking open/read/join)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a regression hangs here")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def png_bytes(seed=0, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- hostile HTTP server

URL_SERVER_MAX = 32 * 2**20  # what the endless body sends at most: bounds memory even if the cap regresses


class Hostile(http.server.BaseHTTPRequestHandler):
    """127.0.0.1 only; every response ends within about 10 s whatever the client does."""

    def log_message(self, *args):
        pass

    def _send(self, code=200, headers=(), body=b""):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def route(self):
        path = self.path
        if path == "/eps":
            self._send(headers=[("Content-Type", "image/png"), ("Content-Length", str(len(EPS)))], body=EPS)
        elif path == "/png":
            data = png_bytes()
            self._send(headers=[("Content-Length", str(len(data)))], body=data)
        elif path == "/endless":  # no Content-Length: the body ends when the server closes
            self._send()
            chunk = b"\0" * 65536
            for _ in range(URL_SERVER_MAX // len(chunk)):
                self.wfile.write(chunk)
        elif path == "/short":  # fewer bytes than announced, then the connection closes
            self._send(headers=[("Content-Length", "5000")], body=png_bytes()[:100])
        elif path == "/announced":  # a huge Content-Length, refused before reading
            self._send(headers=[("Content-Length", str(10**12))], body=b"x" * 100)
        elif path == "/trickle":  # a byte every 0.2 s: no read ever times out
            self._send(headers=[("Content-Length", "1000")])
            for _ in range(50):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/slow-headers":  # the status line, then headers a byte at a time
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            for byte in b"X-Slow: " + b"a" * 48:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        elif path.startswith("/redirect-"):
            target = {"ftp": "ftp://127.0.0.1:9/x.png", "file": "file:///etc/hostname", "png": "/png"}[path[10:]]
            self._send(302, [("Location", target), ("Content-Length", "0")])
        else:
            self._send(404, [("Content-Length", "0")])


@pytest.fixture
def hostile_url(monkeypatch):
    """Base URL of a hostile server on 127.0.0.1; download limits made small (1 s, 1 MiB)."""
    monkeypatch.setattr(trust, "URL_DEADLINE_S", 1.0)
    monkeypatch.setattr(trust, "URL_MAX_BYTES", 2**20)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def refused(source, *fragments, within=10.0) -> str:
    """load_image(source) raises an ImageError naming `source` and `fragments`, within `within` s."""
    with deadline(within), pytest.raises(ImageError) as excinfo:
        load_image(source)
    message = str(excinfo.value)
    assert "\n" not in message and str(source) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- 1. formats that shell out


def test_format_allowlist_is_raster_only():
    Image.init()
    assert set(trust.IMAGE_FORMATS) <= set(Image.OPEN)  # every name is a format PIL knows (no typo)
    assert not {"EPS", "PDF", "PSD", "WMF", "MPEG", "FITS", "GRIB", "BUFR", "HDF5"} & set(trust.IMAGE_FORMATS)


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that leaves a marker file when run, and PIL's Ghostscript call recorded."""
    marker = tmp_path / "ghostscript-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL looks for gs again, and finds ours
    calls = []
    real = EpsImagePlugin.Ghostscript
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or real(*a, **k))
    return marker, calls


def test_eps_is_refused_and_ghostscript_never_runs(tmp_path, fake_ghostscript, hostile_url):
    marker, calls = fake_ghostscript
    eps = tmp_path / "picture.png"  # the name does not matter: PIL goes by the bytes
    eps.write_bytes(EPS)
    refused(str(eps), "not in a format read here")
    refused(f"{hostile_url}/eps", "not in a format read here")  # the same bytes behind a URL
    (tmp_path / "plain.ps").write_bytes(EPS.replace(b" EPSF-3.0", b""))
    refused(str(tmp_path / "plain.ps"), "not in a format read here")
    mmbench = TASKS["mmbench"]
    question = runner.Question("0", 0, "Q?", "Q?", None, {"line": 2, "image_b64": base64.b64encode(EPS).decode()})
    with pytest.raises(ImageError, match="not in a format read here: the image of MMBench question 0"):
        mmbench.open_image(question)  # MMBench's inline images: the same allowlist
    assert not marker.exists() and calls == []

    # The control: without the allowlist PIL does hand this file to Ghostscript (ours, the fake).
    with pytest.raises(Exception), Image.open(eps) as image:  # noqa: B017 -- the fake renders nothing
        image.load()
    assert marker.exists() and len(calls) == 1


def test_allowed_formats_still_load(tmp_path):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    for fmt, suffix in [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"),
                        ("TIFF", "tif"), ("PPM", "ppm")]:
        image.save(tmp_path / f"x.{suffix}", format=fmt)
        assert load_image(str(tmp_path / f"x.{suffix}")).size == (20, 12), fmt
    image.convert("L").save(tmp_path / "x.pgm")
    assert load_image(str(tmp_path / "x.pgm")).mode == "RGB"
    image.save(tmp_path / "x.tga")  # a raster format PIL reads, but not one we read
    refused(str(tmp_path / "x.tga"), "not in a format read here")


# ----------------------------------------------------------------------------- 2. URLs


def test_url_body_is_capped(hostile_url):
    tracemalloc.start()
    try:
        refused(f"{hostile_url}/endless", "larger than the limit of 1048576 bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # the cap (1 MiB) plus a chunk, not the 32 MiB the server would send
    refused(f"{hostile_url}/announced", "announces 1000000000000 bytes")
    refused(f"{hostile_url}/short", "closed after 100 of 5000 bytes")


@pytest.mark.parametrize("path", ["/trickle", "/slow-headers"])
def test_url_has_one_total_deadline(hostile_url, path):
    start = time.monotonic()
    refused(hostile_url + path, "no complete answer within 1 s", within=5)
    assert time.monotonic() - start < 3  # 1 s, not 50 reads of 0.2 s each


@pytest.mark.parametrize("url", ["http://[::1", "http://exa mple.com/x.png", "http://", "https:///x.png",
                                 "http://127.0.0.1:99999/x.png", "http://127.0.0.1:80/x\x00.png"])
def test_malformed_urls(url):
    refused(url, "cannot download image", within=5)  # no traceback, nothing sent anywhere


def test_redirects_to_other_schemes_are_refused(hostile_url):
    refused(f"{hostile_url}/redirect-ftp", "only http(s) is followed")
    refused(f"{hostile_url}/redirect-file", "/redirect-file")
    assert load_image(f"{hostile_url}/redirect-png").size == (40, 30)  # http(s) redirects still work


# ----------------------------------------------------------------------------- 3. files: not regular files


def test_fifos_and_devices_are_refused_without_opening(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: never
    refused(str(fifo), "FIFO", "not a regular file", within=5)
    refused("/dev/zero", "device", within=5)  # would never end
    refused(str(tmp_path), "directory", within=5)
    refused("bad\0name.png", "cannot open image file", within=5)
    with deadline(5):
        for reader in (read_jsonl, read_json, read_tsv):
            for path in (fifo, Path("/dev/zero"), tmp_path):
                with pytest.raises(DataError, match="not a regular file"):
                    reader(path, "question file")
        with pytest.raises(DataError, match="FIFO"):
            read_records(fifo)


@pytest.fixture
def pope(tmp_path):
    return pope_data(tmp_path)


def run_eval(capsys, *args):
    with deadline(30):
        code = runner.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, err


def test_eval_refuses_fifo_inputs(tmp_path, capsys, pope):
    answers = llava_answers(tmp_path / "a.jsonl", [(q, "yes") for q in range(1, 8)])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    score = ["pope", "--data", pope, "--score-only"]
    one_error_line(*run_eval(capsys, *score, "--answers", fifo), "FIFO")
    one_error_line(*run_eval(capsys, *score, "--answers", answers, "--questions", fifo), "FIFO")
    one_error_line(*run_eval(capsys, *score, "--answers", answers, "--compare", fifo), "FIFO")
    labels = pope / "coco" / "coco_pope_random.json"
    labels.unlink()
    os.mkfifo(labels)
    one_error_line(*run_eval(capsys, *score, "--answers", answers), "FIFO", "coco_pope_random.json")


def test_eval_output_must_not_be_an_input(tmp_path, capsys, pope):
    questions = pope / "llava_pope_test.jsonl"
    before = questions.read_bytes()
    base = write_json(tmp_path / "base.json", {"task": "pope", "metrics": {"f1": 80.0}})
    (tmp_path / "link.jsonl").symlink_to(questions)
    os.link(questions, tmp_path / "hard.jsonl")
    run = ["pope", "--data", pope, "--model", tmp_path / "no-model"]
    for output in (questions, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        one_error_line(*run_eval(capsys, *run, "--output", output), "is an input of this run")
    one_error_line(*run_eval(capsys, *run, "--output", base, "--compare", base), "is an input of this run")
    one_error_line(*run_eval(capsys, *run, "--output", pope / "coco" / "coco_pope_random.json"), "is an input")
    one_error_line(*run_eval(capsys, "pope", "--data", pope, "--score-only", "--answers", questions), "is an input")
    assert questions.read_bytes() == before


def test_eval_output_must_be_a_regular_file(tmp_path, capsys, pope):
    run = ["pope", "--data", pope, "--model", tmp_path / "no-model"]
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    one_error_line(*run_eval(capsys, *run, "--output", fifo), "--output", "FIFO")
    one_error_line(*run_eval(capsys, *run, "--output", "/dev/null"), "--output", "device")
    one_error_line(*run_eval(capsys, *run, "--output", tmp_path), "--output", "directory")
    (tmp_path / "file").write_text("")
    one_error_line(*run_eval(capsys, *run, "--output", tmp_path / "file" / "a.jsonl"), "is not a folder")
    answers = llava_answers(tmp_path / "a.jsonl", [(1, "yes")])
    score = ["pope", "--data", pope, "--score-only", "--answers"]
    one_error_line(*run_eval(capsys, *score, tmp_path / "typo.jsonl"), "--answers not found", "typo.jsonl")
    one_error_line(*run_eval(capsys, *score, tmp_path), "--answers", "directory")
    one_error_line(*run_eval(capsys, *score, answers, "--compare", tmp_path), "--compare file", "directory")


def test_eval_output_dev_stdout_is_refused(tmp_path, pope):
    """The literal case: stdout a pipe, so /dev/stdout is one; reading it would wait for ourselves."""
    cmd = [sys.executable, "-m", "minillava.eval", "pope", "--data", str(pope), "--output", "/dev/stdout",
           "--model", str(tmp_path / "no-model")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: --output /dev/stdout") and done.stderr.count("\n") == 1, done.stderr


# ----------------------------------------------------------------------------- 3. files: malformed content


def test_non_utf8_files_name_the_line(tmp_path, capsys, pope):
    questions = pope / "llava_pope_test.jsonl"
    lines = questions.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"dog", b"d\xe9g")  # Latin-1, not UTF-8
    questions.write_bytes(b"\n".join(lines))
    answers = llava_answers(tmp_path / "a.jsonl", [(1, "yes")])
    one_error_line(*run_eval(capsys, "pope", "--data", pope, "--score-only", "--answers", answers),
                   f"{questions}:3:", "not UTF-8")
    answers.write_bytes(b'{"question_id": 1, "text": "y\xe9s"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:1:"):
        read_records(answers)


@pytest.mark.parametrize("record, problem", [
    ({"question_id": 1, "text": "yes", "metadata": "x"}, "'metadata' must be an object"),
    ({"question_id": 1, "text": None}, "'text' must be a string"),
    ({"question_id": 1, "text": 3}, "'text' must be a string"),
    ({"question_id": 1}, "'text' must be a string and is missing"),
    ({"text": "yes"}, "needs a 'question_id'"),
    ({"question_id": [1], "text": "yes"}, "needs a 'question_id'"),
    ({"key": 1, "text": "yes"}, "'key' must be a string"),
    ({"question_id": 1, "text": "yes", "visual_tokens": {"before": "a"}}, "'visual_tokens'"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_answer_records(tmp_path, capsys, pope, record, problem):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 2, "text": "no"}) + "\n" + json.dumps(record) + "\n")
    one_error_line(*run_eval(capsys, "pope", "--data", pope, "--score-only", "--answers", answers),
                   f"{answers}:2:", problem)


@pytest.mark.parametrize("field, value, problem", [
    ("image", 5, "field 'image' must be a string"),
    ("text", None, "field 'text' must be a string"),
    ("question_id", {"a": 1}, "field 'question_id' must be a string or an integer"),
    ("category", ["x"], "field 'category' must be a string"),
])
def test_malformed_question_fields(tmp_path, capsys, pope, field, value, problem):
    questions = pope / "llava_pope_test.jsonl"
    rows = [json.loads(x) for x in questions.read_text().splitlines()]
    rows[1][field] = value
    write_jsonl(questions, rows)
    answers = llava_answers(tmp_path / "a.jsonl", [(1, "yes")])
    one_error_line(*run_eval(capsys, "pope", "--data", pope, "--score-only", "--answers", answers),
                   f"{questions}:2:", problem)


def test_short_and_long_mmbench_rows(tmp_path, capsys):
    data = tmp_path / "mmbench"
    data.mkdir()
    tsv = data / "mmbench_dev_20230712.tsv"
    image = base64.b64encode(png_bytes()).decode()
    header = "index\tquestion\thint\tA\tB\tanswer\timage\n"
    answers = llava_answers(tmp_path / "a.jsonl", [(0, "A")])
    for row, problem in [("1\tQ?\tnan\tx\n", "4 fields, the header has 7"),
                         (f"1\tQ?\tnan\tx\ty\tA\t{image}\textra\n", "8 fields, the header has 7")]:
        tsv.write_text(header + f"0\tQ?\tnan\tx\ty\tA\t{image}\n" + row)
        one_error_line(*run_eval(capsys, "mmbench", "--data", data, "--score-only", "--answers", answers),
                       f"{tsv}:3:", problem)


def malformed_annotations(root: Path, task: str) -> tuple[Path, Path]:
    """(--data, the damaged annotation file) of a one-question benchmark whose annotation lacks a field."""
    q = [{"question_id": "1", "image": "x.png", "text": "Q?"}]
    if task == "textvqa":
        write_jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", q)
        (root / "train_images").mkdir()
        bad = write_json(root / "TextVQA_0.5.1_val.json", {"data": [{"image_id": "1", "question": "Q?"}]})
    elif task == "gqa":
        write_jsonl(root / "llava_gqa_testdev_balanced.jsonl", q)
        (root / "data" / "images").mkdir(parents=True)
        bad = write_json(root / "data" / "testdev_balanced_questions.json", {"1": {"answer": 3}})
    elif task == "scienceqa":
        write_json(root / "llava_test_CQM-A.json", [{"id": "1", "image": "x.png", "conversations": [{"value": "Q?"}]}])
        (root / "images" / "test").mkdir(parents=True)
        bad = write_json(root / "problems.json", {"1": {"answer": 0}})
    elif task == "vizwiz":
        write_jsonl(root / "llava_test.jsonl", q)
        (root / "test").mkdir()
        bad = write_json(root / "val.json", [{"image": "x.png", "answers": [{"a": 1}]}])
    else:
        write_jsonl(root / "questions.jsonl", q)
        (root / "images").mkdir()
        bad = write_json(root / "answers.json", ["1"])
    return root, bad


@pytest.mark.parametrize("task", ["textvqa", "gqa", "scienceqa", "vizwiz", "synthetic"])
def test_malformed_annotation_files(tmp_path, capsys, task):
    data, bad = malformed_annotations(tmp_path / task, task)
    answers = llava_answers(tmp_path / "a.jsonl", [("1", "yes")])
    one_error_line(*run_eval(capsys, task, "--data", data, "--score-only", "--answers", answers), str(bad))


# ----------------------------------------------------------------------------- 3. atomic writes


def test_write_atomic_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    write_atomic(path, "old")
    assert path.read_text() == "old" and path.stat().st_mode & 0o777 == 0o666 & ~current_umask()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_atomic(path, "new" * 1000)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_submission_file_is_written_atomically(tmp_path, capsys, monkeypatch):
    data = tmp_path / "mm-vet"
    (data / "images").mkdir(parents=True)
    write_jsonl(data / "llava-mm-vet.jsonl", [{"question_id": 0, "image": "v1_0.png", "text": "Describe."}])
    answers = llava_answers(tmp_path / "a.jsonl", [(0, "A cat.")])
    submission = tmp_path / "a.submission.json"
    submission.write_text("the old submission")

    def failing(path, data):  # the disk fills up half way
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runner, "write_atomic", failing)
    one_error_line(*run_eval(capsys, "mmvet", "--data", data, "--score-only", "--answers", answers),
                   "a.submission.json", "No space left")
    assert submission.read_text() == "the old submission"
    monkeypatch.undo()
    assert run_eval(capsys, "mmvet", "--data", data, "--score-only", "--answers", answers)[0] == 0
    assert json.loads(submission.read_text()) == {"v1_0": "A cat."}


def test_visualize_writes_atomically_and_checks_out_first(tmp_path, capsys, checkpoints, image_path, monkeypatch):
    from minillava.apps import visualize as vis

    out = tmp_path / "kept.png"
    out.write_bytes(b"the old picture")
    model = checkpoints["hub"]

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = vis.main(["--model", str(model), "--image", str(image_path), "--out", str(out)])
    one_error_line(code, capsys.readouterr().err, "cannot write", "No space left")
    assert out.read_bytes() == b"the old picture" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.png"]
    monkeypatch.undo()

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    for bad in (fifo, tmp_path / "kept.pdf"):
        with deadline(10):
            code = vis.main(["--model", str(model), "--image", str(image_path), "--out", str(bad)])
        one_error_line(code, capsys.readouterr().err, "--out")
    assert vis.main(["--model", str(model), "--image", str(image_path), "--out", str(out)]) == 0
    capsys.readouterr()
    with Image.open(out, formats=["PNG"]) as picture:
        assert picture.format == "PNG"


# ----------------------------------------------------------------------------- 4. questions that raise


def test_a_question_that_raises_is_recorded_and_the_run_goes_on(tmp_path, capsys, checkpoints, monkeypatch):
    data = pope_data(tmp_path, images=True)
    questions = data / "llava_pope_test.jsonl"
    rows = [json.loads(x) for x in questions.read_text().splitlines()]
    rows[1]["text"] = "Is there a dog? BOOM"
    write_jsonl(questions, rows)
    real = engine.prepare

    def prepare(model, tokenizer, question, *args, **kwargs):  # each question of a batch
        if "BOOM" in question:
            raise PromptError("the prompt cannot be encoded (BOOM)")
        if "BUG" in question:
            raise RuntimeError("a bug, not the user's input")
        return real(model, tokenizer, question, *args, **kwargs)

    monkeypatch.setattr(engine, "prepare", prepare)
    out = tmp_path / "answers.jsonl"
    run = ["pope", "--data", data, "--output", out, "--model", checkpoints["hub"], "--max-new-tokens", "2"]
    code, err = run_eval(capsys, *run)
    assert code == 0, err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 7 and [("error" in r) for r in records] == [False, True] + [False] * 5
    assert records[1]["error"] == "the prompt cannot be encoded (BOOM)" and records[1]["text"] == ""
    assert "question 2 failed: the prompt cannot be encoded (BOOM)" in err
    code, err = run_eval(capsys, *run, "--retry-failed")  # the rerun does not stop at it either
    assert code == 0 and "1 to answer" in err and len(out.read_text().splitlines()) == 7

    rows[2]["text"] = "BUG"  # a bug is not the user's fault: it is not swallowed as a failed question
    write_jsonl(questions, rows)
    out.unlink()
    with pytest.raises(RuntimeError, match="a bug"):
        runner.main([str(a) for a in run])
    capsys.readouterr()


def test_hostile_question_text_with_the_real_tokenizer(tmp_path, capsys, checkpoints):
    """`<image>` and a lone surrogate in a question: answered as text, or recorded as that question's
    failure; never the end of the run. Needs the tokenizer's fix (PromptError) from issue 10."""
    from minillava.generate import USER_ERRORS, load
    from minillava.generate import generate as real_generate

    model, tokenizer = load(checkpoints["hub"])
    for text in ("What <image> is it?", "bad \ud800 text"):
        try:
            real_generate(model, tokenizer, Image.new("RGB", (60, 40)), text, "none", 1.0, 1)
        except USER_ERRORS:
            pass
        except Exception as e:  # noqa: BLE001 -- a probe: what today's tokenizer raises
            pytest.skip(f"the tokenizer still raises {type(e).__name__} for {text!r} (another part of issue 10)")
    data = pope_data(tmp_path, images=True)
    rows = [json.loads(x) for x in (data / "llava_pope_test.jsonl").read_text().splitlines()]
    rows[1]["text"], rows[3]["text"] = "What <image> is it?", "bad \ud800 text"
    write_jsonl(data / "llava_pope_test.jsonl", rows)
    out = tmp_path / "answers.jsonl"
    code, err = run_eval(capsys, "pope", "--data", data, "--output", out, "--model", checkpoints["hub"],
                         "--max-new-tokens", "2")
    assert code == 0, err
    records = read_records(out)
    assert [r["question_id"] for r in records] == list(range(1, 8))
    assert records[3]["prompt"] == "bad \ud800 text"  # written with an escape, read back the same


def test_answers_with_a_lone_surrogate_are_written_and_read_back(tmp_path):
    """JSON escapes in a question file can make a lone surrogate, which UTF-8 cannot encode: the record
    is written with ASCII escapes instead of crashing the writer, and reads back equal."""
    from minillava.eval.answers import AnswerWriter

    path = tmp_path / "a.jsonl"
    writer = AnswerWriter(path)
    records = [{"key": "1", "question_id": 1, "prompt": "caf\u00e9", "text": "x"},
               {"key": "2", "question_id": 2, "prompt": "bad \ud800 text", "text": "", "error": "refused"}]
    for record in records:
        writer.write(record)
    writer.close()
    assert read_records(path) == records and "café" in path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- 6. seeds


@pytest.mark.parametrize("seed", [str(2**64), str(2**63), "-1", "1e3", "x"])
def test_seed_out_of_range_is_a_usage_error(seed, capsys):
    from minillava.apps import visualize as vis

    for parse in (lambda: runner.parse_args(["pope", "--data", "d", "--output", "o.jsonl", "--seed", seed]),
                  lambda: vis.parse_args(["--image", "x.png", "--out", "y.png", "--seed", seed])):
        with pytest.raises(SystemExit) as e:
            parse()
        assert e.value.code == 2 and "--seed" in capsys.readouterr().err
    assert runner.parse_args(["pope", "--data", "d", "--output", "o.jsonl", "--seed", str(2**63 - 1)]).seed == 2**63 - 1
