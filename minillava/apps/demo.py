"""A local web page to ask a question about an image, under a chosen visual-token compressor.

    python -m minillava.apps.demo [--model DIR_OR_HUB_ID] [--port 7860]   # needs: pip install -e ".[demo]"

The page (Gradio, as LLaVA's own demo) takes an uploaded or example image and a question, streams the
answer, and shows the kept-token picture (`visualize.kept_picture`, the drawing `python -m
minillava.apps.visualize` writes), the token counts and timings. A second tab answers the same question
under two settings side by side. Gradio is imported only here and only when the page is built: the
rest of the package never needs it.

The handlers (`preview`, `ask`, `compare`) are plain functions of a `Session` that yield the values of
the page's outputs, so the tests call them without a server. A user's mistake (a file that is no
image, a huge one, an empty question) comes back as a one-line message on the page, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from ..compression import compressors, place
from ..generate import (DEFAULT_COMPRESSOR, DEFAULT_RETENTION_RATIO, DTYPE_HELP, DTYPES, USER_ERRORS, conv_template_arg, fail,
                       generate, load, quantize_args, quantize_spec, ratio_arg)
from ..quant import Spec
from ..trust import URL_MAX_BYTES, ImageError, decode_image, open_regular
from ..weights import DEFAULT_MODEL
from .visualize import kept_picture

DEFAULT_PORT = 7860
DEFAULT_HOST = "127.0.0.1"  # local only: the page runs a model on the machine of whoever starts it
INSTALL_HINT = 'the page needs the demo extra: pip install -e ".[demo]"'
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = [("scene.png", "What digit is on the red card?"), ("dense_scene.png", "What is the largest digit?")]
MAX_UPLOAD_BYTES = URL_MAX_BYTES  # the same cap as an image download: Gradio refuses larger uploads itself


@dataclass
class Session:
    """The loaded model the page answers with. One question at a time: generation uses the model's
    KV cache, so two at once would overwrite each other's (the page's queue also runs one at a time)."""

    model: object
    tokenizer: object
    max_new_tokens: int = 512
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, device=None, dtype=None, max_new_tokens: int = 512,
             conv_template: str | None = None, quantize: Spec | None = None) -> "Session":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(*load(model, device, dtype, conv_template, quantize), max_new_tokens=max_new_tokens)


def open_upload(path) -> Image.Image:
    """The uploaded file as an RGB image, opened as every image of the package is (trust.py: regular
    files only, raster formats only, the decompression-bomb limit), never with plain PIL. The path is
    opened as a file, never fetched as a URL, whatever it says. ImageError names the file's own name,
    not Gradio's temporary directory."""
    if not path:
        raise ImageError("no image: upload one or pick an example")
    name = Path(path).name
    with open_regular(path, ImageError, "image file") as f:
        return decode_image(f, name)


def preview(path):
    """Upload -> (the image as the model will see it, or None; a message)."""
    if not path:  # the upload was cleared: nothing to show, nothing to complain about
        return None, ""
    try:
        return open_upload(path), ""
    except ImageError as e:
        return None, str(e)


def _check(question: str, compressor: str, ratio) -> str:
    """Why these settings cannot be answered (a value sent through the API rather than the page), or ''."""
    if not (question or "").strip():
        return "type a question about the image"
    if compressor not in compressors():
        return f"unknown compressor {compressor!r}; one of: {', '.join(compressors())}"
    try:
        ratio_arg(str(ratio))  # the command line's own check
    except argparse.ArgumentTypeError as e:
        return f"the retention ratio: {e}"
    return ""


class _UserMessage(ValueError):
    """A setting the page cannot answer with (an empty question, a ratio sent through the API out of range)."""


class _Stopped(Exception):
    """Raised inside generation when the page that asked has gone away."""


def _stream(call) -> Iterator[tuple[str, object]]:
    """Run call(on_text) in a thread and yield (answer so far, None) as pieces arrive, then (answer,
    its return value). generate() only calls back; a generator handler is what lets Gradio stream.
    If the caller stops listening (the tab closed), generation stops at its next token."""
    pieces, stop, box = queue.Queue(), threading.Event(), {}

    def on_text(piece: str):
        if stop.is_set():
            raise _Stopped
        pieces.put(piece)

    def run():
        try:
            box["result"] = call(on_text)
        except BaseException as e:  # handed to the caller's thread, which reports it
            box["error"] = e
        finally:
            pieces.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    try:
        while (piece := pieces.get()) is not None:
            text += piece
            yield text, None
    finally:
        stop.set()
        thread.join()
    if "error" in box:
        raise box["error"]
    yield text, box["result"]


