"""Preference pairs: the real HH-RLHF file, the JSONL and trl forms, margins, encoding and truncation."""

import json

import pytest

from llamakit import load_tokenizer
from llamakit.data.preference import PreferencePair, encode_pair, read_pairs
from llamakit.errors import DataError


@pytest.fixture(scope="module")
def llama2_tok(assets):
    return load_tokenizer(assets / "llama2" / "tokenizer.model")


def test_the_real_hh_rlhf_file_reads_into_pairs(assets):
    pairs, report = read_pairs(assets / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz")
    assert report.rows == 2312 and len(pairs) == 2312 - sum(report.skipped.values())
    assert report.skipped == {"the answers follow different prompts": 5, "an answer is empty": 4,
                              "the turns do not alternate between user and assistant": 4}
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in pairs)
    first = pairs[0]
    assert first.prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    roles = [m["role"] for m in first.prompt]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]


def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_jsonl_and_trl_forms_with_margins(tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "rating": "Significantly better"},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
         "chosen": "Hello!", "rejected": "No.", "margin": 0.5},
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]},
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "No."}]},
    ]
    pairs, report = read_pairs(_write(tmp_path, rows))
    assert [p.margin for p in pairs] == [3.0, 0.5, 0.0, 0.0] and not report.skipped
    assert pairs[1].prompt[0]["role"] == "system" and pairs[2].prompt == pairs[3].prompt == [
        {"role": "user", "content": "Hi?"}]
    small, _ = read_pairs(_write(tmp_path, rows[:1]), margins="small")
    assert small[0].margin == 1.0


@pytest.mark.parametrize("row, words", [
    ({"prompt": "Hi", "chosen": "a"}, "both be strings or both message lists"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "rating": "great"}, "'rating' 'great'"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": "1"}, "'margin' must be a number"),
    ({"chosen": "no turns here", "rejected": "b"}, "not an HH-RLHF transcript"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
     "must end with an assistant message"),
])
def test_a_malformed_row_is_refused_by_its_place(tmp_path, row, words):
    good = {"prompt": "Hi", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match=rf"pairs.jsonl\[1\]: .*{words}"):
        read_pairs(_write(tmp_path, [good, row]))


def test_encoding_follows_the_chat_format(llama2_tok):
    pair = PreferencePair([{"role": "user", "content": "Hi?"}], "Hello there!", "Go away.")
    encoded = encode_pair(llama2_tok, pair, "llama2", max_len=64)
    assert llama2_tok.decode(encoded.prompt) == "[INST] Hi? [/INST]"
    # Meta's Llama 2 format: "[INST] {user} [/INST] {answer} " then EOS
    assert llama2_tok.decode(encoded.chosen) == "Hello there! " and encoded.chosen[-1] == llama2_tok.eos_id
    assert llama2_tok.decode(encoded.rejected) == "Go away. " and not encoded.truncated


def test_truncation_keeps_the_prompt_end_and_the_answer_start(llama2_tok):
    pair = PreferencePair([{"role": "user", "content": "word " * 100 + "last question?"}], "yes " * 50, "no")
    encoded = encode_pair(llama2_tok, pair, "llama2", max_len=40)
    assert encoded.truncated and len(encoded.prompt) + len(encoded.chosen) <= 40
    assert llama2_tok.decode(encoded.prompt).endswith("last question? [/INST]")
    assert llama2_tok.decode(encoded.chosen).startswith("yes yes") and len(encoded.chosen) == 20
    assert encoded.rejected and len(encoded.prompt) + len(encoded.rejected) <= 40


def test_batches_score_the_answers_only_and_mask_end_drops_the_end_token(llama2_tok):
    from llamakit.data.preference import PreferenceExamples
    from llamakit.train.batches import IGNORE_INDEX

    pair = encode_pair(llama2_tok, PreferencePair([{"role": "user", "content": "Hi?"}], "Hello there!", "No."),
                       "llama2", max_len=64)
    plain = PreferenceExamples([pair], llama2_tok.pad_id).batch([0])
    assert plain["input_ids"].shape == plain["labels"].shape == (2, len(pair.prompt) + len(pair.chosen) - 1)
    scored = [row[row != IGNORE_INDEX].tolist() for row in plain["labels"]]
    assert scored == [pair.chosen, pair.rejected]  # chosen first, each answer's own ids, its end included
    masked = PreferenceExamples([pair], llama2_tok.pad_id, mask_end=True).batch([0])["labels"]
    assert [row[row != IGNORE_INDEX].tolist() for row in masked] == [pair.chosen[:-1], pair.rejected[:-1]]


def test_prompts_read_from_every_form(tmp_path, assets, llama2_tok):
    from llamakit.data.preference import encode_prompt, fit_prompt, read_prompts

    rows = [
        {"prompt": "Hi?", "safety": True},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Story?"}, {"role": "assistant", "content": "Once."}]},
        {"prompt": "Why?", "chosen": "Because.", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "   "}]},
    ]
    prompts, report = read_prompts(_write(tmp_path, rows))
    assert [p.messages[-1]["content"] for p in prompts] == ["Hi?", "Story?", "Why?"]
    assert [p.safety for p in prompts] == [True, False, False] and len(prompts[1].messages) == 3
    assert report.skipped == {"the prompt does not end with a user turn": 1}
    hh, report = read_prompts(assets / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz")
    assert hh[0].messages[0]["content"] == "what are some pranks with a pen i can do?"
    assert report.skipped["the turns do not alternate between user and assistant"] == 4
    assert all(encode_prompt(llama2_tok, p, "llama2", 256)[0] for p in hh)  # every usable prompt encodes
    ids, truncated = encode_prompt(llama2_tok, prompts[1], "llama2", 1000)
    assert not truncated and llama2_tok.decode(ids).endswith("Story? [/INST]")
    short, truncated = encode_prompt(llama2_tok, prompts[1], "llama2", 5)  # one user turn left, then cut
    assert truncated and short == llama2_tok.encode("[INST] Story? [/INST]", bos=True)[-5:]
    fitted = fit_prompt(llama2_tok, prompts[1], "llama2", len(ids) - 1)  # the oldest exchange goes first
    assert fitted.messages == prompts[1].messages[2:]
    with pytest.raises(DataError, match=r"\[0\]: 'safety' must be true or false"):
        read_prompts(_write(tmp_path, [{"prompt": "x", "safety": "yes"}]))
    with pytest.raises(DataError, match=r"\[0\]: no prompt"):
        read_prompts(_write(tmp_path, [{"text": "x"}]))
