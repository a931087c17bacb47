"""The synthetic scenes of issue 6, their evaluation task, and the training script (no model ships yet)."""

import json
import sys
from pathlib import Path


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
    assert a.answer in {card.digit for card in a.scene.cards} | {card.colour for card in a.scene.cards}


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
    train_tiny.main(["--out", str(out), "--stage1-steps", "2", "--stage1-batch", "2", "--stage2-steps", "2",
                     "--stage2-batch", "2", "--eval", "0"])
    assert {"config.json", "model.safetensors", "tokenizer.model", "train_log.txt"} <= {p.name for p in out.iterdir()}
    model = load_model(out)
    assert model.cfg.grid_pinpoints == train_tiny.PINPOINTS and model.cfg.vision.image_size == train_tiny.TILE
    assert "stage 2\tstep 2" in (out / "train_log.txt").read_text()
