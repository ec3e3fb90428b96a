"""The decode loop: ragged batches, budgets, stops, streaming and logprobs against plain full forwards."""

import pytest
import torch

from llamakit import ModelConfig, Transformer, load_tokenizer
from llamakit.errors import LlamakitError
from llamakit.generate import SamplingParams, generate, stream
from llamakit.generate.decode import check_prompts
from llamakit.model import KVCache

GREEDY = SamplingParams(temperature=0)
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():  # sharper distributions than the N(0, 0.02) training init, so greedy is decisive
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def tok512(assets):
    return load_tokenizer(assets / "tinyllamas" / "tok512.model")


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _reference_greedy(model, prompt, steps):
    """Greedy decoding the slow way: a full forward over the whole sequence for every new token."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(model(torch.tensor([tokens]))[0, -1].argmax().item())
    return tokens[len(prompt):]


def test_ragged_batch_greedy_equals_slow_reference(model):
    prompts = _prompts([5, 17, 1, 9])
    completions = generate(model, None, prompts, 12, GREEDY, stop_ids=frozenset())
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == _reference_greedy(model, prompt, 12)
        assert completion.finish_reason == "length"


def test_batched_greedy_equals_single_greedy(model):
    prompts = _prompts([3, 11, 7])
    batched = generate(model, None, prompts, 20, GREEDY, stop_ids=frozenset())
    for prompt, completion in zip(prompts, batched):
        alone = generate(model, None, [prompt], 20, GREEDY, stop_ids=frozenset())[0]
        assert completion.tokens == alone.tokens


def test_each_row_gets_its_own_budget(model):
    prompts = _prompts([4, 8])
    completions = generate(model, None, prompts, [3, 10], GREEDY, stop_ids=frozenset())
    assert [len(c.tokens) for c in completions] == [3, 10]
    assert completions[1].tokens == _reference_greedy(model, prompts[1], 10)


def test_stop_token_ends_a_row_and_is_not_returned(model):
    prompt = _prompts([6])[0]
    free = generate(model, None, [prompt], 10, GREEDY, stop_ids=frozenset())[0].tokens
    stopped = generate(model, None, [prompt], 10, GREEDY, stop_ids=frozenset({free[4]}))[0]
    first = free.index(free[4])
    assert stopped.tokens == free[:first] and stopped.finish_reason == "stop"


def test_logprobs_equal_log_softmax_of_full_forward(model):
    prompts = _prompts([4, 9])
    params = SamplingParams(temperature=1.0, top_p=0.8)
    completions = generate(model, None, prompts, 8, params, stop_ids=frozenset(), logprobs=True, prompt_logprobs=True,
                           generator=torch.Generator().manual_seed(0))
    for prompt, c in zip(prompts, completions):
        sequence = torch.tensor([prompt + c.tokens])
        with torch.no_grad():
            expected = torch.log_softmax(model(sequence)[0, :-1], -1).gather(-1, sequence[0, 1:, None]).flatten()
        assert torch.allclose(torch.tensor(c.prompt_logprobs + c.logprobs), expected, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    prompts, params = _prompts([5, 2]), SamplingParams(temperature=1.0, top_p=0.95)
    def run(seed):
        return [c.tokens for c in generate(model, None, prompts, 16, params, stop_ids=frozenset(),
                                           generator=torch.Generator().manual_seed(seed))]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_repetition_penalty_changes_greedy_choices(model):
    prompt = _prompts([4])[0]
    plain = generate(model, None, [prompt], 30, GREEDY, stop_ids=frozenset())[0].tokens
    penalized = generate(model, None, [prompt], 30, SamplingParams(temperature=0, repetition_penalty=5.0),
                         stop_ids=frozenset())[0].tokens
    assert penalized != plain
    assert len(set(penalized)) >= len(set(plain))


def test_stop_string_cuts_text_and_streaming_holds_it_back(model, tok512):
    prompt = tok512.encode("Once upon a time", bos=True)
    free = generate(model, tok512, [prompt], 40, GREEDY, stop_ids=frozenset())[0]
    stop = free.text[10:14]
    assert len(stop.strip()) > 1
    cut = generate(model, tok512, [prompt], 40, GREEDY, stop_ids=frozenset(), stop_strings=[stop])[0]
    assert cut.text == free.text[:free.text.index(stop)] and cut.finish_reason == "stop"
    pieces = list(stream(model, tok512, prompt, 40, GREEDY, stop_ids=frozenset(), stop_strings=[stop]))
    assert "".join(pieces) == cut.text
    assert all(stop not in piece for piece in pieces)


def test_streamed_pieces_join_to_the_continuation_text(model, tok512):
    prompt = tok512.encode("The cat", bos=True)
    pieces = stream(model, tok512, prompt, 30, SamplingParams(temperature=1.0, top_p=1.0), stop_ids=frozenset(),
                    generator=torch.Generator().manual_seed(3))
    text, completion = "", None
    while completion is None:
        try:
            text += next(pieces)
        except StopIteration as done:
            completion = done.value
    assert text == completion.text
    # The continuation keeps its leading space: prompt text + completion text == decode(everything).
    assert "The cat" + text == tok512.decode(prompt + completion.tokens)


def test_a_cache_left_by_a_bigger_batch_is_reused_correctly(model):
    prompts = _prompts([9, 3, 6, 2])
    generate(model, None, prompts, 20, GREEDY, stop_ids=frozenset())
    again = generate(model, None, prompts[1:2], 5, GREEDY, stop_ids=frozenset())[0]
    assert again.tokens == _reference_greedy(model, prompts[1], 5)


@pytest.mark.parametrize("prompts, budgets, match", [
    ([], [], "no prompts"),
    ([[1, 2]] * 3, [4] * 3, "exceed max_batch_size=2"),
    ([[1, 2], []], [4, 4], "prompt 1 is empty"),
    ([[1] * 16], [4], "prompt 0 has 16 tokens"),
    ([[1, 2]], [0], "at least 1"),
])
def test_bad_requests_are_refused_up_front(prompts, budgets, match):
    with pytest.raises(LlamakitError, match=match):
        check_prompts(prompts, budgets, max_batch_size=2, max_seq_len=16)


def test_kv_cache_overflow_is_a_clear_error(model):
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(LlamakitError, match="KV cache overflow"), torch.no_grad():
        model(torch.tensor([[1] * 10]), cache)


def test_decoding_layout_keeps_values_outputs_and_saving(model, tmp_path, cpu_kernel):
    """The MKL layout (the OpenBLAS/oneDNN one: test_cpu_linear.py)."""
    from llamakit import load_model, save_model
    from llamakit.generate import prepare_for_decoding

    cpu_kernel("mkl")

    torch.manual_seed(1)
    fresh = Transformer(CONFIG.replace(tie_word_embeddings=True)).eval()
    prompts = _prompts([7, 3])
    before = [c.tokens for c in generate(fresh, None, prompts, 10, GREEDY, stop_ids=frozenset())]
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    prepare_for_decoding(fresh)
    assert not fresh.layers[0].mlp.up_proj.weight.is_contiguous()  # column-major now
    assert not fresh.embed_tokens.weight.is_contiguous()  # tied: it is the output matrix too
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    assert [c.tokens for c in generate(fresh, None, prompts, 10, GREEDY, stop_ids=frozenset())] == before
    for fmt in ("llamakit", "meta"):
        save_model(fresh, tmp_path / fmt, fmt)
        assert all(torch.equal(state[k], v) for k, v in load_model(tmp_path / fmt).state_dict().items())
