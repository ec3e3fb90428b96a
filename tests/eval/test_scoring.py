"""Batched log-likelihood scoring equals transformers on the same token ids; batching, sharing and truncation."""

import pytest
import torch

from llamakit.errors import EvalError
from llamakit.eval import encode_pair, score_examples, score_pairs
from llamakit.eval.mmlu import load_examples
from llamakit.eval.scoring import fit_window, greedy_answers
from llamakit.eval.tasks import load_hellaswag, load_piqa
from tests.eval.conftest import hf_score


@pytest.fixture(scope="module")
def real_examples(assets, stories):
    _, tokenizer = stories
    eval_dir = assets / "eval"
    mmlu, _ = load_examples(tokenizer, eval_dir / "mmlu", 5, 512, limit=1)
    return {"piqa": load_piqa(eval_dir / "piqa" / "valid.jsonl")[:8],
            "hellaswag": load_hellaswag(eval_dir / "hellaswag" / "hellaswag_val_full.txt.bz2")[:8],
            "mmlu": mmlu[:6]}


@pytest.mark.parametrize("task", ["piqa", "hellaswag", "mmlu"])
def test_per_example_logprobs_and_choices_equal_transformers(task, real_examples, stories, stories_hf):
    model, tokenizer = stories
    examples = real_examples[task]
    records = score_examples(model, tokenizer, examples, window=512, batch_size=5)
    for example, record in zip(examples, records):
        pairs = [encode_pair(tokenizer, *choice) for choice in example.choices]
        reference = [hf_score(stories_hf[0], ctx, cont) for ctx, cont in pairs]
        assert record["logprobs"] == pytest.approx([lp for lp, _ in reference], abs=1e-4)
        assert record["is_greedy"] == [greedy for _, greedy in reference]
        expected = max(range(len(reference)), key=lambda i: reference[i][0])
        assert record["n_chars"] == [len(continuation) - 1 for _, continuation in example.choices]  # no space
        expected_norm = max(range(len(reference)), key=lambda i: reference[i][0] / record["n_chars"][i])
        assert (record["pred"], record["pred_norm"]) == (expected, expected_norm)
        assert record["acc"] == int(expected == example.gold)


def test_encoding_splits_the_whole_text(stories):
    _, tokenizer = stories
    context, continuation = encode_pair(tokenizer, "Question: Lily went to the park.\nAnswer:", " She played.")
    assert context[0] == tokenizer.bos_id
    assert context + continuation == tokenizer.encode("Question: Lily went to the park.\nAnswer: She played.", bos=True)
    assert tokenizer.decode(continuation).strip() == "She played."
    # a context's trailing space belongs to the continuation
    assert encode_pair(tokenizer, "Tom was ", "happy") == encode_pair(tokenizer, "Tom was", " happy")


def test_batching_order_and_shared_rows_do_not_change_scores(stories):
    model, tokenizer = stories
    texts = [("Once upon a time", " there was a cat"), ("Tom and Lily", " went to the park."), ("The sun", " A"),
             ("The sun", " B"), ("The sun", " A"), ("A", " big dog ran fast and jumped over the fence")]
    pairs = [encode_pair(tokenizer, *t) for t in texts]
    alone = [score_pairs(model, [p], 512)[0] for p in pairs]
    batched = score_pairs(model, pairs, 512, batch_size=4)
    assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in alone], abs=1e-5)
    assert batched[2] == batched[4] and [s.is_greedy for s in batched] == [s.is_greedy for s in alone]


def test_long_context_loses_oldest_tokens(stories, stories_hf):
    model, tokenizer = stories
    context, continuation = encode_pair(tokenizer, "Once upon a time, " * 20, "there was a dog.")
    window = 32
    score = score_pairs(model, [(context, continuation)], window)[0]
    inputs, cut = fit_window(context, continuation, window)
    assert len(inputs) == window and cut == score.truncated == len(context) + len(continuation) - 1 - window
    kept = context[cut:]
    assert score.logprob == pytest.approx(hf_score(stories_hf[0], kept, continuation)[0], abs=1e-4)


def test_continuation_longer_than_the_window_is_an_error(stories):
    model, tokenizer = stories
    pair = encode_pair(tokenizer, "Hi", " and then" * 30)
    with pytest.raises(EvalError, match="does not fit the 16-token window"):
        score_pairs(model, [pair], 16)


def test_empty_continuation_is_an_error(stories):
    with pytest.raises(EvalError, match="empty continuation"):
        encode_pair(stories[1], "context", "")


def test_scoring_after_generation_is_unchanged(stories):
    model, tokenizer = stories
    pair = encode_pair(tokenizer, "Tom", " ran")
    before = score_pairs(model, [pair], 64)[0]
    greedy_answers(model, tokenizer, ["Tom"], 64, max_new_tokens=4)  # generation leaves nothing in the model
    assert score_pairs(model, [pair], 64)[0] == before and torch.isfinite(torch.tensor(before.logprob))
