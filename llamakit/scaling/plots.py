"""One PNG of a scaling analysis: loss against tokens per run with the fitted law, the IsoFLOP parabolas, and the
compute-optimal size against compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llamakit.errors import LlamakitError
from llamakit.files import atomic_file
from llamakit.scaling.analysis import Analysis


def plot_analysis(analysis: Analysis, png: str | Path) -> Path:
    """Write the three panels to `png` (atomically)."""
    try:
        import matplotlib
    except ImportError:
        raise LlamakitError("--plot needs matplotlib: pip install 'llamakit[scaling]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=80)
    _curves(axes[0], analysis)
    _isoflops(axes[1], analysis)
    _optimal_sizes(axes[2], analysis)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png


def _colour(n: float, sizes: np.ndarray):
    import matplotlib.pyplot as plt

    span = np.log(sizes.max() / sizes.min()) or 1.0
    return plt.cm.viridis(0.9 * np.log(n / sizes.min()) / span)


def _curves(ax, analysis: Analysis) -> None:
    """Each run's validation curve (the points fitted filled) and the law at its size."""
    fit, sizes = analysis.chinchilla, np.unique([r.n for r in analysis.runs]).astype(float)
    used = analysis.points
    for i, run in enumerate(analysis.runs):
        colour = _colour(run.n, sizes)
        ax.plot(run.tokens, run.loss, "o", color=colour, markerfacecolor="none", markersize=4, alpha=0.6)
        mine = used.run == i
        ax.plot(used.d[mine], used.loss[mine], "o", color=colour, markersize=5)
    d = np.geomspace(min(min(r.tokens) for r in analysis.runs), max(max(r.tokens) for r in analysis.runs), 100)
    for n in sizes:
        ax.plot(d, fit.loss(n, d), "-", color=_colour(n, sizes), linewidth=1, label=f"N={n:.3g}")
    ax.set(xscale="log", xlabel="tokens seen D", ylabel="validation loss",
           title=f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _isoflops(ax, analysis: Analysis) -> None:
    """Loss against N at each compute budget, its parabola in log N and the minimum."""
    import matplotlib.pyplot as plt

    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title="IsoFLOP profiles")
    ax.grid(alpha=0.3)
    profiles = analysis.profiles
    if not profiles:
        ax.text(0.5, 0.5, "no compute budget\nwith 3 sizes or more", ha="center", va="center", transform=ax.transAxes)
        return
    for i, p in enumerate(profiles):
        colour = plt.cm.plasma(0.85 * i / max(len(profiles) - 1, 1))
        ax.plot(p.n, p.loss, "o", color=colour, label=f"C={p.flops:.2g}")
        x = np.linspace(np.log(p.n[0]), np.log(p.n[-1]), 50)
        ax.plot(np.exp(x), np.polyval(p.parabola, x), "-", color=colour, linewidth=1)
        if p.n_opt is not None and p.inside:
            ax.plot(p.n_opt, np.polyval(p.parabola, np.log(p.n_opt)), "*", color=colour, markersize=11)
    ax.legend(fontsize=7)


def _optimal_sizes(ax, analysis: Analysis) -> None:
    """N_opt against C: the IsoFLOP minima and power law, and the parametric law's closed form."""
    c_all = np.concatenate([6 * analysis.points.n * analysis.points.d, analysis.options.budgets])
    flops = np.geomspace(c_all.min(), c_all.max(), 50)
    n_opt, _ = analysis.chinchilla.compute_optimal(flops)
    ax.plot(flops, n_opt, "-", color="C0", label="parametric fit (approach 3)")
    iso = analysis.isoflop
    if iso is not None:
        used = [p for p in iso.profiles if p.inside]
        ax.plot([p.flops for p in used], [p.n_opt for p in used], "*", color="C1", markersize=11,
                label="IsoFLOP minima")
        ax.plot(flops, iso.compute_optimal(flops)[0], "--", color="C1", label=f"N_opt ~ C^{iso.a:.2f} (approach 2)")
    for c in analysis.options.budgets:
        ax.axvline(c, color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="compute-optimal N",
           title="compute-optimal model size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
