"""prepare end to end: what each stage removes, the packed shards, determinism, resuming and interruptions."""

import dataclasses
import errno
import importlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamakit.cli import main
from llamakit.data import FilterConfig, PrepareConfig, TokenShards, prepare, read_meta
from llamakit.data.prepare import split_documents
from llamakit.data.shards import ShardWriter, file_sha256
from llamakit.errors import DataError
from llamakit.tokenizer import load_tokenizer
from llamakit.tokenizer.train import train_tokenizer
from tests.data.corpus import prose, write_jsonl

# The package exports the function prepare(), which hides the module of the same name from `import ... as`.
prepare_module = importlib.import_module("llamakit.data.prepare")
BOILERPLATE = "Cookies help us deliver our services. By using them you agree."
FRENCH = ("Le renard brun saute par-dessus le chien paresseux, puis il rentre chez lui pour dormir. Demain matin il "
          "partira de nouveau dans la forêt avec ses amis pour chercher de quoi manger.")


def good_docs() -> list[str]:
    """20 distinct prose documents: all of them must survive cleaning."""
    return [prose(120, seed) for seed in range(20)]


def kept_docs() -> list[str]:
    """What cleaning keeps of the corpus below: the good documents, the first one with its boilerplate line (the
    first document holding a boilerplate line keeps it)."""
    docs = good_docs()
    return [f"{docs[0]}\n{BOILERPLATE}", *docs[1:]]


@pytest.fixture
def corpus(tmp_path):
    """The good documents, with boilerplate and bad documents mixed in, over a folder, a .jsonl and a .parquet."""
    docs = good_docs()
    folder = tmp_path / "corpus" / "a_txt"  # read first: files are read in sorted order
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs[:10]):
        (folder / f"{i:02d}.txt").write_text(f"{doc}\n{BOILERPLATE}" if i < 6 else doc)
    bad = ["Hi.", "=-=-=-=-=-=-=-=-=-=-= ***** ##### ~~~~~ ;;;;", "\n".join(["Buy cheap watches now."] * 8),
           docs[6], docs[6].upper().replace(" ", "  "),  # exact duplicates of 06.txt
           docs[7].replace(docs[7].split()[60], "zebra", 1),  # a near duplicate of 07.txt
           FRENCH]
    write_jsonl(tmp_path / "corpus" / "more.jsonl", [f"{d}\n{BOILERPLATE}" for d in docs[10:16]] + bad)
    pq.write_table(pa.table({"text": docs[16:]}), tmp_path / "corpus" / "rest.parquet")
    return tmp_path / "corpus"


def config_for(corpus, tokenizer_file, output, **changes) -> PrepareConfig:
    base = PrepareConfig(inputs=[corpus], output=output, tokenizer=tokenizer_file, shard_tokens=700,
                         boilerplate_min_docs=10, val_fraction=0.1, workers=1)
    return dataclasses.replace(base, **changes)


def documents_in(root, split: str, tokenizer) -> list[str]:
    """The documents of a split, decoded from its packed ids ([bos] text [eos] ...)."""
    shards = TokenShards(root, split)
    ids = shards.window(0, len(shards))
    starts = np.flatnonzero(ids == tokenizer.bos_id)
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    assert len(starts) == len(ends) and starts[0] == 0 and ends[-1] == len(ids) - 1
    return [tokenizer.decode(ids[s + 1:e]) for s, e in zip(starts, ends)]


def all_documents(root, tokenizer) -> list[str]:
    """Every document in both splits, sorted."""
    return sorted(documents_in(root, "train", tokenizer) + documents_in(root, "val", tokenizer))


