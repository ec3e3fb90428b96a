"""Loading with transforms: module swaps on the meta device, tensors of their own dtype and shape, and a checkpoint
that records its transforms and loads back through them."""

import copy
import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from torch import nn

from llamakit import load_model, save_model
from llamakit.checkpoint.transforms import Transform, apply_transforms, register
from llamakit.errors import CheckpointError
from llamakit.model import ModelConfig, Transformer
from tests.helpers import random_tokens


class HalfLinear(nn.Module):
    """A bias-free Linear holding its weight in fp16, optionally transposed to (in, out): a stand-in for a
    quantized layer, whose stored tensors differ from the plain model's in dtype and shape."""

    def __init__(self, linear: nn.Linear, transposed: bool):
        super().__init__()
        weight = linear.weight.detach().to(torch.float16)
        self.transposed = transposed
        self.weight = nn.Parameter(weight.t().contiguous() if transposed else weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        return x @ weight if self.transposed else x @ weight.t()  # (..., out)


@register
@dataclasses.dataclass(frozen=True)
class HalfMLP(Transform):
    """Every MLP projection becomes a HalfLinear."""

    name: ClassVar[str] = "test-half-mlp"
    transposed: bool = True

    def __call__(self, model: Transformer) -> Transformer:
        for block in model.layers:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                setattr(block.mlp, proj, HalfLinear(getattr(block.mlp, proj), self.transposed))
        return model

    def owned(self, model: Transformer) -> dict[str, torch.dtype]:
        return {f"{n}.weight": torch.float16 for n, m in model.named_modules() if isinstance(m, HalfLinear)}


@pytest.fixture(scope="module")
def plain() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, hidden_dim=48, max_seq_len=64))
    model.init_weights()
    return model.eval().requires_grad_(False)


def logits(model: Transformer) -> torch.Tensor:
    return model(random_tokens(64, batch=2, length=12))


def test_a_transformed_model_records_its_transforms_and_loads_back_through_them(plain, tmp_path):
    transformed = apply_transforms(copy.deepcopy(plain), [HalfMLP()])
    save_model(transformed, tmp_path / "ckpt")
    block = json.loads((tmp_path / "ckpt" / "config.json").read_text())["llamakit"]
    assert block["transforms"] == [{"name": "test-half-mlp", "transposed": True}]

    for dtype in (None, torch.bfloat16):
        loaded = load_model(tmp_path / "ckpt", dtype=dtype)
        gate = loaded.layers[0].mlp.gate_proj
        assert isinstance(gate, HalfLinear) and gate.weight.shape == (32, 48)  # transposed: not the plain (48, 32)
        assert gate.weight.dtype == torch.float16  # owned by the transform: never cast to the model's dtype
        assert loaded.embed_tokens.weight.dtype == (dtype or torch.float32)
    loaded = load_model(tmp_path / "ckpt")
    torch.testing.assert_close(logits(loaded), logits(transformed), rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded), logits(plain), rtol=1e-2, atol=1e-2)  # fp16 weights
    assert not torch.equal(logits(loaded), logits(plain))


def test_given_transforms_run_on_the_meta_model_and_cast_what_they_own(plain, tmp_path):
    save_model(plain, tmp_path / "plain")
    seen = []

    class Spy(HalfMLP):
        def __call__(self, model):
            seen.append(model.embed_tokens.weight.is_meta)
            return super().__call__(model)

    loaded = load_model(tmp_path / "plain", transforms=[Spy(transposed=False)])
    assert seen == [True]
    assert loaded.layers[1].mlp.down_proj.weight.dtype == torch.float16
    assert loaded.layers[1].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(logits(loaded), logits(plain), rtol=1e-2, atol=1e-2)
    with pytest.raises(CheckpointError, match=r"weight layers\.0\.mlp\.gate_proj\.weight has shape \(48, 32\) but"):
        load_model(tmp_path / "plain", transforms=[HalfMLP(transposed=True)])  # checked against the new shapes


def test_a_given_transform_converts_the_stored_tensors_it_replaces(plain, tmp_path):
    save_model(plain, tmp_path / "plain")

    class Converting(HalfMLP):
        def convert(self, model, state):  # the plain checkpoint stores (out, in); this layer holds (in, out)
            return {k: v.t() if k in self.owned(model) else v for k, v in state.items()}

    loaded = load_model(tmp_path / "plain", transforms=[Converting(transposed=True)])
    assert loaded.layers[0].mlp.gate_proj.weight.shape == (32, 48)
    torch.testing.assert_close(logits(loaded), logits(plain), rtol=1e-2, atol=1e-2)


def test_an_unknown_transform_or_a_foreign_format_is_refused(plain, tmp_path):
    transformed = apply_transforms(copy.deepcopy(plain), [HalfMLP()])
    with pytest.raises(CheckpointError, match="transformed \\(test-half-mlp\\).*format 'llamakit'"):
        save_model(transformed, tmp_path / "hf", "hf")
    save_model(transformed, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["llamakit"]["transforms"] = [{"name": "int3-dreams"}]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="transform 'int3-dreams', which is not registered here.*import"):
        load_model(tmp_path / "ckpt")
