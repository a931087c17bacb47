"""lmms-eval runs the model `minillava` end to end and answers what `python -m minillava.eval` answers.

Offline: the tasks are written here (a json dataset of synthetic scenes, a task yaml, exact match), in
a folder given to lmms-eval as include_path. Each check runs lmms-eval's own evaluator in a
subprocess: `simple_evaluate(model="minillava", ...)` for the settings (the model found through the
`lmms_eval.models` entry point, as the CLI finds it), and the CLI itself for its exit code, table and
one-line refusals. Skipped when lmms-eval is not installed (see INSTALL).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minillava.eval import runner
from minillava.eval import synthetic as S
from tests.test_eval_tasks import dress_as_vicunas

ROOT = Path(__file__).resolve().parent.parent
INSTALL = 'pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3'
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason=f"lmms-eval is not installed; {INSTALL}")

TINY = ROOT / "weights" / "llava-next-tiny-scenes"
N = 4  # questions: batch 3 answers them as a batch of 3 and one of 1
COMPRESSORS = ("none", "globalcom2", "fastv")
MAX_NEW_TOKENS = 8  # minillava.eval's synthetic task answers with at most 8 tokens
NOISE_TOKENS = 16  # the random checkpoint's answers: 16 tokens of noise, long enough to cut
SAMPLED = "temperature=0.8,top_p=0.9,do_sample=true"  # lmms-eval's --gen_kwargs, over the task's
QUANTIZED = {"int8": ("--quantize", "int8"), "int4": ("--quantize", "int4")}  # int4: the eval chooses 64, the
# largest group dividing the tiny model's input widths (192, 512); as model_args it is given: quantize=int4,group_size=64

UTILS = '''
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]

def two_images(doc):
    return [Image.open(doc["image"]).convert("RGB")] * 2

def doc_to_text(doc):
    return doc["question"]
'''
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.{visual}
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
{generation}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHOICE = """task: choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: 0
doc_to_choice: ["1", "2"]
metric_list:
  - metric: acc
