"""The CPU inference kernels (generate/cpu_linear.py): OpenBLAS for one row, oneDNN for more, on row-major fp32
weights, with torch on one thread around a one-token forward; chosen by timing or by LLAMAKIT_CPU_LINEAR."""

import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_info

from llamakit import ModelConfig, Transformer, load_model, save_model
from llamakit.errors import ConfigError, LlamakitError
from llamakit.generate import SamplingParams, cpu_linear, generate, prepare_for_decoding
from llamakit.generate.compiled import CompiledDecode
from llamakit.model import KVCache
from llamakit.model.llama import TiedHead

GREEDY = SamplingParams(temperature=0)
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=64)


@pytest.fixture
def every_product(monkeypatch):
    """Send even a small model's products to OpenBLAS/oneDNN (normally only weights of SMALL_BYTES or more)."""
    monkeypatch.setattr(cpu_linear, "SMALL_BYTES", 0)


def decisive(tied: bool) -> Transformer:
    """A small model whose greedy choices are far from ties, so any two correct kernels pick the same tokens."""
    torch.manual_seed(0)
    model = Transformer(CONFIG.replace(tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("shape", [(1, 288), (1, 1, 288), (3, 288), (2, 5, 288), (300, 288)])
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_products_match_f_linear(shape, mode):
    torch.manual_seed(0)
    weight, x = torch.randn(1024, 288), torch.randn(shape)  # 1.2 MB: past SMALL_BYTES
    with mode():
        ours = cpu_linear.linear(x, weight)
    assert ours.shape == (*shape[:-1], 1024) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, F.linear(x, weight), rtol=1e-5, atol=1e-4)  # fp32 sums in another order
    small = weight[:128]  # 0.15 MB: F.linear's own result
    with mode():
        assert torch.equal(cpu_linear.linear(x, small), F.linear(x, small))


def test_autograd_goes_through_f_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False)
    ours = torch.nn.Linear(32, 16, bias=False)
    ours.load_state_dict(layer.state_dict())
    ours.__class__ = cpu_linear.CpuLinear
    x = torch.randn(1, 32)
    layer(x).square().sum().backward()
    ours(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, layer.weight.grad)


@pytest.mark.parametrize("tied", [True, False])
def test_rowwise_keeps_values_outputs_and_saving(cpu_kernel, every_product, tmp_path, tied):
    cpu_kernel("rowwise")
    model = decisive(tied)
    prompts = [[1, 5, 9, 33, 7], [1, 400]]
    before = [c.tokens for c in generate(model, None, prompts, 12, GREEDY, stop_ids=frozenset())]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_for_decoding(model) is model and prepare_for_decoding(model) is model  # idempotent
    assert type(model.layers[0].mlp.up_proj) is cpu_linear.CpuLinear
    assert isinstance(model.lm_head, TiedHead) == tied
    assert type(model.lm_head) is (cpu_linear.CpuTiedHead if tied else cpu_linear.CpuLinear)
    assert all(p.is_contiguous() for p in model.parameters())  # row-major
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [c.tokens for c in generate(model, None, prompts, 12, GREEDY, stop_ids=frozenset())] == before
    save_model(model, tmp_path / "saved", "llamakit")
    assert all(torch.equal(state[k], v) for k, v in load_model(tmp_path / "saved").state_dict().items())


def test_mkl_choice_keeps_column_major_layout(cpu_kernel):
    cpu_kernel("mkl")
    model = prepare_for_decoding(decisive(tied=True))
    assert type(model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not model.layers[0].mlp.up_proj.weight.is_contiguous()  # column-major


def test_bf16_weights_are_left_alone(cpu_kernel):
    cpu_kernel("rowwise")
    model = prepare_for_decoding(decisive(tied=False).to(torch.bfloat16))
    assert type(model.layers[0].mlp.up_proj) is torch.nn.Linear


def _openblas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["internal_api"] == "openblas"}


def test_torch_runs_one_thread_in_a_one_token_forward_only(cpu_kernel, every_product):
    cpu_kernel("rowwise")
    model = prepare_for_decoding(decisive(tied=True))
    seen = []
    model.layers[0].register_forward_hook(lambda *_: seen.append((torch.get_num_threads(), _openblas_threads())))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cache = KVCache.for_model(model, 1, 8)
        with torch.inference_mode():
            model(torch.tensor([[1, 5, 9]]), cache, [0])  # prefill: torch keeps its threads
            model(torch.tensor([[4]]), cache, [0])  # one token: torch on one thread, OpenBLAS on two
            assert torch.get_num_threads() == 2
            model(torch.tensor([[4]] * 4), KVCache.for_model(model, 4, 8), [0, 1, 2, 3])  # four rows: oneDNN
            with pytest.raises(LlamakitError, match="overflow"):
                for _ in range(8):
                    model(torch.tensor([[4]]), cache, [0])
        assert torch.get_num_threads() == 2  # given back after the error too
        assert seen[:3] == [(2, seen[0][1]), (1, {2}), (2, seen[2][1])]
    finally:
        torch.set_num_threads(threads)


def test_compiled_step_matches_eager(cpu_kernel, every_product):
    cpu_kernel("rowwise")
    model = prepare_for_decoding(decisive(tied=True))
    prompts = [[1, 5, 9, 33, 7]]
    eager = generate(model, None, prompts, 12, GREEDY, stop_ids=frozenset())
    ours = generate(model, None, prompts, 12, GREEDY, stop_ids=frozenset(), compiled=CompiledDecode(model))
    assert [c.tokens for c in ours] == [c.tokens for c in eager]


def test_a_bad_choice_is_refused(cpu_kernel):
    cpu_kernel("openblas")
    with pytest.raises(ConfigError, match="LLAMAKIT_CPU_LINEAR='openblas' is not a CPU kernel choice; use rowwise"):
        cpu_linear.use_rowwise()


def test_timing_picks_a_kernel(monkeypatch, cpu_kernel, caplog):
    monkeypatch.delenv(cpu_linear.ENV, raising=False)
    with caplog.at_level("INFO", logger="llamakit.generate.cpu_linear"):
        rowwise = cpu_linear.use_rowwise()
    assert ("uses OpenBLAS and oneDNN" if rowwise else "uses MKL") in caplog.text
    assert "CPU matrix-vector product: OpenBLAS" in caplog.text
