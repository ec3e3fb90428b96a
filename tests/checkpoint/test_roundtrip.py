"""Conversions between formats are lossless, and what we write loads in transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llamakit import load_model, save_model
from llamakit.checkpoint import detect_format, load_config
from tests.helpers import hf_llama, hf_logits, random_tokens


def _hf_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "hf"
    hf_llama(num_attention_heads=8, num_key_value_heads=4, intermediate_size=128).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_hf_meta_hf_is_bit_identical(hf_folder, tmp_path, shards):
    save_model(load_model(hf_folder), tmp_path / "meta", "meta", shards=shards)
    assert detect_format(tmp_path / "meta") == "meta"
    save_model(load_model(tmp_path / "meta"), tmp_path / "back", "hf")
    _assert_bit_identical(_hf_tensors(hf_folder), _hf_tensors(tmp_path / "back"))


def test_hf_llamakit_hf_is_bit_identical(hf_folder, tmp_path):
    save_model(load_model(hf_folder), tmp_path / "ours", "llamakit")
    assert detect_format(tmp_path / "ours") == "llamakit"
    save_model(load_model(tmp_path / "ours"), tmp_path / "back", "hf")
    _assert_bit_identical(_hf_tensors(hf_folder), _hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("fmt", ["hf", "llamakit"])
def test_written_folder_loads_in_transformers(tmp_path, fmt):
    from transformers import AutoModelForCausalLM

    reference = hf_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    reference.save_pretrained(tmp_path / "src")
    save_model(load_model(tmp_path / "src"), tmp_path / "out", fmt)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = random_tokens(reference.config.vocab_size, length=64)
    assert (hf_logits(reloaded, tokens) - hf_logits(reference, tokens)).abs().max().item() <= 1e-4


def test_sharded_safetensors_index(hf_folder, tmp_path):
    model = load_model(hf_folder)
    save_model(model, tmp_path / "sharded", "hf", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_bit_identical(_hf_tensors(hf_folder), _hf_tensors(tmp_path / "sharded"))
    tokens = random_tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "sharded")(tokens), model(tokens))


def test_native_format_keeps_the_exact_config(tmp_path):
    from llamakit import ModelConfig, Transformer

    config = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=50, multiple_of=32, ffn_dim_multiplier=1.3)
    save_model(Transformer(config), tmp_path / "m", "llamakit")
    assert load_config(tmp_path / "m") == config


def test_dtype_conversion_on_save_and_load(hf_folder, tmp_path):
    save_model(load_model(hf_folder), tmp_path / "fp32", "hf", dtype="fp32")
    assert all(t.dtype == torch.float32 for t in _hf_tensors(tmp_path / "fp32").values())
    model = load_model(tmp_path / "fp32", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0])
def test_meta_layout_follows_the_model_generation(tmp_path, rope_theta):
    """Llama 1/2 layout (params without rope keys, embedding split by width) or Llama 3's (by vocabulary)."""
    from llamakit import ModelConfig, Transformer

    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=8, vocab_size=128, multiple_of=32, rope_theta=rope_theta))
    save_model(model, tmp_path / "meta", "meta", shards=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps"} <= set(params)
    assert "max_seq_len" not in params  # Meta's Llama.build passes it separately; duplicating it breaks their code
    llama3 = rope_theta == 500000.0
    assert ("rope_theta" in params) == llama3  # Llama 2's ModelArgs dataclass rejects unknown keys
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)  # half of 8 heads x 8 dims
    assert shard["tok_embeddings.weight"].shape == ((64, 64) if llama3 else (128, 32))
    assert load_config(tmp_path / "meta").rope_theta == rope_theta


def test_meta_llama2_style_width_split_embedding(tmp_path):
    """Llama 2 checkpoints shard the embedding along its width and say vocab_size: -1."""
    from llamakit import ModelConfig, Transformer
    from llamakit.checkpoint.meta import params_json

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=50, multiple_of=32)).eval()
    folder = tmp_path / "llama2"
    folder.mkdir()
    save_model(model, tmp_path / "tmp", "meta", shards=2)
    for rank in range(2):  # re-split the embedding along its width, as Llama 2's ParallelEmbedding does
        shard = torch.load(tmp_path / "tmp" / f"consolidated.{rank:02d}.pth", weights_only=True)
        shard["tok_embeddings.weight"] = model.embed_tokens.weight.detach().chunk(2, dim=1)[rank].clone()
        shard["rope.freqs"] = torch.zeros(8)  # Llama 1/2 files carry this buffer
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps({**params_json(model.config), "vocab_size": -1}))
    tokens = random_tokens(50)
    with torch.no_grad():
        assert torch.equal(load_model(folder)(tokens), model(tokens))