"""

# Runs lmms-eval's evaluator on each run of a spec file; prints {name: {answers, score} or {refused}}, the
# template each of spec["templates"]'s models asks in and what it logged about it, and problems of commands.
DRIVER = '''
import json, sys
from loguru import logger
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from minillava.apps.lmms import MiniLlava, Refused

spec = json.load(open(sys.argv[1]))
tasks = TaskManager("WARNING", include_path=spec["include"], include_defaults=False)
out = {}
for name, model_args in spec.get("templates", {}).items():
    said = []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="INFO",
                      filter=lambda r: r["message"].startswith("minillava: conv_template"))
    model = MiniLlava.create_from_arg_string(model_args)
    logger.remove(sink)
    out[name] = {"template": model.tokenizer.template.name, "said": said}
if "padding" in spec:  # a question and the padding copy lmms-eval's evaluator makes of it for a rank with fewer
    from PIL import Image
    from lmms_eval.api.instance import Instance
    from lmms_eval.evaluator import _clone_padding_request

    pad = spec["padding"]
    model = MiniLlava.create_from_arg_string(pad["model_args"])
    model.task_dict = {"t": {"test": [{"image": pad["image"]}]}}
    visual = lambda doc: [Image.open(doc["image"]).convert("RGB")]
    real = Instance("generate_until", (pad["question"], {"max_new_tokens": 8}, visual, 0, "t", "test"), 0,
                    {"task": "t", "doc_id": 0, "repeats": 1})
    out["padding"] = {"answers": model.generate_until([real, _clone_padding_request(real)]),
                      "efficiency": model.efficiency()}
for run in spec["runs"]:
    try:
        r = simple_evaluate(model="minillava", model_args=run["model_args"], tasks=[run["task"]],
                            batch_size=run["batch_size"], gen_kwargs=run.get("gen_kwargs"), task_manager=tasks,
                            log_samples=True, verbosity="WARNING")
    except Refused as e:
        out[run["name"]] = {"refused": str(e.code)}
        continue
    samples = r["samples"][run["task"]]
    out[run["name"]] = {"answers": {s["doc"]["question_id"]: s["resps"][0][0] for s in samples},
                        "score": r["results"][run["task"]]["exact_match,none"]}

import inspect
import lmms_eval.__main__ as cli
from lmms_eval.utils import simple_parse_args_string
from minillava.apps.lmms import MiniLlava

accepted = set(inspect.signature(MiniLlava.__init__).parameters) - {"self", "unknown"}
problems = []
for where, argv in spec.get("commands", []):  # each lmms-eval command the docs show, through lmms-eval's parser
    sys.argv = ["lmms-eval", *argv]
    try:
        args = cli.parse_eval_args()[1]
    except SystemExit as e:
        problems.append(f"{where}: lmms-eval's parser exits with {e.code}")
        continue
    unknown = set(simple_parse_args_string(args.model_args or "")) - accepted
    if args.model != "minillava" or unknown:
        problems.append(f"{where}: model {args.model}, unknown model_args {sorted(unknown)}")
out["commands"] = problems
print("RESULT " + json.dumps(out))
'''


def lmms_env(tmp: Path) -> dict:
    """Environment of an lmms-eval subprocess: offline, caches in `tmp`, this checkout first on the path,
    and the entry point of pyproject.toml even when the installed metadata predates it (an editable
    install made before it was added): then a dist-info declaring pyproject's entry point is put on the path."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"minillava": "minillava.apps.lmms:MANIFEST"}
    path = [str(ROOT)]
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    if installed.get("minillava") != declared["minillava"]:
        info = tmp / "entry" / "minillava_lmms_entry-0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: minillava-lmms-entry\nVersion: 0\n")
        (info / "entry_points.txt").write_text(f"[lmms_eval.models]\nminillava = {declared['minillava']}\n")
        path.append(str(tmp / "entry"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
            "TOKENIZERS_PARALLELISM": "false"}


def shown_commands() -> list[tuple[str, list[str]]]:
    """(page:line, arguments) of each `lmms-eval ...` or `... -m lmms_eval ...` command in README.md and docs/."""
    from tests.test_docs_commands import PAGES, fenced_commands, simple_commands

    out = []
    for page in PAGES:
        for line, command in fenced_commands(page):
            for words in simple_commands(command):
                where = f"{page.relative_to(ROOT)}:{line}"
                if words[0] == "lmms-eval":
                    out.append((where, words[1:]))
                elif "-m" in words[:-1] and words[words.index("-m") + 1] == "lmms_eval":
                    out.append((where, words[words.index("-m") + 2 :]))
    return out


def run(cmd: list[str], tmp: Path, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**lmms_env(tmp), **env}, capture_output=True, text=True, timeout=600)


def eval_answers(data: Path, out: Path, model: Path, compressor: str, *extra: str) -> list[dict]:
    """minillava.eval's records on the split in `data`, in question order; the JSON line it printed (with
    its `efficiency`) in `out`.line.json."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert runner.main(["synthetic", "--data", str(data), "--output", str(out), "--model", str(model),
                            "--compressor", compressor, "--batch-size", "1", *extra]) == 0
    out.with_suffix(".line.json").write_text(printed.getvalue().splitlines()[0])
    return [json.loads(line) for line in out.read_text().splitlines()]


def eval_line(tmp: Path, compressor: str) -> dict:
    """The JSON line of setup's minillava.eval run of `compressor`."""
    return json.loads((tmp / f"eval-{compressor}.line.json").read_text())


