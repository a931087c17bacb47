"""The lmms-eval model's refusals that need no model and no lmms-eval run (issue 32, the coverage audit):
a model_arg, a task's generation_kwargs or a request it cannot serve is one `error: minillava: ...` line
(`Refused`, a SystemExit: lmms-eval's CLI prints it alone and exits 1; tests/test_lmms.py checks that on
the CLI). Each is raised here in this process, before anything is loaded: milliseconds each, after
lmms-eval's import (about 3 s of CPU).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (the lmms extra and lmms-eval --no-deps: .ci/run)")


@pytest.fixture(scope="module")
def lmms():
    import lmms_eval.models  # noqa: F401  (first: its registry imports our module through the entry point)
    from minillava.apps import lmms

    return lmms


def refusal(call) -> str:
    with pytest.raises(SystemExit) as e:
        call()
    assert str(e.value).startswith("error: minillava: ") and "\n" not in str(e.value)
    return str(e.value).removeprefix("error: minillava: ")


@pytest.mark.parametrize("args, message", [
    ({"foo": "1"}, "unknown model_args foo; accepted: pretrained, compressor,"),
    ({"compressor": "globalcom3"}, "compressor=globalcom3 is unknown; choose one of none, "),
    ({"conv_template": "vicuna"}, "conv_template=vicuna is unknown; choose one of "),
    ({"dtype": "float8"}, "dtype=float8 is unknown; choose one of "),
    ({"batch_size": "auto"}, "model_args batch_size=auto: expected an integer >= 1 (batch_size auto is not supported)"),
    ({"compile": "maybe"}, "model_args compile=maybe: expected true or false"),
    ({"device": "tpu"}, "device=tpu: expected cpu, cuda or cuda:N"),
    ({"pretrained": "/nonexistent/model"}, "/nonexistent/model"),
])
def test_model_args(lmms, args, message):
    args = {"pretrained": "llava-next-tiny-scenes", "device": "cpu", **args}
    assert message in refusal(lambda: lmms.MiniLlava(**args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(lmms):
    assert refusal(lambda: lmms.MiniLlava(device="cuda:1")) == \
        "device=cuda:1 was asked for but CUDA is not available here; use device=cpu"


@pytest.mark.parametrize("kwargs, message", [
    ({"until": 5}, "generation_kwargs until=5: expected a string or a list of strings"),
    ({"until": ["stop", 3]}, "generation_kwargs until=['stop', 3]: expected a string or a list of strings"),
    ({"num_beams": 4}, "generation_kwargs num_beams=4: beam search is not supported"),
    ({"max_new_tokens": -1}, "generation_kwargs max_new_tokens=-1: expected an integer >= 1"),
    ({"max_new_tokens": 8.5}, "generation_kwargs max_new_tokens=8.5: expected an integer >= 1"),
    ({"temperature": -0.5}, "generation_kwargs temperature=-0.5: expected a number >= 0"),
])
def test_generation_kwargs(lmms, kwargs, message):
    assert refusal(lambda: lmms.generation_options(kwargs)).startswith(message)


def test_generation_kwargs_defaults(lmms):
    assert lmms.generation_options({"until": "\n\n", "do_sample": False, "temperature": 0.7}) == \
        {"until": ["\n\n"], "max_new_tokens": lmms.DEFAULT_MAX_NEW_TOKENS, "temperature": 0.0, "top_p": 1.0}


def test_requests_it_cannot_serve(lmms):
    model = lmms.MiniLlava.__new__(lmms.MiniLlava)  # _item reads only the task's documents
    picture = Image.new("L", (4, 3))
    model.task_dict = {"t": {"test": [{"v": picture}, {"v": "photo.jpg"}]}}

    def item(context, doc_id):
        return model._item(SimpleNamespace(args=(context, {}, lambda doc: [doc["v"]], doc_id, "t", "test")))

    image, text = item("  <image>\nWhat is it?", 0)  # the template puts the image first: the tag is dropped
    assert (image.mode, image.size, text) == ("RGB", (4, 3), "What is it?")
    assert refusal(lambda: item("Look: <image> what is it?", 0)) == \
        "task t, doc 0 places <image> inside its text; the model's template puts the image before the question"
    assert refusal(lambda: item("What is it?", 1)) == \
        "task t, doc 1: its visual is a str (a video or a path?), not an image"
    assert refusal(lambda: model.generate_until_multi_round([])).startswith("task ? is multi-round;")
