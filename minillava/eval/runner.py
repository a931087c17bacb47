"""The evaluation command: answer a benchmark's questions (resumable, data parallel), then score.

    python -m minillava.eval TASK --data DIR --output FILE.jsonl [--compressor C --retention-ratio R]
    torchrun --nproc-per-node K -m minillava.eval TASK --data DIR --output FILE.jsonl
    torchrun --nproc-per-node D*N -m minillava.eval TASK ... --tensor-parallel N   # D replicas of N ranks
    python -m minillava.eval TASK --data DIR --score-only --answers FILE.jsonl [--compare BASE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from .. import generate as gen
from ..trust import check_regular
from ..config import load_config
from ..batch import generate_batch, retry_alone, warm_up
from ..compression import compressor_help, compressors
from ..conversation import is_llava_vicuna
from ..flops import LlmSpec
from ..generate import DTYPE_HELP, DTYPES, USER_ERRORS, Steps, compile_steps, conv_template_arg, fail, load, quantize_args, \
    quantize_spec, ratio_arg, read_checkpoint, seed_arg
from ..tensor_parallel import LaunchError, check as check_split
from ..trust import ConfigError
from ..quant import Spec, chosen_note, input_widths
from ..weights import resolve_model
from . import distributed
from . import efficiency as E
from .answers import AnswerWriter, assign_keys, consolidate, is_failed, merge, part_file, part_files, read_records
from .files import JSON_ERRORS, DataError, json_problem, read_text, write_atomic
from .tasks import TASKS, Question, Task

# 8: a GPU's decode step reads the weights once for 8 rows; for 7B in float16 eight prompts of
# LLaVA-NeXT's ~2900 uncompressed tokens need ~12 GB of KV cache. On a CPU the tiny model gains little
# (its tower and prefill are compute-bound per question; bench.py row 10), and loses nothing.
DEFAULT_BATCH_SIZE = 8
SETTINGS = ("compressor", "retention_ratio", "max_new_tokens", "seed", "conv_template", "quantize")  # what an answers file must not mix


def parse_args(argv=None) -> argparse.Namespace:
    tasks = "\n".join(f"  {name:<10} {', '.join(task.layout())}" for name, task in TASKS.items())
    p = argparse.ArgumentParser(
        prog="python -m minillava.eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate LLaVA-NeXT (optionally with GlobalCom2 compression) on a benchmark of the "
        "GlobalCom2 paper, with LLaVA's prompts, greedy decoding and the official metrics. Answers are "
        "appended to --output as they come; running the same command again resumes. Under "
        "torchrun the questions are shared among the processes. At the end: one JSON line of metrics "
        "and of what answering cost (\"efficiency\", below), and a markdown row on stdout.",
        epilog=f"tasks and what --data holds for each (LLaVA's docs/Evaluation.md layout):\n{tasks}\n\n"
        "the summary line's \"efficiency\" (the questions answered by this run; timings synchronise the device "
        "and leave out loading and --compile's warm-up; with --compare also relative to the base run):\n"
        + "\n".join(f"  {k:<27} {v}" for k, v in E.FIELDS.items()),
    )
    p.add_argument("task", choices=list(TASKS), help="benchmark")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="the benchmark's folder: question file, images, annotations (LLaVA's playground/data/eval/<task>)")
    p.add_argument("--output", type=Path, metavar="FILE.jsonl", help="answers file, one JSON line per question; resumed if it exists")
    p.add_argument("--model", default=gen.DEFAULT_MODEL,
                   help=f"checkpoint directory or hub id (default {gen.DEFAULT_MODEL})")
    p.add_argument("--compressor", default=gen.DEFAULT_COMPRESSOR, choices=compressors(),
                   help=compressor_help())
    p.add_argument("--retention-ratio", type=ratio_arg, default=gen.DEFAULT_RETENTION_RATIO, metavar="R",
                   help=gen.RATIO_HELP)
    p.add_argument("--limit", type=int, metavar="N", help="only the first N questions of the question file")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="answer length limit (default per task: 16 for yes/no, 32 for short answers and letters, 1024 for MM-Vet)")
    p.add_argument("--questions", type=Path, metavar="FILE", help="another question file in the task's format (e.g. another split)")
    p.add_argument("--images", type=Path, metavar="DIR", help="another image folder")
    p.add_argument("--retry-failed", action="store_true", help="answer again the questions recorded as failed")
    p.add_argument("--score-only", action="store_true", help="score an existing answers file, without a model")
    p.add_argument("--answers", type=Path, metavar="FILE.jsonl",
                   help="with --score-only: the answers to score (ours or LLaVA's; default --output)")
    p.add_argument("--compare", type=Path, metavar="BASE.json",
                   help="metrics JSON line(s) of an uncompressed run: print each metric and efficiency field relative "
                   "to it, in percent")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random compressor (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help=DTYPE_HELP)
    conv_template_arg(p, "the template of LLaVA's script for the task (vicuna_v1) for a Vicuna LLaVA-1.6 "
                      "checkpoint (liuhaotian's or llava-hf's), as the paper; otherwise the checkpoint's")
    quantize_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the tower, prefill and decode step")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the decoder over N processes (launch D x N with torchrun --nproc-per-node D*N: D "
                   "replicas of N ranks share the questions; docs/tensor-parallel.md)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"questions answered together (default {DEFAULT_BATCH_SIZE}): one tower batch, one decoder "
                   "batch of unequal lengths; the answers are those of --batch-size 1. A batch that runs out of "
                   "GPU memory is answered again one by one; lower N if that happens often")
    args = p.parse_args(argv)
    if args.data is None and TASKS[args.task].needs_data:
        p.error(f"--data DIR is required: the folder of {args.task}'s question file, images and annotations")
    if args.score_only:
        args.answers = args.answers or args.output
        if args.answers is None:
            p.error("--score-only needs --answers FILE.jsonl (or --output)")
    elif args.output is None:
        p.error("--output FILE.jsonl is required (the answers file; it is resumed if it exists)")
    elif args.answers is not None:
        p.error("--answers goes with --score-only; to answer questions, give --output")
    if args.limit is not None and args.limit < 0:
        p.error("--limit must be >= 0")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    args.spec = quantize_spec(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    task = TASKS[args.task]
    try:
        check_paths(args, task)  # before any work
        args.base = baseline(args.compare, task.name) if args.compare else None  # (metrics, efficiency)
        if args.score_only:
            questions = select(task.load(args.data, args.questions, args.images), args.limit)
            records = merge(assign_keys(read_records(args.answers, missing_ok=False)))
            finish(args, task, questions, records, args.answers)
            return 0
        return answer_all(args, task)
    except LaunchError as e:  # the same on every rank: rank 0 says it (a rank > 0 exiting 1 first would have
        return fail(str(e)) if int(os.environ.get("RANK", 0)) == 0 else 0  # torchrun stop rank 0 before it speaks)
    except (DataError, *USER_ERRORS) as e:
        return fail(str(e))
    except OSError as e:  # the disk or a folder: full, read-only, removed, not a folder
        return fail(f"cannot read or write {e.filename}: {e.strerror}" if e.filename else str(e))


def check_paths(args, task: Task):
    """What we write (--output) must be a new or regular file in a folder, and neither it nor the
    answers we score may be a file we read (question or annotation file, --compare): a run would
    overwrite the questions, or score them as answers."""
    inputs = task.inputs(args.data, args.questions) + ([args.compare] if args.compare else [])
    checked = [("--answers", args.answers)] if args.score_only else [("--output", args.output)]
    for flag, path in checked:
        if os.path.exists(path) or args.score_only:
            check_regular(path, DataError, flag)  # a directory, FIFO, /dev/stdout (a pipe) or a typo
        if not args.score_only and path.parent.exists() and not path.parent.is_dir():
            raise DataError(f"{flag} {path}: {path.parent} is not a folder")
        check_not_input(flag, path, inputs)


def check_not_input(flag: str, path: Path, inputs: list[Path]):
    """DataError if `path` is the same file as one of `inputs` (hard and symbolic links included)."""
    for other in inputs:
        if os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            raise DataError(f"{flag} {path} is an input of this run ({other}); give another file")


def select(questions: list[Question], limit: int | None) -> list[Question]:
    return questions if limit is None else questions[:limit]


def answer_all(args, task: Task) -> int:
    """Answer the questions the answers file lacks, this process's share of them; rank 0 merges and scores."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda was asked for but CUDA is not available here; use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = distributed.init(device.type, args.tensor_parallel)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)  # what is made without a device (streams, events, graphs) goes there too
        all_questions = task.load(args.data, args.questions, args.images)
        task.check(args.data)
        questions = select(all_questions, args.limit)
        settings = {"compressor": args.compressor, "retention_ratio": args.retention_ratio,
                    "max_new_tokens": args.max_new_tokens or task.max_new_tokens, "seed": args.seed}
        if args.spec and args.spec.chosen:  # recorded only when asked for: files made without it stay resumable
            settings["quantize"] = quantize_setting(args.spec)
        output = args.output
        done = merge(assign_keys([r for path in [output, *part_files(output)] for r in read_records(path)]))
        check_settings(output, done.values(), settings)  # the template once the checkpoint is read (below)
        world.barrier()  # everyone has read the files before rank 0 rewrites them
        order = [q.key for q in all_questions]
        if world.main:
            output.parent.mkdir(parents=True, exist_ok=True)
            consolidate(output, order)  # leftovers of a killed run, merged and in order
        world.barrier()
        todo = [q for q in questions if q.key not in done or (args.retry_failed and is_failed(done[q.key]))]
        mine = todo[world.replica :: world.replicas]  # a replica's ranks answer the same questions together
        if todo:  # the checkpoint says which template this run asks in: a file made in another is refused here
            model_dir = fetch_model(args.model, world)
            settings["conv_template"], native = eval_template(model_dir, task.paper_template, args.conv_template)
            text = load_config(model_dir).text
            ranks = world.shard.size if world.shard else 1
            if world.shard:  # on every rank, a replica without questions too (it would wait at the gather); the
                check_split(text, ranks)  # split itself first: its error says what is wrong (weights.plan_load)
            if args.spec and not args.spec.chosen:  # int4's group size fits the widths each rank holds
                args.spec = args.spec.fit(input_widths(text, ranks))
                settings["quantize"] = quantize_setting(args.spec)
                if world.main:
                    print(chosen_note(args.spec), file=sys.stderr)
            check_settings(output, done.values(), settings, native)
            if world.shard:  # and its quantized shards keep int4's groups (an explicit --group-size)
                check_split(text, ranks, args.spec)
        if world.main:
            ranks = f" on {world.size} processes" if world.size > 1 else ""
            if world.shard:
                ranks += f": {world.replicas} replica{'s' * (world.replicas > 1)} of {world.shard.size} tensor-parallel ranks"
            print(f"{task.name}: {len(questions)} questions, {len(questions) - len(todo)} already in {output}, "
                  f"{len(todo)} to answer{ranks}", file=sys.stderr)
        costs, meters = [], []
        if todo:
            if mine:
                costs, meter = answer(args, task, mine, settings, model_dir, device, world)
                meters = [meter]
            shares = world.gather((costs, meters))  # what each rank's share cost, for the summary
            costs, meters = [c for x in shares for c in x[0]], [m for x in shares for m in x[1]]
        world.barrier()  # every rank's answers are in its part file
        if world.main:
            finish(args, task, questions, consolidate(output, order), output, E.summary(costs, meters))
    finally:
        world.close()
    return 0


