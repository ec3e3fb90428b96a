"""Speculative and prompt-lookup decoding of a batch: each row equals the target's greedy output and what it would
be alone, rows stop and spend their budgets on their own, and sampled rows follow the target's distribution."""

import pytest
import torch

from llamakit.errors import LlamakitError
from llamakit.generate import PromptLookupDrafter, SamplingParams, generate, speculative_generate
from llamakit.generate.drafters import ModelDrafter
from llamakit.generate.engine import append_rows, prefill
from llamakit.generate.sampling import probs
from llamakit.generate.speculative import model_drafter
from llamakit.model import KVCache
from tests.generate.conftest import TINY
from tests.generate.test_speculative import DRAWS, SAMPLED, TV_BOUND, _cli, _exact_first_two, _tv

GREEDY = SamplingParams(temperature=0)
TEXTS = ("Once upon a time, there was a little cat. The little cat liked to play. The little", "Tom and",
         "The sun was shining and the birds were singing. Lily went to the park with her mom. Lily saw a big")
BUDGETS = [40, 25, 60]


def _drafter(kind, target, draft, noisy, batch, max_len=160):
    if kind == "lookup":
        return PromptLookupDrafter(max_ngram=3)
    model = {"draft": draft, "noisy": noisy, "self": target}[kind]
    return model_drafter(model, target, max_len, max_slots=batch)


@pytest.fixture(scope="module")
def prompts(stories):
    _, tok = stories
    return [tok.encode(t, bos=True) for t in TEXTS]


@pytest.fixture(scope="module")
def plain(stories, prompts):
    """The target's own greedy completions, in one plain batch."""
    target, tok = stories
    return generate(target, tok, prompts, BUDGETS, GREEDY, stop_ids=frozenset())


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("kind", ["draft", "noisy", "lookup"])
def test_batched_greedy_equals_target_greedy(stories, small_draft, noisy_draft, prompts, plain, kind, gamma):
    target, tok = stories
    drafter = _drafter(kind, target, small_draft, noisy_draft, len(prompts))
    outs, stats = speculative_generate(target, tok, prompts, BUDGETS, GREEDY, drafter, gamma, stop_ids=frozenset())
    for out, want in zip(outs, plain):
        assert out.tokens == want.tokens and out.text == want.text and out.finish_reason == "length"
    for row, budget in zip(stats.rows, BUDGETS):
        assert row.target_forwards == budget - row.accepted  # one forward per token not drafted correctly
    # one target forward per step for the whole batch, as many as the slowest row needs
    assert stats.target_forwards == max(row.target_forwards for row in stats.rows)
    assert stats.accepted == sum(r.accepted for r in stats.rows) and stats.drafted == sum(r.drafted for r in stats.rows)
    if kind == "noisy":
        assert 0 < stats.acceptance_rate < 1
    if kind == "lookup":  # rows find n-grams at different steps: one forward holds drafts of different lengths
        assert stats.accepted > 0 and len({r.drafted for r in stats.rows}) == len(stats.rows)


@pytest.mark.parametrize("kind", ["noisy", "lookup"])
def test_batched_equals_each_prompt_alone(stories, small_draft, noisy_draft, prompts, kind):
    """Greedy, and sampled with a seed per row: a row's tokens and stats do not depend on its batch."""
    target, tok = stories
    batch = [*prompts, tok.encode("", bos=True)]  # a one-token prompt too: nothing to prefill
    budgets = [*BUDGETS, 20]
    for params in ([GREEDY] * 4, [SamplingParams(temperature=1.0, top_k=20, seed=s) for s in range(4)]):
        outs, stats = speculative_generate(target, tok, batch, budgets, params,
                                           _drafter(kind, target, small_draft, noisy_draft, 4), 3, stop_ids=frozenset())
        for prompt, budget, sp, out, row in zip(batch, budgets, params, outs, stats.rows):
            alone, alone_stats = speculative_generate(target, tok, prompt, budget, sp,
                                                      _drafter(kind, target, small_draft, noisy_draft, 1), 3,
                                                      stop_ids=frozenset())
            assert out.tokens == alone.tokens
            assert (row.drafted, row.accepted) == (alone_stats.drafted, alone_stats.accepted)


class _SlotSpy(ModelDrafter):
    """A ModelDrafter that records, at each release, which rows still hold a slot."""

    def __init__(self, model, cache):
        super().__init__(model, cache)
        self.released = []

    def release(self, row):
        self.released.append((row, sorted(r for r in self.slots if r != row)))
        super().release(row)


def test_a_row_stopping_early_leaves_the_others_running(stories, prompts, plain):
    target, tok = stories
    stop = next(t for t in plain[0].tokens[3:] if all(t not in p.tokens for p in plain[1:]))  # only row 0's
    want = generate(target, tok, prompts, BUDGETS, GREEDY, stop_ids=frozenset({stop}))
    assert want[0].finish_reason == "stop" and len(want[0].tokens) < 10
    assert [w.finish_reason for w in want[1:]] == ["length", "length"]
    # the target as its own draft accepts every token, so the stop token lies inside a run of 5
    drafter = _SlotSpy(target, KVCache.for_model(target, 3, 160))
    outs, _ = speculative_generate(target, tok, prompts, BUDGETS, GREEDY, drafter, 5, stop_ids=frozenset({stop}))
    assert [(o.tokens, o.finish_reason) for o in outs] == [(w.tokens, w.finish_reason) for w in want]
    row, others = drafter.released[0]
    assert row == 0 and others  # row 0 freed its draft slot while other rows were still decoding
    assert drafter.cache.free_slots == 3