def drive(tmp: Path, name: str, spec: dict) -> dict:
    """DRIVER's result on `spec` (include: the task folder; runs; optional templates and commands)."""
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    (tmp / "driver.py").write_text(DRIVER)
    done = run([sys.executable, str(tmp / "driver.py"), str(tmp / f"{name}.json")], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


LOG = re.compile(r"minillava: (\d+) questions \((\d+) failed\)( on rank \d of \d| on \d ranks together)?, "
                 r"efficiency (\{[^{}]*\})")


def logged(output: str) -> list[tuple[int, int, str, dict]]:
    """(questions, failed, where, efficiency) of each of the adapter's INFO lines of what answering cost."""
    return [(int(m[1]), int(m[2]), (m[3] or "").strip(), json.loads(m[4])) for m in LOG.finditer(output)]


def check_efficiency(e: dict, eval_efficiency: dict, n: int):
    """The adapter's efficiency fields against minillava.eval's on the same questions: the counted ones
    (visual tokens, TFLOPs) equal to the printed precision, the measured ones positive and consistent."""
    assert e["measured"] == n
    for key in ("visual_tokens_before", "visual_tokens_after", "prefill_tflops", "tower_tflops"):
        assert e[key] == eval_efficiency[key], key
    assert 0 < e["prefill_ms"] <= e["ttft_ms"]
    assert e["decode_tokens_per_s"] > 0 and e["samples_per_s"] > 0
    peaks = {k for k in e if k.startswith("peak_")}
    assert peaks in ({"peak_rss_mib"}, {"peak_allocated_mib", "peak_reserved_mib"}) and all(e[k] > 0 for k in peaks)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, checkpoints):
    """The split, its lmms-eval tasks, minillava.eval's answers, and lmms-eval's for every run."""
    tmp = tmp_path_factory.mktemp("lmms")
    data = S.write_split(tmp / "data" / "synthetic", N)  # where examples/lmms/ reads it, from tmp
    answers = json.loads((data / "answers.json").read_text())
    rows = [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines()]
    (tmp / "scenes.jsonl").write_text("".join(json.dumps(
        {"question_id": r["question_id"], "image": str(data / "images" / r["image"]), "question": r["text"],
         "answer": answers[r["question_id"]]}) + "\n" for r in rows))
    ours = {c: eval_answers(data, tmp / f"eval-{c}.jsonl", TINY, c) for c in COMPRESSORS}
    quantized = {q: eval_answers(data, tmp / f"eval-{q}.jsonl", TINY, "globalcom2", *flags) for q, flags in QUANTIZED.items()}
    noise = eval_answers(data, tmp / "eval-noise.jsonl", checkpoints["hub"], "globalcom2",
                         "--max-new-tokens", str(NOISE_TOKENS))
    # a stop string from the middle of the first noise answer (no whitespace: the answers are stripped)
    text = noise[0]["text"]
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if not any(ch.isspace() for ch in text[i : i + 2]))

    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    greedy = f"  max_new_tokens: {MAX_NEW_TOKENS}\n  temperature: 0\n  do_sample: false"
    cut = f"  max_new_tokens: {NOISE_TOKENS}\n  until: [{json.dumps(stop)}]"
    for name, visual, generation in [("scenes", "doc_to_visual", greedy), ("noise", "doc_to_visual", cut),
                                     ("pair", "two_images", greedy)]:
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=tmp / "scenes.jsonl", visual=visual,
                                                         generation=generation))
    (tasks / "choice.yaml").write_text(CHOICE.format(data=tmp / "scenes.jsonl"))

    # batch 3 through model_args, which win over simple_evaluate's batch_size (the CLI's --batch_size),
    # with every other model_arg of our CLI at minillava.eval's defaults for this model
    every = "seed=0,conv_template=llava_v1,dtype=float32,device=cpu,compile=false"
    runs = [{"name": f"{c}-b{b}", "task": "scenes", "batch_size": 1,
             "model_args": f"pretrained={TINY},compressor={c},retention_ratio=0.25" + (f",batch_size=3,{every}" if b > 1 else "")}
            for c in COMPRESSORS for b in (1, 3)]
    runs += [{"name": "noise", "task": "noise", "batch_size": 2,
              "model_args": f"pretrained={checkpoints['hub']},compressor=globalcom2"},
             {"name": "sampled", "task": "noise", "batch_size": 1, "gen_kwargs": SAMPLED,
              "model_args": f"pretrained={checkpoints['hub']},compressor=globalcom2,seed=3"},
             {"name": "pair", "task": "pair", "batch_size": 1, "model_args": f"pretrained={TINY}"},
             {"name": "choice", "task": "choice", "batch_size": 1, "model_args": f"pretrained={TINY}"},
             {"name": "ratio", "task": "scenes", "batch_size": 1, "model_args": f"pretrained={TINY},retention_ratio=2"},
             {"name": "int8", "task": "scenes", "batch_size": 1, "model_args": f"pretrained={TINY},quantize=int8"},
             {"name": "int4", "task": "scenes", "batch_size": 1,
              "model_args": f"pretrained={TINY},quantize=int4,group_size=64"},
             {"name": "group-alone", "task": "scenes", "batch_size": 1, "model_args": f"pretrained={TINY},group_size=64"},
             {"name": "group-bad", "task": "scenes", "batch_size": 1,
              "model_args": f"pretrained={TINY},quantize=int4,group_size=48"},
             {"name": "bits-bad", "task": "scenes", "batch_size": 1, "model_args": f"pretrained={TINY},quantize=int3"},
             {"name": "tp", "task": "scenes", "batch_size": 1, "model_args": f"pretrained={TINY},tensor_parallel=2"}]
    vicunas = dress_as_vicunas(tmp_path_factory.mktemp("vicuna"), checkpoints)
    templates = {f"vicuna-{k}": f"pretrained={v},device=cpu" for k, v in vicunas.items()}
    templates |= {"vicuna-override": f"pretrained={vicunas['hf']},device=cpu,conv_template=llava_v1",
                  "tiny": f"pretrained={TINY},device=cpu"}
    commands = shown_commands()
    assert len(commands) >= 3, commands  # README's and docs/evaluation.md's: fewer means the extraction broke
    padding = {"model_args": f"pretrained={TINY},compressor=globalcom2", "image": str(data / "images" / rows[0]["image"]),
               "question": rows[0]["text"]}
    lmms = drive(tmp, "spec", {"include": str(tasks), "runs": runs, "templates": templates, "padding": padding,
                               "commands": commands})
    return {"tmp": tmp, "tasks": tasks, "answers": answers, "ours": ours, "noise": noise, "stop": stop,
            "quantized": quantized, "lmms": lmms}


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("batch", [1, 3])
def test_answers_equal_minillava_eval(setup, compressor, batch):
    got = setup["lmms"][f"{compressor}-b{batch}"]
    ours = {r["question_id"]: r["text"] for r in setup["ours"][compressor]}
    assert got["answers"] == ours
    correct = [ours[q] == a for q, a in setup["answers"].items()]
    assert got["score"] == pytest.approx(sum(correct) / len(correct))