def eval_template(model_dir: Path, paper: str | None, override: str | None) -> tuple[str, str | None]:
    """(the conversation template a run asks in, the checkpoint's own). `override` (--conv-template, the
    lmms-eval model's conv_template) if given; for a Vicuna LLaVA-1.6 checkpoint (conversation.is_llava_vicuna)
    `paper`, the template LLaVA's scripts ask it in (a task's `paper_template`: vicuna_v1, where the
    checkpoint's own is llava_v1; None: no script, the checkpoint's own); else the checkpoint's own, as for
    the tiny model trained here. The checkpoint's own is None if only `override` says."""
    try:
        cfg, tokenizer = read_checkpoint(model_dir)
    except ConfigError:
        if override is None:
            raise
        return override, None  # a checkpoint whose template only the flag tells
    native = tokenizer.template.name
    if override is not None:
        return override, native
    if paper and is_llava_vicuna(model_dir, cfg.layout, native, tokenizer.n_pieces):
        return paper, native
    return native, native


def quantize_setting(spec: Spec) -> str:
    """--quantize as an answers file records it: int8, or int4-gG with the group size."""
    return f"int{spec.bits}" + (f"-g{spec.group_size}" if spec.bits == 4 else "")


def fetch_model(model: str, world: distributed.World) -> Path:
    """The checkpoint directory; a hub id is downloaded by rank 0 alone, the others wait for it."""
    if world.main:
        model_dir = resolve_model(model)
        load_config(model_dir)  # not a checkpoint: say so before reading any weights
    world.barrier()
    return model_dir if world.main else resolve_model(model)