def test_budgets_per_row(stories, prompts, plain):
    target, tok = stories
    budgets = [1, 5, 11]
    outs, stats = speculative_generate(target, tok, prompts, budgets, GREEDY, _drafter("self", target, None, None, 3),
                                       7, stop_ids=frozenset())
    for out, want, budget in zip(outs, plain, budgets):
        assert out.tokens == want.tokens[:budget] and out.finish_reason == "length"
    assert stats.rows[0].drafted == 0  # a budget of one token leaves no room to draft


def test_a_draft_cache_without_a_slot_per_prompt_is_refused(stories, noisy_draft, prompts):
    target, tok = stories
    with pytest.raises(LlamakitError, match="slot per prompt"):
        speculative_generate(target, tok, prompts, 10, GREEDY, model_drafter(noisy_draft, target, 160), 3)


def test_append_rows_pads_without_changing_any_row(tiny_pair):
    """Rows of different lengths appended to slots of different lengths: each row's logits are those of its
    whole sequence run alone from position 0."""
    target, _ = tiny_pair
    cache = KVCache.for_model(target, 3, 16)
    held = [[1, 2, 3, 4, 5], [6], [7, 0, 1]]
    for slot, tokens in enumerate(held):
        prefill(target, cache, slot, tokens)
    rows = [[2], [3, 4, 5, 6], [0, 7]]
    logits = append_rows(target, cache, [0, 1, 2], rows)  # (3, 4, V)
    assert logits.shape == (3, 4, TINY.vocab_size) and cache.lengths == [9, 5, 7]  # the padding too, until rolled back
    for b, (before, new) in enumerate(zip(held, rows)):
        alone = target(torch.tensor([before + new]))[0, len(before):]  # (len(new), V)
        torch.testing.assert_close(logits[b, :len(new)], alone, atol=1e-5, rtol=1e-5)


# --- sampling: each row's tokens follow the target's distribution ----------------------------------------------

def _empirical_batch(target, draft, prompts, gamma, seeded):
    """How often each token came first and second in each row, over DRAWS batched completions (2, B, V); draft
    None drafts by prompt lookup; rows whose `seeded` is True draw from their own random stream, the others from
    one shared generator."""
    counts = torch.zeros(2, len(prompts), TINY.vocab_size)
    g = torch.Generator().manual_seed(0)
    for i in range(DRAWS):
        drafter = (PromptLookupDrafter() if draft is None
                   else ModelDrafter(draft, KVCache.for_model(draft, len(prompts), 16)))
        params = [SamplingParams(temperature=1.0, top_p=1.0, seed=i * len(prompts) + b) if own else SAMPLED
                  for b, own in enumerate(seeded)]
        outs, _ = speculative_generate(target, None, prompts, 3, params, drafter, gamma, stop_ids=frozenset(),
                                       generator=g)
        for b, out in enumerate(outs):
            counts[0, b, out.tokens[0]] += 1
            counts[1, b, out.tokens[1]] += 1
    return counts / DRAWS


@pytest.mark.parametrize("prompts, seeded", [
    ([[1, 4, 2], [3]], [True, False]),
    pytest.param([[1, 4, 2], [1, 2, 4, 1, 2, 6], [3]], [False, True, False], marks=pytest.mark.slow),
])
def test_batched_sampling_matches_target_distribution(tiny_pair, prompts, seeded):
    target, draft = tiny_pair
    empirical = _empirical_batch(target, draft, prompts, 2, seeded)
    for b, prompt in enumerate(prompts):
        first, second = _exact_first_two(target, prompt)
        draft_first = probs(draft(torch.tensor([prompt]))[:, -1].detach(), SAMPLED)[0]
        assert _tv(first, draft_first) > 2 * TV_BOUND  # the draft is far from the target: acceptance matters
        assert _tv(empirical[0, b], first) < TV_BOUND
        assert _tv(empirical[1, b], second) < TV_BOUND


def test_batched_prompt_lookup_sampling_matches_target_distribution(tiny_pair):
    """One-hot drafts of different lengths in one batch; each row keeps x with probability q(x), else draws
    from q without x."""
    target, _ = tiny_pair
    prompts = [[1, 2, 4, 1, 2], [3, 4, 3]]  # the lookups draft [4, 1] and [4, 3]
    empirical = _empirical_batch(target, None, prompts, 2, [False, False])
    for b, prompt in enumerate(prompts):
        first, second = _exact_first_two(target, prompt)
        assert 0.1 < first[4] < 0.9  # both accepting and rejecting the draft happen often
        assert _tv(empirical[0, b], first) < TV_BOUND
        assert _tv(empirical[1, b], second) < TV_BOUND


# --- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_generate_batch_speculative_equals_plain_greedy(assets, capsys):
    tiny = assets / "tinyllamas"
    base = ["generate", "Once upon a time", "Tom and Lily went to the park. Tom and", "--checkpoint",
            tiny / "stories260K.bin", "--tokenizer", tiny / "tok512.model", "--temperature", "0",
            "--max-new-tokens", "40"]
    _, plain, _ = _cli(capsys, *base)
    assert plain.count("Once upon a time") == 1 and "\n\nTom and Lily" in plain
    code, lookup, err = _cli(capsys, *base, "--prompt-lookup", "--speculate", "3")
    assert code == 0 and lookup == plain and "drafted tokens accepted" in err and "per prompt: " in err
    code, drafted, err = _cli(capsys, *base, "--draft-checkpoint", tiny / "stories260K.bin")
    assert code == 0 and drafted == plain and "(100%)" in err
