"""Adapters in PEFT's format: peft loads ours onto the transformers model with the same logits, and back."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamakit import load_model
from llamakit.checkpoint.peft import load_adapter, save_adapter
from llamakit.cli import main
from llamakit.errors import CheckpointError
from llamakit.model.lora import LoRAConfig, apply_lora, merge_lora
from llamakit.model.prefix import PrefixConfig, apply_prefix_tuning, apply_prompt_tuning
from tests.helpers import hf_llama, random_tokens

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

TOL = 1e-4
ARCH = dict(num_attention_heads=4, num_key_value_heads=2)
METHODS = {
    "lora": (apply_lora, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))),
    "prefix": (apply_prefix_tuning, PrefixConfig(num_virtual_tokens=4)),
    "prompt": (apply_prompt_tuning, PrefixConfig(num_virtual_tokens=4)),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    hf_llama(**ARCH).save_pretrained(folder)
    return folder


def _trained_adapter(base, method, folder):
    """A model carrying a perturbed (as if trained) adapter, saved to folder in PEFT's format."""
    apply, cfg = METHODS[method]
    model = load_model(base)
    apply(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    save_adapter(folder, model, cfg, base=str(base))
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_loads_our_adapter_with_the_same_logits(base, method, tmp_path):
    model = _trained_adapter(base, method, tmp_path / "adapter")
    tokens = random_tokens(128, length=16)
    with torch.no_grad():
        ours = model(tokens)
        reference = peft.PeftModel.from_pretrained(hf_llama(**ARCH), tmp_path / "adapter").eval()
        theirs = reference(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[:, -tokens.size(1):]
        plain = load_model(base)(tokens)
    assert (ours - plain).abs().max() > 0.1  # the adapter matters
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("method", list(METHODS))
def test_reloading_an_adapter_gives_the_same_model(base, method, tmp_path):
    model = _trained_adapter(base, method, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method]
    reloaded = load_model(base)
    assert load_adapter(reloaded, tmp_path / "adapter") == method
    tokens = random_tokens(128, length=12)
    with torch.no_grad():
        assert (reloaded(tokens) - model.eval()(tokens)).abs().max() <= TOL


def test_lora_keys_are_peft_names(base, tmp_path):
    _trained_adapter(base, "lora", tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 3 * 2  # A and B, 3 targets, 2 layers


def test_an_adapter_written_by_peft_loads(base, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(hf_llama(**ARCH), config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    model = load_model(base)
    load_adapter(model, tmp_path / "theirs")
    tokens = random_tokens(128, length=12)
    with torch.no_grad():
        assert (model(tokens) - theirs(input_ids=tokens).logits).abs().max() <= TOL


def test_an_adapter_for_another_base_is_refused(base, tmp_path):
    _trained_adapter(base, "lora", tmp_path / "adapter")
    other = tmp_path / "other"
    hf_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2).save_pretrained(other)
    with pytest.raises(CheckpointError, match=r"different base model \(dim=64 \(this model: 32\)"):
        load_adapter(load_model(other), tmp_path / "adapter")


def test_shape_checks_catch_an_adapter_without_our_metadata(base, tmp_path):
    _trained_adapter(base, "lora", tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(weights)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[name] = torch.zeros(4, 48)
    save_file(state, weights)  # no llamakit metadata, as PEFT writes it
    with pytest.raises(CheckpointError, match="has shape"):
        load_adapter(load_model(base), tmp_path / "adapter")


@pytest.mark.parametrize("problem", ["no config", "unknown type", "missing weights"])
def test_malformed_adapter_folders(base, tmp_path, problem):
    _trained_adapter(base, "lora", tmp_path / "adapter")
    if problem == "no config":
        (tmp_path / "adapter" / "adapter_config.json").unlink()
        match = "no adapter_config.json"
    elif problem == "unknown type":
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
        match = "'IA3' is not supported"
    else:
        (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
        match = "cannot read the adapter weights"
    with pytest.raises(CheckpointError, match=match):
        load_adapter(load_model(base), tmp_path / "adapter")


def test_merge_command_writes_a_plain_model_equal_to_the_unmerged_one(base, tmp_path, capsys):
    model = _trained_adapter(base, "lora", tmp_path / "adapter").eval()
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 0
    tokens = random_tokens(128, length=12)
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(tokens) - model(tokens)).abs().max() <= TOL
        assert (merge_lora(model)(tokens) - model(tokens)).abs().max() == 0


def test_merge_refuses_prefix_adapters(base, tmp_path, capsys):
    _trained_adapter(base, "prefix", tmp_path / "adapter")
    code = main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 1 and "only LoRA updates fold into the weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("output", ["adapter", "base", "adapter/merged"])
def test_merge_refuses_to_write_over_or_into_its_inputs(base, tmp_path, capsys, output):
    _trained_adapter(base, "lora", tmp_path / "adapter")
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "adapter").iterdir())
    target = {"base": base}.get(output, tmp_path / output)
    code = main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(target),
                 "--force"])
    err = capsys.readouterr().err
    assert code == 1 and "choose an output path outside it" in err and len(err.strip().splitlines()) == 1
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "adapter").iterdir()) == before
