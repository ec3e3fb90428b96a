"""Speculative and prompt-lookup decoding are exact: greedy equals the target's greedy, and sampled tokens follow
the target's distribution (and a wrong acceptance rule is caught)."""


import pytest
import torch

from llamakit import ModelConfig
from llamakit.cli import main
from llamakit.errors import LlamakitError
from llamakit.generate import (
    ModelDrafter,
    PromptLookupDrafter,
    SamplingParams,
    Speculation,
    generate,
    speculative,
    speculative_generate,
)
from llamakit.generate.sampling import probs
from llamakit.generate.speculative import model_drafter
from llamakit.model import KVCache
from tests.generate.conftest import TINY, random_model

GREEDY = SamplingParams(temperature=0)
GAMMAS = (1, 2, 4, 7)


def _drafter(kind, target, draft, noisy, max_len):
    if kind == "draft":
        return model_drafter(draft, target, max_len)
    if kind == "noisy":
        return model_drafter(noisy, target, max_len)
    if kind == "self":
        return model_drafter(target, target, max_len)
    return PromptLookupDrafter(max_ngram=3)


@pytest.mark.parametrize("kind", ["draft", "noisy", "self", "lookup"])
def test_greedy_equals_target_greedy(stories, small_draft, noisy_draft, kind):
    target, tok = stories
    prompt = tok.encode("Once upon a time, there was a little cat. The little cat liked to play. The little", bos=True)
    budget = 40
    [plain] = generate(target, tok, [prompt], budget, GREEDY, stop_ids=frozenset())
    rates = []
    for gamma in GAMMAS:
        drafter = _drafter(kind, target, small_draft, noisy_draft, len(prompt) + budget + gamma + 1)
        out, stats = speculative_generate(target, tok, prompt, budget, GREEDY, drafter, gamma, stop_ids=frozenset())
        assert out.tokens == plain.tokens, gamma
        assert out.text == plain.text
        assert stats.target_forwards == budget - stats.accepted  # one forward per token not drafted correctly
        rates.append(stats.acceptance_rate)
    if kind == "self":
        assert rates == [1.0] * len(GAMMAS)
    if kind in ("noisy", "lookup"):
        assert min(rates) > 0 and max(rates) < 1


def test_compiled_draft_equals_target_greedy(stories, noisy_draft):
    """The draft's one-token steps run on the compiled decode step (speculation composes with it)."""
    target, tok = stories
    prompt = tok.encode("Once upon a time, there was a little cat. The little", bos=True)
    [plain] = generate(target, tok, [prompt], 30, GREEDY, stop_ids=frozenset())
    spec = Speculation(target, noisy_draft, 3, compile=True)
    [ours] = spec.generate(tok, [prompt], 30, GREEDY, stop_ids=frozenset())
    assert ours.tokens == plain.tokens
    assert 0 < spec.stats.acceptance_rate < 1 and spec.compiled._compiled  # the draft stepped compiled
    with pytest.raises(LlamakitError, match="prompt lookup has none: leave out --compile"):
        Speculation(target, None, compile=True)


def test_stop_token_and_budget_inside_accepted_run(stories):
    target, tok = stories
    prompt = tok.encode("Once upon a time, there was a little girl.", bos=True)
    [plain] = generate(target, tok, [prompt], 30, GREEDY, stop_ids=frozenset())
    stop = plain.tokens[9]
    first = plain.tokens.index(stop)
    [want] = generate(target, tok, [prompt], 30, GREEDY, stop_ids=frozenset({stop}))
    # the target as its own draft accepts every token, so the stop token lies inside a run of 7
    out, _ = speculative_generate(target, tok, prompt, 30, GREEDY, model_drafter(target, target, 64), 7,
                                  stop_ids=frozenset({stop}))
    assert out.tokens == want.tokens == plain.tokens[:first]
    assert out.finish_reason == "stop"
    for budget in (1, 5, 11):
        out, _ = speculative_generate(target, tok, prompt, budget, GREEDY, model_drafter(target, target, 64), 7,
                                      stop_ids=frozenset())
        assert out.tokens == plain.tokens[:budget] and out.finish_reason == "length"