def test_until_cuts_at_the_first_stop_string(setup):
    stop, got = setup["stop"], setup["lmms"]["noise"]["answers"]
    expected = {r["question_id"]: (r["text"][: r["text"].find(stop)] if stop in r["text"] else r["text"]).strip()
                for r in setup["noise"]}
    assert got == expected
    first = setup["noise"][0]
    assert len(got[first["question_id"]]) < len(first["text"])  # the first answer was cut


def test_sampling_follows_gen_kwargs(setup, checkpoints):
    """temperature and top_p from gen_kwargs, the seed from model_args: the answers are generate_batch's
    with those settings, one question at a time, cut at the task's stop string."""
    from PIL import Image

    from minillava.batch import generate_batch
    from minillava.generate import load

    model, tokenizer = load(checkpoints["hub"])
    rows = [json.loads(line) for line in (setup["tmp"] / "scenes.jsonl").read_text().splitlines()]
    stop, expected = setup["stop"], {}
    for r in rows:
        (result,) = generate_batch(model, tokenizer, [(Image.open(r["image"]).convert("RGB"), r["question"])],
                                   "globalcom2", 0.25, NOISE_TOKENS, temperature=0.8, top_p=0.9, seed=3)
        text = result.text
        expected[r["question_id"]] = (text[: text.find(stop)] if stop in text else text).strip()
    assert setup["lmms"]["sampled"]["answers"] == expected
    assert expected != setup["lmms"]["noise"]["answers"]  # sampled, not greedy


@pytest.mark.parametrize("quantize", list(QUANTIZED))
def test_quantized_answers_equal_minillava_eval(setup, quantize):
    """quantize (and int4's group_size) as model_args: the answers of `minillava.eval --quantize ...`, which
    without --group-size chose and recorded the same group size."""
    got = setup["lmms"][quantize]["answers"]
    assert got == {r["question_id"]: r["text"] for r in setup["quantized"][quantize]}
    assert all(r["metadata"]["quantize"] == {"int8": "int8", "int4": "int4-g64"}[quantize] for r in setup["quantized"][quantize])


