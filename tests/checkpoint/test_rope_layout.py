"""Meta's interleaved RoPE (complex rotation of adjacent pairs) equals ours on permuted wq rows."""

import torch

from llamakit.checkpoint.meta import halves_to_interleaved, interleaved_to_halves
from llamakit.model import ModelConfig
from llamakit.model.llama import apply_rope, rope_cos_sin, rope_frequencies


def test_permutation_makes_the_two_rope_conventions_agree():
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=8, rope_theta=500000.0)
    H, D, T = config.n_heads, config.head_dim, 11
    torch.manual_seed(0)
    w_meta, x = torch.randn(H * D, config.dim, dtype=torch.float64), torch.randn(T, config.dim, dtype=torch.float64)
    inv_freq = rope_frequencies(config).double()

    # Meta's convention: (q[2i], q[2i+1]) is the complex number rotated by e^{i * pos * freq_i}.
    q = (x @ w_meta.T).view(T, H, D // 2, 2)
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * inv_freq)
    meta_rotated = torch.view_as_real(torch.view_as_complex(q) * rotation[:, None, :])  # (T, H, D/2, 2)
    meta_as_halves = meta_rotated.transpose(2, 3).reshape(T, H, D)  # reals first, then imaginaries

    # Ours: the same weights permuted once, then the rotate-half formula.
    ours = (x @ interleaved_to_halves(w_meta, H).T).view(1, T, H, D).transpose(1, 2)  # (1, H, T, D)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(T), torch.float64)
    ours_rotated = apply_rope(ours, cos, sin)[0].transpose(0, 1)  # (T, H, D)

    assert torch.allclose(ours_rotated, meta_as_halves, atol=1e-12)
    assert torch.equal(halves_to_interleaved(interleaved_to_halves(w_meta, H), H), w_meta)