def counts_line(before: int, after: int, result=None, picture_s: float | None = None) -> str:
    """'visual tokens 336 -> 94 (28% kept)', then the answer's length and timings once there is one."""
    line = f"visual tokens {before} -> {after} ({100 * after / max(before, 1):.0f}% kept)"
    if result is not None:
        t = result.timings_s
        line += (f" | answer {len(result.token_ids)} tokens | vision {t['vision']:.2f} s, compress "
                 f"{t['compress'] * 1000:.1f} ms, prefill {t['prefill']:.2f} s, decode {t['decode']:.2f} s "
                 f"({result.decode_tokens_per_s:.1f} tokens/s)")
    if picture_s is not None:
        line += f" | picture {picture_s:.2f} s"
    return line


def _answer(session: Session, image, question: str, compressor: str, ratio: float):
    """Yield (answer so far, picture, counts) for one setting: the picture first, then the streamed answer."""
    t0 = time.perf_counter()
    pic, picture_s = None, None
    # a tower method's merged tokens have no cell to draw (apps/visualize.py)
    if place(compressor) != "tower":
        pic = kept_picture(session.model, image, compressor, ratio, tokenizer=session.tokenizer, prompt=question)
        picture_s = time.perf_counter() - t0
        yield "", pic.image, counts_line(pic.before, pic.after)
    call = partial(generate, session.model, session.tokenizer, image, question, compressor, ratio,
                   session.max_new_tokens)
    for text, result in _stream(lambda on_text: call(on_text=on_text)):
        if result is not None:
            counts = counts_line(result.visual_tokens["before"], result.visual_tokens["after"], result, picture_s)
        else:
            counts = counts_line(pic.before, pic.after) if pic is not None else ""
        yield text, pic and pic.image, counts


def _guarded(run, blank: tuple) -> Iterator[tuple]:
    """Yield run()'s outputs with an empty message; on an error, the outputs so far and a one-line
    message instead of a traceback, so the page shows it and the server keeps serving."""
    last, outputs = blank, run()
    try:
        for last in outputs:
            yield (*last, "")
    except (*USER_ERRORS, _UserMessage) as e:
        yield (*last, str(e))
    except Exception as e:  # a bug, not the user's fault: the traceback goes to the server's log
        traceback.print_exc()
        yield (*last, f"internal error ({type(e).__name__}: {' '.join(str(e).split())}); see the server's log")
    finally:
        outputs.close()  # the page went away mid-answer: release the lock and stop generating now


def ask(session: Session, path, question: str, compressor: str = DEFAULT_COMPRESSOR,
        ratio: float = DEFAULT_RETENTION_RATIO) -> Iterator[tuple]:
    """The Ask tab: yields (answer, picture, counts, message) as the answer streams."""

    def run():
        problem = _check(question, compressor, ratio)
        if problem:
            raise _UserMessage(problem)
        image = open_upload(path)
        with session.lock:
            yield from _answer(session, image, question.strip(), compressor, float(ratio))

    yield from _guarded(run, ("", None, ""))


def compare(session: Session, path, question: str, compressor_a: str, ratio_a: float, compressor_b: str,
            ratio_b: float) -> Iterator[tuple]:
    """The side-by-side tab: the same question under setting A, then B; yields (answer A, picture A,
    counts A, answer B, picture B, counts B, message)."""

    def run():
        problem = _check(question, compressor_a, ratio_a) or _check(question, compressor_b, ratio_b)
        if problem:
            raise _UserMessage(problem)
        image = open_upload(path)
        a = ("", None, "")
        with session.lock:
            for a in _answer(session, image, question.strip(), compressor_a, float(ratio_a)):
                yield (*a, "", None, "")
            for b in _answer(session, image, question.strip(), compressor_b, float(ratio_b)):
                yield (*a, *b)

    yield from _guarded(run, ("", None, "", "", None, ""))