def test_paper_template_by_default(setup):
    """minillava.eval's rule (runner.eval_template): a Vicuna LLaVA-1.6 checkpoint (llava-hf's, liuhaotian's)
    is asked in vicuna_v1, conv_template wins, the tiny model keeps its own; said once at INFO."""
    got = {k: setup["lmms"][k] for k in ("vicuna-hf", "vicuna-original", "vicuna-override", "tiny")}
    assert {k: v["template"] for k, v in got.items()} == {"vicuna-hf": "vicuna_v1", "vicuna-original": "vicuna_v1",
                                                          "vicuna-override": "llava_v1", "tiny": "llava_v1"}
    assert got["vicuna-hf"]["said"] == ["minillava: conv_template vicuna_v1 (LLaVA's benchmark scripts' for a Vicuna "
                                        "LLaVA-1.6 checkpoint; conv_template=NAME overrides)"]
    assert got["vicuna-override"]["said"] == ["minillava: conv_template llava_v1 (model_args)"]
    assert got["tiny"]["said"] == ["minillava: conv_template llava_v1 (the checkpoint's)"]


def test_padding_copies_are_answered_not_counted(setup):
    """lmms-eval evens out the ranks' request counts with copies of a request (its __padding_only__
    metadata): the copy is answered, as lmms-eval expects, but its cost is not counted twice."""
    got, first = setup["lmms"]["padding"], setup["ours"]["globalcom2"][0]
    assert got["answers"] == [first["text"]] * 2
    e = got["efficiency"]
    assert (e["questions"], e["failed"], e["measured"]) == (1, 0, 1)
    assert (e["visual_tokens_before"], e["visual_tokens_after"]) == (first["visual_tokens"]["before"],
                                                                    first["visual_tokens"]["after"])


def test_refusals_are_one_line(setup):
    refused = {k: setup["lmms"][k].get("refused") for k in ("pair", "choice", "ratio", "group-alone", "group-bad",
                                                            "bits-bad", "tp")}
    assert refused["pair"] == ("error: minillava: task pair, doc 0 has 2 images; the model answers questions about "
                               "exactly one image (LLaVA-NeXT's single-image prompt): choose a single-image task")
    assert refused["choice"].startswith("error: minillava: task choice asks for loglikelihood")
    assert refused["ratio"] == "error: minillava: model_args retention_ratio=2: 2 is outside (0, 1]: it is the " \
                               "fraction of visual tokens kept"
    assert refused["group-alone"] == "error: minillava: model_args group_size=64 goes with quantize=int4"
    assert refused["group-bad"] == "error: minillava: model_args group_size=48: expected one of 32, 64, 128, 256 " \
                                   "(inputs sharing one int4 scale)"
    assert refused["bits-bad"] == "error: minillava: model_args quantize=int3: expected int8 or int4"
    assert refused["tp"] == ("error: minillava: model_args tensor_parallel=2: lmms-eval gives each process its own "
                             "documents, so the ranks splitting one model would be asked different questions; use "
                             "torchrun -m minillava.eval TASK --tensor-parallel N (docs/tensor-parallel.md)")


def test_shown_commands_parse(setup):
    """Each lmms-eval command in README.md and docs/ parses with lmms-eval's own parser (tests/
    test_docs_commands.py checks our CLIs' commands; lmms-eval is not one of them), names our model,
    and gives it only model_args it takes."""
    assert setup["lmms"]["commands"] == []


