"""Properties of the model itself: presets, KV cache, causality, dtypes, meta-device construction."""

import copy

import pytest
import torch

from llamakit import ModelConfig, Transformer
from llamakit.errors import ConfigError, LlamakitError
from llamakit.model import PRESETS, KVCache

PUBLISHED = {  # parameter counts as published (model cards / papers)
    "llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672, "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824,
}
TINY = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    config = ModelConfig.from_preset(name)
    assert config.num_params() == PUBLISHED[name]
    with torch.device("meta"):  # the real module agrees with the formula, at no memory cost
        assert Transformer(config).num_params() == PUBLISHED[name]


def test_tinyllamas_presets_match_their_files():
    # llama2.c v0 file size = 28-byte header + 4 * (params + RoPE tables); stories260K.bin is 1,056,540 bytes
    c = PRESETS["stories260k"]
    assert 28 + 4 * (c.num_params() + c.max_seq_len * c.head_dim) == 1_056_540
    assert [PRESETS[n].ffn_hidden_dim for n in ("stories260k", "stories15m", "stories42m", "stories110m")] == [
        172, 768, 1376, 2048]


def test_every_published_size_has_a_preset():
    assert set(PUBLISHED) | {"stories260k", "stories15m", "stories42m", "stories110m"} == set(PRESETS)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("llama4-8b")


def test_llama32_rope_scaling_factor():
    assert ModelConfig.from_preset("llama3.2-1b").rope_scaling.factor == 32.0
    assert ModelConfig.from_preset("llama3.1-8b").rope_scaling.factor == 8.0


def test_invalid_configs_are_rejected():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=3, vocab_size=10)
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**TINY.to_dict(), "n_expert": 8})


def _model(config=TINY, seed=0):
    torch.manual_seed(seed)
    return Transformer(config).eval()


def test_kv_cache_decoding_equals_full_forward():
    model, tokens = _model(), torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, max_slots=3)
        prefill = model(tokens[:, :7], cache)  # prompt
        chunk = model(tokens[:, 7:12], cache)  # several tokens after a cached prefix
        steps = [model(tokens[:, t:t + 1], cache) for t in range(12, 20)]  # one at a time
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    assert (cached - full).abs().max().item() < 1e-5


def test_causality():
    model, tokens = _model(), torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_cache_overflow_is_a_clear_error():
    model = _model()
    cache = KVCache(model.config, max_slots=1, max_seq_len=8)
    with pytest.raises(LlamakitError, match="KV cache overflow"):
        model(torch.zeros(1, 9, dtype=torch.long), cache)
    assert cache.lengths == [0]  # a refused forward appends nothing
    assert model(torch.zeros(1, 9, dtype=torch.long)).shape == (1, 9, 97)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    model, tokens = _model(), torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
        half = model.to(dtype)(tokens)
    assert half.dtype == torch.float32  # logits are returned in fp32 whatever the weights' dtype
    assert (half - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_meta_device_then_materialise():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("llama3.1-405b"))  # 405B parameters, no memory
    assert model.embed_tokens.weight.is_meta
    with torch.device("meta"):
        tiny = Transformer(TINY)
    tiny.to_empty(device="cpu")
    tiny.init_weights()
    assert torch.isfinite(tiny(torch.zeros(1, 4, dtype=torch.long))).all()


class DoubledHead(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, h):
        return 2 * self.head(h)


def test_tied_embeddings_share_one_matrix():
    model = _model(TINY.replace(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight and "lm_head.weight" not in model.state_dict()
    assert copy.deepcopy(model).lm_head.weight is not model.embed_tokens.weight  # a copy ties to its own embedding


def test_the_output_head_is_a_module_that_can_be_swapped():
    """Quantization and tensor parallelism replace the head from outside; tied models included."""
    for tied in (False, True):
        model, tokens = _model(TINY.replace(tie_word_embeddings=tied)), torch.randint(0, 97, (1, 5))
        with torch.no_grad():
            expected = 2 * model(tokens)
            model.lm_head = DoubledHead(model.lm_head)
            assert torch.equal(model(tokens), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    model, tokens = _model(), torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
        got = model.to("cuda", dtype)(tokens.cuda()).cpu()
    assert (got - ref).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.1 * ref.abs().max().item())


def test_rope_frequencies_stay_fp32_after_casting_the_model():
    from llamakit.model.llama import rope_frequencies

    model = Transformer(ModelConfig.from_preset("stories260k").replace(rope_theta=500000.0)).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_frequencies(model.config))
