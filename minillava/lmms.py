"""The lmms-eval model `minillava`: LLaVA-NeXT with any of our compressors, inside lmms-eval 0.7.

    lmms-eval --model minillava --model_args pretrained=M,compressor=globalcom2,retention_ratio=0.25 \
        --include_path DIR --tasks NAME [--batch_size N]
    accelerate launch --num_processes K -m lmms_eval --model minillava ...   # data parallel

Registered without touching lmms-eval: pyproject.toml puts `MANIFEST` in the `lmms_eval.models`
entry-point group, which lmms-eval 0.7's registry (lmms_eval/models/registry_v2.py) reads at start-up.
A "simple" model: each request is (context, gen_kwargs, doc_to_visual, doc_id, task, split); the
questions go through `minillava.batch.generate_batch` with the model `minillava.generate.load` loads,
as `python -m minillava.eval` does (minillava/eval/runner.py), so both give the same answers.

Every lmms-eval process imports this module when it reads the entry points: only what lmms-eval's CLI
imports anyway (its model base class, hence torch) is imported here; our model code is imported when
the model is made. Install and use: docs/evaluation.md, "lmms-eval".
"""

from __future__ import annotations

import json
import time

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="minillava", simple_class_path="minillava.lmms.MiniLlava")

# lmms-eval's LLaVA models' default answer length when a task's generation_kwargs give none
DEFAULT_MAX_NEW_TOKENS = 1024
IMAGE = "<image>"


class Refused(SystemExit):
    """What this model cannot do (a request kind, a question without exactly one image, a bad
    model_arg), said in one line. A SystemExit rather than a ValueError because lmms-eval's CLI
    catches every Exception, prints its traceback, logs "Error during evaluation" and exits 0; a
    SystemExit passes through it: the interpreter prints the message alone and exits with 1. Under
    `accelerate launch` the other ranks are stopped by the launcher. Library callers of
    `simple_evaluate` can catch it as `Refused`."""

    def __init__(self, message: str):
        super().__init__(f"error: minillava: {message}")


