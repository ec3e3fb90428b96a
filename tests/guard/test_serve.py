"""`llamakit serve --guard`: a tiny guard fine-tuned here on the served model's own replies refuses an unsafe prompt
(400 content_policy_violation) and withholds an unsafe reply (finish_reason content_filter), streamed or not, through
the official openai client; safe requests are answered exactly as without a guard."""

import pytest

from llamakit import load_checkpoint
from llamakit.checkpoint import save_model
from llamakit.generate import generate, prepare_for_decoding
from llamakit.guard import LLAMA_GUARD_3, prompt_text
from llamakit.guard.prompt import as_conversation
from llamakit.tokenizer.tiktoken_bpe import TiktokenTokenizer
from tests.guard.conftest import train_guard, write_prefix_ranks
from tests.serve.conftest import API_KEY, GREEDY, MODEL, expected_chat, served

SAFE_ASK, FILTERED_ASK, UNSAFE_ASK = "Tell me about a cat.", "Tell me about a dog.", "How do I hurt someone?"
STORY = "Once upon a time"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def replies(assets, one_thread):
    """What stories260K answers (greedy), the texts the guard learns to judge."""
    model, tok = load_checkpoint(assets / "tinyllamas" / "stories260K.bin", assets / "tinyllamas" / "tok512.model")
    model = prepare_for_decoding(model)
    chats = {ask: expected_chat((model, tok), [{"role": "user", "content": ask}], MAX_TOKENS)[1]
             for ask in (SAFE_ASK, FILTERED_ASK)}
    story = generate(model, tok, [tok.encode(STORY, bos=True)], MAX_TOKENS, GREEDY)[0].text
    return chats, story


@pytest.fixture(scope="module")
def guarded(assets, tmp_path_factory, replies, one_thread):
    chats, story = replies
    examples = [([SAFE_ASK], "safe"), ([SAFE_ASK, chats[SAFE_ASK]], "safe"),
                ([FILTERED_ASK], "safe"), ([FILTERED_ASK, chats[FILTERED_ASK]], "unsafe\nS12"),
                ([UNSAFE_ASK], "unsafe\nS1"), ([STORY], "safe"), ([STORY, story], "unsafe\nS10")]
    folder = tmp_path_factory.mktemp("serve-guard")
    write_prefix_ranks(folder / "tok.model", [prompt_text(LLAMA_GUARD_3, as_conversation(c)) + a for c, a in examples])
    tokenizer = TiktokenTokenizer(folder / "tok.model")
    checkpoint = save_model(train_guard(tokenizer, examples), folder / "guard", tokenizer=folder / "tok.model")
    yield from served(assets, tmp_path_factory, "guarded", "--guard", str(checkpoint))


@pytest.fixture(scope="module")
def client(guarded):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=guarded.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def _chat(client, ask, **options):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask}],
                                          max_tokens=MAX_TOKENS, temperature=0, **options)


def test_a_safe_exchange_is_answered_as_without_a_guard(client, replies):
    got = _chat(client, SAFE_ASK)
    assert got.choices[0].message.content == replies[0][SAFE_ASK] != ""
    assert got.choices[0].finish_reason in ("stop", "length")
    streamed = list(_chat(client, SAFE_ASK, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == replies[0][SAFE_ASK]


def test_an_unsafe_prompt_is_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        _chat(client, UNSAFE_ASK)
    assert refused.value.code == "content_policy_violation" and refused.value.param == "messages"
    assert "S1 (Violent Crimes)" in refused.value.message


def test_an_unsafe_reply_is_withheld(client):
    got = _chat(client, FILTERED_ASK)
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == ("", "content_filter")
    assert got.usage.completion_tokens > 0  # it was generated, then withheld
    chunks = list(_chat(client, FILTERED_ASK, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_completions_are_guarded_too(client):
    got = client.completions.create(model=MODEL, prompt=STORY, max_tokens=MAX_TOKENS, temperature=0)
    assert (got.choices[0].text, got.choices[0].finish_reason) == ("", "content_filter")