def build_app(model=DEFAULT_MODEL, device=None, dtype=None, max_new_tokens: int = 512):
    """The page as a gr.Blocks, queued one event at a time. `model`: a checkpoint directory or hub id
    (as `generate.load` takes), a (model, tokenizer) pair, or a Session."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
    import gradio as gr

    if isinstance(model, Session):
        session = model
    elif isinstance(model, tuple):
        session = Session(*model, max_new_tokens=max_new_tokens)
    else:
        session = Session.load(model, device, dtype, max_new_tokens)
    names = list(compressors())

    def settings(label: str, compressor: str, ratio: float):
        choice = gr.Dropdown(names, value=compressor, label=f"Compressor{label}",
                             info="none = plain LLaVA-NeXT; prumerge+ picks its own count")
        # the slider's floor keeps at least a few tokens of even the tiny model's 336
        kept = gr.Slider(0.05, 1.0, value=ratio, step=0.05, label=f"Retention ratio r{label}",
                         info="fraction of visual tokens kept")
        return choice, kept

    def texts(label: str, key: str):
        answer = gr.Textbox(label=f"Answer{label}", lines=2, interactive=False, elem_id=f"answer{key}")
        counts = gr.Textbox(label=f"Tokens and timings{label}", lines=3, interactive=False, elem_id=f"counts{key}")
        return answer, counts

    def kept(label: str, key: str):
        return gr.Image(label=f"Kept visual tokens{label}", type="pil", format="png", interactive=False,
                        height=440, show_label=False, elem_id=f"picture{key}")  # the drawing has its own title

    with gr.Blocks(title="minillava: LLaVA-NeXT with GlobalCom2", analytics_enabled=False) as app:
        gr.Markdown("## LLaVA-NeXT with visual-token compression\nUpload an image or pick an example, ask a "
                    "question, choose a compressor and its retention ratio r. The picture shows which visual "
                    "tokens the compressor keeps; *Side by side* answers under two settings.")
        with gr.Row():
            with gr.Column():
                # gr.File, not gr.Image: gr.Image would open the upload with plain PIL before we see it
                upload = gr.File(label="Image (PNG, JPEG, WEBP, GIF, BMP, TIFF or PPM)", type="filepath",
                                 elem_id="upload")
                shown = gr.Image(label="The image", type="pil", format="png", interactive=False, height=220)
            with gr.Column():
                question = gr.Textbox(label="Question", placeholder="What digit is on the red card?",
                                      elem_id="question")
                message = gr.Textbox(label="Message", interactive=False, elem_id="message")
                examples = [[str(EXAMPLES_DIR / f), q] for f, q in EXAMPLES if (EXAMPLES_DIR / f).is_file()]
                if examples:  # the examples/ folder is in a checkout, not in an installed wheel
                    gr.Examples(examples, [upload, question], label="Examples")
        with gr.Tab("Ask"):
            with gr.Row():
                compressor, ratio = settings("", DEFAULT_COMPRESSOR, DEFAULT_RETENTION_RATIO)
            ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Row():  # the answer beside its picture, so both fit on one screen
                with gr.Column(scale=2):
                    answer, counts = texts("", "")
                with gr.Column(scale=3):
                    picture = kept("", "")
        with gr.Tab("Side by side"):
            with gr.Row():
                compressor_a, ratio_a = settings(" A", "none", 1.0)
                compressor_b, ratio_b = settings(" B", DEFAULT_COMPRESSOR, 0.1)
            compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Row():
                with gr.Column():
                    answer_a, counts_a = texts(" A", "_a")
                    out_a = (answer_a, kept(" A", "_a"), counts_a)
                with gr.Column():
                    answer_b, counts_b = texts(" B", "_b")
                    out_b = (answer_b, kept(" B", "_b"), counts_b)

        upload.change(preview, [upload], [shown, message], api_name="preview")
        one = dict(fn=partial(ask, session), inputs=[upload, question, compressor, ratio],
                   outputs=[answer, picture, counts, message])
        ask_button.click(**one, api_name="ask")
        question.submit(**one, api_name=False)
        compare_button.click(partial(compare, session),
                             [upload, question, compressor_a, ratio_a, compressor_b, ratio_b],
                             [*out_a, *out_b, message], api_name="compare")
    # one event at a time: the model and its cache serve one question at once (see Session)
    return app.queue(default_concurrency_limit=1, max_size=32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m minillava.apps.demo",
        description="A local web page (Gradio) to ask LLaVA-NeXT about an image: upload or pick an image, type "
        "a question, choose a compressor and retention ratio r, and get the streamed answer, the picture of "
        "the kept visual tokens, token counts and timings; a side-by-side tab compares two settings. "
        "Needs the demo extra: pip install -e \".[demo]\". The compressors are generate's: python -m "
        "minillava.generate --help.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, folder name under weights/, or hub id (default {DEFAULT_MODEL}, "
                   "the tiny offline model; e.g. liuhaotian/llava-v1.6-vicuna-7b)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens the page, "
                   "and the model, to the network)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer length limit (default 512)")
    conv_template_arg(p)
    quantize_args(p)
    args = p.parse_args(argv)
    args.spec = quantize_spec(p, args)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if not 0 < args.port < 65536:
        p.error("--port must be in 1..65535")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        return fail(INSTALL_HINT)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda was asked for but CUDA is not available here; use --device cpu")
    try:
        session = Session.load(args.model, args.device, DTYPES.get(args.dtype), args.max_new_tokens, args.conv_template,
                               args.spec)
    except USER_ERRORS as e:
        return fail(str(e))
    app = build_app(session)
    try:
        # quiet: Gradio's own banner suggests share=True, which this page does not offer
        app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False,
                   show_error=False, quiet=True, prevent_thread_lock=True)
        print(f"minillava demo on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
        app.block_thread()
    except OSError as e:  # the port is taken, or the address is not this machine's
        reason = " ".join(str(e).split()).split(". ")[0]  # Gradio's advice after it names launch() arguments
        return fail(f"cannot listen on {args.host}:{args.port} ({reason}); choose another --port or --host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