def answer(args, task: Task, questions: list[Question], settings: dict, model_dir: Path, device, world):
    """Answer `questions` with one model, --batch-size at a time, appending each record as soon as its
    batch is done. A question that fails is recorded as failed; the others of its batch are answered.
    Returns what answering cost: each answered question's `efficiency.QuestionCost`, and the Meter's."""
    model, tokenizer = load(model_dir, device, DTYPES.get(args.dtype), settings["conv_template"], args.spec,
                            world.shard)
    steps = Steps()
    if args.compile:  # warmed up on the first batch: its shapes (tiles, prompt lengths, batch, cache) compile here
        steps = compile_steps(model)
        first = [(image, q.prompt) for q, image in zip(questions, open_images(task, questions[: args.batch_size]))
                 if not isinstance(image, BaseException)]
        warm_up(model, steps, tokenizer, first, args.compressor, args.retention_ratio, settings["max_new_tokens"],
                args.seed)
    spec, tile = LlmSpec.from_text(args.model, model.cfg.text), E.tile_flops(model, args.compressor, args.retention_ratio)
    costs, meter = [], E.Meter(device)  # from here on: answering
    # one writer a replica: its first rank (the others compute the same answers)
    writer = (AnswerWriter(args.output if world.replicas == 1 else part_file(args.output, world.replica))
              if world.writes else None)
    share = f" (replica 0 of {world.replicas})" if world.shard else f" (rank 0 of {world.size})" if world.size > 1 else ""
    bar = tqdm(total=len(questions), desc=task.name + share, unit="q", file=sys.stderr, disable=not world.main,
               dynamic_ncols=True)
    try:
        for q, result in answered(args, task, questions, settings, model, tokenizer, steps, world.shard is None):
            record = {"key": q.key, "question_id": q.question_id, "prompt": q.text}
            if isinstance(result, BaseException):  # this question's fault: record it, go on
                message = " ".join(str(result).split()) or type(result).__name__
                record.update(text="", error=message)
                if writer:  # said once a replica
                    prefix = f"[rank {world.rank}] " if world.size > 1 else ""
                    tqdm.write(f"{prefix}question {q.question_id} failed: {message}", file=sys.stderr)
            else:
                record.update(text=result.text.strip(), visual_tokens=result.visual_tokens)
                costs.append(E.question_cost(result, E.text_tokens(tokenizer, q.prompt), spec, args.compressor,
                                              args.retention_ratio, tile))
            record.update(model_id=args.model, metadata=settings)
            if writer:
                writer.write(record)
            bar.update(1)
        measured = meter.stop()
    finally:
        bar.close()
        if writer:
            writer.close()
    return (costs if writer else []), measured  # each question counted once; every rank's memory


