"""Meta's Llama API on the real tinyllamas model, checked against transformers' own generation."""

import pytest
import torch

from llamakit import Llama, load_model, save_model
from llamakit.errors import LlamakitError
from llamakit.tokenizer.chat import UNSAFE_REPLY


@pytest.fixture(scope="module")
def files(assets, tmp_path_factory):
    tiny = assets / "tinyllamas"
    folder = tmp_path_factory.mktemp("stories")
    save_model(load_model(tiny / "stories260K.bin"), folder / "hf", "hf", tokenizer=tiny / "tok512.model")
    return {"bin": tiny / "stories260K.bin", "tok": tiny / "tok512.model", "hf": folder / "hf"}


@pytest.fixture(scope="module")
def llama(files):
    return Llama.build(files["bin"], files["tok"], max_seq_len=256, max_batch_size=4)


def test_greedy_equals_transformers_generate(llama, files):
    from transformers import LlamaForCausalLM

    prompt = llama.tokenizer.encode("Once upon a time", bos=True)
    ours, _ = llama.generate([prompt], max_gen_len=120, temperature=0)
    reference = LlamaForCausalLM.from_pretrained(files["hf"]).eval()
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=120, do_sample=False,
                                    eos_token_id=llama.tokenizer.eos_id, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours[0] == theirs
    text = llama.text_completion(["Once upon a time"], temperature=0, max_gen_len=120)[0]["generation"]
    assert text.startswith(", there was a little girl named Lily. She loved to play outside")  # a TinyStories story


def test_logprobs_equal_transformers_log_softmax(llama, files):
    from transformers import LlamaForCausalLM

    prompt = llama.tokenizer.encode("Lily and Tom", bos=True)
    llama.generator.manual_seed(5)
    (ids,), (logprobs,) = llama.generate([prompt], 20, temperature=1.0, top_p=0.9, logprobs=True, echo=True)
    assert ids[:len(prompt)] == prompt and len(ids) > len(prompt) + 5 and len(logprobs) == len(ids)
    # Sampled at temperature 1 with top-p, yet each logprob is under the model's raw distribution (Meta's rule).
    reference = LlamaForCausalLM.from_pretrained(files["hf"]).eval()
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], -1)
    expected = expected.gather(-1, torch.tensor(ids[1:])[:, None]).flatten()
    assert logprobs[0] == 0.0  # the first token has no context
    assert torch.allclose(torch.tensor(logprobs[1:]), expected, atol=1e-4)
    # text_completion reports the same draws (same seed) as each token's text and its logprob.
    llama.generator.manual_seed(5)
    result = llama.text_completion(["Lily and Tom"], temperature=1.0, top_p=0.9, max_gen_len=20, logprobs=True,
                                   echo=True)[0]
    assert result["logprobs"] == logprobs
    assert result["tokens"] == [llama.tokenizer.decode([t]) for t in ids]
    assert result["generation"] == llama.tokenizer.decode(ids)


def test_echo_returns_prompt_then_generation(llama):
    plain = llama.text_completion(["Lily went"], temperature=0, max_gen_len=10)[0]["generation"]
    echoed = llama.text_completion(["Lily went"], temperature=0, max_gen_len=10, echo=True)[0]["generation"]
    assert echoed.startswith("Lily went") and echoed.endswith(plain)


def test_batch_of_different_lengths_equals_each_alone(llama):
    prompts = ["Once upon a time", "Tom had a big red", "The sun"]
    batched = llama.text_completion(prompts, temperature=0, max_gen_len=40)
    for prompt, result in zip(prompts, batched):
        assert result == llama.text_completion([prompt], temperature=0, max_gen_len=40)[0]


def test_default_budget_fills_the_window_per_prompt(llama):
    # Meta's rule: each prompt may grow to max_seq_len, so a short prompt is not limited by a long one.
    long_prompt = "Once upon a time " * 30
    tokens, _ = llama.generate([llama.tokenizer.encode(p, bos=True) for p in (long_prompt, "Hi")], 255,
                               temperature=1.0, stop_ids=frozenset())
    lengths = [len(llama.tokenizer.encode(p, bos=True)) for p in (long_prompt, "Hi")]
    assert [len(t) for t in tokens] == [256 - n for n in lengths]


