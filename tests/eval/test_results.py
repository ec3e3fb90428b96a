"""The results log: rewritten atomically after each task; an interrupt keeps finished tasks; the table."""

import json

import pytest

from llamakit.eval import Perplexity, RunLog, TaskResult, format_table, run_tasks


def result(name, acc):
    return TaskResult(name, {"acc": acc, "acc_stderr": 0.1, "acc_norm": acc, "n": 4}, {"template_version": "1"},
                      [{"id": "0", "acc": 1}])


def test_interrupt_keeps_finished_tasks(tmp_path):
    path = tmp_path / "out" / "results.json"
    log = RunLog({"seed": 0}, path)
    assert json.loads(path.read_text())["status"] == "running"

    def interrupted(model):
        assert list(json.loads(path.read_text())["results"]) == ["piqa"]  # written before the next task starts
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tasks(None, [("piqa", lambda model: result("piqa", 0.5)), ("boolq", interrupted),
                         ("arc_easy", lambda model: result("arc_easy", 1.0))], log)
    data = json.loads(path.read_text())
    assert data["status"] == "failed" and data["results"]["boolq"] == {"status": "failed", "error": "interrupted"}
    assert data["results"]["piqa"]["metrics"]["acc"] == 0.5 and data["results"]["piqa"]["status"] == "complete"
    assert "arc_easy" not in data["results"]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary files left


def test_table():
    table = format_table([result("piqa", 0.5), result("winogrande", 0.25)]).splitlines()
    assert table[0].split() == ["task", "metric", "value", "±", "stderr", "n"] and set(table[1]) == {"-"}
    assert table[2].split() == ["piqa", "acc", "0.5000", "0.1000", "4"]
    assert table[5].split() == ["winogrande", "acc_norm", "0.2500", "4"]


def test_perplexity_table_shows_each_metric_with_its_count():
    result = TaskResult("perplexity", Perplexity(nll=2000.0, tokens=1000, bytes=4000, windows=2).as_dict(), {})
    rows = [line.split() for line in format_table([result]).splitlines()[2:]]
    assert rows == [["perplexity", "token_perplexity", "7.3891", "1000"],
                    ["perplexity", "byte_perplexity", "1.6487", "4000"],
                    ["perplexity", "bits_per_byte", "0.7213", "4000"]]
