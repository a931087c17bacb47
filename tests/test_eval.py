"""Evaluation: every task's file format and official metric, resume after a kill, torchrun, failures.

The tiny random model answers nonsense, so metrics are checked on hand-written answer files
(`--score-only`) against values worked out by hand in each test; runs with the model check the
plumbing only (records, resume, sharding, failures).
"""

import base64
import copy as cp
import io
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minillava.eval import TASKS, runner
from minillava.eval import metrics as M
from minillava.eval.answers import consolidate, part_file, read_records
from minillava.eval.files import DataError

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def noise_png(path: Path, seed: int, size=(70, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def llava_answers(path: Path, qids_and_texts):
    """An answers file as LLaVA's scripts write it (no "key": keys come from question_id order)."""
    return write_jsonl(path, [{"question_id": q, "prompt": "", "text": t, "model_id": "x", "metadata": {}}
                              for q, t in qids_and_texts])


def score(capsys, task, data, answers, *extra):
    code = runner.main([task, "--data", str(data), "--score-only", "--answers", str(answers), *map(str, extra)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"| {task} |")
    return json.loads(lines[0])


# ----------------------------------------------------------------------------- metrics by hand


def test_vqa_normalisation():
    assert M.normalize_vqa_answer("Two.") == "2"  # period dropped, number word mapped
    assert M.normalize_vqa_answer("the Coca-Cola") == "coca cola"  # "-" inside a word becomes a space, article dropped
    assert M.normalize_vqa_answer("It's a dog!") == "it 's dog"  # "'s" split off, "!" -> space, "a" dropped
    assert M.normalize_vqa_answer("3.5 dont") == "3.5 don't"  # a decimal point stays; contraction restored
    assert M.normalize_vqa_answer("x - y") == "x y"  # punctuation next to a space is removed, not spaced


def test_vqa_score_leave_one_out():
    # "2" given by 3 of 10 humans: leaving out one of those 3 leaves 2 matches (2/3), any other 3 (1).
    assert M.vqa_score("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert M.vqa_score("x", ["x"] * 4 + ["y"] * 6) == 1.0  # 3 or 4 others agree: capped at 1
    assert M.vqa_score("z", ["x"] * 10) == 0.0


def test_pope_parsing():
    assert M.pope_label("No, there is not.") == "no"
    assert M.pope_label("Yes. But not sure") == "yes"  # only the first sentence counts
    assert M.pope_label("Nope") == "yes"  # the official rule looks for the words No/no/not only
    assert M.pope_label("") == "yes"


def test_mme_parsing():
    assert [M.mme_label(a) for a in ["Yes", "No.", "There is", "yes, it is", "Not really", "nothing"]] == \
        ["yes", "no", "other", "yes", "no", "no"]


# ----------------------------------------------------------------------------- each task's format and score


def test_textvqa(tmp_path, capsys):
    data = tmp_path / "textvqa"
    (data / "train_images").mkdir(parents=True)
    ocr = "\nReference OCR token: a, b"
    write_jsonl(data / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "img1", "image": "img1.jpg", "text": "How many cans?" + ocr + SHORT},
        {"question_id": "img1", "image": "img1.jpg", "text": "What brand?" + ocr + SHORT},  # same id: key img1#1
        {"question_id": "img2", "image": "img2.jpg", "text": "What is written?" + ocr + SHORT},
        {"question_id": "img3", "image": "img3.jpg", "text": "What color?" + ocr + SHORT},
    ])
    write_json(data / "TextVQA_0.5.1_val.json", {"data": [
        {"image_id": "img1", "question": "How many cans?", "answers": ["2"] * 3 + ["3"] * 7},
        {"image_id": "img1", "question": "What brand?", "answers": ["coca cola"] + ["coke"] * 9},
        {"image_id": "img2", "question": "What is written?", "answers": ["something"] * 10},
        {"image_id": "img3", "question": "What color?", "answers": ["red"] * 10},
    ]})
    questions = TASKS["textvqa"].load(data)
    assert [q.key for q in questions] == ["img1", "img1#1", "img2", "img3"]
    assert questions[0].prompt == "How many cans?" + SHORT  # the OCR line dropped, as the GlobalCom2 loader
    answers = llava_answers(tmp_path / "a.jsonl", [("img1", "Two."), ("img1", "the Coca-Cola"), ("img2", "nothing")])
    with open(answers, "a") as f:  # the fourth question failed (e.g. its image was missing)
        f.write(json.dumps({"key": "img3", "question_id": "img3", "prompt": "", "text": "", "error": "no image"}) + "\n")
    line = score(capsys, "textvqa", data, answers)
    # "Two." -> "2": 3 of 10 humans -> (3 * 2/3 + 7 * 1) / 10 = 0.9
    # "the Coca-Cola" -> "coca cola": 1 of 10 -> (1 * 0 + 9 * 1/3) / 10 = 0.3
    # "nothing" -> 0; the failed question -> 0.   Mean: 1.2 / 4 = 30%.
    assert line["metrics"]["accuracy"] == pytest.approx(30.0)
    assert (line["questions"], line["answered"], line["failed"], line["missing"]) == (4, 3, 1, 0)
    assert line["headline"] == "accuracy" and line["score"] == pytest.approx(30.0)


def test_mme(tmp_path, capsys):
    data = tmp_path / "MME"
    root = data / "MME_Benchmark_release_version"
    qa = root / "artwork" / "questions_answers_YN"  # layout with images/ and questions_answers_YN/
    (root / "artwork" / "images").mkdir(parents=True)
    qa.mkdir()
    (qa / "1.txt").write_text("Is this a painting? Please answer yes or no.\tYes\n"
                              "Is this a sculpture? Please answer yes or no.\tNo\n")
    (qa / "2.txt").write_text("Is it by Monet?  Please answer yes or no.\tYes\n"  # MME's double space
                              "Is it by Degas? Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir()  # flat layout: images and answers side by side
    (root / "code_reasoning" / "3.txt").write_text("Is a python code shown in the picture? Please answer yes or no.\tYes\n"
                                                   "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n")
    rows = [("artwork/images/1.jpg", "Is this a painting?"), ("artwork/images/1.jpg", "Is this a sculpture?"),
            ("artwork/images/2.jpg", "Is it by Monet?"), ("artwork/images/2.jpg", "Is it by Degas?"),
            ("code_reasoning/3.png", "Is a python code shown in the picture?"),
            ("code_reasoning/3.png", "Is a c++ code shown in the picture?")]
    write_jsonl(data / "llava_mme.jsonl", [{"question_id": q, "image": q, "text": t + SHORT,
                                             "category": q.split("/")[0]} for q, t in rows])
    texts = ["Yes", "No.", "There is", "no", "yes, it is", "Not really"]
    line = score(capsys, "mme", data, llava_answers(tmp_path / "a.jsonl", zip([q for q, _ in rows], texts)))
    # artwork: right, right | other (wrong), right -> acc 3/4 = 75, acc+ 1/2 images = 50 -> 125
    # code_reasoning: right, right -> 100 + 100 = 200
    cats = line["metrics"]["categories"]
    assert cats["artwork"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert cats["code_reasoning"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0}
    assert (line["metrics"]["perception"], line["metrics"]["cognition"]) == (125.0, 200.0)


def pope_data(root: Path, images: bool = False) -> Path:
    """POPE: 5 adversarial questions, then 2 random ones; labels in coco/coco_pope_<split>.json."""
    data = root / "pope"
    (data / "val2014").mkdir(parents=True)
    adversarial = [("a.png", "yes"), ("a.png", "no"), ("b.png", "no"), ("b.png", "yes"), ("c.png", "yes")]
    random = [("d.png", "no"), ("d.png", "yes")]
    questions, qid = [], 0
    for split, items in (("adversarial", adversarial), ("random", random)):
        write_jsonl(data / "coco" / f"coco_pope_{split}.json",
                    [{"question_id": i + 1, "image": img, "text": "Is there a dog?", "label": label}
                     for i, (img, label) in enumerate(items)])
        for img, _ in items:
            qid += 1
            questions.append({"question_id": qid, "image": img, "text": "Is there a dog in the image?" + SHORT,
                              "category": split})
    write_jsonl(data / "llava_pope_test.jsonl", questions)
    if images:
        for seed, name in enumerate("abcd"):
            noise_png(data / "val2014" / f"{name}.png", seed, size=(60 + 20 * seed, 50))
    return data


def test_pope(tmp_path, capsys):
    data = pope_data(tmp_path)
    texts = ["Yes. But not sure", "No, there is not.", "Nope", "I do not see one", "There is a dog in the image",
             "no", "Yes"]
    line = score(capsys, "pope", data, llava_answers(tmp_path / "a.jsonl", zip(range(1, 8), texts)))
    # adversarial: labels yes no no yes yes, parsed yes no yes no yes -> TP 2, TN 1, FP 1, FN 1
    #   accuracy 3/5, precision 2/3, recall 2/3, F1 2/3, yes-ratio 3/5
    # random: labels no yes, parsed no yes -> all 1, yes-ratio 1/2
    adv, rnd = line["metrics"]["splits"]["adversarial"], line["metrics"]["splits"]["random"]
    assert (adv["tp"], adv["tn"], adv["fp"], adv["fn"]) == (2, 1, 1, 1)
    assert adv["accuracy"] == pytest.approx(60.0) and adv["yes_ratio"] == pytest.approx(60.0)
    for k in ("precision", "recall", "f1"):
        assert adv[k] == pytest.approx(200 / 3)
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["f1"], rnd["yes_ratio"]) == (100, 100, 100, 100, 50)
    assert line["metrics"]["f1"] == pytest.approx((200 / 3 + 100) / 2)
    assert line["metrics"]["accuracy"] == pytest.approx(80.0)


def test_gqa(tmp_path, capsys):
    data = tmp_path / "gqa"
    (data / "data" / "images").mkdir(parents=True)
    truth = {"101": "yes", "102": "table", "103": "left", "104": "left"}
    write_jsonl(data / "llava_gqa_testdev_balanced.jsonl",
                [{"question_id": q, "image": f"n{q}.jpg", "text": "Q?" + SHORT} for q in truth])
    write_json(data / "data" / "testdev_balanced_questions.json", {q: {"answer": a, "isBalanced": True} for q, a in truth.items()})
    answers = llava_answers(tmp_path / "a.jsonl", zip(truth, ["Yes.", "The table", "left", "Right."]))
    line = score(capsys, "gqa", data, answers)
    # "Yes." -> "yes" right; "the table" != "table" (no article stripping in GQA); "left" right; "right" wrong
    assert line["metrics"]["accuracy"] == 50.0


def test_scienceqa(tmp_path, capsys):
    data = tmp_path / "scienceqa"
    (data / "images" / "test").mkdir(parents=True)
    problems = {"1": 2, "2": 2, "3": 3, "4": 3, "5": 3, "6": 2}  # id -> number of choices
    answer = {"1": 1, "2": 0, "3": 0, "4": 2, "5": 0, "6": 1}
    entries = []
    for pid, n in problems.items():
        options = "\n".join(f"{'ABCDE'[i]}. option {i}" for i in range(n))
        entry = {"id": pid, "conversations": [{"from": "human", "value": f"<image>\nQuestion {pid}?\n{options}"},
                                              {"from": "gpt", "value": "ABCDE"[answer[pid]]}]}
        if pid != "2":  # question 2 has no image: not in the image subset
            entry["image"] = f"{pid}/image.png"
        else:
            entry["conversations"][0]["value"] = entry["conversations"][0]["value"].replace("<image>\n", "")
        entries.append(entry)
    write_json(data / "llava_test_CQM-A.json", entries)
    write_json(data / "problems.json", {p: {"choices": [f"option {i}" for i in range(n)], "answer": answer[p]}
                                        for p, n in problems.items()})
    questions = TASKS["scienceqa"].load(data)
    assert [q.key for q in questions] == ["1", "3", "4", "5", "6"]
    assert questions[0].prompt == "Question 1?\nA. option 0\nB. option 1" + LETTER
    answers = llava_answers(tmp_path / "a.jsonl", zip(["1", "3", "4", "5", "6"],
                                                      ["B", "A. option 0", "The answer is C.", "E", "b"]))
    line = score(capsys, "scienceqa", data, answers)
    # "B" right; "A. ..." right; "The answer is C." right; "E" is not among 3 choices: wrong;
    # "b" is no option letter: wrong.  3/5 = 60%.
    assert line["metrics"]["accuracy"] == 60.0


def png_b64(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench(tmp_path, capsys):
    data = tmp_path / "mmbench"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
              "comment", "split", "image"]
    rows = [
        [0, "What animal?", "nan", "cat", "dog", "nan", "nan", "A"],
        [1, "What colour?", "Look closely.", "red", "green", "blue", "", "C"],
        [2, "How many?", "", "one", "two", "", "", "B"],
        [3, "Which?", "nan", "yes", "no", "", "", "A"],
        [4, "Test split?", "nan", "x", "y", "", "", ""],  # no answer: not graded
    ]
    lines = ["\t".join(header)] + ["\t".join(map(str, r + ["cat", "src", "l2", "nan", "dev", png_b64(r[0])])) for r in rows]
    data.mkdir()
    (data / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    questions = TASKS["mmbench"].load(data)
    assert questions[1].prompt == "Look closely.\nWhat colour?\nA. red\nB. green\nC. blue" + LETTER
    assert questions[0].extra["options"] == {"A": "cat", "B": "dog"}
    assert TASKS["mmbench"].open_image(questions[0]).size == (40, 30)
    answers = llava_answers(tmp_path / "a.jsonl", zip(range(5), ["A", "(C) blue", "two.", "I think A or B", "x"]))
    line = score(capsys, "mmbench", data, answers)
    # "A" right; "(C) blue" -> C right; "two." is option B's text -> right; "I think A or B" picks
    # nothing -> wrong; row 4 has no answer.  3/4 = 75%.
    assert line["metrics"] == {"accuracy": 75.0, "graded": 4}
    upload = [line.split("\t") for line in (tmp_path / "a.submission.tsv").read_text().splitlines()]
    # LLaVA's upload columns (scripts/convert_mmbench_for_submission.py; tests/test_eval_tasks.py checks it whole)
    assert upload[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert upload[2][6] == "(C) blue" and len(upload) == 6


def test_mmbench_bad_image_is_an_image_error(tmp_path):
    data = tmp_path / "mmbench"
    data.mkdir()
    (data / "mmbench_dev_20230712.tsv").write_text("index\tquestion\thint\tA\tB\tanswer\timage\n0\tQ?\tnan\tx\ty\tA\t!!notbase64\n")
    from minillava.trust import ImageError
    with pytest.raises(ImageError, match="MMBench question 0"):
        TASKS["mmbench"].open_image(TASKS["mmbench"].load(data)[0])


def test_vizwiz(tmp_path, capsys):
    data = tmp_path / "vizwiz"
    (data / "test").mkdir(parents=True)
    text = "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    write_jsonl(data / "llava_test.jsonl", [{"question_id": 0, "image": "VizWiz_val_0.jpg", "text": text},
                                             {"question_id": 1, "image": "VizWiz_test_1.jpg", "text": text}])
    write_json(data / "val.json", [{"image": "VizWiz_val_0.jpg",
                                    "answers": [{"answer": a} for a in ["2 dogs"] * 2 + ["dogs"] * 8]}])
    line = score(capsys, "vizwiz", data, llava_answers(tmp_path / "a.jsonl", [(0, "Two dogs."), (1, "Unanswerable")]))
    # "Two dogs." -> "2 dogs", 2 of 10 humans: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; the test image is not graded.
    assert line["metrics"]["accuracy"] == pytest.approx(60.0) and line["metrics"]["graded"] == 1
    upload = json.loads((tmp_path / "a.submission.json").read_text())
    assert upload == [{"image": "VizWiz_val_0.jpg", "answer": "2 dogs"}, {"image": "VizWiz_test_1.jpg", "answer": "unanswerable"}]


def test_mmvet_writes_the_judge_file(tmp_path, capsys):
    data = tmp_path / "mm-vet"
    (data / "images").mkdir(parents=True)
    write_jsonl(data / "llava-mm-vet.jsonl", [{"question_id": i, "image": f"v1_{i}.png", "text": "Describe."} for i in range(2)])
    line = score(capsys, "mmvet", data, llava_answers(tmp_path / "a.jsonl", [(0, "A cat."), (1, "x = 3")]))
    assert line["score"] is None and "judge" in line["metrics"]["note"]
    assert json.loads(Path(line["submission"]).read_text()) == {"v1_0": "A cat.", "v1_1": "x = 3"}


def test_compare_and_limit(tmp_path, capsys):
    data = tmp_path / "gqa"
    (data / "data" / "images").mkdir(parents=True)
    truth = {"1": "yes", "2": "no", "3": "red", "4": "blue"}
    write_jsonl(data / "llava_gqa_testdev_balanced.jsonl", [{"question_id": q, "image": "x.jpg", "text": "Q?"} for q in truth])
    write_json(data / "data" / "testdev_balanced_questions.json", {q: {"answer": a} for q, a in truth.items()})
    answers = llava_answers(tmp_path / "a.jsonl", zip(truth, ["yes", "yes", "red", "red"]))
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"task": "pope", "metrics": {"f1": 80.0}}) + "\n| pope | none | - | f1 | 80.00 | - | 9/9 |\n"
                    + json.dumps({"task": "gqa", "metrics": {"accuracy": 80.0}}) + "\n")  # stdout of two runs
    line = score(capsys, "gqa", data, answers, "--compare", base)
    assert line["metrics"]["accuracy"] == 50.0 and line["relative"] == {"accuracy": 62.5}  # 50 / 80
    code = runner.main(["gqa", "--data", str(data), "--score-only", "--answers", str(answers), "--limit", "3",
                        "--compare", str(base)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and json.loads(out[0])["metrics"]["accuracy"] == pytest.approx(200 / 3)  # first 3: 2 right
    assert out[1] == "| gqa | - | - | accuracy | 66.67 | 83.3% | 3/3 |"  # LLaVA's files do not say how they were made
    base.write_text(json.dumps({"task": "pope", "metrics": {"f1": 80.0}}) + "\n")
    code = runner.main(["gqa", "--data", str(data), "--output", str(tmp_path / "new.jsonl"), "--compare", str(base)])
    one_error_line(code, capsys.readouterr().err, "no metrics of task gqa")  # said before any model is loaded


# ----------------------------------------------------------------------------- bad input


def one_error_line(code, err, *fragments):
    assert code == 1
    assert err.strip().count("\n") == 0 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_and_malformed_files(tmp_path, capsys):
    data = pope_data(tmp_path)
    answers = llava_answers(tmp_path / "a.jsonl", [(1, "yes")])

    def run(*extra):
        code = runner.main(["pope", "--data", str(data), "--score-only", "--answers", str(answers), *map(str, extra)])
        return code, capsys.readouterr().err

    questions = data / "llava_pope_test.jsonl"
    good = questions.read_text().splitlines()
    questions.write_text("\n".join(good[:1] + ['{"question_id": 2, "image": '] + good[2:]) + "\n")
    one_error_line(*run(), f"{questions}:2:", "not a JSON line")
    questions.write_text("\n".join(good[:2] + ['{"question_id": 3, "text": "Q?", "category": "random"}']) + "\n")
    one_error_line(*run(), f"{questions}:3:", "missing field 'image'")
    questions.unlink()
    one_error_line(*run(), "question file not found", str(questions))
    one_error_line(*run("--questions", tmp_path / "nope.jsonl"), "nope.jsonl")
    code = runner.main(["pope", "--data", str(tmp_path / "nowhere"), "--score-only", "--answers", str(answers)])
    one_error_line(code, capsys.readouterr().err, "data folder not found")
    (data / "val2014").rmdir()
    other = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.png", "text": "Q?", "category": "random"}])
    one_error_line(*run("--questions", other), "image folder not found", "val2014")
    with pytest.raises(SystemExit) as e:
        runner.parse_args(["pope", "--output", "x.jsonl"])
    assert e.value.code == 2 and "--data DIR is required" in capsys.readouterr().err


def test_answers_file_reading(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"key": "1", "text": "a"}\n{"key": "2", "text": "b"}\n{"key": "3", "te')
    assert [r["key"] for r in read_records(path)] == ["1", "2"]  # a kill mid-write: last line ignored
    path.write_text('{"key": "1", "text": "a"}\n{"key": "2", "te\n{"key": "3", "text": "c"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2:"):
        read_records(path)  # damage in the middle is an error naming the line


def test_consolidate_merges_parts_in_question_order(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"key": "b", "text": "1"}\n{"key": "c", "text": "", "error": "x"}\n{"key": "d", "te')
    part_file(out, 1).write_text('{"key": "a", "text": "2"}\n')
    part_file(out, 0).write_text('{"key": "c", "text": "3"}\n')  # an answer beats an earlier failure
    records = consolidate(out, ["a", "b", "c", "d"])
    assert [json.loads(x)["key"] for x in out.read_text().splitlines()] == ["a", "b", "c"]
    assert records["c"]["text"] == "3" and not list(tmp_path.glob("*.part"))


# ----------------------------------------------------------------------------- with the model


def untimed(line: dict) -> dict:
    """The summary line without what the clock and memory measure (they differ from run to run)."""
    efficiency = {k: v for k, v in line["efficiency"].items() if not k.endswith(("_ms", "_per_s", "_mib"))}
    return {**line, "efficiency": efficiency}


def run_pope(capsys, data, output, model, *extra):
    code = runner.main(["pope", "--data", str(data), "--output", str(output), "--model", str(model),
                        "--max-new-tokens", "3", *map(str, extra)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.splitlines()[0]), err


@pytest.fixture
def pope_images(tmp_path):
    data = pope_data(tmp_path, images=True)
    (data / "val2014" / "b.png").write_bytes(b"not an image")  # questions 3 and 4 cannot be answered
    return data


def test_run_records_failures_and_progress(tmp_path, capsys, checkpoints, pope_images):
    out = tmp_path / "run" / "answers.jsonl"
    line, err = run_pope(capsys, pope_images, out, checkpoints["hub"])
    assert (line["questions"], line["answered"], line["failed"], line["missing"]) == (7, 5, 2, 0)
    assert "7/7" in err and "q/s" in err  # the progress bar: count, rate (and ETA while running)
    assert err.count("failed: not an image") == 2 and "b.png" in err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in records] == list(range(1, 8))
    assert records[2]["error"].startswith("not an image") and records[2]["text"] == ""
    assert records[0]["metadata"] == {"compressor": "globalcom2", "retention_ratio": 0.25, "max_new_tokens": 3, "seed": 0,
                                      "conv_template": "llava_v1"}  # the checkpoint's: it is no released Vicuna
    assert records[0]["visual_tokens"]["after"] > 0 and "text" in records[0] and "error" not in records[0]


def test_resume_after_kill(tmp_path, capsys, checkpoints, pope_images, monkeypatch):
    out = tmp_path / "answers.jsonl"
    run_pope(capsys, pope_images, out, checkpoints["tf5"], "--limit", 6)
    complete = out.read_bytes()
    lines = complete.split(b"\n")
    out.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][:25])  # killed while writing the 5th answer

    calls = []
    real = runner.generate_batch
    monkeypatch.setattr(runner, "generate_batch", lambda *a, **k: calls.extend(q for _, q in a[2]) or real(*a, **k))
    line, err = run_pope(capsys, pope_images, out, checkpoints["tf5"], "--limit", 6)
    assert len(calls) == 2 and "4 already in" in err  # questions 5 and 6 only
    assert out.read_bytes() == complete  # nothing lost, nothing twice, same order
    assert line["questions"] == 6 and line["failed"] == 2

    run_pope(capsys, pope_images, out, checkpoints["tf5"])  # no limit: only question 7 is new
    assert len(calls) == 3 and len(out.read_text().splitlines()) == 7

    run_pope(capsys, pope_images, out, checkpoints["tf5"], "--retry-failed")  # b.png still bad: failed again
    assert len(calls) == 3 and len(out.read_text().splitlines()) == 7

    code = runner.main(["pope", "--data", str(pope_images), "--output", str(out), "--model", str(checkpoints["tf5"]),
                        "--max-new-tokens", "3", "--compressor", "none"])
    one_error_line(code, capsys.readouterr().err, "other settings", "compressor globalcom2 -> none")


def test_batch_size_4_writes_the_answers_of_batch_size_1(tmp_path, capsys, checkpoints, pope_images):
    """--batch-size 4 (two unreadable images inside the first batch, a last batch of 3) and 1: the same
    answers file byte for byte; a file begun at one batch size is resumed at another."""
    one, four = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    line1, _ = run_pope(capsys, pope_images, one, checkpoints["hub"], "--batch-size", 1, "--max-new-tokens", 8)
    line4, _ = run_pope(capsys, pope_images, four, checkpoints["hub"], "--batch-size", 4, "--max-new-tokens", 8)
    assert four.read_bytes() == one.read_bytes() and untimed(line4) == untimed(line1) and line1["failed"] == 2
    texts = [json.loads(x)["text"] for x in one.read_text().splitlines()]
    assert len({len(t) for t in texts}) > 1  # answers of different lengths
    lines = four.read_bytes().split(b"\n")
    four.write_bytes(b"\n".join(lines[:2]) + b"\n")
    run_pope(capsys, pope_images, four, checkpoints["hub"], "--batch-size", 3, "--max-new-tokens", 8)
    assert four.read_bytes() == one.read_bytes()


def test_torchrun_two_processes_equal_one(tmp_path, capsys, checkpoints, pope_images):
    model = checkpoints["hub"]
    single = tmp_path / "single.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's workers run one thread each: same arithmetic, same argmax
    try:
        line, _ = run_pope(capsys, pope_images, single, model)
    finally:
        torch.set_num_threads(threads)

    parallel = tmp_path / "parallel.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "minillava.eval", "pope", "--data", str(pope_images), "--output", str(parallel),
           "--model", str(model), "--max-new-tokens", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert parallel.read_bytes() == single.read_bytes()
    assert not list(tmp_path.glob("*.part"))
    stdout = done.stdout.strip().splitlines()
    assert len(stdout) == 2 and untimed(json.loads(stdout[0])) == untimed(line)  # printed once, by rank 0
    assert json.loads(stdout[0])["efficiency"]["measured"] == 5  # both ranks' questions, gathered
    assert "on 2 processes" in done.stderr


# ----------------------------------------------------------------------------- MMBench matching vs VLMEvalKit
# A literal transcription of VLMEvalKit's exact matching (open-compass/VLMEvalKit e8e78f05,
# vlmeval/utils/matching_util.py: can_infer_option, can_infer_text, can_infer), logger calls dropped
# and `verbose` fixed to its default (the VERBOSE environment variable unset).

_VERBOSE_ANSWER_RE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer, choices):
    verbose = 0
    # Choices is a dictionary
    if 'Failed to obtain answer via API' in answer:
        return False

    reject_to_answer = [
        "Sorry, I can't help with images of people yet.", "I can't process this file.",
        "I'm sorry, but without the image provided", 'Cannot determine the answer'
    ]
    for err in reject_to_answer:
        if err in answer:
            return 'Z'

    def count_choice(splits, choices, prefix='', suffix=''):
        cnt = 0
        for c in choices:
            if prefix + c + suffix in splits:
                cnt += 1
        return cnt

    answer_mod = cp.copy(answer)
    chars = '.()[],:;!*#{}'
    for c in chars:
        answer_mod = answer_mod.replace(c, ' ')

    splits = [x.strip() for x in answer_mod.split()]
    count = count_choice(splits, choices)

    if count == 1:
        for ch in choices:
            if 'A' in splits and len(splits) > 3 and verbose:
                return False
            if ch in splits and splits.index(ch) > (len(splits) - 5):
                return ch
    elif count == 0 and count_choice(splits, {'Z', ''}) == 1:
        return 'Z'

    match = _VERBOSE_ANSWER_RE.search(answer or "")
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()

    return False


def can_infer_text(answer, choices):
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    assert isinstance(choices, dict)
    for k in choices:
        assert k in string.ascii_uppercase
        choices[k] = str(choices[k]).lower()
    cands = []
    for k in choices:
        if choices[k] in answer:
            cands.append(k)
    if len(cands) == 1:
        return cands[0]
    return False


def can_infer(answer, choices):
    answer = str(answer)
    copt = can_infer_option(answer, choices)
    return copt if copt else can_infer_text(answer, choices)


MMB_OPTION_SETS = [
    {"A": "cat", "B": "dog"},
    {"A": "red", "B": "green", "C": "blue", "D": "dark green"},
    {"A": "The Renaissance", "B": "Middle Ages", "C": "A", "D": "none of these"},
    {"A": "1", "B": "2", "C": "3"},
    {"A": "yes", "B": "no", "C": "Z"},
]
MMB_ANSWERS = [
    "A", "B", "C", "D", "Z", "E", "a", "b", "", " ", "A.", "(B)", "[C]", "D:", "B) dog", "C. blue", "The answer is C",
    "The answer is C.", "the correct answer is **B**.", "Answer is d", "Option D", "Options A and B", "I think A or B",
    "A or B", "A cat", "a cat", "dog", "It is a dog.", "It is a cat, not a dog.", "green", "dark green",
    "The colour is dark green.", "Cannot determine the answer", "Sorry, I can't help with images of people yet.",
    "Failed to obtain answer via API", "Failed to obtain answer via API: B", "B is right, because A is wrong here",
    "The picture shows A in the corner and the answer is B", "A A", "B\nC", "**C**", "#D", "{A}", "2", "3.",
    "Two", "It shows 1 and 2", "Middle Ages", "the renaissance, clearly", "None of these", "yes", "No.",
    "Yes, no", "B - dog", "B/dog", "answer: B", "Answer:B", "Answer is B, not C", "The answer is E",
    "A. The Renaissance", "I cannot tell. Z", "Z.", "The answer is B because the answer is C",
    "It is red or green", "The first one, A, no wait, B, C, D, actually the answer", "blue " * 20,
]


@pytest.mark.parametrize("options", MMB_OPTION_SETS, ids=lambda o: "/".join(o.values()))
def test_mmbench_matching_is_vlmevalkit_can_infer(options):
    rng = np.random.default_rng(0)
    answers = list(MMB_ANSWERS)
    pieces = [*options, *options.values(), "The", "answer", "is", "Option", "(", ")", ".", ",", "**", "not", "Z", "\n"]
    for _ in range(400):  # random sentences of letters, option texts and the words the rules look for
        answers.append(" ".join(rng.choice(pieces, size=rng.integers(1, 9))))
    for answer in answers:
        expected = can_infer(answer, dict(options))  # a copy: can_infer_text lower-cases its choices in place
        assert M.mmbench_choice(answer, options) == (expected if expected in options else None), answer


def test_mmbench_matching_examples():
    options = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    picks = {"The answer is C": "C", "Option D": "D", "[A]": "A", "It is a dog.": "B", "I think A or B": None,
             "Cannot determine the answer": None, "B is right, because A is wrong here": None}
    assert {a: M.mmbench_choice(a, options) for a in picks} == picks
