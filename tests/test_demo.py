"""The demo page (minillava/apps/demo.py): its handlers on the shipped tiny model (an answer, the kept-token
picture, the counts, the side-by-side tab, bad uploads and settings as one-line messages), the app
through Gradio's own client, the command line, and (slow) the page in headless Chromium.

The browser test needs Debian's chromium and chromium-driver and the demo extra:
    apt-get install -y chromium chromium-driver && python -m pytest -m slow tests/test_demo.py
It saves the screenshot the README shows, examples/demo.png.
"""

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e \".[demo]\"")

from minillava.apps import demo  # noqa: E402
from minillava.weights import DEFAULT_MODEL  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "examples" / "scene.png"
QUESTION = "What digit is on the red card?"  # the tiny model answers "6" for examples/scene.png


@pytest.fixture(scope="module")
def session():
    return demo.Session.load(DEFAULT_MODEL, "cpu", max_new_tokens=16)


def last(outputs):
    """The final values a handler yields (what the page shows when it is done)."""
    return list(outputs)[-1]


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("compressor, ratio, counts", [("none", 1.0, "336 -> 336"), ("globalcom2", 0.25, "336 -> 94")])
def test_ask_answers_with_a_picture_and_counts(session, compressor, ratio, counts):
    steps = list(demo.ask(session, str(SCENE), QUESTION, compressor, ratio))
    answer, picture, line, message = steps[-1]
    assert answer.strip() == "6" and message == ""
    assert isinstance(picture, Image.Image) and 400 <= picture.width <= 4000 and 400 <= picture.height <= 4000
    assert f"visual tokens {counts}" in line
    for part in ("answer 2 tokens", "vision", "compress", "prefill", "decode", "tokens/s", "picture"):
        assert part in line
    # the picture and counts come before the answer, which then streams in
    assert steps[0][0] == "" and steps[0][1] is not None and counts in steps[0][2]


def test_a_tower_method_answers_without_a_picture(session):
    """ficoco merges inside the tower: its tokens have no grid cell to draw, so the page answers with the
    counts and no picture (python -m minillava.apps.visualize refuses it in one line)."""
    steps = list(demo.ask(session, str(SCENE), QUESTION, "ficoco", 0.5))
    answer, picture, line, message = steps[-1]
    assert answer.strip() and message == "" and picture is None
    assert "visual tokens 336 -> 160" in line and "picture" not in line


def test_side_by_side_answers_under_two_settings(session):
    answer_a, picture_a, counts_a, answer_b, picture_b, counts_b, message = last(
        demo.compare(session, str(SCENE), QUESTION, "none", 1.0, "globalcom2", 0.1))
    assert answer_a.strip() == answer_b.strip() == "6" and message == ""
    assert isinstance(picture_a, Image.Image) and isinstance(picture_b, Image.Image)
    assert "336 -> 336" in counts_a and "336 -> 46" in counts_b


def test_fastv_picture_needs_the_question_and_gets_it(session):
    answer, picture, counts, message = last(demo.ask(session, str(SCENE), QUESTION, "fastv", 0.25))
    assert message == "" and answer.strip() == "6" and isinstance(picture, Image.Image) and "336 -> 84" in counts


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: the decompression-bomb check refuses it on opening,
    before any pixel is decoded, so the file stays tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nnewpath 0 0 moveto 16 16 lineto stroke\n%%EOF\n"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
BAD_UPLOADS = {
    "text.png": (b"this is not a picture\n", "not an image"),
    "figure.eps": (EPS, "not an image"),
    "paper.pdf": (PDF, "not an image"),
    "huge.png": (png_with_size(40_000, 40_000), "too large"),
    "empty.png": (b"", "not an image"),
}


@pytest.mark.parametrize("size", [(127, 3188), (1, 100_000)])
def test_sliver_uploads_answer_with_a_picture(session, tmp_path, size):
    """Issue 32's images (an unpadded crop area without a column) answer on the page, under a stage
    method and FastV (whose picture maps its kept positions onto the grid), with no message."""
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 40, 40)).save(path)
    for compressor in ("globalcom2", "fastv"):
        answer, picture, line, message = last(demo.ask(session, str(path), QUESTION, compressor, 0.25))
        assert message == "" and isinstance(picture, Image.Image) and "visual tokens" in line, (compressor, message)


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_bad_uploads_are_one_line_messages(session, tmp_path, name):
    data, fragment = BAD_UPLOADS[name]
    path = tmp_path / name
    path.write_bytes(data)
    shown, message = demo.preview(str(path))
    assert shown is None and fragment in message and name in message and one_line(message)
    answer, picture, counts, message = last(demo.ask(session, str(path), QUESTION, "globalcom2", 0.25))
    assert (answer, picture, counts) == ("", None, "") and fragment in message and one_line(message)
    *sides, message = last(demo.compare(session, str(path), QUESTION, "none", 1.0, "globalcom2", 0.1))
    assert fragment in message and one_line(message)
    # the message names the upload, not the directory Gradio put it in
    assert str(tmp_path) not in message
    # and the next question is answered as usual
    assert last(demo.ask(session, str(SCENE), QUESTION, "none", 1.0))[0].strip() == "6"


