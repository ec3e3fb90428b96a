"""LoRA, prefix and prompt tuning applied from outside the model: start, merge, gradients, decoding."""

import pytest
import torch

from llamakit import load_model
from llamakit.errors import ConfigError
from llamakit.model import KVCache
from llamakit.model.lora import LINEAR_NAMES, LoRAConfig, LoRALinear, apply_lora, disable_lora, merge_lora
from llamakit.model.prefix import PrefixConfig, apply_prefix_tuning, apply_prompt_tuning
from tests.helpers import hf_llama, random_tokens

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF model, its folder, tokens): a GQA model, so prefixes are sized by key/value heads."""
    hf = hf_llama(num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("base")
    hf.save_pretrained(folder)
    return hf, folder, random_tokens(hf.config.vocab_size, length=20)


def _perturb(model):
    """Move every trainable parameter away from its start, so equalities below are not trivially 0 == 0."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))


def test_lora_starts_from_the_base_model_exactly(base):
    _, folder, tokens = base
    model = load_model(folder)
    expected = model(tokens)
    wrapped = apply_lora(model, LoRAConfig(rank=4, targets=("all-linear",)))
    assert len(wrapped) == 7 * model.config.n_layers
    assert torch.equal(model(tokens), expected)  # B = 0: the update is exactly zero


def test_only_adapter_parameters_train(base):
    _, folder, tokens = base
    model = load_model(folder)
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "down_proj")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    model(tokens).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_merged_equals_unmerged(base):
    _, folder, tokens = base
    model = load_model(folder)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("all-linear",)))
    _perturb(model)
    model.eval()  # dropout off: the unmerged model is deterministic
    unmerged = model(tokens)
    assert (unmerged - load_model(folder)(tokens)).abs().max() > 0.1
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (model(tokens) - unmerged).abs().max() <= TOL


def test_disable_lora_gives_the_base_model_inside_and_the_adapted_one_outside(base):
    _, folder, tokens = base
    expected = load_model(folder)(tokens)
    model = load_model(folder)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.1, targets=("all-linear",)))
    _perturb(model)
    model.eval()
    adapted = model(tokens)
    assert (adapted - expected).abs().max() > 0.1
    with disable_lora(model):
        assert torch.equal(model(tokens), expected)  # a LoRA policy as its own reference
        with disable_lora(model):
            pass
        assert torch.equal(model(tokens), expected)  # a nested use leaves the outer one in force
    assert torch.equal(model(tokens), adapted)


def test_lora_on_a_bf16_base_trains_fp32_updates(base):
    _, folder, tokens = base
    model = load_model(folder, dtype="bf16")
    apply_lora(model, LoRAConfig(rank=4))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    model.train()
    model(tokens).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets", [("qkv",), ("lm_head",), ()])
def test_unknown_targets_are_refused(targets):
    with pytest.raises(ConfigError, match="match no projection"):
        LoRAConfig(targets=targets)


def test_targets_that_match_nothing_in_the_model(base):
    _, folder, _ = base
    model = load_model(folder)
    apply_lora(model, LoRAConfig(targets=LINEAR_NAMES))
    with pytest.raises(ConfigError, match="match no nn.Linear"):
        apply_lora(model.layers[0].self_attn.q_proj, LoRAConfig())  # a LoRALinear's own layers are not targets


def test_prompt_tuning_equals_prepending_embeddings_in_transformers(base):
    """The independent reference: transformers run on [soft prompt; token embeddings] (PEFT's definition)."""
    hf, folder, tokens = base
    model = load_model(folder)
    prompt = apply_prompt_tuning(model, PrefixConfig(num_virtual_tokens=5))
    _perturb(model)
    with torch.no_grad():
        embeds = torch.cat([prompt.embedding.expand(tokens.size(0), -1, -1), hf.model.embed_tokens(tokens)], dim=1)
        expected = hf(inputs_embeds=embeds).logits[:, 5:]
        got = model(tokens)
    assert got.shape == expected.shape and (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("apply", [apply_prefix_tuning, apply_prompt_tuning])
def test_virtual_tokens_decode_with_a_kv_cache_as_the_full_forward(base, apply):
    _, folder, tokens = base
    model = load_model(folder)
    apply(model, PrefixConfig(num_virtual_tokens=3))
    _perturb(model)
    with torch.inference_mode():
        full = model(tokens)
        cache = KVCache(model.config, tokens.size(0), 32)
        steps = [model(tokens[:, :12], cache)] + [model(tokens[:, t:t + 1], cache) for t in range(12, tokens.size(1))]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL
    assert (full - load_model(folder)(tokens)).abs().max() > 0.01  # the prefix changes the output


@pytest.mark.parametrize("apply", [apply_prefix_tuning, apply_prompt_tuning])
def test_virtual_tokens_train_and_nothing_else(base, apply):
    _, folder, tokens = base
    model = load_model(folder)
    apply(model, PrefixConfig(num_virtual_tokens=4))
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    if apply is apply_prompt_tuning:
        assert trainable == {"soft_prompt.embedding": (4, model.config.dim)}
    else:
        assert len(trainable) == 2 * model.config.n_layers
        assert set(trainable.values()) == {(model.config.kv_heads, 4, model.config.head_dim)}
    model.train()
    model(tokens).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_virtual_token_count_must_be_positive():
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PrefixConfig(num_virtual_tokens=0)
