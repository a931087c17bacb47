"""The benchmarks: where each one's files are, what the model is asked, and how answers are scored.

Layouts follow LLaVA's evaluation guide (`docs/Evaluation.md`, eval.zip): `--data DIR` is the
benchmark's folder there (e.g. `playground/data/eval/textvqa`). Prompts are those of LLaVA's
scripts: the question file's text after `<image>\\n`, with the per-script edits noted on each task.

A task is a `Task` subclass registered in TASKS with `@register`; a new benchmark needs only that.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..trust import ImageError, decode_image, load_image
from . import metrics as M
from .files import DataError, field as get, read_json, read_jsonl, read_text, read_tsv, require

QID = (str, int)  # question ids are numbers or strings in LLaVA's files

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "请直接回答选项字母。"  # model_vqa_mmbench.py --lang cn


@dataclass
class Question:
    key: str  # unique within the task; answers are keyed by it (see key_questions)
    question_id: object  # as the question file has it (not unique in TextVQA and MME)
    text: str  # the question as the file has it; recorded as the answer's "prompt", as LLaVA does
    prompt: str  # what the model is asked, after `<image>\n`
    image: Path | None  # the image file (None if the task keeps images elsewhere)
    extra: dict = field(default_factory=dict)  # what scoring needs: category, options, ...


def key_questions(questions: list[Question]) -> list[Question]:
    """Key each question by its question_id; a repeated id gets "#1", "#2", ... in file order."""
    seen: dict[str, int] = {}
    for q in questions:
        qid = str(q.question_id)
        n = seen.get(qid, 0)
        seen[qid] = n + 1
        q.key = qid if n == 0 else f"{qid}#{n}"
    return questions


class Task:
    """One benchmark. Subclasses set the class attributes and `make` (and usually `score`)."""

    name: str
    questions_file: str  # relative to --data
    images_dir: str | None  # relative to --data; None when images are inline
    max_new_tokens: int  # default answer length limit
    headline: str | None  # the metric of the paper's table; None when it needs a server or judge
    needs: tuple[str, ...] = ()  # files scoring reads, relative to --data, checked before a run
    needs_data = True  # False for a task that makes its own questions (then --data may be omitted)
    # --conv-mode of LLaVA's script for the benchmark (scripts/v1_5/eval/*.sh): the template a Vicuna
    # LLaVA-1.6 checkpoint is asked in by default; None: the checkpoint's own (runner.eval_template)
    paper_template: str | None = "vicuna_v1"

    def load(self, data: Path, questions_file: Path | None = None, images: Path | None = None) -> list[Question]:
        """The questions, in file order, keyed."""
        if not data.is_dir():
            raise DataError(f"data folder not found: {data}")
        path = self.questions_path(data, questions_file)
        image_root = images or (data / self.images_dir if self.images_dir else None)
        if image_root is not None and not image_root.is_dir():
            raise DataError(f"image folder not found: {image_root}")
        built = [self.make(row, path, number, image_root) for number, row in self.read(path)]
        return key_questions([q for q in built if q is not None])

    def questions_path(self, data: Path | None, questions_file: Path | None = None) -> Path | None:
        return questions_file or (data / self.questions_file if data is not None else None)

    def inputs(self, data: Path | None, questions_file: Path | None = None) -> list[Path]:
        """The files a run reads (that an output must never overwrite)."""
        questions = self.questions_path(data, questions_file)
        return ([questions] if questions else []) + ([data / n for n in self.needs] if data is not None else [])

    def layout(self) -> list[str]:
        """The files and folders --data holds, for --help."""
        images = [self.images_dir + "/"] if self.images_dir else []
        return [self.questions_file, *images, *self.needs]

    def check(self, data: Path):
        """Fail before answering thousands of questions if scoring would not find its files."""
        for name in self.needs:
            require(data / name, f"{self.name} annotation file")

    def read(self, path: Path) -> list[tuple[int, dict]]:
        return read_jsonl(path)

    def make(self, row: dict, path: Path, number: int, images: Path | None) -> Question | None:
        """A Question from one row of the question file (None to skip the row)."""
        return Question("", get(row, "question_id", path, number, QID), get(row, "text", path, number, str),
                        row["text"], images / get(row, "image", path, number, str), {"line": number})

    def open_image(self, q: Question) -> Image.Image:
        return load_image(str(q.image))

    def score(self, data: Path, answered: list[tuple[Question, str]]) -> dict:
        """Metrics of (question, answer text) pairs; rates in percent."""
        return {}

    def submission(self, data: Path | None, answered: list[tuple[Question, str]]) -> tuple[str, str] | None:
        """(file suffix, content) of the file an evaluation server or judge takes, if any."""
        return None


TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls()
    return cls


def _percent(x: float) -> float:
    return 100.0 * x


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _entry(value, path: Path, where: str, shape: str, ok) -> None:
    """DataError naming the file and entry unless `ok(value)`: annotation files are checked as read."""
    if not (isinstance(value, dict) and ok(value)):
        raise DataError(f"{path}: {where} is not {shape}")


# ----------------------------------------------------------------------------- tasks


@register
class TextVQA(Task):
    """TextVQA val. LLaVA's question file adds a "Reference OCR token: ..." line between the question
    and the short-answer instruction; the GlobalCom2 loader drops it, so the model sees 2 lines."""

    name = "textvqa"
    questions_file = "llava_textvqa_val_v051_ocr.jsonl"
    images_dir = "train_images"
    max_new_tokens = 32
    headline = "accuracy"
    needs = ("TextVQA_0.5.1_val.json",)

    def make(self, row, path, number, images):
        q = super().make(row, path, number, images)
        lines = q.text.split("\n")
        if len(lines) == 3 and lines[1].startswith("Reference OCR token:"):
            q.prompt = lines[0] + "\n" + lines[2]
        return q

    def score(self, data, answered):
        path = data / self.needs[0]
        document = read_json(path, "TextVQA annotations")
        if not isinstance(document, dict) or not isinstance(document.get("data"), list):
            raise DataError(f"{path}: expected TextVQA's {{\"data\": [...]}} annotation file")
        for i, a in enumerate(document["data"]):
            _entry(a, path, f"data[{i}]", "an annotation with image_id, question (strings) and answers (a list of strings)",
                   lambda a: isinstance(a.get("image_id"), str) and isinstance(a.get("question"), str)
                   and _strings(a.get("answers")))
        # Matched as LLaVA's eval_textvqa.py does: (image id, lower-cased question).
        truth = {(a["image_id"], a["question"].lower()): a["answers"] for a in document["data"]}
        scores = []
        for q, text in answered:
            question = q.text.split("\n")[0].lower()
            answers = truth.get((str(q.question_id), question))
            if answers is None:
                raise DataError(f"{path}: no annotation for image {q.question_id} and question {question!r}")
            scores.append(M.vqa_score(text, answers))
        return {"accuracy": _percent(M.mean(scores))}


@register
class MME(Task):
    """MME: yes/no questions, two per image. Ground truth is in the benchmark's own folders
    (`<category>/[questions_answers_YN/]<image>.txt`, lines "question<TAB>Yes|No")."""

    name = "mme"
    questions_file = "llava_mme.jsonl"
    images_dir = "MME_Benchmark_release_version"
    max_new_tokens = 16
    headline = "perception"
    PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
    COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

    @staticmethod
    def _question(text: str) -> str:
        """The question without its answer-format instruction, spaces collapsed: the matching key."""
        text = text.replace(SHORT_ANSWER, "").replace("Please answer yes or no.", "")
        return " ".join(text.split())

    def _truth_file(self, root: Path, qid: str) -> Path:
        category = root / qid.split("/")[0]
        name = qid.split("/")[-1].split(".")[0] + ".txt"  # as LLaVA's convert_answer_to_mme.py
        return category / "questions_answers_YN" / name if (category / "images").is_dir() else category / name

    def score(self, data, answered):
        root = data / self.images_dir
        truths: dict[Path, dict[str, str]] = {}
        groups: dict[str, dict[str, list]] = {}  # category -> image -> [(answer, truth)]
        for q, text in answered:
            qid = str(q.question_id)
            path = self._truth_file(root, qid)
            if path not in truths:
                truths[path] = {}
                for number, line in enumerate(read_text(path, "MME answer file").split("\n"), 1):
                    if line.strip():
                        parts = line.rstrip("\r").split("\t")
                        if len(parts) != 2:
                            raise DataError(f"{path}:{number}: expected 'question<TAB>answer'")
                        truths[path][self._question(parts[0])] = parts[1].strip()
            truth = truths[path].get(self._question(q.text))
            if truth is None:
                raise DataError(f"{path}: no answer for question {self._question(q.text)!r}")
            groups.setdefault(qid.split("/")[0], {}).setdefault(qid, []).append((text, truth))
        categories = {c: M.mme_category(list(images.values())) for c, images in groups.items()}
        return {
            "perception": sum(v["score"] for c, v in categories.items() if c in self.PERCEPTION),
            "cognition": sum(v["score"] for c, v in categories.items() if c in self.COGNITION),
            "categories": {c: {"acc": _percent(v["acc"]), "acc_plus": _percent(v["acc_plus"]), "score": v["score"]}
                           for c, v in sorted(categories.items())},
        }


@register
class POPE(Task):
    """POPE on COCO val2014, three splits. Labels: `coco/coco_pope_<split>.json`, one line per
    question in the order of that split's questions in the question file."""

    name = "pope"
    questions_file = "llava_pope_test.jsonl"
    images_dir = "val2014"
    max_new_tokens = 16
    headline = "f1"

    def load(self, data, questions_file=None, images=None):
        questions = super().load(data, questions_file, images)
        seen: dict[str, int] = {}
        for q in questions:  # position within the split: the line of its label
            category = q.extra["category"]
            q.extra["label_index"] = seen.get(category, 0)
            seen[category] = q.extra["label_index"] + 1
        return questions

    def make(self, row, path, number, images):
        q = super().make(row, path, number, images)
        q.extra["category"] = get(row, "category", path, number, str)
        return q

    def inputs(self, data, questions_file=None):
        splits = ("adversarial", "popular", "random")
        return [*super().inputs(data, questions_file), *(data / "coco" / f"coco_pope_{s}.json" for s in splits)]

    def layout(self):
        return [*super().layout(), "coco/coco_pope_{adversarial,popular,random}.json"]

    def check(self, data):
        if not (data / "coco").is_dir():
            raise DataError(f"POPE label folder not found: {data / 'coco'}")

    def score(self, data, answered):
        labels: dict[str, list] = {}
        splits: dict[str, tuple[list, list]] = {}
        for q, text in answered:
            category = q.extra["category"]
            if category not in labels:
                labels[category] = read_jsonl(data / "coco" / f"coco_pope_{category}.json", "POPE label file")
            rows, index = labels[category], q.extra["label_index"]
            path = data / "coco" / f"coco_pope_{category}.json"
            if index >= len(rows):
                raise DataError(f"{path}: {len(rows)} labels but the question file has more {category} questions")
            number, row = rows[index]
            if "image" in row and Path(str(row["image"])).name != q.image.name:
                raise DataError(f"{path}:{number}: label for image {row['image']} but question {q.question_id} "
                                f"asks about {q.image.name}: label and question files are out of step")
            preds, truth = splits.setdefault(category, ([], []))
            preds.append(M.pope_label(text))
            truth.append(get(row, "label", path, number))
        per_split = {}
        for category, (preds, truth) in sorted(splits.items()):
            m = M.pope_metrics(preds, truth)
            per_split[category] = {k: (_percent(v) if isinstance(v, float) else v) for k, v in m.items()}
        return {
            "f1": M.mean(s["f1"] for s in per_split.values()),
            "accuracy": M.mean(s["accuracy"] for s in per_split.values()),
            "splits": per_split,
        }


