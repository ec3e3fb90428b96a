"""RACE: the official files and the hub's row formats read alike; prompts equal lm-evaluation-harness's own `race` task."""

import json
from pathlib import Path

import pytest

from llamakit.errors import EvalError
from llamakit.eval.race import load_race, load_task, race_context, race_example
from tests.eval.lm_eval_tasks import lm_eval_requests, race_rows

DATA = Path(__file__).parent / "data" / "race" / "test"
OFFICIAL = sorted(DATA.rglob("*.txt"))  # high/1.txt, middle/1.txt, middle/2.txt


def official(path: Path) -> dict:
    return json.loads(path.read_text())


def test_hand_checked_prompts():
    articles = {a.id: a for a in load_race(DATA)}
    # an earlier fill-in question gets its answer in the blank (one of the blank's two spaces stays)
    assert race_context(articles["high1.txt"]) == (
        "Article: " + official(DATA / "high" / "1.txt")["article"] + "\n\n"
        "Question: When did the town get its first library?\nAnswer: 1920\n"
        "The old man loved listening to radio\n"
        "What is the writer's attitude towards the town's future?")
    # the last question is asked as it is, blank included; the options follow after a space
    example = race_example(articles["middle1.txt"])
    assert example.choices[1] == ("Article: Tom had a little dog called Max. Every day after school, Tom and Max "
                                  "played in the park.\n\nQuestion: What did Tom have?\nAnswer: a dog\n"
                                  "Tom played with it  _  .", " in the shop")
    assert example.gold == 3 and example.answers == ("at school", "in the shop", "by the river", "in the park")
    assert [(a.id, a.level, len(a.questions)) for a in load_race(DATA)] == [
        ("high1.txt", "high", 3), ("middle1.txt", "middle", 2), ("middle2.txt", "middle", 1)]


def test_prompts_equal_lm_eval_race(tmp_path):
    """lm-evaluation-harness's own `race` task (its YAML and preprocess_race) over our articles as EleutherAI/race
    rows asks the same questions with the same choices."""
    requests, task = lm_eval_requests("race")
    targets, rows = [task.doc_to_target(doc) for doc in task.eval_docs], race_rows()
    examples = [race_example(a) for a in load_race(DATA)]  # the same order: the files sorted
    assert len(examples) == len(requests) == 3
    for example, pairs, target in zip(examples, requests, targets):
        assert [tuple(p) for p in pairs] == list(example.choices)
        assert target == example.gold
    # the EleutherAI/race rows themselves read the same
    path = tmp_path / "race.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [race_example(a).choices for a in load_race(path)] == [e.choices for e in examples]


def test_row_formats_read_like_the_official_files(tmp_path):
    articles = load_race(DATA)
    lines = tmp_path / "official.jsonl"  # one official article per line
    lines.write_text("".join(json.dumps(official(p)) + "\n" for p in OFFICIAL))
    hub = tmp_path / "ehovy.jsonl"  # one question per line, as on the Hugging Face hub (ehovy/race)
    hub.write_text("".join(json.dumps({"example_id": d["id"], "article": d["article"], "answer": a, "question": q,
                                       "options": o}) + "\n"
                           for d in map(official, OFFICIAL) for q, o, a in zip(d["questions"], d["options"],
                                                                                 d["answers"])))
    for path in (lines, hub):
        assert [(a.id, a.level, a.questions) for a in load_race(path)] == [(a.id, a.level, a.questions)
                                                                          for a in articles]
    bare = tmp_path / "bare.jsonl"  # rows without example_id: consecutive rows of one article are grouped by its text
    bare.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "example_id"}) + "\n"
                            for line in hub.read_text().splitlines()))
    assert [a.questions for a in load_race(bare)] == [a.questions for a in articles]


def test_levels_and_limits():
    assert [a.id for a in load_task("race_middle", DATA / "middle", None, None)] == ["middle1.txt", "middle2.txt"]
    assert [a.id for a in load_task("race", DATA, 0, 2)] == ["high1.txt", "middle1.txt"]
    with pytest.raises(EvalError, match="1 articles that are not middle .e.g. high1.txt"):
        load_task("race_middle", DATA, None, None)
    with pytest.raises(EvalError, match="race_high is evaluated zero-shot"):
        load_task("race_high", DATA / "high", 2, None)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(answers=["E", "A", "D"]), r"1.txt question 1: answer 'E' is not one of A, B, C, D"),
    (lambda d: d.update(answers=["AB", "A", "D"]), r"answer 'AB' is not one of"),
    (lambda d: d["options"][1].pop(), r"question 2: options must be a list of 4 strings"),
    (lambda d: d.update(answers=["A"]), r"must be non-empty lists of one length \(got 3, 3, 1\)"),
    (lambda d: d.pop("article"), r"missing field 'article'"),
])
def test_malformed_articles_are_refused(tmp_path, change, message):
    data = official(DATA / "high" / "1.txt")
    change(data)
    (tmp_path / "high").mkdir()
    (tmp_path / "high" / "1.txt").write_text(json.dumps(data))
    with pytest.raises(EvalError, match=message):
        load_race(tmp_path)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(EvalError, match="no RACE article files"):
        load_race(tmp_path)
    (tmp_path / "1.txt").write_text("Article: not json")
    with pytest.raises(EvalError, match=r"1.txt: not valid JSON"):
        load_race(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"article": "a", "text": "b"}) + "\n")
    with pytest.raises(EvalError, match=r"rows.jsonl:1: not a RACE row"):
        load_race(rows)
    rows.write_text(json.dumps({"article": "a", "problems": "[{'question': 'q'"}) + "\n")
    with pytest.raises(EvalError, match=r"'problems' is not a list literal"):
        load_race(rows)
    (tmp_path / "mixed" / "RACE" / "train" / "high").mkdir(parents=True)
    (tmp_path / "mixed" / "RACE" / "train" / "high" / "1.txt").write_text((DATA / "high" / "1.txt").read_text())
    with pytest.raises(EvalError, match="holds training or dev articles"):
        load_race(tmp_path / "mixed" / "RACE")
