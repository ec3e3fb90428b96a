"""The shard format: writer/reader round trip, windows across shards, dtype choice, damage and mismatch errors."""

import json
import re

import numpy as np
import pytest

from llamakit.data.shards import FORMAT, VERSION, ShardWriter, TokenShards, file_sha256, read_meta, token_dtype, write_meta
from llamakit.errors import DataError
from llamakit.tokenizer.train import train_tokenizer
from tests.data.corpus import prose


def make_folder(root, tokenizer_file, splits: dict[str, list[np.ndarray]], vocab_size=320, shard_tokens=7):
    """A prepared folder holding the given token chunks, written with ShardWriter."""
    root.mkdir(exist_ok=True)
    (root / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    dtype, entries = token_dtype(vocab_size), {}
    for split, chunks in splits.items():
        with ShardWriter(root, split, dtype, shard_tokens) as writer:
            for chunk in chunks:
                writer.write(chunk)
            shards = writer.close()
        entries[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": len(chunks), "shards": shards}
    write_meta(root, {"format": FORMAT, "version": VERSION, "dtype": dtype,
                      "tokenizer": {"file": "tokenizer.model", "sha256": file_sha256(tokenizer_file),
                                    "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2}, "splits": entries})
    return root


def test_round_trip_across_shards(tmp_path, tokenizer_file):
    chunks = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 30)]
    root = make_folder(tmp_path / "p", tokenizer_file, {"train": chunks, "val": [np.arange(5)]})
    assert sorted(p.name for p in root.iterdir()) == [
        "meta.json", "tokenizer.model", "train-00000.bin", "train-00001.bin", "train-00002.bin", "train-00003.bin",
        "train-00004.bin", "val-00000.bin"]
    train = TokenShards(root)
    assert len(train) == train.num_tokens == 30 and train.vocab_size == 320
    assert np.array_equal(train.window(0, 30), np.arange(30)) and train.window(0, 30).dtype == np.int64
    assert np.array_equal(train.window(5, 11), np.arange(5, 16))  # spans shards 0, 1 and 2
    assert np.array_equal(train.window(28, 2), [28, 29]) and train.window(30, 0).size == 0
    assert np.array_equal(TokenShards(root, "val").window(0, 5), np.arange(5))
    assert np.fromfile(root / "train-00000.bin", dtype="<u2").tolist() == list(range(7))  # raw little-endian
    with pytest.raises(IndexError, match="outside the 30 tokens"):
        train.window(25, 6)


def test_dtype_follows_the_vocabulary(tmp_path, tokenizer_file):
    assert token_dtype(32000) == token_dtype(65536) == "uint16" and token_dtype(65537) == token_dtype(128256) == "uint32"
    big = np.array([0, 65535, 65536, 128255])
    root = make_folder(tmp_path / "p", tokenizer_file, {"train": [big]}, vocab_size=128256)
    assert read_meta(root)["dtype"] == "uint32" and (root / "train-00000.bin").stat().st_size == 4 * 4
    assert TokenShards(root).window(0, 4).tolist() == big.tolist()


def test_writer_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", "uint16", 4) as writer:
        writer.write(np.arange(6))  # one full shard, then 2 tokens in a temporary file
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["train-00000.bin"]


def test_missing_folder_or_meta(tmp_path):
    with pytest.raises(DataError, match="does not exist; run `llamakit prepare` first"):
        TokenShards(tmp_path / "nothing")
    with pytest.raises(DataError, match="has no meta.json .* run `llamakit prepare` first"):
        TokenShards(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "is not a llamakit-shards meta file"),
    ({"version": 99}, "has format version 99, but this llamakit reads version 1"),
    ({"dtype": "float32"}, "unknown dtype 'float32'"),
])
def test_wrong_meta(change, message, tmp_path, tokenizer_file):
    root = make_folder(tmp_path / "p", tokenizer_file, {"train": [np.arange(5)]})
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(DataError, match=message):
        TokenShards(root)


def test_damaged_shards_and_unknown_split(tmp_path, tokenizer_file):
    root = make_folder(tmp_path / "p", tokenizer_file, {"train": [np.arange(20)], "val": []})
    with pytest.raises(DataError, match="has no 'test' split \\(it has train, val\\)"):
        TokenShards(root, "test")
    with pytest.raises(DataError, match="'val' split .* holds no tokens"):
        TokenShards(root, "val")
    with open(root / "train-00001.bin", "r+b") as f:
        f.truncate(5)
    with pytest.raises(DataError, match="train-00001.bin has 5 bytes but meta.json records 7 tokens \\(14 bytes\\)"):
        TokenShards(root)
    (root / "train-00001.bin").unlink()
    with pytest.raises(DataError, match="train-00001.bin is missing"):
        TokenShards(root)


def test_tokenizer_check(tmp_path, tokenizer_file, tokenizer):
    root = make_folder(tmp_path / "p", tokenizer_file, {"train": [np.arange(5)]})
    shards = TokenShards(root)
    shards.check_tokenizer(tokenizer)
    assert shards.tokenizer_sha256 == file_sha256(shards.tokenizer_path) == file_sha256(tokenizer_file)
    from llamakit.tokenizer import load_tokenizer

    other = load_tokenizer(train_tokenizer([prose(300, 7)] * 3, tmp_path / "other.model", 300, num_threads=1))
    with pytest.raises(DataError, match="prepared with tokenizer tokenizer.model .*; pass that tokenizer"):
        shards.check_tokenizer(other)
    meta = json.loads((root / "meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 999
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="has 320 tokens but the shards .* were made with 999"):
        TokenShards(root).check_tokenizer(tokenizer)


def test_a_replaced_tokenizer_copy_is_blamed_on_the_folder(tmp_path, tokenizer_file):
    from llamakit.tokenizer import load_tokenizer

    root = make_folder(tmp_path / "p", tokenizer_file, {"train": [np.arange(5)]})
    train_tokenizer([prose(300, 7)] * 3, root / "tokenizer.model", 300, num_threads=1, overwrite=True)  # replaced
    recorded = file_sha256(tokenizer_file)[:12]
    with pytest.raises(DataError, match=re.escape(f"{root / 'tokenizer.model'} has sha256 ") + r"\w{12}\.\.\. but "
                       + re.escape(f"{root / 'meta.json'} records sha256 {recorded}... (the tokenizer the shards were "
                                   "made with); restore the original file or re-run `llamakit prepare --force`")):
        TokenShards(root).check_tokenizer(load_tokenizer(root / "tokenizer.model"))
