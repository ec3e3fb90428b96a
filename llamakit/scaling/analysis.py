"""Both fits on a set of runs, their bootstrap intervals, compute-optimal sizes and predictions, as one report."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from llamakit.errors import DataError
from llamakit.scaling.fit import (
    ChinchillaFit,
    IsoFlopFit,
    IsoFlopProfile,
    bootstrap,
    fit_chinchilla,
    fit_isoflop,
    interval,
    isoflop_profiles,
)
from llamakit.scaling.runs import Points, RunCurve, scaling_points

log = logging.getLogger(__name__)
RESAMPLE = ("runs", "points")


@dataclass
class FitOptions:
    points: str = "final"  # each run's final evaluation, or every evaluation ("all")
    bootstrap: int = 100  # resamples for the intervals (0: none)
    resample: str = "runs"  # what a resample draws with replacement: whole runs (their points are correlated), or points
    level: float = 0.9  # the central interval reported
    width: float = 0.1  # IsoFLOP groups: points within this many decades of compute
    budgets: list[float] = field(default_factory=list)  # compute budgets (FLOPs) to size a model for
    predict: list[tuple[float, float]] = field(default_factory=list)  # (N, D) pairs to predict the loss of
    refine: int = 8  # L-BFGS runs from the best grid starts
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE:
            raise DataError(f"--resample {self.resample!r}; choose one of {', '.join(RESAMPLE)}")
        if not 0 < self.level < 1:
            raise DataError(f"--level must be in (0, 1), got {self.level}")
        if self.bootstrap < 0 or self.width <= 0:
            raise DataError("--bootstrap must be >= 0 and --width positive")


@dataclass
class Analysis:
    runs: list[RunCurve]
    points: Points
    chinchilla: ChinchillaFit
    chinchilla_samples: list[dict[str, float]]
    profiles: list[IsoFlopProfile]  # every compute group with 3 sizes, used by the IsoFLOP fit or not
    isoflop: IsoFlopFit | None
    isoflop_error: str | None
    isoflop_samples: list[dict[str, float]]
    options: FitOptions


def analyse(runs: list[RunCurve], opts: FitOptions) -> Analysis:
    """The parametric (approach 3) and IsoFLOP (approach 2) fits, each with `opts.bootstrap` refits on resamples."""
    unfinished = [r.name for r in runs if not r.finished]
    if unfinished and opts.points == "final":
        log.warning("runs not finished (their last loss is mid-schedule, too high for its tokens): %s",
                    ", ".join(unfinished))
    points = scaling_points(runs, opts.points)
    chinchilla = fit_chinchilla(points.n, points.d, points.loss, refine=opts.refine)
    groups = points.groups(opts.resample)

    def refit_chinchilla(index: np.ndarray) -> dict[str, float]:
        p = points.take(index)
        return fit_chinchilla(p.n, p.d, p.loss, refine=opts.refine).constants()

    def refit_isoflop(index: np.ndarray) -> dict[str, float]:
        p = points.take(index)
        fit = fit_isoflop(p.n, p.d, p.loss, opts.width)
        return {"a": fit.a, "b": fit.b, "k_n": fit.k_n, "k_d": fit.k_d}

    samples = bootstrap(groups, refit_chinchilla, opts.bootstrap, opts.seed)
    try:
        isoflop, iso_error = fit_isoflop(points.n, points.d, points.loss, opts.width), None
        iso_samples = bootstrap(groups, refit_isoflop, opts.bootstrap, opts.seed)
    except DataError as e:
        isoflop, iso_error, iso_samples = None, str(e), []
    profiles = isoflop_profiles(points.n, points.d, points.loss, opts.width)
    return Analysis(runs, points, chinchilla, samples, profiles, isoflop, iso_error, iso_samples, opts)


def report(analysis: Analysis) -> dict:
    """Everything the fits found, JSON-ready: constants with intervals, budgets, predictions, the runs used."""
    opts, fit = analysis.options, analysis.chinchilla
    bounds = _bounds(analysis.chinchilla_samples, fit.constants(), opts.level)
    result = {
        "options": asdict(opts),
        "runs": [{"path": str(r.path), "n": r.n, "max_steps": r.max_steps, "finished": r.finished,
                  "tokens": r.tokens[-1], "loss": r.loss[-1]} for r in analysis.runs],
        "points": len(analysis.points.n),
        "chinchilla": {"constants": fit.constants(), "interval": bounds, "huber_objective": fit.objective,
                       "bootstrap_fits": len(analysis.chinchilla_samples)},
        "budgets": [_budget(analysis, c) for c in opts.budgets],
        "predictions": [_prediction(analysis, n, d) for n, d in opts.predict],
    }
    result["isoflop"] = {"profiles": [asdict(p) for p in analysis.profiles]}
    if analysis.isoflop is None:
        result["isoflop"]["error"] = analysis.isoflop_error
    else:
        iso = analysis.isoflop
        constants = {"a": iso.a, "b": iso.b, "k_n": iso.k_n, "k_d": iso.k_d}
        result["isoflop"] |= {"constants": constants, "bootstrap_fits": len(analysis.isoflop_samples),
                              "interval": _bounds(analysis.isoflop_samples, constants, opts.level)}
    return result


def _bounds(samples: list[dict[str, float]], constants: dict[str, float], level: float) -> dict:
    return {k: interval(samples, k, level) for k in constants}


def _fits(analysis: Analysis) -> list[ChinchillaFit]:
    return [ChinchillaFit(**s, objective=0.0) for s in analysis.chinchilla_samples]


def _spread(values: list[float], level: float) -> list[float] | None:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return None
    return [float(x) for x in np.percentile(values, [50 * (1 - level), 50 * (1 + level)])]


def _budget(analysis: Analysis, flops: float) -> dict:
    """The compute-optimal N and D for a budget, by the parametric law (and by the IsoFLOP power law)."""
    n_opt, d_opt = (float(x) for x in analysis.chinchilla.compute_optimal(flops))
    level = analysis.options.level
    samples = [f.compute_optimal(flops) for f in _fits(analysis)]
    entry = {"flops": flops, "n_opt": n_opt, "d_opt": d_opt, "tokens_per_param": d_opt / n_opt,
             "loss": float(analysis.chinchilla.loss(n_opt, d_opt)),
             "n_opt_interval": _spread([float(n) for n, _ in samples], level),
             "d_opt_interval": _spread([float(d) for _, d in samples], level)}
    if analysis.isoflop is not None:
        iso_n, iso_d = analysis.isoflop.compute_optimal(flops)
        entry |= {"isoflop_n_opt": float(iso_n), "isoflop_d_opt": float(iso_d)}
    return entry


def _prediction(analysis: Analysis, n: float, d: float) -> dict:
    """The law's loss for N parameters on D tokens, and how D compares with the compute-optimal D at C = 6ND
    (Llama 3's 8B: about 15T tokens, far beyond its compute-optimal ~0.2T, and still improving)."""
    fit, level = analysis.chinchilla, analysis.options.level
    _, d_opt = fit.compute_optimal(6 * n * d)
    return {"n": n, "d": d, "flops": 6 * n * d, "loss": float(fit.loss(n, d)),
            "loss_interval": _spread([float(f.loss(n, d)) for f in _fits(analysis)], level),
            "d_over_d_opt": float(d / d_opt)}
