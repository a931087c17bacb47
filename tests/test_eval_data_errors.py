"""A benchmark's files that do not say what the task needs (issue 32, the coverage audit: these refusals had
no test): a question file, an annotation or label file of the wrong shape, a question the annotations do
not answer. Each is one DataError naming the file (and line or entry), which `python -m minillava.eval`
prints as its one error line (tests/test_eval.py checks that path); here each task's reader and scorer
is called directly on a small file written for the case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minillava.eval.files import DataError, read_jsonl, read_tsv
from minillava.eval.tasks import TASKS, Question


def question(qid, text="What is it?", image="a.jpg", **extra) -> Question:
    return Question(str(qid), qid, text, text, Path(image), extra)


def write(root: Path, name: str, content) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def refused(call, *needles):
    with pytest.raises(DataError) as e:
        call()
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_annotation_files_of_the_wrong_shape(tmp_path):
    write(tmp_path, "TextVQA_0.5.1_val.json", [])
    refused(lambda: TASKS["textvqa"].score(tmp_path, [(question(1), "a")]), "expected TextVQA's {\"data\": [...]}")
    write(tmp_path, "TextVQA_0.5.1_val.json", {"data": [{"image_id": "7", "question": "what?", "answers": ["a"]}]})
    refused(lambda: TASKS["textvqa"].score(tmp_path, [(question(8, "what?"), "a")]),
            "no annotation for image 8 and question 'what?'")
    write(tmp_path, "llava_vqav2_mscoco_test2015.jsonl", "")
    write(tmp_path, "v2_mscoco_val2014_annotations.json", {"annotations": {}})
    refused(lambda: TASKS["vqav2"].score(tmp_path, [(question(1), "a")]), "expected VQAv2's {\"annotations\": [...]}")
    write(tmp_path, "val.json", {"answers": []})
    refused(lambda: TASKS["vizwiz"].score(tmp_path, [(question(1), "a")]), "val.json: expected VizWiz's list of annotations")
    write(tmp_path, "data/testdev_balanced_questions.json", {"1": {"answer": "yes"}})
    refused(lambda: TASKS["gqa"].score(tmp_path, [(question(2), "yes")]), "no answer for question 2")
    write(tmp_path, "problems.json", {"1": {"choices": ["a", "b"], "answer": 0}})
    refused(lambda: TASKS["scienceqa"].score(tmp_path, [(question(2), "A")]), "problems.json: no problem 2")


def test_unscored_splits_say_where_to_submit(tmp_path):
    """VizWiz's test split has no val.json, MMBench's test TSV no answer column: the run still writes the
    upload file, and its summary says so instead of a score."""
    assert TASKS["vizwiz"].score(tmp_path, [(question(1), "a")]) == \
        {"accuracy": None, "note": "test split: submit the upload file to the EvalAI server"}


def test_mme_answer_files(tmp_path):
    task, root = TASKS["mme"], tmp_path / TASKS["mme"].images_dir
    write(root, "color/1.txt", "Is it red? Please answer yes or no.\tYes\nIs it blue?\n")
    q = question("color/1.png", "Is it red?\nAnswer the question using a single word or phrase.")
    refused(lambda: task.score(tmp_path, [(q, "yes")]), "color/1.txt:2: expected 'question<TAB>answer'")
    write(root, "color/1.txt", "Is it red? Please answer yes or no.\tYes\n")
    refused(lambda: task.score(tmp_path, [(question("color/1.png", "Is it green?"), "yes")]),
            "no answer for question 'Is it green?'")


def test_pope_labels_out_of_step(tmp_path):
    task = TASKS["pope"]
    refused(lambda: task.check(tmp_path), "POPE label folder not found")
    write(tmp_path, "coco/coco_pope_random.json", json.dumps({"image": "b.jpg", "label": "yes"}) + "\n")
    q = question(1, image="val2014/a.jpg", category="random", label_index=0)
    refused(lambda: task.score(tmp_path, [(q, "yes")]), "coco_pope_random.json:1: label for image b.jpg but question 1 "
            "asks about a.jpg")
    second = question(2, image="val2014/b.jpg", category="random", label_index=1)
    refused(lambda: task.score(tmp_path, [(second, "yes")]), "1 labels but the question file has more random questions")


def test_scienceqa_question_file(tmp_path):
    task = TASKS["scienceqa"]
    (tmp_path / task.images_dir).mkdir(parents=True)
    for content, needle in [({"id": 1}, "expected a JSON list of questions"), ([3], "entry 1 is not an object"),
                            ([{"id": 1, "image": "a.png", "conversations": [{"value": 5}]}],
                             "entry 1: conversations[0].value must be a string")]:
        write(tmp_path, task.questions_file, content)
        refused(lambda: task.load(tmp_path), task.questions_file, needle)


def test_synthetic_answers(tmp_path):
    task = TASKS["synthetic"]
    refused(lambda: task.load(None, tmp_path / "questions.jsonl"), "--questions needs --data DIR")
    (tmp_path / task.images_dir).mkdir()
    write(tmp_path, "questions.jsonl", json.dumps({"question_id": "q1", "text": "?", "image": "1.png"}) + "\n")
    write(tmp_path, "answers.json", {"q2": "4"})
    refused(lambda: task.load(tmp_path), "answers.json: no answer for question q1")


def test_rows_that_are_not_rows(tmp_path, monkeypatch):
    refused(lambda: read_jsonl(write(tmp_path, "q.jsonl", '{"a": 1}\n[1, 2]\n')), "q.jsonl:2: expected a JSON object, got list")
    # csv's only error in read_tsv's dialect is a field past csv.field_size_limit, which read_tsv raises to
    # 2**31 - 1 (MMBench's base64 images): a smaller limit stands in for a field of 2 GiB
    import csv

    limit = csv.field_size_limit
    monkeypatch.setattr(csv, "field_size_limit", lambda n: limit(12))
    refused(lambda: read_tsv(write(tmp_path, "q.tsv", "index\tquestion\n1\tWhat is in the picture?\n"), "question file"),
            "q.tsv:", ": not a tab-separated row (field larger than field limit (12))")  # the line it names is
    # csv's line_num before the failing row (1 here, the row is line 2): noted in the audit, left as is
