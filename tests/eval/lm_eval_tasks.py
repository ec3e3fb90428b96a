"""lm-evaluation-harness's own task objects over our fixture files: the independent reference for our prompts.

Built once per test session (indexing lm-eval's tasks takes seconds): its `race` over tests/eval/data/race
(as EleutherAI/race rows) and its `gsm8k_cot` over tests/eval/data/gsm8k.
"""

import functools
import json
import tempfile
import warnings
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def race_rows() -> list[dict]:
    """The official RACE fixture articles (files sorted by path) as EleutherAI/race rows: {article, problems: the
    repr of [{question, options, answer}]}."""
    rows = []
    for path in sorted((DATA / "race" / "test").rglob("*.txt")):
        d = json.loads(path.read_text())
        problems = [{"question": q, "options": o, "answer": a} for q, o, a in zip(d["questions"], d["options"],
                                                                                 d["answers"])]
        rows.append({"article": d["article"], "problems": repr(problems)})
    return rows


def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]


def lm_eval_requests(name: str) -> tuple[list[list[tuple]], object]:
    """Each document's request arguments (context and continuation, or context and generation settings) of
    lm-eval's task `name` ("race" or "gsm8k_cot") over our fixture rows, and the task; skipped without lm_eval."""
    pytest.importorskip("lm_eval")
    return _built()[name]


@functools.cache
def _built() -> dict:
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="llamakit_lm_eval_"))
    sources = {"race": ("race/race.yaml", race_rows()), "gsm8k_cot": ("gsm8k/gsm8k-cot.yaml", gsm8k_rows())}
    for name, (include, rows) in sources.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(
            f"include: {Path(lm_eval.tasks.__file__).parent / include}\ntask: llamakit_reference_{name}\n"
            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        warnings.simplefilter("ignore", DeprecationWarning)  # load_task_or_group: the API every lm_eval 0.4 has
        tasks = TaskManager(include_path=str(folder)).load_task_or_group([f"llamakit_reference_{n}" for n in sources])
    return {name: _requests(tasks[f"llamakit_reference_{name}"]) for name in sources}


def _requests(task) -> tuple[list[list[tuple]], object]:
    task.build_all_requests(rank=0, world_size=1)
    by_doc: dict[int, list[tuple]] = {}
    for instance in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc.setdefault(instance.doc_id, []).append(tuple(instance.args))
    return [by_doc[d] for d in sorted(by_doc)], task