class MiniLlava(lmms):
    """LLaVA-NeXT (any checkpoint `python -m minillava.generate` takes) with a visual-token compressor.

    model_args (as `python -m minillava.eval`'s flags): pretrained (checkpoint directory or hub id),
    compressor, retention_ratio, conv_template, device (cpu, cuda, cuda:N; default cuda when available),
    dtype (float32, bfloat16, float16; default as our CLI), compile (true/false), seed (of the random
    compressor and of sampling), batch_size (questions answered together; lmms-eval's `--batch_size`
    sets it too, model_args wins)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, compressor: str | None = None,
                 retention_ratio: float | None = None, conv_template: str | None = None, device: str | None = None,
                 dtype: str | None = None, compile: bool | str = False, seed: int | str = 0,
                 batch_size: int | str = 1, max_batch_size=None, **unknown) -> None:
        super().__init__()
        import torch
        from accelerate import Accelerator

        from . import generate as gen
        from .compression import compressors
        from .conversation import TEMPLATES
        from .eval import distributed
        from .eval.runner import fetch_model

        if unknown:
            raise Refused(f"unknown model_args {', '.join(sorted(unknown))}; accepted: pretrained, compressor, "
                          "retention_ratio, conv_template, device, dtype, compile, seed, batch_size")
        self.compressor = compressor or gen.DEFAULT_COMPRESSOR
        if self.compressor not in compressors():
            raise Refused(f"compressor={self.compressor} is unknown; choose one of {', '.join(compressors())}")
        self.retention_ratio = _checked("retention_ratio", gen.DEFAULT_RETENTION_RATIO if retention_ratio is None
                                        else retention_ratio, gen.ratio_arg)
        self.seed = _checked("seed", seed, gen.seed_arg)
        self.batch_size_per_gpu = _checked("batch_size", batch_size, _positive)
        if conv_template is not None and conv_template not in TEMPLATES:
            raise Refused(f"conv_template={conv_template} is unknown; choose one of {', '.join(TEMPLATES)}")
        if dtype is not None and dtype not in gen.DTYPES:
            raise Refused(f"dtype={dtype} is unknown; choose one of {', '.join(gen.DTYPES)}")
        compile = _checked("compile", compile, _boolean)

        # Data parallel as lmms-eval's own simple models (llava_hf.py): under `accelerate launch` each
        # process takes the GPU of its local rank; lmms-eval's evaluator gives each rank its share of
        # the documents (task.build_all_requests(rank, world_size)) and gathers the answers.
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not (device in ("cpu", "cuda") or device.startswith("cuda:")):
            raise Refused(f"device={device}: expected cpu, cuda or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise Refused(f"device={device} was asked for but CUDA is not available here; use device=cpu")
        if device.startswith("cuda") and self._world_size > 1:
            device = f"cuda:{self.accelerator.local_process_index}"
        self._device = torch.device(device)
        world = distributed.World(self._rank, self._world_size, self.accelerator.local_process_index)
        try:
            model_dir = fetch_model(pretrained or gen.DEFAULT_MODEL, world)  # a hub id: rank 0 downloads
            self.model, self.tokenizer = gen.load(model_dir, self._device, gen.DTYPES.get(dtype), conv_template)
        except gen.USER_ERRORS as e:
            raise Refused(str(e)) from None
        self.pretrained = pretrained
        self.steps = gen.Steps()
        if compile:
            self.steps = gen.compile_steps(self.model)
            gen.warm_up(self.model, self.steps, batch=self.batch_size_per_gpu, compressor=self.compressor)
        self.stats: list[dict] = []  # one entry per answered batch: see `efficiency`

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that a model_arg wins over the CLI's value of the same name: its
        `--batch_size` (default 1) is always passed, and lmms' version fails with "got multiple values
        for keyword argument 'batch_size'" when model_args names it too."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in order: the requests grouped by their gen_kwargs (a group decodes
        with one setting), each group answered `batch_size` at a time in document order; each answer is
        cut before the first of the task's `until` strings and stripped. A question that fails (an image
        we refuse, a prompt longer than the context) answers "" with a warning, as lmms-eval's models do."""
        from loguru import logger
        from tqdm import tqdm

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        options = {key: generation_options(requests[indices[0]].args[1]) for key, indices in groups.items()}
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="minillava", unit="q")
        try:
            for key, indices in groups.items():
                self._answer_group(requests, indices, options[key], answers, bar)
        finally:  # a refusal's message then starts a line of its own
            bar.close()
        if self.stats:
            logger.info(f"minillava: {summary(self.efficiency())}")
        return answers

    def _answer_group(self, requests, indices: list[int], options: dict, answers: list, bar):
        """Answer requests[i] for i in `indices` (one gen_kwargs) into answers[i], batch_size at a time."""
        from loguru import logger

        for start in range(0, len(indices), self.batch_size):
            batch = [requests[i] for i in indices[start : start + self.batch_size]]
            for i, request, result in zip(indices[start:], batch, self._answer(batch, options)):
                context, gen_kwargs, _, doc_id, task, _ = request.args
                if isinstance(result, BaseException):
                    logger.warning(f"minillava: {task} doc {doc_id} failed: {' '.join(str(result).split())}")
                    answers[i] = ""
                else:
                    answers[i] = cut(result.text, options["until"]).strip()
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[i])
            bar.update(len(batch))

    def _answer(self, batch, options: dict) -> list:
        """Result or exception per request of `batch`: one `generate_batch` call; a batch that runs out of
        GPU memory is answered again one question at a time (as minillava.eval's runner does)."""
        import torch

        from .batch import generate_batch

        items = [self._item(request) for request in batch]

        def run(some):
            return generate_batch(self.model, self.tokenizer, some, self.compressor, self.retention_ratio,
                                  options["max_new_tokens"], temperature=options["temperature"],
                                  top_p=options["top_p"], seed=self.seed, steps=self.steps, return_exceptions=True)

        t0 = time.perf_counter()
        try:
            results = run(items)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(items) == 1:
                raise
            results = [r for item in items for r in run([item])]
        answered = [r for r in results if not isinstance(r, BaseException)]
        self.stats.append({"questions": len(items), "failed": len(items) - len(answered),
                           "seconds": time.perf_counter() - t0,
                           "visual_tokens": [r.visual_tokens for r in answered]})
        return results

    def _item(self, request) -> tuple:
        """(PIL image, question) of a request, or Refused when it has not exactly one image."""
        from PIL import Image

        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = list(_flatten(visuals))
        where = f"task {task}, doc {doc_id}"
        if len(visuals) != 1:
            raise Refused(f"{where} has {len(visuals)} images; the model answers questions about exactly one image "
                          "(LLaVA-NeXT's single-image prompt): choose a single-image task")
        if not isinstance(visuals[0], Image.Image):
            raise Refused(f"{where}: its visual is a {type(visuals[0]).__name__} (a video or a path?), not an image")
        text = context.lstrip()
        if text.startswith(IMAGE):  # the template already puts the image before the question
            text = text[len(IMAGE) :].lstrip("\n")
        if IMAGE in text:
            raise Refused(f"{where} places {IMAGE} inside its text; the model's template puts the image before the question")
        return visuals[0].convert("RGB"), text

    def efficiency(self) -> dict:
        """What the batches answered so far cost: questions, failed, seconds in the model (image tiling,
        tower, compression, prefill, decode; not lmms-eval's data loading), samples/s, and the mean
        visual tokens before/after compression per answered question."""
        questions = sum(s["questions"] for s in self.stats)
        seconds = sum(s["seconds"] for s in self.stats)
        kept = [v for s in self.stats for v in s["visual_tokens"]]
        mean = {k: sum(v[k] for v in kept) / len(kept) for k in ("before", "after")} if kept else None
        return {"questions": questions, "failed": sum(s["failed"] for s in self.stats), "seconds": seconds,
                "samples_per_s": questions / seconds if seconds > 0 else 0.0, "visual_tokens": mean}

    def loglikelihood(self, requests):
        task = requests[0].args[4] if requests else "?"
        raise Refused(f"task {task} asks for loglikelihood (multiple-choice scoring); the model only generates: "
                      "choose a generate_until task")

    def generate_until_multi_round(self, requests):
        task = requests[0].args[4] if requests else "?"
        raise Refused(f"task {task} is multi-round; the model answers one question per image: choose a single-round task")