def test_cli(setup):
    """The CLI finds the model, runs the README's example task (examples/lmms/, on the split in
    tmp/data/synthetic), prints the table with the score, and our efficiency line; a refusal is one
    line on stderr with exit code 1, no traceback."""
    tmp, tasks = setup["tmp"], setup["tasks"]
    done = run([sys.executable, "-m", "lmms_eval", "--model", "minillava", "--model_args",
                f"pretrained={TINY},compressor=globalcom2,retention_ratio=0.25", "--batch_size", "2",
                "--include_path", str(ROOT / "examples" / "lmms"), "--tasks", "synthetic_scenes"], tmp, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = setup["ours"]["globalcom2"]
    score = sum(r["text"] == setup["answers"][r["question_id"]] for r in ours) / N
    row = next(x for x in done.stdout.splitlines() if x.startswith("|synthetic_scenes"))
    assert float(row.split("|")[6]) == pytest.approx(score), row
    ((questions, failed, where, efficiency),) = logged(done.stdout + done.stderr)
    assert (questions, failed, where) == (N, 0, "")
    check_efficiency(efficiency, eval_line(tmp, "globalcom2")["efficiency"], N)
    assert "minillava: conv_template llava_v1 (the checkpoint's)" in done.stdout + done.stderr

    refused = run([sys.executable, "-m", "lmms_eval", "--model", "minillava", "--model_args", f"pretrained={TINY}",
                   "--include_path", str(tasks), "--tasks", "pair"], tmp)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: minillava: task pair, doc 0 has 2 images")
    assert "Traceback" not in refused.stderr + refused.stdout


PRUNING = {"pdrop": 0.25, "sparsevlm": 0.25, "ficoco-l": 0.25, "ficoco": 0.5}  # the tiny tower merges at most half


@pytest.mark.slow
def test_the_pruning_methods_answer_as_minillava_eval(setup):
    """Every method that prunes inside the decoder or the tower, through lmms-eval in batches of 3 (such a
    method's rows are prefilled one by one): minillava.eval's answers at the same r."""
    tmp = setup["tmp"]
    runs = [{"name": c, "task": "scenes", "batch_size": 1,
             "model_args": f"pretrained={TINY},compressor={c},retention_ratio={r},batch_size=3"} for c, r in PRUNING.items()]
    got = drive(tmp, "pruning", {"include": str(setup["tasks"]), "runs": runs})
    for c, r in PRUNING.items():
        ours = eval_answers(tmp / "data" / "synthetic", tmp / f"eval-{c}.jsonl", TINY, c, "--retention-ratio", str(r))
        assert got[c]["answers"] == {x["question_id"]: x["text"] for x in ours}, c


@pytest.mark.slow
def test_data_parallel(setup):
    """Two processes (torchrun on CPU; `accelerate launch` on GPUs): each answers its share, rank 0
    gathers every answer, and they are minillava.eval's."""
    tmp, out = setup["tmp"], setup["tmp"] / "dp"
    done = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lmms_eval",
                "--model", "minillava", "--model_args", f"pretrained={TINY},compressor=globalcom2",
                "--include_path", str(setup["tasks"]), "--tasks", "scenes", "--output_path", str(out),
                "--log_samples"], tmp, ACCELERATE_USE_CPU="1")  # accelerate's multi-process CPU mode (gloo)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = logged(done.stdout + done.stderr)
    shares = sorted(x for x in lines if x[2].startswith("on rank"))
    assert [x[:3] for x in shares] == [(2, 0, "on rank 0 of 2"), (2, 0, "on rank 1 of 2")]  # N = 4, two per rank
    (whole,) = [x for x in lines if x[2] == "on 2 ranks together"]  # rank 0 alone logs the gathered whole
    assert whole[:2] == (N, 0)
    check_efficiency(whole[3], eval_line(tmp, "globalcom2")["efficiency"], N)
    # run side by side: the whole's throughput is its questions over the longest rank's wall time, its peak the largest
    assert whole[3]["samples_per_s"] == pytest.approx(N * min(x[3]["samples_per_s"] / x[0] for x in shares), rel=2e-3)
    assert whole[3]["peak_rss_mib"] == max(x[3]["peak_rss_mib"] for x in shares)
    samples = [json.loads(x) for f in out.rglob("*_samples_scenes.jsonl") for x in f.read_text().splitlines()]
    rows = [json.loads(line) for line in (setup["tmp"] / "scenes.jsonl").read_text().splitlines()]
    got = {rows[s["doc_id"]]["question_id"]: s["filtered_resps"] for s in samples}
    assert got == {r["question_id"]: r["text"] for r in setup["ours"]["globalcom2"]}


@pytest.mark.slow
def test_compiled_answers_equal_eager(setup):
    """compile=true (the tower, prefill and decode step torch.compile'd, warmed up for batch 3 when the
    model is made): the eager answers, minillava.eval's. Slow: about 70 s of compiling on 2 CPU cores."""
    run = {"name": "compiled", "task": "scenes", "batch_size": 1,
           "model_args": f"pretrained={TINY},compressor=globalcom2,batch_size=3,compile=true"}
    got = drive(setup["tmp"], "compiled", {"include": str(setup["tasks"]), "runs": [run]})
    assert got["compiled"]["answers"] == {r["question_id"]: r["text"] for r in setup["ours"]["globalcom2"]}


