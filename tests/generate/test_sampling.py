"""Sampling filters against independent formulations of their rules, and the sampler's distribution."""

import pytest
import torch

from llamakit.errors import ConfigError
from llamakit.generate.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    sample,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)


def _logits(batch=4, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _kept(filtered):
    return torch.isfinite(filtered)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_tokens_whose_more_likely_mass_is_within_p(p):
    logits = _logits()
    probs = logits.softmax(-1)
    # Independent statement of Meta's nucleus rule: a token survives iff the total probability of
    # the tokens strictly more likely than it is at most p.
    more_likely_mass = (probs[:, None, :] * (probs[:, None, :] > probs[:, :, None])).sum(-1)
    assert torch.equal(_kept(top_p_filter(logits, p)), more_likely_mass <= p)


def test_top_p_always_keeps_the_best_token_and_one_disables_it():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    assert _kept(top_p_filter(logits, 0.01)).tolist() == [[True, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_k_keeps_the_k_largest():
    logits = _logits()
    kept = _kept(top_k_filter(logits, 5))
    assert kept.sum(-1).tolist() == [5] * 4
    for row, mask in zip(logits, kept):
        assert set(row.argsort(descending=True)[:5].tolist()) == set(mask.nonzero().flatten().tolist())
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_min_p_keeps_tokens_within_a_factor_of_the_best():
    logits = _logits()
    probs = logits.softmax(-1)
    expected = probs >= 0.1 * probs.max(-1, keepdim=True).values
    assert torch.equal(_kept(min_p_filter(logits, 0.1)), expected)


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = _logits()
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    params = SamplingParams(temperature=0.7, top_p=1.0)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, params, generator) for _ in range(20000)]).flatten()
    frequencies = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(frequencies, (logits / 0.7).softmax(-1)[0], atol=0.015)


def test_filters_restrict_what_is_sampled():
    logits = _logits(batch=1, vocab=20)
    generator = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.5, top_p=1.0, top_k=3), generator).item() for _ in range(300)}
    assert draws == set(logits[0].topk(3).indices.tolist())  # only the top 3, and all of them


def test_seeded_sampling_is_reproducible():
    logits, params = _logits(), SamplingParams(temperature=1.0, top_p=0.95)
    a = [sample(logits, params, torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [sample(logits, params, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_token_logprobs_are_log_softmax_of_raw_logits():
    logits, tokens = _logits(), torch.tensor([0, 5, 9, 49])
    expected = torch.log_softmax(logits, -1)[torch.arange(4), tokens]
    assert torch.allclose(token_logprobs(logits, tokens), expected)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=1.0), dict(repetition_penalty=0)])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingParams(**bad)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("bad, problem", [
    (dict(temperature=INF), "temperature must be a finite number"),
    (dict(temperature=NAN), "temperature must be a finite number"),
    (dict(temperature=-INF), "temperature must be a finite number"),
    (dict(top_p=NAN), "top_p must be a finite number"),
    (dict(min_p=NAN), "min_p must be a finite number"),
    (dict(repetition_penalty=INF), "repetition_penalty must be a finite number"),
    (dict(temperature="0.7"), "temperature must be a finite number"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
])
def test_non_finite_or_mistyped_settings_are_rejected(bad, problem):
    with pytest.raises(ConfigError, match=problem):
        SamplingParams(**bad)


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-45, 1e-46, 1e-300])
def test_a_tiny_temperature_samples_the_best_token(temperature):
    # Dividing raw logits by it gives inf, and softmax(inf - inf) is nan; below fp32's range it is 0 / 0: token 0.
    logits = _logits()
    assert torch.equal(sample(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(0)),
                       logits.argmax(-1))
