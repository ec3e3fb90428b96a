"""load_tokenizer: the backend comes from the file's content; every bad input gets a clear error."""

import base64
import shutil

import pytest

from llamakit.errors import TokenizerError
from llamakit.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, check_vocab, load_tokenizer


@pytest.mark.parametrize(("source", "misleading_name", "expected"), [
    ("llama3", "spm.model", TiktokenTokenizer),
    ("llama3", "tokenizer.bin", TiktokenTokenizer),
    ("llama2", "tokenizer.tiktoken", SentencePieceTokenizer),
    ("tok512", "ranks.txt", SentencePieceTokenizer),
])
def test_backend_is_chosen_by_content(source, misleading_name, expected, tokenizer_files, tokenizers, tmp_path):
    copy = tmp_path / misleading_name
    shutil.copyfile(tokenizer_files[source], copy)
    tok = load_tokenizer(copy)
    assert type(tok) is expected
    assert tok.path == copy
    assert tok.encode("Hello 😀 world") == tokenizers[source].encode("Hello 😀 world")


def test_directory_with_tokenizer_model(tokenizer_files, tmp_path):
    shutil.copyfile(tokenizer_files["llama2"], tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "sentencepiece" and tok.path == tmp_path / "tokenizer.model"


def test_directory_in_hugging_face_llama3_layout(tokenizer_files, tmp_path):
    (tmp_path / "original").mkdir()
    shutil.copyfile(tokenizer_files["llama3"], tmp_path / "original" / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.kind == "tiktoken" and tok.vocab_size == 128256


def test_missing_path(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist") as err:
        load_tokenizer(tmp_path / "nope.model")
    assert str(tmp_path / "nope.model") in str(err.value)


def test_directory_with_only_hugging_face_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "original/tokenizer.model" in message


def test_empty_directory(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("export", ["tinyllamas/tok512.bin", "llama2/tokenizer.bin"])
def test_llama2c_export_is_recognized(export, assets, tmp_path):
    with pytest.raises(TokenizerError, match="llama2.c") as err:
        load_tokenizer(assets / export)
    assert str(assets / export) in str(err.value) and ".model" in str(err.value)
    shutil.copyfile(assets / export, tmp_path / "tok512.bin")  # a directory holding only the export
    with pytest.raises(TokenizerError, match="tok512.bin is a llama2.c tokenizer export"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "empty"),
    (b'{"version": "1.0", "added_tokens": []}', "tokenizer.json"),
    (b"\x00\x01garbage\xff" * 50, "neither a SentencePiece model nor a tiktoken rank file"),
    (b"just some text\nover lines\n", "neither a SentencePiece model nor a tiktoken rank file"),
])
def test_unreadable_files(content, expected, tmp_path):
    file = tmp_path / "tokenizer.model"
    file.write_bytes(content)
    with pytest.raises(TokenizerError, match=expected) as err:
        load_tokenizer(file)
    assert str(file) in str(err.value)


def test_malformed_tiktoken_file(tmp_path):
    file = tmp_path / "tokenizer.model"
    file.write_bytes(b"IQ== 0\nIg== 1\nIw== 2\nJA== 3\nJQ== 4\nthis line is broken\n")
    with pytest.raises(TokenizerError, match="malformed") as err:
        load_tokenizer(file)
    assert str(file) in str(err.value)


def test_backend_classes_reject_the_other_format(tokenizer_files):
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SentencePieceTokenizer(tokenizer_files["llama3"])
    with pytest.raises(TokenizerError, match="not a tiktoken rank file"):
        TiktokenTokenizer(tokenizer_files["llama2"])


def write_ranks(path, tokens):
    """Write a tiktoken rank file for the given tokens, ranked in order."""
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))


def test_tiktoken_specials_follow_the_file_and_a_replaced_file_is_reread(tmp_path):
    # tiktoken caches rank files by path name; a new file at the same path must not be served stale.
    file = tmp_path / "ranks.model"
    single_bytes = [bytes([b]) for b in range(256)]
    write_ranks(file, [*single_bytes, b"ab"])
    tok = load_tokenizer(file)
    assert tok.encode("ab") == [256]
    assert (tok.bos_id, tok.vocab_size) == (257, 257 + 256)
    write_ranks(file, [*single_bytes, b"cd", b"ef"])
    tok = load_tokenizer(file)
    assert tok.encode("ab") == [ord("a"), ord("b")]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (258, 259, 258 + 256)


def test_check_vocab_accepts_equal_and_padded_sizes(tokenizers):
    tok = tokenizers["tok512"]
    for model_vocab in (512, 512 + 64, 512 + 1024):
        check_vocab(tok, model_vocab, "ckpt/stories260K")


@pytest.mark.parametrize(("name", "model_vocab"), [("tok512", 511), ("tok512", 512 + 1025),
                                                     ("llama2", 128256), ("llama3", 32000)])
def test_check_vocab_rejects_the_wrong_tokenizer(name, model_vocab, tokenizers):
    tok = tokenizers[name]
    with pytest.raises(TokenizerError) as err:
        check_vocab(tok, model_vocab, "ckpt/some-model")
    message = str(err.value)
    for part in (str(tok.vocab_size), str(model_vocab), str(tok.path), "ckpt/some-model"):
        assert part in message