def test_report_and_shards(corpus, tokenizer_file, tokenizer, tmp_path):
    out = tmp_path / "out"
    report = prepare(config_for(corpus, tokenizer_file, out, filters=FilterConfig(languages=("en",))))
    assert (report["files"], report["documents_read"]) == (12, 27)
    assert report["boilerplate"] == {"distinct_lines": 1, "lines_dropped": 11, "chars_dropped": 11 * (len(BOILERPLATE) + 1)}
    removed = {name: r["documents"] for name, r in report["filters"].items() if r["documents"]}
    assert removed == {"min_chars": 1, "min_alnum_fraction": 1, "max_duplicate_line_fraction": 1, "language": 1}
    assert report["exact_duplicates"]["documents"] == 2 and report["near_duplicates"]["documents"] == 1
    assert report["kept"] == {"documents": 20, "chars": sum(map(len, kept_docs()))}
    train, val = documents_in(out, "train", tokenizer), documents_in(out, "val", tokenizer)
    assert len(val) >= 1 and sorted(train + val) == sorted(kept_docs())
    assert train == [d for d in kept_docs() if d in train]  # corpus order
    meta = read_meta(out)
    assert meta["splits"]["train"]["documents"] == len(train) == report["splits"]["train"]["documents"]
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["dtype"] == "uint16"
    assert meta["report"] == report and meta["settings"]["filters"]["languages"] == ["en"]
    assert load_tokenizer(out / "tokenizer.model").vocab_size == 320 and len(meta["inputs"]) == 12


def test_same_output_for_any_worker_count(corpus, tokenizer_file, tmp_path):
    prepare(config_for(corpus, tokenizer_file, tmp_path / "one", workers=1))
    prepare(config_for(corpus, tokenizer_file, tmp_path / "two", workers=2))
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        if name != "meta.json":  # meta.json records the worker count
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_rerun_skips_and_changes_need_force(corpus, tokenizer_file, tmp_path):
    out = tmp_path / "out"
    report = prepare(config_for(corpus, tokenizer_file, out))
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare(config_for(corpus, tokenizer_file, out, workers=3)) == report  # the worker count does not matter
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"different settings \(filters.min_chars: 20 -> 30\); pass --force"):
        prepare(config_for(corpus, tokenizer_file, out, filters=FilterConfig(min_chars=30)))
    (corpus / "a_txt" / "03.txt").write_text(prose(100, 77))
    with pytest.raises(DataError, match=r"different inputs \(modified 03.txt\); pass --force"):
        prepare(config_for(corpus, tokenizer_file, out))
    prepare(config_for(corpus, tokenizer_file, out, force=True))
    assert (out / "meta.json").stat().st_mtime_ns != stamp


def test_output_inside_the_input_folder_is_not_read(corpus, tokenizer_file):
    out = corpus / "prepared"
    report = prepare(config_for(corpus, tokenizer_file, out))
    assert prepare(config_for(corpus, tokenizer_file, out)) == report  # shards and meta.json are not new inputs
    assert len(read_meta(out)["inputs"]) == 12


def test_new_tokenizer_in_the_same_process(corpus, tokenizer_file, tmp_path):
    out = tmp_path / "out"
    prepare(config_for(corpus, tokenizer_file, out))
    other = train_tokenizer([prose(300, seed) for seed in range(50, 60)], tmp_path / "other.model", 360, num_threads=1)
    prepare(config_for(corpus, other, out, force=True))
    shards = TokenShards(out)
    assert shards.vocab_size == 360 and shards.tokenizer_sha256 == file_sha256(other)
    assert all_documents(out, load_tokenizer(other)) == sorted([*kept_docs(), FRENCH])  # no language filter here


