"""Guard over a tiny model fine-tuned in the test: its learned answers come back as the right verdicts."""

import pytest

from llamakit.guard import LLAMA_GUARD_3, Guard, GuardError
from llamakit.guard.prompt import as_conversation
from tests.guard.conftest import TRAINING


@pytest.fixture(scope="module")
def guard(tiny_guard, one_thread):
    checkpoint, tokenizer = tiny_guard
    return Guard.load(checkpoint, tokenizer, device="cpu")


def _expected(answer: str) -> tuple[str, list[str]]:
    first, _, codes = answer.partition("\n")
    return first, [c for c in codes.split(",") if c]


@pytest.mark.parametrize(("messages", "answer"), TRAINING, ids=[m[-1][:24] for m, _ in TRAINING])
def test_check_reproduces_the_learned_verdicts(guard, messages, answer):
    verdict = guard.check(as_conversation(messages))
    status, codes = _expected(answer)
    assert verdict.status == status, verdict.raw
    assert [c.code for c in verdict.categories] == codes
    assert [c.name for c in verdict.categories] == [LLAMA_GUARD_3.category(c).name for c in codes]
    assert verdict.raw.strip() == answer  # greedy decoding stopped at <|eot_id|>, which is not in the text
    assert verdict.safe == (status == "safe")


def test_a_string_is_a_user_prompt_and_batches_match_single_checks(guard):
    texts = [m[0] for m, _ in TRAINING if len(m) == 1]
    batch = guard.check_batch(texts)
    assert [v.status for v in batch] == [guard.check(t, role="user").status for t in texts]
    assert [v.status for v in batch] == [_expected(a)[0] for m, a in TRAINING if len(m) == 1]
    guard.batch_size = 2  # split into several generate calls: same verdicts
    try:
        assert guard.check_batch(texts) == batch
    finally:
        guard.batch_size = 8


def test_the_role_must_be_that_of_the_last_message(guard):
    with pytest.raises(GuardError, match="needs the user message it answers"):
        guard.check("Rob a bank.", role="agent")
    with pytest.raises(GuardError, match="last message is from the agent"):
        guard.check(as_conversation(["Hi", "Hello"]), role="user")
    with pytest.raises(GuardError, match="unknown role"):
        guard.check("Hi", role="assistant")
    with pytest.raises(GuardError, match="should be from user"):
        guard.check([{"role": "assistant", "content": "Hello"}])
    with pytest.raises(GuardError, match="should be from user"):
        guard.check([{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hi"}])


def test_a_conversation_beyond_the_context_is_refused(guard):
    with pytest.raises(GuardError, match="exceeds the guard model's 512-token context"):
        guard.check("word " * 600)


def test_a_llama3_policy_needs_a_llama3_tokenizer(assets, tiny_guard):
    from llamakit.tokenizer import load_tokenizer

    sentencepiece = load_tokenizer(assets / "tinyllamas" / "tok512.model")
    with pytest.raises(GuardError, match="needs a Llama 3 tokenizer"):
        Guard(Guard.load(*tiny_guard, device="cpu").model, sentencepiece)