# --- InternVL3 (docs/internvl.md): a tiny random checkpoint in OpenGVLab's layout --------------------------

IV_COMPRESSORS = ("none", "globalcom2")
GREEDY = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "do_sample": False}  # the scenes task's


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """The split, a tiny InternVL3 (InternViT with fused attn.qkv, 56 px tiles, Qwen2) and minillava.eval's
    answers with it under each of IV_COMPRESSORS."""
    from tests import tiny

    tmp = tmp_path_factory.mktemp("lmms-internvl")
    data = S.write_split(tmp / "synthetic", N)
    model = tiny.save_iv_checkpoint(tiny.iv_hf_model(seed=2), tmp / "internvl", "original",
                                    tiny.train_internvl_tokenizer(tmp / "tokenizer.json"))
    rows = [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines()]
    docs = [{"question_id": r["question_id"], "image": str(data / "images" / r["image"]), "question": r["text"]}
            for r in rows]
    ours = {c: {r["question_id"]: r["text"] for r in eval_answers(data, tmp / f"eval-{c}.jsonl", model, c)}
            for c in IV_COMPRESSORS}
    return {"tmp": tmp, "model": model, "docs": docs, "ours": ours}


@pytest.mark.parametrize("compressor", IV_COMPRESSORS)
def test_internvl_answers_equal_minillava_eval(internvl, compressor):
    """In this process (lmms-eval's Instance requests handed to generate_until, as its evaluator hands
    them): InternVL3's answers, batch_size 3 (a batch of 3 and one of 1), are minillava.eval's (answered one
    at a time), in InternVL's template. About 3 s with the fixture once transformers is imported."""
    from PIL import Image
    from lmms_eval.api.instance import Instance

    from minillava.apps.lmms import MiniLlava

    model = MiniLlava.create_from_arg_string(f"pretrained={internvl['model']},compressor={compressor},"
                                             f"retention_ratio=0.25,device=cpu", {"batch_size": 3})
    assert model.tokenizer.template.name == "internvl2_5"
    docs = internvl["docs"]
    model.task_dict = {"scenes": {"test": docs}}
    visual = lambda doc: [Image.open(doc["image"]).convert("RGB")]  # noqa: E731 (the task's doc_to_visual)
    requests = [Instance("generate_until", (d["question"], dict(GREEDY), visual, i, "scenes", "test"), i,
                         {"task": "scenes", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    answers = model.generate_until(requests)
    assert dict(zip((d["question_id"] for d in docs), answers)) == internvl["ours"][compressor]
    assert model.efficiency()["questions"] == N


@pytest.mark.slow
def test_internvl_through_lmms_eval_s_evaluator(internvl):
    """lmms-eval's simple_evaluate in a subprocess (the model found through its entry point, a json task, one
    question at a time): InternVL3's answers under none and globalcom2 are minillava.eval's (about 15 s)."""
    tmp = internvl["tmp"]
    (tmp / "scenes.jsonl").write_text("".join(json.dumps(d) + "\n" for d in internvl["docs"]))
    tasks = tmp / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "utils.py").write_text(UTILS)
    greedy = f"  max_new_tokens: {MAX_NEW_TOKENS}\n  temperature: 0\n  do_sample: false"
    (tasks / "scenes.yaml").write_text(TASK.format(name="scenes", data=tmp / "scenes.jsonl", visual="doc_to_visual",
                                                    generation=greedy).replace("doc_to_target: answer",
                                                                               "doc_to_target: question"))
    runs = [{"name": c, "task": "scenes", "batch_size": 1,
             "model_args": f"pretrained={internvl['model']},compressor={c},retention_ratio=0.25,device=cpu"}
            for c in IV_COMPRESSORS]
    got = drive(tmp, "internvl", {"include": str(tasks), "runs": runs})
    for c in IV_COMPRESSORS:
        assert got[c]["answers"] == internvl["ours"][c], c