def test_draft_with_another_vocabulary_is_refused(stories):
    target, tok = stories
    other = random_model(ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=300, multiple_of=16), seed=0)
    with pytest.raises(LlamakitError, match="vocabulary"):
        model_drafter(other, target, 64)
    drafter = ModelDrafter(other, KVCache.for_model(other, 1, 64))
    with pytest.raises(LlamakitError, match="vocabulary"):
        speculative_generate(target, tok, [1, 5, 6], 4, GREEDY, drafter, 2)


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    drafter = PromptLookupDrafter(max_ngram=3)
    assert drafter.lookup([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]
    assert drafter.lookup([1, 7, 8, 9], 3) == []
    assert drafter.lookup([5, 1, 2, 6, 1, 2], 4) == [6, 1, 2]
    # a batch: each row looks in its own sequence, with its own k
    assert drafter.propose([0, 1], [[1, 2, 3, 1, 2], [4, 5, 4]], [1, 3], [GREEDY] * 2, [None] * 2) == [
        ([3], None), ([5, 4], None)]


# --- sampling: the distribution of the generated tokens is the target's -----------------------------------------

SAMPLED = SamplingParams(temperature=1.0, top_p=1.0)
DRAWS = 4000
# With V = 8 and n draws, E[TV] <= 1/2 * sum_v sqrt(q_v / n) <= 1/2 * sqrt(V / n) = 0.022 for n = 4000, and its
# standard deviation is far smaller, so 0.05 is a safe bound for the exact rule; a rule that is wrong by more
# than that in TV fails it.
TV_BOUND = 0.05


@torch.no_grad()
def _exact_first_two(target, prompt):
    """The target's distribution of the first generated token and the marginal of the second (V,) each."""
    first = probs(target(torch.tensor([prompt]))[:, -1], SAMPLED)[0]  # (V,)
    seqs = torch.tensor([prompt + [v] for v in range(TINY.vocab_size)])  # (V, T+1)
    second = first @ probs(target(seqs)[:, -1], SAMPLED)  # (V,)
    return first, second


def _empirical_first_two(target, draft, prompt, gamma):
    """How often each token came first and second in DRAWS completions; draft None drafts by prompt lookup."""
    counts = torch.zeros(2, TINY.vocab_size)
    g = torch.Generator().manual_seed(0)
    for _ in range(DRAWS):
        drafter = PromptLookupDrafter() if draft is None else ModelDrafter(draft, KVCache.for_model(draft, 1, 16))
        out, _ = speculative_generate(target, None, prompt, 3, SAMPLED, drafter, gamma, stop_ids=frozenset(),
                                      generator=g)
        counts[0, out.tokens[0]] += 1
        counts[1, out.tokens[1]] += 1
    return counts / DRAWS


def _tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


def test_sampling_matches_target_distribution(tiny_pair):
    target, draft = tiny_pair
    prompt = [1, 4, 2]
    first, second = _exact_first_two(target, prompt)
    draft_first = probs(draft(torch.tensor([prompt]))[:, -1].detach(), SAMPLED)[0]
    assert _tv(first, draft_first) > 3 * TV_BOUND  # the draft is far from the target: acceptance matters
    empirical = _empirical_first_two(target, draft, prompt, gamma=2)
    assert _tv(empirical[0], first) < TV_BOUND
    assert _tv(empirical[1], second) < TV_BOUND


def test_prompt_lookup_sampling_matches_target_distribution(tiny_pair):
    """One-hot drafts: keep x with probability q(x), else draw from q without x."""
    target, _ = tiny_pair
    prompt = [1, 2, 4, 1, 2]  # the lookup drafts [4, 1]
    first, second = _exact_first_two(target, prompt)
    assert 0.1 < first[4] < 0.9  # both accepting and rejecting the draft happen often
    empirical = _empirical_first_two(target, None, prompt, gamma=2)
    assert _tv(empirical[0], first) < TV_BOUND
    assert _tv(empirical[1], second) < TV_BOUND


def test_sampling_test_catches_a_wrong_rule(tiny_pair, monkeypatch):
    """Always accepting the drafts gives the draft's distribution: the same test must fail."""
    target, draft = tiny_pair
    prompt = [1, 4, 2]
    first, _ = _exact_first_two(target, prompt)

    def always_accept(drafts, p, q, generator):
        n = len(drafts)
        return n, int(speculative.draw(q[n:n + 1], generator))

    monkeypatch.setattr(speculative, "verify", always_accept)
    empirical = _empirical_first_two(target, draft, prompt, gamma=2)
    assert _tv(empirical[0], first) > TV_BOUND


# --- wiring: chat and the CLI -------------------------------------------------------------------------------------


def test_chat_with_speculation_replies_as_without(stories):
    from llamakit.generate.chat import ChatSession

    target, tok = stories
    replies = []
    for speculation in (None, Speculation(target, target, gamma=3), Speculation(target, None, gamma=3)):
        session = ChatSession(target, tok, max_seq_len=256, max_new_tokens=40, params=GREEDY, speculation=speculation)
        replies.append(["".join(session.reply(text)) for text in ("Hello there", "Tell me a story")])
        if speculation is not None:
            assert speculation.stats.target_forwards > 0
    assert replies[0] == replies[1] == replies[2]


def _cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_speculative_equals_plain_greedy(assets, capsys):
    tiny = assets / "tinyllamas"
    base = ["generate", "Once upon a time", "--checkpoint", tiny / "stories260K.bin", "--tokenizer",
            tiny / "tok512.model", "--temperature", "0", "--max-new-tokens", "40"]
    _, plain, _ = _cli(capsys, *base)
    code, lookup, err = _cli(capsys, *base, "--prompt-lookup", "--speculate", "3")
    assert code == 0 and lookup == plain and "drafted tokens accepted" in err
    code, drafted, err = _cli(capsys, *base, "--draft-checkpoint", tiny / "stories260K.bin")
    assert code == 0 and drafted == plain and "(100%)" in err
    code, _, err = _cli(capsys, *base, "--prompt-lookup", "--repetition-penalty", "1.2")
    assert code == 1 and "penalties" in err
