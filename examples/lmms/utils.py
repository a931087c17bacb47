"""Functions of synthetic_scenes.yaml: a split in LLaVA's layout (questions.jsonl, images/, answers.json)."""

import json
from functools import cache
from pathlib import Path

from PIL import Image

SPLIT = Path("data/synthetic")  # as the yaml's data_files


def doc_to_visual(doc):
    return [Image.open(SPLIT / "images" / doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["text"]  # the question and LLaVA's short-answer instruction, as minillava.eval asks it


@cache
def _answers() -> dict:
    return json.loads((SPLIT / "answers.json").read_text())


def doc_to_target(doc):
    return _answers()[doc["question_id"]]
