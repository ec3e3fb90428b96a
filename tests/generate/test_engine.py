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
    return [decoder.step()[0][1] for _ in range(steps)], request


def test_a_request_prefilled_while_others_decode_gets_what_it_gets_alone(model):
    """Two requests are mid-decode when a third is prefilled into a free slot; all three match their solo runs
    (greedy and seeded sampling, each with different settings in the same steps)."""
    prompts = [_prompt(5, 1), _prompt(9, 2), _prompt(14, 3)]
    decoder = Decoder(model, KVCache.for_model(model, 3, 64))
    first = decoder.add(prompts[:2], MIXED[:2], [12, 12])
    got = {r: [] for r in first}
    for _ in range(4):
        for request, token, _ in decoder.step():
            got[request].append(token)
    [late] = decoder.add(prompts[2:], MIXED[2:], [12])
    assert late.slot == 2 and decoder.cache.lengths[:2] == [5 + 3, 9 + 3]  # the others keep their places
    got[late] = []
    for _ in range(8):
        for request, token, _ in decoder.step():
            got[request].append(token)
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
    assert torch.allclose(p.sum(), torch.tensor(1.0)) and p[decoder.step()[0][1]] > 0
