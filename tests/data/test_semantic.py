"""Semantic dedup: the exact blocked search against brute force, the embedding against the model's own forward,
and paraphrases that MinHash misses removed by a trained model's embeddings (stories260K)."""

import numpy as np
import pytest
import torch

from llamakit.data import semantic
from llamakit.data.dedup import jaccard, shingles
from llamakit.data.semantic import Embedder, SemanticDeduplicator, final_hidden_states
from llamakit.errors import DataError
from llamakit.model import ModelConfig, Transformer

STORY = ("Tom had a big red ball. He liked to play with it in the park every day. One day, the ball rolled into the "
         "pond. Tom was sad. His mom helped him get it back, and Tom was happy again.")
PARAPHRASE = ("Tom had a large red ball. He loved to play with it at the park each day. One morning, the ball rolled "
              "into the lake. Tom felt sad. His mother helped him get it out, and Tom felt happy again.")
OTHERS = ["Lily wanted to bake a cake for her friend. She got flour, eggs and sugar from the kitchen. She mixed them "
          "in a bowl and put the cake in the oven. Her friend loved the cake and said thank you.",
          "Once upon a time, there was a little bird who could not fly. The bird sat in a tree and watched the other "
          "birds. A kind owl came and taught the bird how to flap its wings. Soon the bird could fly high."]


def brute_force(embeddings: np.ndarray, threshold: float) -> list[bool]:
    """Keep each row unless its cosine similarity to an earlier kept row is >= threshold (the definition)."""
    kept: list[int] = []
    for i, row in enumerate(embeddings):
        if all(float(row @ embeddings[j]) < threshold for j in kept):
            kept.append(i)
    return [i in kept for i in range(len(embeddings))]


def test_blocked_search_equals_brute_force(monkeypatch):
    monkeypatch.setattr(semantic, "BLOCK_ROWS", 3)  # many blocks, some partly full
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16))
    near = base[rng.integers(0, 40, size=40)] + 0.1 * rng.normal(size=(40, 16))  # near copies of random rows
    rows = np.concatenate([base, near])[rng.permutation(80)]
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    dedup = SemanticDeduplicator(0.95)
    keep = [k for start, size in [(0, 7), (7, 1), (8, 30), (38, 42)] for k in dedup.select(rows[start:start + size])]
    assert keep == brute_force(rows, 0.95) and 40 <= sum(keep) < 80 and dedup.kept == sum(keep)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=64)).eval()


def test_final_hidden_states_are_what_the_head_reads(tiny_model):
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.allclose(tiny_model.lm_head(final_hidden_states(tiny_model, tokens)), tiny_model(tokens), atol=1e-5)


def test_embeddings_are_unit_means_that_ignore_padding(tiny_model, tokenizer):
    texts = ["A short one.", "A much longer document, with many more words than the first one has in it."]
    embedder = Embedder(tiny_model, tokenizer, batch_size=2)
    together = embedder.embed(texts)  # padded to the longer
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    assert together.shape == (2, 32) and np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-6)
    assert np.allclose(together, alone, atol=1e-5)
    ids = torch.tensor([tokenizer.encode(texts[0], bos=True)])
    with torch.no_grad():
        mean = final_hidden_states(tiny_model, ids)[0].mean(0)  # (dim,)
    assert np.allclose(alone[0], (mean / mean.norm()).numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def stories(assets):
    from llamakit.checkpoint import load_checkpoint

    folder = assets / "tinyllamas"
    return load_checkpoint(folder / "stories260K.bin", folder / "tok512.model")


def test_a_trained_model_finds_paraphrases_minhash_misses(stories):
    assert jaccard(shingles(STORY), shingles(PARAPHRASE)) < 0.05  # almost no 5-word shingle survives the rewording
    embeddings = Embedder(*stories).embed([STORY, *OTHERS, PARAPHRASE])
    similarity = embeddings @ embeddings.T
    assert similarity[0, 3] > max(similarity[0, 1], similarity[0, 2], similarity[1, 2], similarity[3, 1]) + 0.03
    assert SemanticDeduplicator(0.97).select(embeddings) == [True, True, True, False]


def test_prepare_reports_semantic_duplicates(stories, assets, tmp_path):
    from llamakit.data import PrepareConfig, prepare
    from tests.data.corpus import write_jsonl

    write_jsonl(tmp_path / "in.jsonl", [STORY, *OTHERS, PARAPHRASE])
    config = PrepareConfig(inputs=[tmp_path / "in.jsonl"], output=tmp_path / "out", val_fraction=0.3, workers=1,
                           tokenizer=assets / "tinyllamas" / "tok512.model")
    config.semantic.checkpoint, config.semantic.threshold = "stories260K.bin", 0.97
    report = prepare(config, embedder=Embedder(*stories))
    assert report["semantic_duplicates"]["documents"] == 1 and report["near_duplicates"]["documents"] == 0
    assert report["semantic_duplicates"]["chars"] == len(PARAPHRASE) and report["kept"]["documents"] == 3
    with pytest.raises(DataError, match="semantic dedup needs the model"):
        prepare(PrepareConfig(inputs=[tmp_path / "in.jsonl"], output=tmp_path / "x", tokenizer=config.tokenizer,
                              semantic=config.semantic))


def test_cli_semantic_dedup(assets, tmp_path, capsys):
    from llamakit.cli import main
    from tests.data.corpus import write_jsonl

    folder = assets / "tinyllamas"
    write_jsonl(tmp_path / "in.jsonl", [STORY, *OTHERS, PARAPHRASE])
    code = main(["prepare", str(tmp_path / "in.jsonl"), "--tokenizer", str(folder / "tok512.model"), "--output",
                 str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0.3", "--semantic-dedup",
                 str(folder / "stories260K.bin"), "--semantic-tokenizer", str(folder / "tok512.model"),
                 "--semantic-threshold", "0.97", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert any(line.split()[:3] == ["semantic", "duplicates", "-1"] for line in out.splitlines())
