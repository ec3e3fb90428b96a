"""Our forward pass equals transformers.LlamaForCausalLM on tiny random models, through every load path."""

import pytest
import torch

from llamakit import load_model, save_model
from llamakit.errors import CheckpointError
from tests.helpers import hf_llama, hf_logits, random_tokens

TOL = 1e-4
SCALED_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=101),  # odd vocab: width-split embedding
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    # positions up to 96 go far beyond the original 16-token context, where the scaling matters
    "scaled_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=SCALED_ROPE),
    "tied": dict(tie_word_embeddings=True),
    # Meta's rule with ffn_dim_multiplier=1.3, multiple_of=32 on dim 64: int(1.3 * 170) = 221 -> 224
    "ffn_dim_multiplier": dict(intermediate_size=224, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory):
    """(name, HF model, its saved folder, tokens, HF logits) for one architecture variant."""
    hf = hf_llama(**VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(folder)
    length = 96 if request.param == "scaled_rope" else 24
    tokens = random_tokens(hf.config.vocab_size, length=length)
    return request.param, hf, folder, tokens, hf_logits(hf, tokens)


def test_hf_path(reference):
    name, _, folder, tokens, expected = reference
    model = load_model(folder)
    with torch.no_grad():
        got = model(tokens)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_meta_path(reference, shards, tmp_path):
    name, hf, folder, tokens, expected = reference
    if hf.config.num_key_value_heads % shards:  # e.g. MQA: one KV head cannot be split (nor can Meta's code)
        with pytest.raises(CheckpointError, match=f"cannot split this model into {shards} shards"):
            save_model(load_model(folder), tmp_path / "meta", "meta", shards=shards)
        assert not (tmp_path / "meta").exists()
        return
    save_model(load_model(folder), tmp_path / "meta", "meta", shards=shards)
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == shards
    model = load_model(tmp_path / "meta")
    with torch.no_grad():
        assert (model(tokens) - expected).abs().max().item() <= TOL
    assert model.config.tie_word_embeddings == (name == "tied")


def test_ffn_dim_multiplier_matches_meta_rule():
    from llamakit import ModelConfig
    config = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=8, multiple_of=32, ffn_dim_multiplier=1.3)
    assert config.ffn_hidden_dim == VARIANTS["ffn_dim_multiplier"]["intermediate_size"]


def test_scaled_rope_changes_long_positions(tmp_path):
    """Guard against a silently ignored rope_scaling: plain RoPE must differ beyond the original context."""
    hf = hf_llama(**VARIANTS["scaled_rope"])
    hf.save_pretrained(tmp_path)
    tokens = random_tokens(hf.config.vocab_size, length=96)
    model = load_model(tmp_path)
    model.config = model.config.replace(use_scaled_rope=False)
    model.init_buffers()
    with torch.no_grad():
        assert (model(tokens) - hf_logits(hf, tokens)).abs().max().item() > 1e-2


def test_transformers_v4_config_schema(tmp_path):
    """transformers v5 writes rope_parameters; v4 (and most hub files) write rope_theta + rope_scaling."""
    import json

    hf = hf_llama(**VARIANTS["scaled_rope"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {**config.pop("rope_scaling"), "rope_theta": config.pop("rope_theta")}
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = random_tokens(hf.config.vocab_size, length=96)
    with torch.no_grad():
        assert (load_model(tmp_path)(tokens) - hf_logits(hf, tokens)).abs().max().item() <= TOL