def answered(args, task: Task, questions: list[Question], settings: dict, model, tokenizer, steps,
             retry: bool = True):
    """(question, Result or exception) for each question, in order, --batch-size at a time. The next
    batch's images are opened (read, decoded, or made) in a thread while this batch is answered.
    `retry`: see `answer_batch`."""
    batches = [questions[s : s + args.batch_size] for s in range(0, len(questions), args.batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(open_images, task, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            opened = pending.result()  # a bug raised while opening is raised here
            if k + 1 < len(batches):
                pending = pool.submit(open_images, task, batches[k + 1])
            yield from zip(batch, answer_batch(args, task, batch, settings, model, tokenizer, steps, opened, retry))


def open_images(task: Task, batch: list[Question]) -> list:
    """Each question's PIL image, or the exception (one of USER_ERRORS) that opening it raised."""
    out = []
    for q in batch:
        try:
            out.append(task.open_image(q))
        except USER_ERRORS as e:
            out.append(e)
    return out


def answer_batch(args, task: Task, batch: list[Question], settings: dict, model, tokenizer, steps,
                 opened: list | None = None, retry: bool = True) -> list:
    """One Result or exception per question of `batch` (`opened`: its images from `open_images`, opened
    here if None). A batch that runs out of GPU memory is answered again one question at a time, so
    only a question too large alone fails (e.g. one huge image). Not with `retry` False (a tensor-parallel
    rank: its partners, which did not run out, would wait in the batch's collectives while it retried
    alone; the error stops the run, torchrun stops the others, and the answers file resumes)."""
    opened = open_images(task, batch) if opened is None else opened
    images = {i: x for i, x in enumerate(opened) if not isinstance(x, BaseException)}
    results = [x if isinstance(x, BaseException) else None for x in opened]

    def run(keys: list[int]) -> list:
        return generate_batch(model, tokenizer, [(images[i], batch[i].prompt) for i in keys], args.compressor,
                              args.retention_ratio, settings["max_new_tokens"], temperature=0.0, seed=args.seed,
                              steps=steps, return_exceptions=True)

    keys = list(images)
    done = (retry_alone(run, keys) if retry else run(keys)) if keys else []
    for i, r in zip(keys, done, strict=True):
        results[i] = r
    return results


def check_settings(output: Path, records, settings: dict, native: str | None = None):
    """An answers file holds one configuration: refuse to resume it with another. Only the SETTINGS that
    `settings` has are compared; a record without a template (made before templates were recorded, when
    one was recorded only if --conv-template named it) was made with the checkpoint's own, `native`."""
    keys = [k for k in SETTINGS if k in settings]
    new = {k: settings[k] for k in keys}
    for record in records:
        meta = record.get("metadata", {})
        old = {k: meta.get(k, native if k == "conv_template" else None) for k in keys}
        if "metadata" in record and old != new:
            differ = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in keys if old[k] != new[k])
            raise DataError(f"{output} holds answers made with other settings ({differ}); "
                            "use another --output, or the same settings to resume it")


def finish(args, task: Task, questions: list[Question], records: dict[str, dict], answers_path: Path,
           efficiency: dict | None = None):
    """Score, write the submission file if the task has one, print the JSON line (with `efficiency`, what
    answering cost, when this run answered questions) and the markdown row."""
    answered = [(q, records[q.key].get("text", "")) for q in questions if q.key in records]
    failed = sum(is_failed(records[q.key]) for q in questions if q.key in records)
    missing = len(questions) - len(answered)
    if missing:
        print(f"warning: {missing} of {len(questions)} questions have no answer in {answers_path}; "
              "they are left out of the metrics", file=sys.stderr)
    metrics = task.score(args.data, answered) if answered else {}
    first = next(iter(records.values()), {})
    settings = first.get("metadata", {})  # how the answers were made (LLaVA's own files do not say)
    kept = [records[q.key]["visual_tokens"] for q in questions if "visual_tokens" in records.get(q.key, {})]
    line = {
        "task": task.name,
        "model": first.get("model_id"),
        "compressor": settings.get("compressor"),
        "retention_ratio": settings.get("retention_ratio"),
        "questions": len(questions),
        "answered": len(answered) - failed,
        "failed": failed,
        "missing": missing,
        "visual_tokens": {k: round(sum(v[k] for v in kept) / len(kept), 1) for k in ("before", "after")} if kept else None,
        "headline": task.headline,
        "score": metrics.get(task.headline) if task.headline else None,
        "metrics": metrics,
    }
    if efficiency is not None:
        line["efficiency"] = {k: significant(v) for k, v in efficiency.items()}
    made = task.submission(args.data, answered) if answered else None
    if made is not None:
        suffix, content = made
        path = answers_path.with_name(answers_path.with_suffix("").name + suffix)
        check_not_input("the submission file", path, task.inputs(args.data, args.questions) + [answers_path])
        write_atomic(path, content)
        line["submission"] = str(path)
    if args.base is not None:
        base_metrics, base_efficiency = args.base
        line["relative"] = relative(metrics, base_metrics)
        if efficiency is not None and base_efficiency:
            line["relative"]["efficiency"] = E.relative(line["efficiency"], base_efficiency)
    printed = rounded(line)
    if efficiency is not None:
        printed["efficiency"] = line["efficiency"]  # significant digits, not decimals (see `significant`)
    print(json.dumps(printed))
    print(markdown_row(line))


def baseline(path: Path, task: str) -> tuple[dict, dict | None]:
    """The metrics and efficiency of `task` in BASE: what this command prints, for one task or several
    (markdown rows and other lines not starting with "{" are skipped; the last line of the task wins)."""
    objects = []
    for number, line in enumerate(read_text(path, "--compare file").split("\n"), 1):
        if line.lstrip().startswith("{"):
            try:
                objects.append(json.loads(line))
            except JSON_ERRORS as e:
                raise DataError(f"{path}:{number}: not a JSON line ({json_problem(e)})") from None
    found = [o for o in objects if isinstance(o, dict) and o.get("task") == task]
    if not found:
        raise DataError(f"{path}: no metrics of task {task} (expected the JSON line this command prints)")
    metrics, efficiency = found[-1].get("metrics", {}), found[-1].get("efficiency")
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: the metrics of task {task} are not an object")
    return metrics, efficiency if isinstance(efficiency, dict) else None


def relative(metrics: dict, base: dict) -> dict:
    """Each numeric metric as a percentage of the base run's (the paper's relative scores)."""
    return {k: 100.0 * v / base[k] for k, v in metrics.items()
            if isinstance(v, (int, float)) and isinstance(base.get(k), (int, float)) and base[k]}


def rounded(value):
    """Floats to 4 decimals, in nested dicts too: 75.0, not 74.99999999999999."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def significant(value):
    """A float to 4 significant digits (a tiny model's TFLOPs are 0.0003...), anything else as it is."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def markdown_row(line: dict) -> str:
    """| task | compressor | retention ratio | metric | value | vs base | answered/questions |"""
    value = line["score"]
    rel = line.get("relative", {}).get(line["headline"]) if line["headline"] else None
    ratio = line["retention_ratio"] if line["compressor"] not in (None, "none") else "-"  # no ratio without compression
    cells = [line["task"], line["compressor"] or "-", ratio, line["headline"] or "-",
             "-" if value is None else f"{value:.2f}", "-" if rel is None else f"{rel:.1f}%",
             f"{line['answered']}/{line['questions']}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"
