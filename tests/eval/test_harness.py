"""The lm-evaluation-harness model `llamakit`: lm_eval's requests scored as transformers scores them; its CLI wrapper."""

import json
import subprocess
import sys

import pytest
import torch

from llamakit.eval import encode_pair, text_perplexity
from tests.eval.conftest import hf_score

lm_eval = pytest.importorskip("lm_eval")

ROWS = [{"question": "Lily went to the park. She saw a", "choices": ["big dog.", "spaceship made of cheese."], "label": 0},
        {"question": "Tom was sad because he lost his", "choices": ["toy.", "quantum chromodynamics."], "label": 0},
        {"question": "Once upon a time, there was a little", "choices": ["girl", "the of and"], "label": 1}]
TASK_YAML = """task: llamakit_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, monkeypatch_module):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "tiny.yaml").write_text(TASK_YAML.format(data=folder / "data.jsonl"))
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield mp


@pytest.fixture(scope="module")
def adapter(assets):
    from llamakit.eval.harness import LlamakitLM

    tiny = assets / "tinyllamas"
    return LlamakitLM(str(tiny / "stories260K.bin"), str(tiny / "tok512.model"), device="cuda", batch_size="3")


def test_simple_evaluate_scores_like_transformers(assets, task_dir, stories, stories_hf):
    from lm_eval.tasks import TaskManager

    import llamakit.eval.harness  # noqa: F401  registers the "llamakit" model with lm_eval

    tiny = assets / "tinyllamas"
    results = lm_eval.simple_evaluate(model="llamakit", model_args=f"checkpoint={tiny / 'stories260K.bin'},"
                                      f"tokenizer={tiny / 'tok512.model'}", tasks=["llamakit_tiny_mc"],
                                      task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
                                      batch_size=4)
    samples = sorted(results["samples"]["llamakit_tiny_mc"], key=lambda s: s["doc_id"])
    hits = []
    for row, sample in zip(ROWS, samples):
        reference = [hf_score(stories_hf[0], *encode_pair(stories[1], row["question"], " " + c)) for c in row["choices"]]
        got = [resp[0] for resp in sample["resps"]]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in reference], abs=1e-4)
        assert [g for _, g in got] == [g for _, g in reference]
        hits.append(int(max(range(2), key=lambda i: reference[i][0]) == row["label"]))
    assert results["results"]["llamakit_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / 3)


def test_rolling_and_generation(adapter, stories, stories_hf):
    text = "Once upon a time, there was a little girl named Lily. She loved to play."
    [rolling] = adapter.loglikelihood_rolling([(text,)], disable_tqdm=True)
    assert rolling == pytest.approx(-text_perplexity(*stories, text, window=512).nll, rel=1e-6)
    [empty_context] = adapter.loglikelihood([("", "Once upon a time")], disable_tqdm=True)
    assert empty_context[0] == pytest.approx(hf_score(stories_hf[0], *encode_pair(stories[1], "", "Once upon a time"))[0],
                                             abs=1e-4)
    prompt = "Tom and Lily went to the"
    [answer] = adapter.generate_until([(prompt, {"until": ["."], "max_gen_toks": 30, "do_sample": False})],
                                      disable_tqdm=True)
    ids = stories[1].encode(prompt, bos=True)
    with torch.no_grad():
        out = stories_hf[0].generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, pad_token_id=0,
                                     eos_token_id=stories[1].eos_id)[0, len(ids):]
    continuation = stories[1].decode(ids + out.tolist())[len(prompt):]  # the text that follows the prompt
    assert answer == continuation.split(".")[0] and answer.startswith(" ") and "." not in answer


def test_module_runs_lm_eval_cli(assets, task_dir, tmp_path):
    tiny = assets / "tinyllamas"
    result = subprocess.run([sys.executable, "-m", "llamakit.eval.harness", "--model", "llamakit", "--model_args",
                             f"checkpoint={tiny / 'stories260K.bin'},tokenizer={tiny / 'tok512.model'}",
                             "--tasks", "llamakit_tiny_mc", "--include_path", str(task_dir), "--batch_size", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(line.startswith("|llamakit_tiny_mc") and "acc" in line for line in result.stdout.splitlines())


def test_importing_llamakit_does_not_need_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None; import llamakit, llamakit.eval, llamakit.cli; "
            "print('lm_eval' in sys.modules and sys.modules['lm_eval'] is not None)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