@register
class GQA(Task):
    """GQA testdev-balanced; answers from the official `testdev_balanced_questions.json`."""

    name = "gqa"
    questions_file = "llava_gqa_testdev_balanced.jsonl"
    images_dir = "data/images"
    max_new_tokens = 32
    headline = "accuracy"
    needs = ("data/testdev_balanced_questions.json",)

    def score(self, data, answered):
        path = data / self.needs[0]
        truth = read_json(path, "GQA questions file")
        correct = []
        for q, text in answered:
            entry = truth.get(str(q.question_id)) if isinstance(truth, dict) else None
            if entry is None:
                raise DataError(f"{path}: no answer for question {q.question_id}")
            _entry(entry, path, f"question {q.question_id}", "an object with a string 'answer'",
                   lambda e: isinstance(e.get("answer"), str))
            correct.append(M.gqa_normalize(text) == entry["answer"])
        return {"accuracy": _percent(M.mean(correct))}


@register
class ScienceQA(Task):
    """ScienceQA test, image subset (SQA-IMG): questions without an image are skipped. The
    "<image>" marker is removed from the text and the option-letter instruction appended
    (`model_vqa_science.py --single-pred-prompt`). Answers from ScienceQA's `problems.json`."""

    name = "scienceqa"
    questions_file = "llava_test_CQM-A.json"
    images_dir = "images/test"
    max_new_tokens = 32
    headline = "accuracy"
    needs = ("problems.json",)

    def read(self, path):
        rows = read_json(path, "question file")
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of questions")
        return [(i + 1, row) for i, row in enumerate(rows)]  # "line" is the entry number here

    def make(self, row, path, number, images):
        if not isinstance(row, dict):
            raise DataError(f"{path}: entry {number} is not an object")
        if "image" not in row:
            return None
        try:
            text = row["conversations"][0]["value"]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{path}: entry {number} has no conversations[0].value") from None
        if not isinstance(text, str):
            raise DataError(f"{path}: entry {number}: conversations[0].value must be a string")
        question = text.replace("<image>", "").strip()
        return Question("", get(row, "id", path, number, QID), text, question + "\n" + OPTION_LETTER,
                        images / get(row, "image", path, number, str), {"line": number})

    def score(self, data, answered):
        path = data / self.needs[0]
        problems = read_json(path, "ScienceQA problems file")
        correct = []
        for q, text in answered:
            problem = problems.get(str(q.question_id)) if isinstance(problems, dict) else None
            if problem is None:
                raise DataError(f"{path}: no problem {q.question_id}")
            _entry(problem, path, f"problem {q.question_id}", "an object with 'choices' (a list) and 'answer' (an index)",
                   lambda p: isinstance(p.get("choices"), list) and type(p.get("answer")) is int)
            correct.append(M.scienceqa_choice(text, len(problem["choices"])) == problem["answer"])
        return {"accuracy": _percent(M.mean(correct))}