def test_interrupted_run_never_looks_complete(corpus, tokenizer_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []

    def dies_on_second_chunk(texts, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(texts, **kwargs)

    encode = prepare_module.encode_documents
    monkeypatch.setattr(prepare_module, "CHUNK_DOCS", 4)
    monkeypatch.setattr(prepare_module, "encode_documents", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(config_for(corpus, tokenizer_file, out, shard_tokens=100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # the shards written so far are gone too
    monkeypatch.undo()
    out.mkdir()  # a folder from an older version, interrupted: partial files, no meta.json
    (out / "train-00000.bin").write_bytes(b"partial")
    (out / ".train-00009.bin.tmp").write_bytes(b"left by a killed run")
    with pytest.raises(DataError, match="no meta.json"):
        TokenShards(out)
    prepare(config_for(corpus, tokenizer_file, out))
    assert TokenShards(out).num_tokens > 0 and not list(out.glob(".*"))


def test_refuses_foreign_folders_and_empty_results(corpus, tokenizer_file, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="holds files that `llamakit prepare` did not write \\(notes.txt\\)"):
        prepare(config_for(corpus, tokenizer_file, tmp_path / "mine"))
    (tmp_path / "tiny.txt").write_text("Hi there.")
    with pytest.raises(DataError, match="no documents are left after the quality filters: of 1 read, min_chars removed 1"):
        prepare(config_for(tmp_path / "tiny.txt", tokenizer_file, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="--val-fraction 1.0 leaves nothing to train on"):
        prepare(config_for(corpus, tokenizer_file, tmp_path / "out", val_fraction=1.0))


def test_split_is_stable_with_at_least_one_validation_document():
    docs = good_docs()
    splits = split_documents(docs, 0.005)
    assert len(splits["val"]) == 1 and splits == split_documents(docs, 0.005)
    assert split_documents(docs[::-1], 0.005)["val"] == splits["val"]  # fixed by content, not position
    with pytest.raises(DataError, match="only 1 document is left after cleaning"):
        split_documents(docs[:1], 0.5)
    half = split_documents(docs, 0.5)
    assert 4 <= len(half["val"]) <= 16 and len(half["train"]) + len(half["val"]) == 20


def test_large_vocabulary_uses_uint32(corpus, assets, tmp_path):
    out = tmp_path / "out"
    prepare(config_for(corpus, assets / "llama3" / "tokenizer.model", out, shard_tokens=10**6))
    tokenizer = load_tokenizer(out / "tokenizer.model")
    assert read_meta(out)["dtype"] == "uint32" and (out / "train-00000.bin").stat().st_size % 4 == 0
    shards = TokenShards(out)
    assert shards.window(0, 1)[0] == tokenizer.bos_id == 128000
    assert all_documents(out, tokenizer) == sorted([*kept_docs(), FRENCH])  # no language filter here


def test_rerun_decides_from_meta_without_reading_the_corpus(corpus, tokenizer_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    report = prepare(config_for(corpus, tokenizer_file, out))

    def no_cleaning(*args, **kwargs):
        raise AssertionError("a rerun with the same inputs and settings must not read or clean the corpus")

    monkeypatch.setattr(prepare_module, "clean_corpus", no_cleaning)
    assert prepare(config_for(corpus, tokenizer_file, out)) == report
    (corpus / "a_txt" / "03.txt").write_text(prose(100, 77))  # a changed input is still noticed
    with pytest.raises(DataError, match=r"different inputs \(modified 03.txt\)"):
        prepare(config_for(corpus, tokenizer_file, out))


def test_a_damaged_folder_is_not_already_prepared(corpus, tokenizer_file, tmp_path):
    out = tmp_path / "out"
    prepare(config_for(corpus, tokenizer_file, out))
    sha = file_sha256(out / "tokenizer.model")
    other = train_tokenizer([prose(300, seed) for seed in range(50, 60)], tmp_path / "other.model", 360, num_threads=1)
    (out / "tokenizer.model").write_bytes(other.read_bytes())
    with pytest.raises(DataError, match=re.escape(f"{out / 'tokenizer.model'} has sha256 ") + r"\w{12}\.\.\. but "
                       + re.escape(f"{out / 'meta.json'} records sha256 {sha[:12]}") + ".*restore the original file"):
        prepare(config_for(corpus, tokenizer_file, out))
    prepare(config_for(corpus, tokenizer_file, out, force=True))
    (out / "train-00001.bin").unlink()
    with pytest.raises(DataError, match="train-00001.bin is missing"):
        prepare(config_for(corpus, tokenizer_file, out))


def test_force_builds_aside_and_an_interrupt_keeps_the_old_data(corpus, tokenizer_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(config_for(corpus, tokenizer_file, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    encode, calls = prepare_module.encode_documents, []

    def dies_on_second_chunk(texts, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(texts, **kwargs)

    monkeypatch.setattr(prepare_module, "CHUNK_DOCS", 4)
    monkeypatch.setattr(prepare_module, "encode_documents", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(config_for(corpus, tokenizer_file, out, shard_tokens=100, force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no temporary folder left
    monkeypatch.undo()
    prepare(config_for(corpus, tokenizer_file, out, shard_tokens=100, force=True))
    assert read_meta(out)["settings"]["shard_tokens"] == 100 and TokenShards(out).num_tokens > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_temporaries_of_killed_runs_are_removed(corpus, tokenizer_file, tmp_path):
    dead = tmp_path / ".out.tmp-999999999"  # no such process
    dead.mkdir()
    (dead / "train-00000.bin").write_bytes(b"left by a run killed with SIGKILL")
    prepare(config_for(corpus, tokenizer_file, tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_identical_files_keep_one_document(tokenizer_file, tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    text = "\n".join(prose(40, line) for line in range(5))  # five long lines, each in every copy
    for i in range(50):
        (folder / f"{i:02d}.txt").write_text(text)
    for i, doc in enumerate(good_docs()[:3]):
        (folder / f"doc{i}.txt").write_text(doc)
    report = prepare(config_for(folder, tokenizer_file, tmp_path / "out"))
    assert report["boilerplate"]["lines_dropped"] == 0 and report["exact_duplicates"]["documents"] == 49
    assert report["kept"]["documents"] == 4


@pytest.mark.parametrize("docs, settings, message", [
    (good_docs(), {"val_fraction": 0.0}, "--val-fraction 0.0 leaves no validation split, which pretraining needs "
                                         "to measure validation loss; use a value above 0"),
    (good_docs(), {"val_fraction": float("nan")}, "--val-fraction nan is not a number"),
])
def test_no_validation_split_is_refused_before_tokenizing(docs, settings, message, tokenizer_file, tmp_path,
                                                         monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", docs)
    monkeypatch.setattr(prepare_module, "encode_documents", None)  # tokenizing would fail with a TypeError
    with pytest.raises(DataError, match=message):
        prepare(config_for(tmp_path / "in.jsonl", tokenizer_file, tmp_path / "out", **settings))
    assert not (tmp_path / "out").exists()


def test_a_single_document_is_refused_and_leaves_no_output(tokenizer_file, tmp_path):
    # Streaming prepare knows how many documents survive only at the end (they are tokenised on the way),
    # so this error comes after tokenising, but the folder being built is removed: nothing is left behind.
    write_jsonl(tmp_path / "in.jsonl", good_docs()[:1])
    with pytest.raises(DataError, match="only 1 document is left after cleaning, so none can be held out for validation"):
        prepare(config_for(tmp_path / "in.jsonl", tokenizer_file, tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_full_disk_is_one_error_and_keeps_the_old_data(corpus, tokenizer_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(config_for(corpus, tokenizer_file, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_fills(self, tokens):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", disk_fills)
    with pytest.raises(DataError, match=rf"{out}: the disk holding {tmp_path} is full .* the earlier data, if any, "
                                        "is kept"):
        prepare(config_for(corpus, tokenizer_file, out, shard_tokens=100, force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_prepare_onto_a_really_full_disk(corpus, tokenizer_file, small_disk, capsys):
    out = small_disk / "data"
    code = main(["prepare", str(corpus), "--tokenizer", str(tokenizer_file), "--output", str(out), "--workers", "1",
                 "--val-fraction", "0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith(f"llamakit prepare: error: {out}: the disk holding") and "is full" in err
    assert len(err.splitlines()) == 1 and list(small_disk.iterdir()) == []