@pytest.mark.parametrize("path, question, compressor, ratio, fragment", [
    (None, QUESTION, "none", 1.0, "no image"),
    (str(SCENE), "   ", "none", 1.0, "type a question"),
    (str(SCENE), QUESTION, "jpeg", 1.0, "unknown compressor"),
    (str(SCENE), QUESTION, "globalcom2", 0.0, "outside (0, 1]"),
    (str(SCENE), QUESTION, "globalcom2", float("nan"), "outside (0, 1]"),
    (str(SCENE), QUESTION, "globalcom2", "lots", "not a number"),
])
def test_bad_settings_are_one_line_messages(session, path, question, compressor, ratio, fragment):
    message = last(demo.ask(session, path, question, compressor, ratio))[-1]
    assert fragment in message and one_line(message)


def test_an_unexpected_error_is_a_message_and_the_page_goes_on(session, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(demo, "generate", broken)
    answer, picture, counts, message = last(demo.ask(session, str(SCENE), QUESTION, "none", 1.0))
    assert message.startswith("internal error (RuntimeError: boom second line)") and one_line(message)
    assert picture is not None  # what was done before the error stays on the page
    assert "Traceback" in capsys.readouterr().err  # the server's log keeps the details
    monkeypatch.undo()
    assert last(demo.ask(session, str(SCENE), QUESTION, "none", 1.0))[0].strip() == "6"


def test_closing_the_page_mid_answer_releases_the_model(session):
    outputs = demo.ask(session, str(SCENE), QUESTION, "none", 1.0)
    next(outputs)  # the picture is out; the answer is being generated
    outputs.close()
    assert not session.lock.locked()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_app_through_gradios_client(session):
    from gradio_client import Client, handle_file

    app = demo.build_app(session)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        answer, picture, counts, message = client.predict(handle_file(str(SCENE)), QUESTION, "globalcom2", 0.25,
                                                          api_name="/ask")
        assert answer.strip() == "6" and message == "" and "336 -> 94" in counts
        assert Image.open(picture).size[0] >= 400
        result = client.predict(handle_file(str(SCENE)), QUESTION, "globalcom2", 0.25, "fastervlm", 0.25,
                                api_name="/compare")
        assert [result[0].strip(), result[3].strip()] == ["6", "6"] and "336 -> 96" in result[5]
        bad = client.predict(handle_file(str(ROOT / "pyproject.toml")), QUESTION, "none", 1.0, api_name="/ask")
        assert "not an image" in bad[-1] and "pyproject.toml" in bad[-1]
    finally:
        app.close()


def test_the_core_never_imports_gradio():
    code = ("import sys, pkgutil, importlib, minillava, globalcom2\n"
            "for m in pkgutil.walk_packages(minillava.__path__, 'minillava.'):\n"
            "    if m.name != 'minillava.apps.demo' and not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "import minillava.apps.demo\n"  # importing the page's module does not import gradio either
            "assert 'gradio' not in sys.modules, 'gradio imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_without_gradio_the_command_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert demo.main([]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {demo.INSTALL_HINT}" and 'pip install -e ".[demo]"' in err


def test_a_model_that_does_not_load_is_one_line(tmp_path, capsys):
    assert demo.main(["--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert demo.main(["--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in err and err.count("\n") == 1


def test_help_and_defaults(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = capsys.readouterr().out
    assert "--port" in text and "--host" in text and "--share" not in text
    args = demo.parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, DEFAULT_MODEL)


# --- in a real browser ----------------------------------------------------------------------------


def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    return browser, shutil.which("chromedriver")


@pytest.mark.slow
def test_the_page_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e \".[demo]\"")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()
    if not (browser and driver_path):
        pytest.skip("no headless browser: apt-get install -y chromium chromium-driver")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "minillava.apps.demo", "--port", str(port), "--max-new-tokens", "16"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, driver = f"http://127.0.0.1:{port}/", None
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the page answers, or the server has died, or two minutes have passed
            assert server.poll() is None, f"the server exited: {server.stdout.read()}"
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500",
                     "--force-device-scale-factor=1"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
        upload.send_keys(str(SCENE))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload a, #upload .file-name, #upload td"))
        driver.find_element(By.CSS_SELECTOR, "#question textarea, #question input").send_keys(QUESTION)
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
                            .strip() or None)
        assert answer == "6"
        counts = wait.until(lambda d: "|" in (v := d.find_element(By.CSS_SELECTOR, "#counts textarea")
                                              .get_attribute("value")) and v)
        assert "336 -> 94" in counts
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#picture img"))
        # the whole page in the screenshot: the window as tall as the document
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height, 2400))
        time.sleep(1)  # let the picture finish drawing before the screenshot
        driver.save_screenshot(str(ROOT / "examples" / "demo.png"))

        # the side-by-side tab: none vs globalcom2 at 0.1 by default
        driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Side by side')]").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#compare").is_displayed())
        driver.find_element(By.CSS_SELECTOR, "#compare").click()
        both = wait.until(lambda d: all(d.find_element(By.CSS_SELECTOR, f"#counts_{k} textarea").get_attribute("value")
                                        .count("|") >= 2 for k in "ab") and
                          [d.find_element(By.CSS_SELECTOR, f"#{n}_{k} textarea").get_attribute("value")
                           for n in ("answer", "counts") for k in "ab"])
        assert both[0].strip() == both[1].strip() == "6"
        assert "336 -> 336" in both[2] and "336 -> 46" in both[3]

        # a file that is no image: a message on the page, and the server goes on serving
        driver.find_element(By.CSS_SELECTOR, "#upload button[aria-label=Clear]").click()  # the upload box returns
        bad = tmp_path / "notes.png"
        bad.write_text("not a picture\n")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]")).send_keys(str(bad))
        message = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value"))
        assert "not an image" in message and "notes.png" in message and "Traceback" not in message
        assert server.poll() is None
        urllib.request.urlopen(url, timeout=10).close()
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
