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
from dataclasses import dataclass, field

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="minillava", simple_class_path="minillava.apps.lmms.MiniLlava")

# lmms-eval's LLaVA models' default answer length when a task's generation_kwargs give none
DEFAULT_MAX_NEW_TOKENS = 1024
IMAGE = "<image>"
# The template a Vicuna LLaVA-1.6 checkpoint is asked in by default: LLaVA's benchmark scripts'
# (scripts/v1_5/eval/*.sh: --conv-mode vicuna_v1), as lmms-eval's own `llava` model's default
# conv_template (lmms_eval/models/simple/llava.py) and minillava.eval's `paper_template`.
PAPER_TEMPLATE = "vicuna_v1"


class Refused(SystemExit):
    """What this model cannot do (a request kind, a question without exactly one image, a bad
    model_arg), said in one line. A SystemExit rather than a ValueError because lmms-eval's CLI
    catches every Exception, prints its traceback, logs "Error during evaluation" and exits 0; a
    SystemExit passes through it: the interpreter prints the message alone and exits with 1. Under
    `accelerate launch` the other ranks are stopped by the launcher. Library callers of
    `simple_evaluate` can catch it as `Refused`."""

    def __init__(self, message: str):
        super().__init__(f"error: minillava: {message}")


def choose_device(device: str | None, world_size: int, local_index: int):
    """The torch.device of model_args' `device` (cpu, cuda, cuda:N; default cuda when available, under data
    parallel the GPU of the process's local index), made the current CUDA device: what is made without a
    device (pinned buffers, events, CUDA graphs, the current stream that generate.TokenReader and the
    compiled steps run on) then belongs to the model's GPU, not to cuda:0. Refused for anything else."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (device in ("cpu", "cuda") or device.startswith("cuda:")):
        raise Refused(f"device={device}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Refused(f"device={device} was asked for but CUDA is not available here; use device=cpu")
    if device.startswith("cuda") and world_size > 1:
        device = f"cuda:{local_index}"
    try:
        chosen = torch.device(device)
    except RuntimeError:  # "cuda:x"
        raise Refused(f"device={device}: expected cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and chosen.index is not None:
        torch.cuda.set_device(chosen)
    return chosen


class MiniLlava(lmms):
    """LLaVA-NeXT (any checkpoint `python -m minillava.generate` takes) with a visual-token compressor.

    model_args (as `python -m minillava.eval`'s flags): pretrained (checkpoint directory or hub id),
    compressor, retention_ratio, conv_template (default: vicuna_v1 for a Vicuna LLaVA-1.6 checkpoint, as
    LLaVA's scripts; else the checkpoint's), device (cpu, cuda, cuda:N; default cuda when available),
    dtype (float32, bfloat16, float16; default as our CLI), quantize (int8, int4) and group_size (int4's),
    compile (true/false), seed (of the random compressor and of sampling), batch_size (questions answered
    together; lmms-eval's `--batch_size` sets it too, model_args wins). tensor_parallel other than 1 is
    refused: lmms-eval's evaluator gives every process its own share of the documents (build_all_requests
    with RANK and WORLD_SIZE, lmms_eval/evaluator.py), whereas the N ranks splitting one model must run
    the same questions together; `python -m minillava.eval --tensor-parallel N` does that."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, compressor: str | None = None,
                 retention_ratio: float | None = None, conv_template: str | None = None, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None, group_size: int | str | None = None,
                 compile: bool | str = False, seed: int | str = 0, batch_size: int | str = 1, max_batch_size=None,
                 tensor_parallel: int | str = 1, **unknown) -> None:
        super().__init__()
        from accelerate import Accelerator
        from loguru import logger

        from .. import generate as gen
        from ..compression import compressors
        from ..conversation import TEMPLATES
        from ..eval import distributed
        from ..eval import efficiency as E
        from ..eval.runner import eval_template, fetch_model
        from ..flops import LlmSpec

        if unknown:
            raise Refused(f"unknown model_args {', '.join(sorted(unknown))}; accepted: pretrained, compressor, "
                          "retention_ratio, conv_template, device, dtype, quantize, group_size, compile, seed, "
                          "batch_size, tensor_parallel (1)")
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
        spec = quantization(quantize, group_size)
        compile = _checked("compile", compile, _boolean)
        if str(tensor_parallel) != "1":  # see the class docstring
            raise Refused(f"model_args tensor_parallel={tensor_parallel}: lmms-eval gives each process its own "
                          "documents, so the ranks splitting one model would be asked different questions; use "
                          "torchrun -m minillava.eval TASK --tensor-parallel N (docs/tensor-parallel.md)")

        # Data parallel as lmms-eval's own simple models (llava_hf.py): under `accelerate launch` each
        # process takes the GPU of its local rank; lmms-eval's evaluator gives each rank its share of
        # the documents (task.build_all_requests(rank, world_size)) and gathers the answers.
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = choose_device(device, self._world_size, self.accelerator.local_process_index)
        world = distributed.World(self._rank, self._world_size, self.accelerator.local_process_index)
        try:
            model_dir = fetch_model(pretrained or gen.DEFAULT_MODEL, world)  # a hub id: rank 0 downloads
            # minillava.eval's rule: model_args wins; a Vicuna LLaVA-1.6 checkpoint the paper's; else its own
            template, native = eval_template(model_dir, PAPER_TEMPLATE, conv_template)
            self.model, self.tokenizer = gen.load(model_dir, self._device, gen.DTYPES.get(dtype), template, spec)
        except gen.USER_ERRORS as e:
            raise Refused(str(e)) from None
        if conv_template is not None:
            why = "model_args"
        elif template != native:
            why = "LLaVA's benchmark scripts' for a Vicuna LLaVA-1.6 checkpoint; conv_template=NAME overrides"
        else:
            why = "the checkpoint's"
        if self._rank == 0:
            logger.info(f"minillava: conv_template {template} ({why})")
        self.pretrained = pretrained
        self.steps = gen.compile_steps(self.model) if compile else gen.Steps()
        self.warm = not compile  # compiled steps are warmed up on the first batch asked (`generate_until`)
        # what each answered question cost, counted as minillava.eval's runner.answer counts it
        self.llm = LlmSpec.from_text(pretrained or gen.DEFAULT_MODEL, self.model.cfg.text)
        try:
            self.tile = E.tile_flops(self.model, self.compressor, self.retention_ratio)  # one tile through the tower
        except gen.USER_ERRORS as e:  # a tower method this tower cannot run at this r
            raise Refused(str(e)) from None
        self.shares: list[Share] = []  # one per generate_until call: see `efficiency`

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
        we refuse, a prompt longer than the context) answers "" with a warning, as lmms-eval's models do.
        Logs (INFO) what answering cost: the line `log_line` writes, this process's share of the run."""
        from loguru import logger
        from tqdm import tqdm

        from ..eval import efficiency as E

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        options = {key: generation_options(requests[indices[0]].args[1]) for key, indices in groups.items()}
        if not self.warm and groups:  # at the first batch's shapes, before answering is measured
            from ..batch import warm_up

            key, indices = next(iter(groups.items()))
            items = [self._item(requests[i]) for i in indices[: self.batch_size]]
            warm_up(self.model, self.steps, self.tokenizer, items, self.compressor, self.retention_ratio,
                    options[key]["max_new_tokens"], self.seed)
            self.warm = True
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="minillava", unit="q")
        share, meter = Share(), E.Meter(self._device)  # from here on: answering (after loading and warm-up)
        try:
            for key, indices in groups.items():
                self._answer_group(requests, indices, options[key], answers, bar, share)
        finally:  # a refusal's message then starts a line of its own
            bar.close()
        share.measured = meter.stop()
        self.shares.append(share)
        if share.questions:
            where = f" on rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
            logger.info(log_line(cost([[share]]), where))
        return answers

    def _answer_group(self, requests, indices: list[int], options: dict, answers: list, bar, share: Share):
        """Answer requests[i] for i in `indices` (one gen_kwargs) into answers[i], batch_size at a time,
        counting each question and what it cost into `share` (as minillava.eval's runner.answer)."""
        from loguru import logger

        from ..eval import efficiency as E

        for start in range(0, len(indices), self.batch_size):
            batch = [requests[i] for i in indices[start : start + self.batch_size]]
            items = [self._item(request) for request in batch]
            for i, request, (_, text), result in zip(indices[start:], batch, items, self._answer(items, options)):
                context, gen_kwargs, _, doc_id, task, _ = request.args
                if isinstance(result, BaseException):
                    logger.warning(f"minillava: {task} doc {doc_id} failed: {' '.join(str(result).split())}")
                    answers[i] = ""
                else:
                    answers[i] = cut(result.text, options["until"]).strip()
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[i])
                # lmms-eval pads a rank's requests with copies of one of them so that ranks have equal
                # counts (evaluator._clone_padding_request, task.build_all_requests): answered, not counted
                if not (request.metadata or {}).get("__padding_only__"):
                    share.questions += 1
                    if isinstance(result, BaseException):
                        share.failed += 1
                    else:
                        share.costs.append(E.question_cost(result, E.text_tokens(self.tokenizer, text), self.llm,
                                                           self.compressor, self.retention_ratio, self.tile))
            bar.update(len(batch))

    def _answer(self, items: list[tuple], options: dict) -> list:
        """Result or exception per (image, question) of `items`: one `generate_batch` call; a batch that runs
        out of GPU memory is answered again one question at a time (as minillava.eval's runner does)."""
        from ..batch import generate_batch, retry_alone

        def run(some):
            return generate_batch(self.model, self.tokenizer, some, self.compressor, self.retention_ratio,
                                  options["max_new_tokens"], temperature=options["temperature"],
                                  top_p=options["top_p"], seed=self.seed, steps=self.steps, return_exceptions=True)

        return retry_alone(run, items)

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
        """What this process's generate_until calls so far cost: `cost`'s dict (questions, failed, and
        minillava.eval's efficiency fields)."""
        return cost([self.shares])

    def clean(self):
        """Under data parallel, rank 0 logs what the whole run cost (every rank's shares: the longest wall
        time, the largest peak, as minillava.eval under torchrun), then lmms' clean frees the model.
        Gathered here, not in generate_until: lmms-eval 0.7.3's evaluator calls `lm.clean()` on every rank
        after its loop over request types, whereas a rank may skip generate_until (with --use_cache, when
        all its requests are cached, ResponseCache.execute does not call the model), and a collective
        call that one rank skips hangs the others."""
        import torch.distributed as dist
        from loguru import logger

        from ..eval import distributed

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            processes = distributed.World(self.rank, self.world_size).gather(self.shares)
            if self.rank == 0 and any(s.questions for shares in processes for s in shares):
                logger.info(log_line(cost(processes), f" on {self.world_size} ranks together"))
        super().clean()

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


