"""Everything a user can get wrong with a checkpoint gives an error naming the file and the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamakit import ModelConfig, Transformer, load_model, save_model
from llamakit.checkpoint import load_checkpoint, load_config
from llamakit.errors import CheckpointError, TokenizerError


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=512, hidden_dim=48))
    return save_model(model, tmp_path / "ckpt", "hf")


def _edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_model(tmp_path)


def test_config_without_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(folder)


def test_missing_weight(folder):
    _edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights model\.layers\.1|missing weights layers\.1"):
        load_model(folder)


def test_unknown_weight(folder):
    _edit_weights(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(48, 32)}))
    with pytest.raises(CheckpointError, match="unknown weights layers.2"):
        load_model(folder)


def test_shape_mismatch_names_the_weight(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight has shape \(48, 32\) but the config implies \(64, 32\)"):
        load_model(folder)


def test_damaged_files(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(folder)


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_unsupported_architectures(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="model_type 'mistral' is not supported"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match="'yarn' is not supported"):
        load_model(folder)


def _meta_shards(folder, out, shards):
    return save_model(load_model(folder), out, "meta", shards=shards)


@pytest.mark.parametrize("shards, damage, message", [
    (2, {"00": None}, r"consolidated\.00\.pth is missing \(the weights are split into 2 shards\)"),
    (2, {"01": None}, r"consolidated\.01\.pth is missing \(the weights are split into 2 shards\)"),
    (4, {"01": None, "03": None}, r"consolidated\.01\.pth, consolidated\.03\.pth are missing"),
    (2, {"01": "00"}, r"consolidated\.01\.pth: holds the same weights as consolidated\.00\.pth"),
    (4, {"03": "01"}, r"consolidated\.03\.pth: holds the same weights as consolidated\.01\.pth"),
    (2, {"02": "01"}, r"consolidated\.02\.pth not part of this checkpoint, whose weights are split into 2 shards"),
    (2, {"01": "4:01"}, r"pieces of tok_embeddings\.weight do not fit together \(\(512, 16\) torch\.float32 in "
                        r"consolidated\.00\.pth, \(512, 8\) torch\.float32 in consolidated\.01\.pth\)"),
])
def test_meta_shards_missing_copied_or_mixed(tmp_path, folder, shards, damage, message):
    """A shard deleted, copied over another, or taken from another split is named, not blamed on the config."""
    meta, other = _meta_shards(folder, tmp_path / "meta", shards), _meta_shards(folder, tmp_path / "other", 4)
    for rank, source in damage.items():
        target = meta / f"consolidated.{rank}.pth"
        if source is None:
            target.unlink()
        else:
            home, _, source = source.rpartition(":")
            shutil.copy((other if home else meta) / f"consolidated.{source}.pth", target)
    for read in (load_model, load_config):
        with pytest.raises(CheckpointError, match=message):
            read(meta)


@pytest.mark.parametrize("dim", [16, 40, 96, 128])
def test_a_params_json_that_does_not_fit_the_shards_is_blamed(tmp_path, folder, dim):
    meta = _meta_shards(folder, tmp_path / "meta", 2)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "dim": dim}))
    with pytest.raises(CheckpointError, match=rf"params\.json: dim={dim}, but the weights are 32 wide \(layers\.0\."
                                              r"attention\.wq\.weight is 16 x 32\); this params\.json belongs to"):
        load_model(meta)


def test_meta_shard_count_that_does_not_divide_names_the_sizes(tmp_path):
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=96))
    with pytest.raises(CheckpointError) as error:
        save_model(model, tmp_path / "m", "meta", shards=3)
    assert str(error.value) == (
        "cannot split this model into 3 shards: 3 does not divide n_heads=8, n_kv_heads=4, vocab_size=512 or "
        "dim=64 (the embedding is split along one); shard counts that divide them all: 1, 2, 4")
    assert not (tmp_path / "m").exists()


def test_pickled_objects_are_refused(tmp_path, folder):
    save_model(load_model(folder), tmp_path / "meta", "meta")
    torch.save({"tok_embeddings.weight": torch.zeros(2), "evil": object()}, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="only plain tensor state dicts"):
        load_model(tmp_path / "meta")


def test_tokenizer_vocab_mismatch(folder, assets):
    shutil.copy(assets / "llama2" / "tokenizer.model", folder / "tokenizer.model")  # 32000 tokens, model has 512
    with pytest.raises(TokenizerError, match="32000"):
        load_checkpoint(folder)
    with pytest.raises(TokenizerError, match="32000"):
        save_model(load_model(folder), folder.parent / "out", tokenizer=folder / "tokenizer.model")
    assert not (folder.parent / "out").exists()


def test_matching_tokenizer_is_found_and_copied(folder, assets, tmp_path):
    model, tok = load_checkpoint(folder, tokenizer=assets / "tinyllamas" / "tok512.model")
    save_model(model, tmp_path / "out", tokenizer=tok)
    _, found = load_checkpoint(tmp_path / "out")
    assert found.vocab_size == 512 and found.path.name == "tokenizer.model"


def test_failed_write_leaves_nothing(tmp_path, folder, monkeypatch):
    import llamakit.checkpoint.hf as hf

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(load_model(folder), tmp_path / "out", "hf")
    assert list(tmp_path.iterdir()) == [folder]


def test_written_files_get_the_usual_permissions(folder):
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in folder.iterdir())  # not safetensors' 0600


def test_llama32_scaling_factor_is_inferred_from_metas_params(tmp_path):
    from llamakit.checkpoint.meta import config_from_params

    for preset in ("llama3.2-1b", "llama3.1-8b"):  # Meta's 3.2 params.json carry no scaling factor
        c = ModelConfig.from_preset(preset)
        (tmp_path / "params.json").write_text(json.dumps({
            "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
            "vocab_size": c.vocab_size, "multiple_of": c.multiple_of, "ffn_dim_multiplier": c.ffn_dim_multiplier,
            "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "use_scaled_rope": True}))
        assert config_from_params(tmp_path).rope_scaling == c.rope_scaling


def test_meta_shards_that_disagree(tmp_path, folder):
    save_model(load_model(folder), tmp_path / "meta", "meta", shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    shard.pop("layers.1.ffn_norm.weight")
    torch.save(shard, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: holds different weights"):
        load_model(tmp_path / "meta")