def test_seed_makes_sampling_reproducible(files):
    def run(seed):
        llama = Llama.build(files["bin"], files["tok"], max_seq_len=128, max_batch_size=2, seed=seed)
        return llama.text_completion(["Once upon a time", "Lily"], temperature=1.0, max_gen_len=30)
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_chat_completion_shapes_and_llama2_refusal(llama):
    dialogs = [[{"role": "user", "content": "Tell me a story."}],
               [{"role": "user", "content": "[INST] hi [/INST]"}]]
    results = llama.chat_completion(dialogs, temperature=0, max_gen_len=20, logprobs=True)
    assert results[0]["generation"]["role"] == "assistant" and results[0]["generation"]["content"]
    assert len(results[0]["tokens"]) == len(results[0]["logprobs"]) > 0
    assert results[1] == {"generation": {"role": "assistant", "content": UNSAFE_REPLY}, "tokens": [], "logprobs": []}
    assert llama.chat_format == "llama2"


@pytest.mark.parametrize("call, match", [
    (lambda g: g.text_completion(["a"] * 5), "5 prompts exceed max_batch_size=4"),
    (lambda g: g.text_completion(["Once upon a time " * 100]), "leaving no room"),
    (lambda g: g.text_completion([""]), "non-empty"),
    (lambda g: g.text_completion(["Hi"], max_gen_len=0), "at least 1"),
    (lambda g: g.chat_completion([[{"role": "assistant", "content": "hi"}]]), "should be from 'user'"),
    (lambda g: g.text_completion(["Hi"], top_p=0), "top_p"),
    (lambda g: g.text_completion(["Hi"], temperature=float("inf")), "temperature must be a finite number"),
    (lambda g: g.chat_completion([[{"role": "user", "content": "Hi"}]], top_p=float("nan")),
     "top_p must be a finite number"),
])
def test_bad_input_raises_clear_errors(llama, call, match):
    with pytest.raises(LlamakitError, match=match):
        call(llama)


def test_build_errors_name_the_problem(files, assets, tmp_path):
    with pytest.raises(LlamakitError, match="no such file or directory; pass the path of a checkpoint"):
        Llama.build(tmp_path / "missing", files["tok"], 64, 1)
    with pytest.raises(LlamakitError, match="tokenizer"):
        Llama.build(files["bin"], assets / "llama2" / "tokenizer.model", 64, 1)
    with pytest.raises(LlamakitError, match="device 'tpu' is not a device name; use cpu, cuda, cuda:N or mps"):
        Llama.build(files["bin"], files["tok"], 64, 1, device="tpu")


def test_max_seq_len_beyond_the_model_needs_extend_context(files, caplog):
    with pytest.raises(LlamakitError, match=r"max_seq_len=513 is beyond the model's 512-token context .* "
                                            "pass extend_context=True"):
        Llama.build(files["bin"], files["tok"], max_seq_len=513, max_batch_size=1)
    llama = Llama.build(files["bin"], files["tok"], max_seq_len=600, max_batch_size=1, extend_context=True)
    assert llama.cache.max_seq_len == 600  # the cache holds the whole window
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "WARNING"] == [
        "max_seq_len=600 is beyond the model's 512-token context"]
    assert Llama.build(files["bin"], files["tok"], max_seq_len=512, max_batch_size=1).max_seq_len == 512


@pytest.mark.parametrize("dtype", [torch.float64, "float64", torch.int8, "fp8"])
def test_an_unsupported_dtype_is_refused_not_replaced(files, dtype):
    with pytest.raises(LlamakitError, match=f"unsupported dtype {dtype!r}; choose one of fp32, .* torch.float16"):
        Llama.build(files["bin"], files["tok"], 64, 1, dtype=dtype)


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, torch.bfloat16), ("fp16", torch.float16),
                                             (None, torch.float32)])
def test_a_supported_dtype_is_honoured_everywhere(files, dtype, expected):
    llama = Llama.build(files["bin"], files["tok"], 64, 1, dtype=dtype)
    assert {p.dtype for p in llama.model.parameters()} == {expected}
    assert llama.cache.k.dtype == expected
    assert llama.text_completion(["Once upon a time"], temperature=0, max_gen_len=8)[0]["generation"].strip()
