"""The synthetic scenes of issue 6, their evaluation task, the training script and the shipped model."""

import json
import sys
from pathlib import Path


import torch

from minillava import generate as gen
from minillava import trust, weights
from minillava.eval import runner
from minillava.eval import synthetic as S
from minillava.eval.tasks import TASKS
from minillava.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_scenes_are_deterministic():
    a, b = S.sample(7, "test", 3), S.sample(7, "test", 3)
    assert a.scene.image.tobytes() == b.scene.image.tobytes()
    assert (a.question, a.answer, a.scene.cards) == (b.question, b.answer, b.scene.cards)
    c = S.sample(7, "train", 3)
    assert c.scene.image.tobytes() != a.scene.image.tobytes()
    assert len(a.scene.cards) == 1 and a.answer == a.scene.cards[0].digit and a.scene.cards[0].colour in a.question
    many = S.sample(7, "train", 3, cards=(3, 5))  # the tower's training scenes
    assert 3 <= len(many.scene.cards) <= 5
    assert len({c.colour for c in many.scene.cards}) == len({c.digit for c in many.scene.cards}) == len(many.scene.cards)


def test_synthetic_task_scores_an_answers_file(tmp_path, capsys):
    data = S.write_split(tmp_path / "split", 4)
    truth = json.loads((data / "answers.json").read_text())
    ids = sorted(truth)
    wrong = "purple" if truth[ids[3]] != "purple" else "red"
    answers = [{"question_id": ids[0], "text": truth[ids[0]]},
               {"question_id": ids[1], "text": f"  {truth[ids[1]].upper()} \n"},
               {"question_id": ids[2], "text": truth[ids[2]]},
               {"question_id": ids[3], "text": wrong}]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    assert runner.main(["synthetic", "--data", str(data), "--score-only", "--answers", str(path)]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["score"] == 75.0 and line["questions"] == 4


def test_synthetic_task_without_data_is_the_written_split(tmp_path, monkeypatch):
    task = TASKS["synthetic"]
    monkeypatch.setattr(type(task), "DEFAULT_QUESTIONS", 3)
    in_memory = task.load(None)
    data = S.write_split(tmp_path / "split", 3)
    written = task.load(data)
    assert [(q.question_id, q.prompt, q.extra["answer"]) for q in in_memory] == \
        [(q.question_id, q.prompt, q.extra["answer"]) for q in written]
    assert task.open_image(in_memory[1]).tobytes() == task.open_image(written[1]).tobytes()


def test_training_smoke(tmp_path):
    """Two steps of each stage write a checkpoint that the normal loader reads back, in float16."""
    import train_tiny

    out = tmp_path / "tiny"
    train_tiny.main(["--out", str(out), "--stage1-steps", "2", "--stage1-batch", "2", "--stage2-scenes", "3",
                     "--stage2-steps", "2", "--stage2-batch", "2", "--eval", "0"])
    assert {"config.json", "model.safetensors", "tokenizer.model", "train_log.txt"} <= {p.name for p in out.iterdir()}
    model = load_model(out)
    assert model.cfg.grid_pinpoints == train_tiny.PINPOINTS and model.cfg.vision.image_size == train_tiny.TILE
    assert "stage 2\tstep 2" in (out / "train_log.txt").read_text()


# ----------------------------------------------------------------------------- the shipped model

SHIPPED = ROOT / "weights" / "llava-next-tiny-scenes"
EXAMPLE_QUESTION, EXAMPLE_ANSWER = "What digit is on the red card?", "6"  # examples/scene.png (held-out test-00020)
HELD_OUT_MIN, THUMBNAIL_MAX = 85.0, 40.0  # percent on held-out questions 0 .. 39


def test_the_default_model_is_the_shipped_one(tmp_path, monkeypatch):
    """`--model` defaults to the committed checkpoint, found even when MINILLAVA_WEIGHTS points
    elsewhere; it is small, float16 and in the transformers layout."""
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    assert weights.resolve_model(weights.DEFAULT_MODEL) == SHIPPED
    files = {p.name: p.stat().st_size for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20
    header = trust.read_header(SHIPPED / "model.safetensors")
    assert {e.dtype for e in header.values()} == {torch.float16}
    assert all(k.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                             "language_model.lm_head.", "image_newline")) for k in header)  # transformers hub layout
    load_model(SHIPPED)  # strict: every parameter present, nothing left over


def test_the_readme_command_answers(capsys):
    """The README's first command, offline, with the default model and compressor."""
    code = gen.main(["--image", str(ROOT / "examples" / "scene.png"), "--prompt", EXAMPLE_QUESTION, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["text"].strip() == EXAMPLE_ANSWER
    assert result["visual_tokens"]["after"] < result["visual_tokens"]["before"]  # GlobalCom2 at r = 0.25


def test_the_shipped_model_answers_held_out_questions():
    """Held-out questions 0 .. 39: uncompressed accuracy as measured when the model was trained
    (see docs/miniature.md), and well below it with the thumbnail alone (the digit needs the crops)."""
    from compression_table import evaluate

    accuracy, kept = evaluate(SHIPPED, 40, [("none", 1.0), ("thumbnail", 1.0), ("globalcom2", 0.25)])[:2]
    assert accuracy[("none", 1.0)] >= HELD_OUT_MIN
    assert accuracy[("thumbnail", 1.0)] <= THUMBNAIL_MAX
    assert kept[("none", 1.0)] == 100.0 and kept[("thumbnail", 1.0)] == 0.0
