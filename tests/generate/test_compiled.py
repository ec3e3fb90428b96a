"""The compiled decode step (generate/compiled.py): the same greedy tokens as eager decoding (fp32), on the real
stories260K, and one compile per batch bucket."""

import pytest
import torch
from torch._dynamo.utils import counters

from llamakit.checkpoint import load_checkpoint
from llamakit.errors import LlamakitError
from llamakit.generate import SamplingParams, generate
from llamakit.generate.compiled import CompiledDecode, bucket, buckets, static_cache
from llamakit.generate.decode import prepare_for_decoding

GREEDY = SamplingParams(temperature=0)
PROMPTS = ["Once upon a time", "The dog ran", "Lily saw a big red ball and", "Tom"]


@pytest.fixture(scope="module")
def stories(assets):
    tiny = assets / "tinyllamas"
    model, tokenizer = load_checkpoint(tiny / "stories260K.bin", tiny / "tok512.model", dtype=torch.float32)
    return prepare_for_decoding(model), tokenizer


@pytest.fixture(scope="module")
def compiled(stories):
    """One compiled step for the module: each bucket compiles once, on first use."""
    return CompiledDecode(stories[0])


def encode(tokenizer, texts):
    return [tokenizer.encode(t, bos=True) for t in texts]


def test_buckets_and_static_cache(stories):
    assert [bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket(3, 3) == 3  # never more rows than the cache has slots
    assert buckets(1) == [1] and buckets(6) == [1, 2, 4, 6] and buckets(8) == [1, 2, 4, 8]
    cache = static_cache(stories[0], 3, 40)
    assert (cache.max_slots, cache.max_seq_len) == (4, 256)


def test_batch_one_matches_eager(stories, compiled):
    model, tokenizer = stories
    prompts = encode(tokenizer, PROMPTS[:1])
    eager = generate(model, tokenizer, prompts, 40, GREEDY)
    ours = generate(model, tokenizer, prompts, 40, GREEDY, compiled=compiled)
    assert ours[0].tokens == eager[0].tokens and len(eager[0].tokens) > 10


def test_padded_bucket_with_a_row_finishing_early_matches_eager(stories, compiled):
    """Three rows run as bucket 4 (one padding row); the middle one stops after 5 tokens, leaving a gap."""
    model, tokenizer = stories
    prompts, budgets = encode(tokenizer, PROMPTS[:3]), [30, 5, 30]
    eager = generate(model, tokenizer, prompts, budgets, GREEDY)
    ours = generate(model, tokenizer, prompts, budgets, GREEDY, compiled=compiled)
    assert [c.tokens for c in ours] == [c.tokens for c in eager]
    assert len(ours[1].tokens) == 5 and len(ours[0].tokens) > 5


def test_another_batch_size_in_the_bucket_does_not_recompile(stories, compiled):
    model, tokenizer = stories
    generate(model, tokenizer, encode(tokenizer, PROMPTS[:3]), 8, GREEDY, compiled=compiled)  # bucket 4 compiled
    graphs = counters["stats"]["unique_graphs"]
    prompts = encode(tokenizer, PROMPTS)  # 4 rows: the same bucket, the same cache shape
    ours = generate(model, tokenizer, prompts, 8, GREEDY, compiled=compiled)
    assert counters["stats"]["unique_graphs"] == graphs
    assert [c.tokens for c in ours] == [c.tokens for c in generate(model, tokenizer, prompts, 8, GREEDY)]


def test_a_full_or_repeated_slot_is_refused_as_in_eager(stories, compiled):
    model = stories[0]
    cache = compiled.cache(2, 8)
    for slot in (cache.acquire(), cache.acquire()):
        cache.lengths[slot] = cache.max_seq_len
    with pytest.raises(LlamakitError, match="overflow"):
        compiled(model, cache, [0], torch.tensor([5]))
    cache.lengths[0] = 3
    with pytest.raises(LlamakitError, match="repeat"):
        compiled(model, cache, [0, 0], torch.tensor([5, 6]))


def test_warm_up_compiles_ahead_and_leaves_the_cache_empty(stories, compiled):
    """What a server does before it reports ready: after warm_up, decoding compiles nothing more, and the cache is
    as it was (free slots, nothing held), so it decodes exactly as eager."""
    model, tokenizer = stories
    cache = compiled.cache(1, 8)
    assert compiled.warm_up(cache) == [1]
    assert cache.free_slots == 1 and cache.lengths == [0]
    graphs = counters["stats"]["unique_graphs"]
    prompts = encode(tokenizer, PROMPTS[2:3])
    ours = generate(model, tokenizer, prompts, 20, GREEDY, cache=cache, compiled=compiled)
    assert counters["stats"]["unique_graphs"] == graphs
    assert ours[0].tokens == generate(model, tokenizer, prompts, 20, GREEDY)[0].tokens
    cache.acquire()
    with pytest.raises(LlamakitError, match="empty KV cache"):
        compiled.warm_up(cache)


def test_many_buckets_and_models_fit_dynamo_limit(stories, monkeypatch):
    """Every CompiledDecode shares _static_step's code object, one dynamo entry per bucket and cache shape: a server
    with many buckets (or a process compiling several models) must not hit dynamo's default limit of 8."""
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 8)
    CompiledDecode(stories[0])._step(torch.device("cpu"))  # compiles lazily: nothing is compiled here
    assert torch._dynamo.config.cache_size_limit >= 256 and torch._dynamo.config.recompile_limit >= 256
