"""The lm-evaluation-harness model `llamakit`: lm_eval's requests scored as transformers scores them; its CLI wrapper."""

import json
import subprocess
import sys

import pytest
import torch

from llamakit.errors import LlamakitError
from llamakit.eval import encode_pair, score_examples, text_perplexity
from llamakit.eval.readers import read_lines
from llamakit.eval.tasks import load_hellaswag, load_winogrande
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
# lm-eval 0.4's hellaswag.yaml on rows its process_docs has already cleaned (the text form is cleaned)
HELLASWAG_YAML = """task: llamakit_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
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


def test_acc_norm_is_lm_evals_on_real_hellaswag(assets, stories, tmp_path, monkeypatch_module):
    """lm_eval's own request building and process_results, fed llamakit's log-likelihoods, pick what llamakit picks."""
    from lm_eval.tasks import TaskManager, get_task_dict

    model, tokenizer = stories
    path = assets / "eval" / "hellaswag" / "hellaswag_val_full.txt.bz2"
    lines = read_lines(path)[:60]  # 10 examples of 6 lines: context, label, four endings
    rows = [{"query": lines[i], "label": lines[i + 1], "choices": lines[i + 2:i + 6]} for i in range(0, 60, 6)]
    (tmp_path / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hellaswag.yaml").write_text(HELLASWAG_YAML.format(data=tmp_path / "hellaswag.jsonl"))
    task = get_task_dict(["llamakit_hellaswag"], TaskManager(include_path=str(tmp_path)))["llamakit_hellaswag"]
    examples = load_hellaswag(path)[:10]
    records = score_examples(model, tokenizer, examples, window=512, batch_size=8)
    old_rule = []  # llamakit's former acc_norm: divided by UTF-8 bytes, leading space included
    for doc, example, record in zip(task.validation_docs(), examples, records):
        requests = task.construct_requests(doc, task.fewshot_context(doc, num_fewshot=0))
        assert [r.args for r in requests] == list(example.choices)  # the same (context, continuation) pairs
        results = list(zip(record["logprobs"], record["is_greedy"]))
        assert task.process_results(doc, results) == {"acc": record["acc"], "acc_norm": record["acc_norm"]}
        lm_eval_pick = [j for j in range(4) if task.process_results({**doc, "label": str(j)}, results)["acc_norm"]]
        assert lm_eval_pick == [record["pred_norm"]]
        by_bytes = [lp / len(c.encode()) for lp, (_, c) in zip(record["logprobs"], example.choices)]
        old_rule.append(max(range(4), key=by_bytes.__getitem__))
    # the two rules disagree on real examples (all ASCII): example 8, where only lm-eval's rule finds the gold ending
    assert all(ch.isascii() for ex in examples for _, c in ex.choices for ch in c)
    assert [i for i, r in enumerate(records) if r["pred_norm"] != old_rule[i]] == [8]
    assert records[8]["acc_norm"] == 1 and old_rule[8] != examples[8].gold


def test_winogrande_answers_are_lm_evals_choices(tmp_path):
    from lm_eval.tasks.winogrande import preprocess_winogrande

    row = {"qID": "q1", "sentence": "The trophy didn't fit in the suitcase because the _ was too big.",
           "option1": "trophy", "option2": "suitcase", "answer": "1"}
    (tmp_path / "dev.jsonl").write_text(json.dumps(row) + "\n")
    [example] = load_winogrande(tmp_path / "dev.jsonl")
    assert list(example.answers) == preprocess_winogrande.doc_to_choice(row)
    assert example.choices[0][1] == " " + preprocess_winogrande.doc_to_target(row)


def test_max_length_beyond_the_models_context(assets, caplog):
    from llamakit.eval.harness import LlamakitLM

    tiny = assets / "tinyllamas"
    with pytest.raises(LlamakitError, match="max_length 100000 is beyond the model's 512-token context"):
        LlamakitLM(str(tiny / "stories260K.bin"), str(tiny / "tok512.model"), max_length="100000")
    lm = LlamakitLM(str(tiny / "stories260K.bin"), str(tiny / "tok512.model"), max_length=1024, extend_context=True)
    assert lm.max_length == 1024 and "beyond the model's 512-token context" in caplog.text
    assert LlamakitLM(str(tiny / "stories260K.bin"), str(tiny / "tok512.model"), max_length=256).max_length == 256
