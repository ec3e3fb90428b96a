"""Perplexity equals exp(mean NLL) computed independently with transformers; the window/stride rules."""

import math

import pytest
import torch

from llamakit.errors import EvalError
from llamakit.eval import text_perplexity
from llamakit.eval.perplexity import perplexity_of_ids, sliding_windows

TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. "
        "One day, she saw a big, red ball in the park. She ran to it and kicked it very high.")


def hf_token_nlls(hf_model, context: list[int], targets: list[int]) -> list[float]:
    """-log p of each target token after context + the targets before it, by transformers."""
    tokens = torch.tensor([context + targets])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(tokens).logits[0, :-1].float(), dim=-1)
    rows = logprobs[len(context) - 1:]
    return (-rows.gather(-1, torch.tensor(targets)[:, None]).flatten()).tolist()


def test_full_context_equals_exp_mean_nll(stories, stories_hf):
    model, tokenizer = stories
    ids = tokenizer.encode(TEXT, bos=True)
    nlls = hf_token_nlls(stories_hf[0], ids[:1], ids[1:])
    result = text_perplexity(model, tokenizer, TEXT, window=512)
    assert result.tokens == len(ids) - 1 and result.bytes == len(TEXT.encode()) and result.windows == 1
    assert result.token_perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(sum(nlls) / result.bytes / math.log(2), rel=1e-5)
    assert result.byte_perplexity == pytest.approx(math.exp(sum(nlls) / result.bytes), rel=1e-5)
    for stride in (1, 7, 512):  # the text fits one window: any stride gives the full-context value
        assert text_perplexity(model, tokenizer, TEXT, 512, stride).nll == pytest.approx(result.nll, rel=1e-5)


def test_stride_equal_to_window_is_independent_chunks(stories, stories_hf):
    model, tokenizer = stories
    ids = tokenizer.encode(TEXT, bos=True)
    window = 16
    expected = []
    for start in range(0, len(ids) - 1, window):  # chunk inputs ids[start:start + window], each on its own
        chunk = ids[start:start + window + 1]
        expected += hf_token_nlls(stories_hf[0], chunk[:1], chunk[1:])
    nll, tokens, windows = perplexity_of_ids(model, ids, window, window, batch_size=3)
    assert tokens == len(expected) == len(ids) - 1 and windows == math.ceil((len(ids) - 1) / window)
    assert nll == pytest.approx(sum(expected), rel=1e-5)


def test_sliding_window_gives_each_token_the_most_context(stories, stories_hf):
    model, tokenizer = stories
    ids = tokenizer.encode(TEXT, bos=True)[:40]
    window = 8
    expected = sum(hf_token_nlls(stories_hf[0], ids[max(0, i - window):i], [ids[i]])[0] for i in range(1, len(ids)))
    nll, tokens, _ = perplexity_of_ids(model, ids, window, stride=1, batch_size=16)
    assert tokens == len(ids) - 1 and nll == pytest.approx(expected, rel=1e-5)
    # a middle stride scores every token exactly once too
    assert perplexity_of_ids(model, ids, window, stride=3)[1] == len(ids) - 1


@pytest.mark.parametrize("n, window, stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (33, 8, 3), (9, 8, 8)])
def test_windows_cover_each_target_once(n, window, stride):
    spans = sliding_windows(n, window, stride)
    scored = [t for _, first, end in spans for t in range(first + 1, end + 1)]
    assert scored == list(range(1, n))
    assert all(end - begin <= window and begin <= first for begin, first, end in spans)


def test_bad_stride_and_empty_text(stories):
    model, tokenizer = stories
    with pytest.raises(EvalError, match="stride 9 must be between 1 and the window"):
        text_perplexity(model, tokenizer, TEXT, window=8, stride=9)
    with pytest.raises(EvalError, match="empty"):
        text_perplexity(model, tokenizer, "", window=8)