def generation_options(gen_kwargs: dict) -> dict:
    """until (stop strings), max_new_tokens, temperature, top_p from a task's generation_kwargs, with
    lmms-eval's LLaVA defaults (no stop string beyond EOS, 1024 tokens, greedy). do_sample false is
    greedy whatever the temperature; beam search is refused."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise Refused(f"generation_kwargs until={until!r}: expected a string or a list of strings")
    if (gen_kwargs.get("num_beams") or 1) > 1:
        raise Refused(f"generation_kwargs num_beams={gen_kwargs['num_beams']}: beam search is not supported "
                      "(greedy or sampling only)")
    limit = gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    temperature = gen_kwargs.get("temperature") or 0.0
    if not (isinstance(limit, int) and limit >= 1):
        raise Refused(f"generation_kwargs max_new_tokens={limit!r}: expected an integer >= 1")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise Refused(f"generation_kwargs temperature={temperature!r}: expected a number >= 0")
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    top_p = gen_kwargs.get("top_p")
    return {"until": until, "max_new_tokens": limit, "temperature": float(temperature),
            "top_p": 1.0 if top_p is None else float(top_p)}


def cut(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (empty ones ignored)."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text


def summary(e: dict) -> str:
    tokens = f", visual tokens {e['visual_tokens']['before']:.1f} -> {e['visual_tokens']['after']:.1f} (mean)" \
        if e["visual_tokens"] else ""
    return (f"{e['questions']} questions ({e['failed']} failed) in {e['seconds']:.2f}s of model time, "
            f"{e['samples_per_s']:.2f} samples/s{tokens}")


def _flatten(visuals):
    if visuals is None:
        return
    if isinstance(visuals, (list, tuple)):
        for v in visuals:
            yield from _flatten(v)
    else:
        yield visuals


def _checked(name: str, value, parse):
    """`value` (a string, or what lmms-eval's parser made of one) through our CLI's check `parse`."""
    import argparse

    try:
        return parse(str(value))
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise Refused(f"model_args {name}={value}: {e}") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("expected an integer >= 1 (batch_size auto is not supported)")
    return int(text)


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")
