"""llama2.c files: the real stories260K checkpoint, and our v0/v1 writer/reader."""

import struct

import pytest
import torch

from llamakit import ModelConfig, Transformer, load_model, load_tokenizer, save_model
from llamakit.checkpoint import detect_format
from llamakit.checkpoint.llama2c import write_llama2c
from llamakit.errors import CheckpointError
from llamakit.model import KVCache
from tests.helpers import hf_logits, random_tokens

# Greedy output of stories260K from BOS, as printed by llama2.c's run.c (-t 0.0) in its doc/stories260K.md:
# an independent reference for our reading of the file layout and RoPE permutation.
RUNC_GREEDY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
               "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
               "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do.")


@pytest.fixture(scope="module")
def stories(assets):
    return assets / "tinyllamas" / "stories260K.bin"


def test_stories260k_config(stories):
    model = load_model(stories)
    c = model.config
    assert (c.dim, c.ffn_hidden_dim, c.n_layers, c.n_heads, c.kv_heads, c.vocab_size, c.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert c.tie_word_embeddings and model.num_params() == 260_032


def test_stories260k_greedy_matches_run_c(stories, assets):
    model, tok = load_model(stories), load_tokenizer(assets / "tinyllamas" / "tok512.model")
    ids = [tok.bos_id]
    cache = KVCache(model.config, max_slots=1)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache)
        for _ in range(120):
            ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([ids[-1:]]), cache)
    assert tok.decode(ids[1:]).startswith(RUNC_GREEDY)


def test_stories260k_logits_equal_transformers(stories, tmp_path):
    from transformers import LlamaForCausalLM

    model = load_model(stories)
    save_model(model, tmp_path / "hf", "hf")
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = random_tokens(512, length=100)
    with torch.no_grad():
        assert (model(tokens) - hf_logits(reference, tokens)).abs().max().item() <= 1e-4


def test_llama2c_rewrite_is_byte_identical(stories, tmp_path):
    save_model(load_model(stories), tmp_path / "again.bin", "llama2c")
    assert (tmp_path / "again.bin").read_bytes() == stories.read_bytes()  # RoPE tables included


def test_llama2c_through_meta_shards(stories, tmp_path):
    model = load_model(stories)
    save_model(model, tmp_path / "meta", "meta", shards=2)
    back = load_model(tmp_path / "meta").state_dict()
    assert all(torch.equal(t, back[name]) for name, t in model.state_dict().items())


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_write_read_versions(tmp_path, version, tied):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=48,
                                    max_seq_len=16, tie_word_embeddings=tied)).eval()
    path = tmp_path / "model.bin"
    write_llama2c(path, model.config, model.state_dict(), version=version)
    assert detect_format(path) == "llama2c" and detect_format(tmp_path) == "llama2c"
    tokens = random_tokens(40)
    with torch.no_grad():
        assert torch.equal(load_model(path)(tokens), model(tokens))


def test_unsupported_llama2c_files(tmp_path):
    quantized = tmp_path / "q80.bin"
    quantized.write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, 64, 172, 5, 8, 4, 512, 512, 1).ljust(4096, b"\0"))
    with pytest.raises(CheckpointError, match="version 2"):
        load_model(quantized)
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + b"\0" * 1000)
    with pytest.raises(CheckpointError, match="not a recognised checkpoint"):
        load_model(truncated)


def test_llama2c_cannot_store_llama3_rope(tmp_path):
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=40, rope_theta=500000.0))
    with pytest.raises(CheckpointError, match="rope_theta"):
        save_model(model, tmp_path / "x.bin", "llama2c")
    assert not (tmp_path / "x.bin").exists()