def _is_none(value) -> bool:
    """MMBench's empty cells (pandas reads them as NaN)."""
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


@register
class MMBench(Task):
    """MMBench (dev by default): a TSV with the image inline (base64). The prompt is hint, question,
    "A. ..." lines, then the option-letter instruction (`model_vqa_mmbench.py --single-pred-prompt`,
    one round). Accuracy where the TSV has answers; the server's upload file is written too."""

    name = "mmbench"
    instruction = OPTION_LETTER
    questions_file = "mmbench_dev_20230712.tsv"
    images_dir = None
    max_new_tokens = 32
    headline = "accuracy"
    LETTERS = "ABCD"

    def read(self, path):
        return read_tsv(path, "question file")

    def make(self, row, path, number, images):
        options = {}
        for letter in self.LETTERS:
            if _is_none(row.get(letter)):
                break
            options[letter] = row[letter]
        question = get(row, "question", path, number)
        hint = row.get("hint")
        text = question if _is_none(hint) else hint + "\n" + question
        text += "".join(f"\n{letter}. {option}" for letter, option in options.items())
        answer = row.get("answer")
        return Question("", get(row, "index", path, number), text, text + "\n" + self.instruction, None,
                        {"line": number, "options": options, "image_b64": get(row, "image", path, number),
                         "answer": None if _is_none(answer) else answer.strip(),
                         "question": question, "category": row.get("category"),
                         "row": {k: v for k, v in row.items() if k != "image"}})

    def open_image(self, q):
        where = f"the image of MMBench question {q.question_id} (line {q.extra['line']})"
        try:
            data = base64.b64decode(q.extra["image_b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"cannot decode {where}: not base64 ({' '.join(str(e).split())})") from None
        return decode_image(io.BytesIO(data), where)  # the same format allowlist as every image

    def score(self, data, answered):
        graded = [(q, text) for q, text in answered if q.extra["answer"] is not None]
        if not graded:
            return {"accuracy": None, "note": "no answers in the TSV: submit the upload file to the server"}
        correct = [M.mmbench_choice(text, q.extra["options"]) == q.extra["answer"] for q, text in graded]
        return {"accuracy": _percent(M.mean(correct)), "graded": len(graded)}

    DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")

    def submission(self, data, answered):
        """LLaVA's upload file (scripts/convert_mmbench_for_submission.py) as TSV (save it as .xlsx for the
        server): the TSV's columns but hint, category, source, image, comment and l2-category, with
        `prediction` inserted as the 7th column; the cells as the TSV has them. One row per answered
        question (every row of the TSV in a full run)."""
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")  # a cell with a tab or newline is quoted
        header = [k for k in answered[0][0].extra["row"] if k not in self.DROPPED] if answered else []
        header.insert(min(6, len(header)), "prediction")
        writer.writerow(header)
        for q, text in answered:
            row = {**q.extra["row"], "prediction": text}
            writer.writerow([row.get(k, "") for k in header])
        return ".submission.tsv", out.getvalue()


@register
class MMBenchCN(MMBench):
    """MMBench-CN (dev by default): MMBench's Chinese questions, answered as `model_vqa_mmbench.py --lang
    cn --single-pred-prompt` does (scripts/v1_5/eval/mmbench_cn.sh): the option-letter instruction in
    Chinese. Scored and submitted as MMBench."""

    name = "mmbench-cn"
    questions_file = "mmbench_dev_cn_20231003.tsv"
    instruction = OPTION_LETTER_CN


@register
class VQAv2(Task):
    """VQAv2 test-dev (scripts/v1_5/eval/vqav2.sh): the question file's text already ends with the
    short-answer instruction. The EvalAI upload file is LLaVA's `convert_vqav2_for_submission.py`'s: one
    entry per question of the whole test2015 file (`llava_vqav2_mscoco_test2015.jsonl` in --data; if it is
    absent, of the question file), each answer through EvalAI's answer processor, "" where unanswered.
    Questions that VQAv2's official val annotations (`v2_mscoco_val2014_annotations.json` in --data) hold
    are scored locally with the official VQA accuracy, on the answer as uploaded (e.g. `--questions` a
    val question file in LLaVA's format, `--images` val2014)."""

    name = "vqav2"
    questions_file = "llava_vqav2_mscoco_test-dev2015.jsonl"
    images_dir = "test2015"
    max_new_tokens = 32
    headline = "accuracy"
    TEST = "llava_vqav2_mscoco_test2015.jsonl"
    ANNOTATIONS = "v2_mscoco_val2014_annotations.json"

    def layout(self):
        return [*super().layout(), f"[{self.TEST}, the upload file's questions]", f"[{self.ANNOTATIONS}, to score val questions]"]

    def inputs(self, data, questions_file=None):
        return [*super().inputs(data, questions_file), data / self.TEST, data / self.ANNOTATIONS]

    def score(self, data, answered):
        path = data / self.ANNOTATIONS
        if not path.exists():
            return {"accuracy": None, "note": "test-dev: submit the upload file to the EvalAI server"}
        document = read_json(path, "VQAv2 annotations")
        if not isinstance(document, dict) or not isinstance(document.get("annotations"), list):
            raise DataError(f"{path}: expected VQAv2's {{\"annotations\": [...]}} file")
        for i, a in enumerate(document["annotations"]):
            _entry(a, path, f"annotations[{i}]", "an annotation with question_id, answer_type and answers "
                   "([{\"answer\": string}, ...])",
                   lambda a: type(a.get("question_id")) is int and isinstance(a.get("answer_type", ""), str)
                   and isinstance(a.get("answers"), list)
                   and all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"]))
        truth = {a["question_id"]: a for a in document["annotations"]}
        types: dict[str, list[float]] = {}
        for q, text in answered:
            a = truth.get(q.question_id)
            if a is not None:
                score = M.vqav2_score(M.normalize_vqa_answer(text), [x["answer"] for x in a["answers"]])
                types.setdefault(a.get("answer_type", "other"), []).append(score)
        graded = [x for scores in types.values() for x in scores]
        return {"accuracy": _percent(M.mean(graded)) if graded else None, "graded": len(graded),
                "answer_types": {k: _percent(M.mean(v)) for k, v in sorted(types.items())}}

    def submission(self, data, answered):
        results = {q.question_id: text for q, text in answered}
        test = data / self.TEST if data is not None and (data / self.TEST).exists() else None
        ids = [get(row, "question_id", test, n, QID) for n, row in read_jsonl(test)] if test else \
            [q.question_id for q, _ in answered]
        rows = [{"question_id": i, "answer": M.normalize_vqa_answer(results[i]) if i in results else ""} for i in ids]
        return ".submission.json", json.dumps(rows)


@register
class VizWiz(Task):
    """VizWiz-VQA. The test split is scored by the EvalAI server: the upload file (LLaVA's
    `convert_vizwiz_for_submission.py` format, normalised answers) is written next to the answers.
    Questions whose image is in VizWiz's `val.json` (in --data) are also scored locally."""

    name = "vizwiz"
    questions_file = "llava_test.jsonl"
    images_dir = "test"
    max_new_tokens = 32
    headline = "accuracy"

    def layout(self):
        return [*super().layout(), "[val.json, to score val questions]"]

    def inputs(self, data, questions_file=None):
        return [*super().inputs(data, questions_file), data / "val.json"]

    def score(self, data, answered):
        path = data / "val.json"
        if not path.exists():
            return {"accuracy": None, "note": "test split: submit the upload file to the EvalAI server"}
        entries = read_json(path, "VizWiz annotations")
        if not isinstance(entries, list):
            raise DataError(f"{path}: expected VizWiz's list of annotations")
        for i, a in enumerate(entries):
            _entry(a, path, f"entry {i}", "an annotation with 'image' and 'answers' ([{\"answer\": string}, ...])",
                   lambda a: isinstance(a.get("image", ""), str) and isinstance(a.get("answers", []), list)
                   and all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a.get("answers", [])))
        truth = {a["image"]: [x["answer"] for x in a["answers"]] for a in entries if "image" in a and a.get("answers")}
        graded = [M.vqa_score(text, truth[q.image.name]) for q, text in answered if q.image.name in truth]
        return {"accuracy": _percent(M.mean(graded)) if graded else None, "graded": len(graded)}

    def submission(self, data, answered):
        rows = [{"image": q.image.name, "answer": M.normalize_vqa_answer(text)} for q, text in answered]
        return ".submission.json", json.dumps(rows)


@register
class MMVet(Task):
    """MM-Vet: open answers graded by a GPT-4 judge; the file for MM-Vet's grader is written
    (LLaVA's `convert_mmvet_for_eval.py` format: {"v1_<id>": answer})."""

    name = "mmvet"
    questions_file = "llava-mm-vet.jsonl"
    images_dir = "images"
    max_new_tokens = 1024
    headline = None

    def score(self, data, answered):
        return {"note": "graded by MM-Vet's GPT-4 judge: run its grader on the submission file"}

    def submission(self, data, answered):
        return ".submission.json", json.dumps({f"v1_{q.question_id}": text for q, text in answered}, indent=2)


@register
class Synthetic(Task):
    """Synthetic scenes for a small model trained here (`synthetic.py`, `scripts/train_tiny.py`): the digit on the
    scene's one small card, a detail only the crops show.
    Exact match after lower-casing and stripping. `--data` is a split written by
    `python -m minillava.eval.synthetic --out DIR`; without it, the default held-out split
    (DEFAULT_QUESTIONS test questions of the default seed) is made in memory."""

    name = "synthetic"
    family = "card"  # which scene family of synthetic.py
    questions_file = "questions.jsonl"
    images_dir = "images"
    max_new_tokens = 8
    headline = "accuracy"
    needs = ("answers.json",)
    needs_data = False
    paper_template = None  # no LLaVA script: the checkpoint's own template
    DEFAULT_QUESTIONS = 500

    def load(self, data, questions_file=None, images=None):
        from . import synthetic as S

        if data is None and questions_file is None:
            questions = []
            for i in range(self.DEFAULT_QUESTIONS):
                s = S.sample(S.DEFAULT_SEED, "test", i, family=self.family)
                questions.append(Question("", S.question_id("test", i, self.family), S.prompt(s.question),
                                          S.prompt(s.question), None,
                                          {"index": i, "answer": s.answer, "category": s.category}))
            return key_questions(questions)
        if data is None:
            raise DataError("--questions needs --data DIR, the split's folder (with answers.json)")
        questions = super().load(data, questions_file, images)
        path = data / self.needs[0]
        answers = read_json(path, "synthetic answers file")
        if not isinstance(answers, dict):
            raise DataError(f"{path}: expected an object {{question_id: answer}}")
        for q in questions:
            if str(q.question_id) not in answers:
                raise DataError(f"{path}: no answer for question {q.question_id}")
            q.extra["answer"] = answers[str(q.question_id)]
        return questions

    def check(self, data):
        if data is not None:
            super().check(data)

    def open_image(self, q):
        if q.image is None:
            from . import synthetic as S

            return S.sample(S.DEFAULT_SEED, "test", q.extra["index"], family=self.family).scene.image
        return super().open_image(q)

    def score(self, data, answered):
        correct = [text.strip().lower() == str(q.extra["answer"]).strip().lower() for q, text in answered]
        return {"accuracy": _percent(M.mean(correct))}


@register
class SyntheticDense(Synthetic):
    """The dense synthetic scenes (`synthetic.py`): 3 to 8 cards gathered in one region of one or two crops,
    "What is the largest digit?", where the per-crop budget decides what survives compression. Scored and
    loaded as `synthetic`; `--data` is a split written by `python -m minillava.eval.synthetic --family dense`."""

    name = "synthetic-dense"
    family = "dense"