@dataclass
class Share:
    """What one generate_until call of one process answered, and what it cost."""

    questions: int = 0  # lmms-eval's padding copies left out
    failed: int = 0
    costs: list = field(default_factory=list)  # efficiency.QuestionCost of each answered question
    measured: dict = field(default_factory=dict)  # its efficiency.Meter's stop(): wall_s, peak_*_mib


def cost(processes: list[list[Share]]) -> dict:
    """{"questions", "failed", and minillava.eval's efficiency fields (eval/efficiency.py `summary`; absent
    when no question was answered)} of each process's shares. A process's calls ran one after another
    (their wall times add up, a peak is the largest); the processes ran side by side (`summary`)."""
    from ..eval import efficiency as E

    shares = [s for p in processes for s in p]
    meters = []
    for p in filter(None, processes):
        peaks = {k for s in p for k in s.measured if k.startswith("peak_")}
        meters.append({"wall_s": sum(s.measured.get("wall_s", 0.0) for s in p),
                       **{k: max(s.measured[k] for s in p if k in s.measured) for k in peaks}})
    out = {"questions": sum(s.questions for s in shares), "failed": sum(s.failed for s in shares)}
    return {**out, **(E.summary([c for s in shares for c in s.costs], meters) or {})}


def log_line(e: dict, where: str = "") -> str:
    """`minillava: N questions (F failed)[where], efficiency {...}`: `cost`'s fields as the summary line of
    minillava.eval prints its `efficiency` object (4 significant digits)."""
    from ..eval.runner import significant

    fields = {k: significant(v) for k, v in e.items() if k not in ("questions", "failed")}
    return f"minillava: {e['questions']} questions ({e['failed']} failed){where}, efficiency {json.dumps(fields)}"


def quantization(quantize, group_size):
    """The quant.Spec of model_args quantize and group_size, as our CLIs' --quantize / --group-size
    (generate.py quantize_args): None when not quantized; int4 without group_size gets the one that fits
    the model (quant.Spec.fit, said when loading)."""
    from ..quant import Spec

    bits = {None: None, "int8": 8, "int4": 4}
    if quantize not in bits:
        raise Refused(f"model_args quantize={quantize}: expected int8 or int4")
    if group_size is not None and quantize == "int4":
        group_size = _checked("group_size", group_size, _group_size)
    try:
        return Spec.of(bits[quantize], group_size)
    except ValueError:
        raise Refused(f"model_args group_size={group_size} goes with quantize=int4") from None


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


def _group_size(text: str) -> int:
    from ..quant import GROUP_SIZES

    if not text.isdigit() or int(text) not in GROUP_SIZES:
        raise ValueError(f"expected one of {', '.join(map(str, GROUP_SIZES))} (inputs sharing one int4 scale)")
    return int(text)


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")
