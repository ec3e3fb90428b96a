"""The engine: a caller-owned KV cache with slots, chunked prefill, decode_one, per-row sampling and the Decoder."""

import pytest
import torch

from llamakit import ModelConfig, Transformer
from llamakit.errors import LlamakitError
from llamakit.generate import Decoder, SamplingParams, decode_one, generate, prefill, prefill_batch
from llamakit.generate.sampling import RowParams, draw, probs, sample
from llamakit.model import KVCache

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128)
TOL = 1e-5
MIXED = [  # one row of each kind: greedy, plain sampling, and every filter at once
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, top_p=1.0, seed=11),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.02, repetition_penalty=1.3, seed=12),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():  # sharper distributions than the training init, so greedy is decisive
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def _prompt(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(model, prompt, params, steps):
    """The tokens a request gets when it has the cache to itself."""
    decoder = Decoder(model, KVCache.for_model(model, 1, 64))
    [request] = decoder.add([prompt], [params], [steps])
    return [decoder.step()[0].id for _ in range(steps)], request


def test_a_request_prefilled_while_others_decode_gets_what_it_gets_alone(model):
    """Two requests are mid-decode when a third is prefilled into a free slot; all three match their solo runs
    (greedy and seeded sampling, each with different settings in the same steps)."""
    prompts = [_prompt(5, 1), _prompt(9, 2), _prompt(14, 3)]
    decoder = Decoder(model, KVCache.for_model(model, 3, 64))
    first = decoder.add(prompts[:2], MIXED[:2], [12, 12])
    got = {r: [] for r in first}
    for _ in range(4):
        for token in decoder.step():
            got[token.request].append(token.id)
    [late] = decoder.add(prompts[2:], MIXED[2:], [12])
    assert late.slot == 2 and decoder.cache.lengths[:2] == [5 + 3, 9 + 3]  # the others keep their places
    got[late] = []
    for _ in range(8):
        for token in decoder.step():
            got[token.request].append(token.id)
    for request, prompt, params in zip([*first, late], prompts, MIXED):
        expected, _ = _alone(model, prompt, params, len(got[request]))
        assert got[request] == expected


def test_a_finished_row_leaves_the_batch(model):
    """Rows that are done cost no more compute: every later forward carries only the live rows."""
    batch_sizes = []
    handle = model.register_forward_pre_hook(lambda _m, args: batch_sizes.append(args[0].shape))
    try:
        done = generate(model, None, [_prompt(4, 1), _prompt(6, 2)], [2, 6], SamplingParams(temperature=0),
                        stop_ids=frozenset())
    finally:
        handle.remove()
    assert [len(c.tokens) for c in done] == [2, 6]
    assert batch_sizes == [(2, 6), (2, 1)] + [(1, 1)] * 4  # prefill, one shared step, then the long row alone


def test_rows_with_different_settings_match_their_solo_runs_in_generate(model):
    prompts = [_prompt(7, 4)] * 3
    together = generate(model, None, prompts, 10, MIXED, stop_ids=frozenset())
    for prompt, params, completion in zip(prompts, MIXED, together):
        assert completion.tokens == generate(model, None, [prompt], 10, params, stop_ids=frozenset())[0].tokens


def test_chunked_prefill_equals_one_forward(model):
    prompts = [_prompt(13, 5), _prompt(4, 6), _prompt(9, 7)]
    cache = KVCache.for_model(model, 3, 32)
    with torch.inference_mode():
        last, lps = prefill_batch(model, cache, [0, 1, 2], prompts, chunk_size=4, prompt_logprobs=True)
        assert cache.lengths == [13, 4, 9]  # padding in a chunk is rolled back
        for b, prompt in enumerate(prompts):
            full = model(torch.tensor([prompt]))[0]  # (T, V)
            assert (last[b] - full[-1]).abs().max() <= TOL
            expected = full[:-1].log_softmax(-1).gather(-1, torch.tensor(prompt[1:])[:, None]).flatten()
            assert torch.allclose(torch.tensor(lps[b]), expected, atol=TOL)
        # Decoding after a chunked prefill continues the sequence exactly.
        step = decode_one(model, cache, [1], torch.tensor([7]))
        assert (step[0] - model(torch.tensor([prompts[1] + [7]]))[0, -1]).abs().max() <= TOL


def test_rollback_is_free_and_a_released_slot_is_fresh(model):
    cache = KVCache.for_model(model, 2, 32)
    prompt, draft = _prompt(6, 8), torch.tensor([[5], [9], [17]])
    with torch.inference_mode():
        assert cache.acquire() == 0
        after_prompt = prefill(model, cache, 0, prompt)
        for token in draft:
            decode_one(model, cache, [0], token)
        cache.rollback(0, 3)  # reject the three draft tokens
        again = decode_one(model, cache, [0], draft[0])
        assert (again[0] - model(torch.tensor([prompt + [5]]))[0, -1]).abs().max() <= TOL
        cache.release(0)
        assert cache.acquire() == 0 and cache.lengths[0] == 0
        assert (prefill(model, cache, 0, prompt) - after_prompt).abs().max() <= TOL


def test_cache_misuse_is_a_clear_error(model):
    cache = KVCache.for_model(model, 1, 8)
    cache.acquire()
    with pytest.raises(LlamakitError, match="all 1 KV cache slots are in use"):
        cache.acquire()
    with pytest.raises(LlamakitError, match="cannot roll KV cache slot 0 back by 1"):
        cache.rollback(0, 1)
    cache.release(0)
    with pytest.raises(LlamakitError, match="slot 0 is not in use"):
        cache.release(0)
    with pytest.raises(LlamakitError, match="repeat a slot"), torch.no_grad():
        model(torch.zeros(2, 1, dtype=torch.long), cache, [0, 0])
    with pytest.raises(LlamakitError, match="do not fit the KV cache's 8 positions"):
        Decoder(model, cache).add([[1] * 6], [SamplingParams()], [3])
    assert cache.free_slots == 1  # nothing was taken by the refused request


@pytest.mark.parametrize("params", MIXED + [SamplingParams(temperature=1e-9, top_k=3)])
def test_probs_sum_to_one_and_are_what_sample_draws_from(params):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    seen = torch.rand(4, 50, generator=torch.Generator().manual_seed(1)) < 0.3
    p = probs(logits, params, seen)
    assert torch.allclose(p.sum(-1), torch.ones(4)) and (p >= 0).all()
    drawn = sample(logits, params, torch.Generator().manual_seed(5), seen)
    assert torch.equal(drawn, draw(p, torch.Generator().manual_seed(5)))
    # And the draw follows p: 20,000 draws of one row land where p says, within sampling error.
    row = p[:1].expand(20_000, -1)
    counts = torch.bincount(draw(row, torch.Generator().manual_seed(6)), minlength=50) / 20_000
    assert (counts - p[0]).abs().max() < 0.02 and (counts[p[0] == 0] == 0).all()


def test_per_row_settings_match_each_row_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 3
    seen = torch.rand(3, 50, generator=torch.Generator().manual_seed(3)) < 0.3
    together = probs(logits, RowParams(MIXED), seen)
    for b, params in enumerate(MIXED):
        assert torch.equal(together[b], probs(logits[b:b + 1], params, seen[b:b + 1])[0])
    greedy = probs(logits, MIXED[0])
    assert torch.equal(greedy, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


def test_decoder_exposes_the_distribution_it_samples_from(model):
    decoder = Decoder(model, KVCache.for_model(model, 1, 32))
    [request] = decoder.add([_prompt(5, 9)], [MIXED[2]], [4])
    p = decoder.probs(request)
    assert torch.allclose(p.sum(), torch.tensor(1.0)) and p[decoder.step()[0].id] > 0


def test_enqueued_prompts_prefill_a_chunk_per_step_while_others_decode(model):
    """Continuous batching: a long prompt is prefilled 4 tokens per step; the running request gets a token every
    step meanwhile, and both end up with their solo tokens."""
    decoder = Decoder(model, KVCache.for_model(model, 2, 64), prefill_chunk=4)
    [running] = decoder.add([_prompt(5, 1)], [MIXED[1]], [10])
    [late] = decoder.enqueue([_prompt(10, 2)], [MIXED[2]], [6])
    got = {running: [], late: []}
    for step in range(8):
        tokens = decoder.step()
        assert [t.request for t in tokens][0] is running  # never stalled by the prefill
        assert (late in [t.request for t in tokens]) == (step >= 2)  # 10 prompt tokens: 4 + 4 + 2
        for t in tokens:
            got[t.request].append(t.id)
    assert got[running] == _alone(model, _prompt(5, 1), MIXED[1], 8)[0]
    assert got[late] == _alone(model, _prompt(10, 2), MIXED[2], 6)[0]


def test_min_tokens_bans_the_stop_tokens_until_reached(model):
    prompt = _prompt(6, 3)
    free, _ = _alone(model, prompt, MIXED[0], 4)
    decoder = Decoder(model, KVCache.for_model(model, 1, 32))
    decoder.add([prompt], [MIXED[0]], [4], min_tokens=2, stop_ids=frozenset(free[:2]))
    got = [decoder.step()[0].id for _ in range(4)]
    assert got[0] != free[0] and got[1] not in free[:2]


def test_top_logprobs_are_the_most_likely_tokens_under_the_raw_distribution(model):
    prompt = _prompt(6, 4)
    decoder = Decoder(model, KVCache.for_model(model, 1, 32))
    decoder.add([prompt], [MIXED[1]], [2], top_logprobs=3)
    [token] = decoder.step()
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
    assert token.logprob == pytest.approx(expected[token.id].item(), abs=1e-5)
    values, ids = expected.topk(3)
    assert [i for i, _ in token.top] == ids.tolist()
    assert [lp for _, lp in token.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(4))
    counts = torch.zeros(1, 50)
    counts[0, 3], counts[0, 7] = 2, 1
    params = SamplingParams(temperature=1.0, top_p=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    expected = (logits - 0.25 * counts - 0.5 * (counts > 0)).softmax(-1)
    assert torch.allclose(probs(logits, params, counts=counts), expected, atol=1e-6)
