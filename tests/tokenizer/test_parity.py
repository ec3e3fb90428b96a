"""Our encode/decode against the backend libraries themselves, on the real tokenizer files."""

import pytest

from llamakit.errors import TokenizerError
from tests.tokenizer.samples import LLAMA3_SPECIALS, TEXTS


def reference_encode(name, text, sp_reference, llama3_reference):
    """The backend library's own ids for text."""
    if name == "llama3":
        return llama3_reference.encode_ordinary(text)
    return sp_reference[name].encode(text)


def reference_decode(name, ids, sp_reference, llama3_reference):
    """The backend library's own text for ids."""
    if name == "llama3":
        return llama3_reference.decode(ids)
    return sp_reference[name].decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_backend(name, text, tokenizers, sp_reference, llama3_reference):
    tok = tokenizers[name]
    ids = tok.encode(text)
    assert ids == reference_encode(name, text, sp_reference, llama3_reference)
    assert tok.decode(ids) == reference_decode(name, ids, sp_reference, llama3_reference)


@pytest.mark.parametrize("text", ["hello", "", "日本 😀"])
def test_bos_eos_add_exactly_one_id_each(name, text, tokenizers):
    tok = tokenizers[name]
    plain = tok.encode(text)
    assert tok.encode(text, bos=True) == [tok.bos_id, *plain]
    assert tok.encode(text, eos=True) == [*plain, tok.eos_id]
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *plain, tok.eos_id]


@pytest.mark.parametrize("text", ["<s>", "</s>", "<unk>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>",
                                  "say <|eom_id|> then <|python_tag|> and </s>"])
def test_special_token_names_in_text_are_plain_text(name, text, tokenizers):
    tok = tokenizers[name]
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_llama3_ids(tokenizers, llama3_reference):
    tok = tokenizers["llama3"]
    assert tok.kind == "tiktoken"
    assert tok.vocab_size == 128256 == llama3_reference.n_vocab
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|reserved_special_token_0|>": 128002,
                "<|reserved_special_token_2|>": 128005, "<|reserved_special_token_3|>": 128011,
                "<|reserved_special_token_247|>": 128255}
    specials = tok.special_tokens
    assert {k: specials[k] for k in expected} == expected
    assert specials == {name: 128000 + i for i, name in enumerate(LLAMA3_SPECIALS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert tok.stop_ids == frozenset({128001, 128008, 128009})
    assert tok.decode([128006, 128009]) == "<|start_header_id|><|eot_id|>"


def test_llama3_known_encoding(tokenizers, llama3_reference):
    assert tokenizers["llama3"].encode("hello world") == llama3_reference.encode_ordinary("hello world")
    assert tokenizers["llama3"].encode("hello world") == [15339, 1917]


def test_sentencepiece_ids(tokenizers):
    for name, size in (("llama2", 32000), ("tok512", 512)):
        tok = tokenizers[name]
        assert tok.kind == "sentencepiece"
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (size, 1, 2)
        assert tok.pad_id == 0  # no pad piece: falls back to <unk>
        assert tok.stop_ids == frozenset({2})
        assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}


def test_path_and_repr(name, tokenizers, tokenizer_files):
    tok = tokenizers[name]
    assert tok.path == tokenizer_files[name]
    assert str(tok.path) in repr(tok)


def test_decode_accepts_numpy_and_torch_ints(name, tokenizers):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    tok = tokenizers[name]
    ids = tok.encode("hello world")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_decode_rejects_ids_outside_the_vocabulary(name, tokenizers):
    tok = tokenizers[name]
    for bad in (tok.vocab_size, -1):
        with pytest.raises(TokenizerError, match=str(tok.path)):
            tok.decode([5, bad])


def test_surrogates_are_repaired_before_encoding(name, tokenizers):
    tok = tokenizers[name]
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode("\ud83d\ude00") == tok.encode("😀")  # a surrogate pair, as a JSON escape leaves it


def test_encode_rejects_non_text(tokenizers):
    with pytest.raises(TypeError):
        tokenizers["llama2"].encode(b"bytes")
