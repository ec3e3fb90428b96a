"""Scaling-law fits on (N, D, loss) points: Hoffmann et al. (2022) "Training Compute-Optimal Large Language Models".

- Approach 3 (§3.3, Appendix D.2): the parametric loss L(N, D) = E + A/N^alpha + B/D^beta, fitted by minimising the
  Huber loss (delta = 1e-3) of log L, written as log L = LSE(a - alpha log N, b - beta log D, e) with
  a, b, e = log A, log B, log E, by L-BFGS from a grid of initialisations.
- Approach 2 (§3.2): IsoFLOP profiles. Points of about the same compute C = 6ND are grouped, a parabola in log N is
  fitted to each group's losses, its minimum is that budget's N_opt, and N_opt = k C^a is fitted in log space.
Pure functions of numpy arrays; scipy.optimize does the minimisation.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from llamakit.errors import DataError, LlamakitError

log = logging.getLogger(__name__)
HUBER_DELTA = 1e-3  # Hoffmann et al., Appendix D.2
# Hoffmann et al.'s grid of initialisations (Appendix D.2): 5 x 5 x 5 x 6 x 6 = 4500 starts.
GRID = {"alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5), "e": np.arange(-1, 1.01, 0.5),
        "a": np.arange(0, 25.1, 5), "b": np.arange(0, 25.1, 5)}
MIN_POINTS = 6  # more points than the law's 5 constants
MAX_LOG = 100.0  # |log A|, |log B|, |log E| beyond this: a start that ran away, not a fit


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the minimised Huber loss (sum over points)

    def loss(self, n, d):
        """The predicted loss of N parameters trained on D tokens (arrays broadcast)."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, flops):
        """(N_opt, D_opt) minimising L under C = 6ND (Hoffmann et al., eq. 4): N_opt = G (C/6)^(beta/(alpha+beta)),
        D_opt = G^-1 (C/6)^(alpha/(alpha+beta)), with G = (alpha A / (beta B))^(1/(alpha+beta))."""
        flops = np.asarray(flops, dtype=float)
        if self.alpha <= 0 or self.beta <= 0:  # the loss does not fall with N (or D): no balance to strike
            return np.full_like(flops, np.nan), np.full_like(flops, np.nan)
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        n_opt = g * np.power(flops / 6, self.beta / s)
        return n_opt, flops / 6 / n_opt

    def constants(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "objective"}


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The Huber loss of residuals r and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) / delta and its gradient in theta =
    (a, b, e, alpha, beta). Dividing by delta leaves the minimum where it is but gives L-BFGS gradients of order 1."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, P)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)  # (3, P)
    total = weights.sum(axis=0)
    predicted = top + np.log(total)
    weights /= total  # d LSE / d term: a softmax over the three terms
    value, slope = huber(predicted - log_l, delta)
    grad = np.stack([weights[0], weights[1], weights[2], -weights[0] * log_n, -weights[1] * log_d]) @ slope
    return value.sum() / delta, grad / delta


def _grid_objectives(log_n, log_d, log_l, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Every grid start (a, b, e, alpha, beta) and its objective, evaluated at once."""
    starts = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))  # (S, 5)
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))  # each (S, 1)
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(starts), len(log_n)))])  # (3, S, P)
    predicted = np.logaddexp.reduce(terms, axis=0)  # (S, P)
    return starts, huber(predicted - log_l, delta)[0].sum(axis=1)


def fit_chinchilla(n, d, loss, delta: float = HUBER_DELTA, refine: int | None = 16) -> ChinchillaFit:
    """Fit L = E + A/N^alpha + B/D^beta to points (Hoffmann et al., Appendix D.2). L-BFGS runs from the `refine` best
    of the 4500 grid starts (all of them with refine=None, as in the paper: the same minimum here, much slower)."""
    minimize = _scipy_minimize()
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n, d, loss))
    _check_points(log_n, log_d, log_l)
    starts, values = _grid_objectives(log_n, log_d, log_l, delta)
    best = None
    for start in starts[np.argsort(values)[:refine]]:
        result = minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                          options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.abs(result.x[:3]) < MAX_LOG) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise DataError(f"scaling fit: L-BFGS diverged from every start on these {len(log_n)} points; they do not "
                        "determine the law (add runs of other sizes and token counts)")
    a, b, e, alpha, beta = best.x
    return ChinchillaFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                         beta=float(beta), objective=float(best.fun * delta))


def _scipy_minimize():
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise LlamakitError("scaling fits need scipy: pip install 'llamakit[scaling]'") from None
    return minimize


def _check_points(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> None:
    if not (len(log_n) == len(log_d) == len(log_l)):
        raise ValueError("n, d and loss must have the same length")
    if not np.all(np.isfinite(np.concatenate([log_n, log_d, log_l]))):
        raise DataError("scaling fit: every N, D and loss must be positive and finite")
    if len(log_n) < MIN_POINTS or len(np.unique(log_n)) < 2 or len(np.unique(log_d)) < 2:
        raise DataError(f"scaling fit: {len(log_n)} point(s) from {len(np.unique(log_n))} model size(s) and "
                        f"{len(np.unique(log_d))} token count(s); the 5-constant law needs at least {MIN_POINTS} "
                        "points, 2 sizes and 2 token counts: add runs (llamakit scaling sweep), or fit every evaluation "
                        "(--points all)")


@dataclass(frozen=True)
class IsoFlopProfile:
    """One compute budget: the points' losses against log N, the parabola through them and its minimum."""

    flops: float  # the geometric mean of the group's C = 6ND
    n: list[float]
    loss: list[float]
    parabola: list[float]  # loss = p[0] x^2 + p[1] x + p[2], x = ln N
    n_opt: float | None  # None: the parabola opens downwards (no minimum)
    inside: bool  # the minimum lies within the sizes trained: not an extrapolation


@dataclass(frozen=True)
class IsoFlopFit:
    """N_opt = k_n C^a and D_opt = k_d C^b fitted on the budgets whose minimum lies inside the sizes trained."""

    profiles: list[IsoFlopProfile]
    a: float
    b: float
    k_n: float
    k_d: float

    def compute_optimal(self, flops):
        flops = np.asarray(flops, dtype=float)
        return self.k_n * flops**self.a, self.k_d * flops**self.b


def compute_groups(flops: np.ndarray, width: float) -> list[np.ndarray]:
    """Indices of points in groups of about the same compute: sorted by log10 C, a group spans at most `width`
    decades from its smallest member."""
    order = np.argsort(flops)
    log_c = np.log10(flops[order])
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or log_c[i] - log_c[start] > width:
            groups.append(order[start:i])
            start = i
    return groups


def isoflop_profile(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> IsoFlopProfile | None:
    """The parabola in ln N through one compute group (the lowest loss per size: the envelope of runs that share a
    size); None with fewer than 3 sizes."""
    best: dict[float, float] = {}
    for size, value in zip(n.tolist(), loss.tolist()):
        best[size] = min(value, best.get(size, np.inf))
    if len(best) < 3:
        return None
    sizes = np.array(sorted(best))
    values = np.array([best[s] for s in sizes])
    x = np.log(sizes)
    p = np.polyfit(x, values, 2)
    n_opt = float(np.exp(-p[1] / (2 * p[0]))) if p[0] > 0 else None
    inside = bool(n_opt is not None and sizes[0] <= n_opt <= sizes[-1])
    return IsoFlopProfile(float(np.exp(np.mean(np.log(6 * n * d)))), sizes.tolist(), values.tolist(), p.tolist(),
                          n_opt, inside)


def isoflop_profiles(n, d, loss, width: float = 0.1) -> list[IsoFlopProfile]:
    """The parabola of every compute group (`width` decades of C = 6ND wide) that holds 3 sizes or more."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    return [p for g in compute_groups(6 * n * d, width) if (p := isoflop_profile(n[g], d[g], loss[g]))]


def fit_isoflop(n, d, loss, width: float = 0.1) -> IsoFlopFit:
    """Hoffmann et al.'s approach 2 on points grouped by C = 6ND (groups `width` decades wide)."""
    profiles = isoflop_profiles(n, d, loss, width)
    used = [p for p in profiles if p.inside]
    if len(used) < 2:
        raise DataError(f"IsoFLOP fit: {len(used)} compute budget(s) with at least 3 model sizes and a loss minimum "
                        f"inside them ({len(profiles)} with 3 sizes); it needs 2: sweep sizes on both sides of the "
                        "optimum at each budget (llamakit scaling sweep --flops)")
    log_c = np.log([p.flops for p in used])
    log_n = np.log([p.n_opt for p in used])
    a, log_k = np.polyfit(log_c, log_n, 1)
    b, log_kd = np.polyfit(log_c, log_c - np.log(6) - log_n, 1)  # D_opt = C / (6 N_opt): b = 1 - a
    return IsoFlopFit(profiles, float(a), float(b), float(np.exp(log_k)), float(np.exp(log_kd)))


def bootstrap(groups: Sequence[np.ndarray], fit: Callable[[np.ndarray], dict[str, float]], k: int,
              seed: int = 0) -> list[dict[str, float]]:
    """Refit on `k` resamples: each draws len(groups) groups of point indices (runs, or single points) with
    replacement. Resamples the fit rejects (too few sizes, say) are skipped and logged."""
    rng = np.random.default_rng(seed)
    samples, failed = [], 0
    for _ in range(k):
        chosen = rng.integers(len(groups), size=len(groups))
        try:
            samples.append(fit(np.concatenate([groups[i] for i in chosen])))
        except DataError:
            failed += 1
    if failed:
        log.info("bootstrap: %d of %d resamples could not be fitted (too few distinct points)", failed, k)
    return samples


def interval(samples: list[dict[str, float]], key: str, level: float) -> tuple[float, float] | None:
    """The central `level` percentile interval of one constant over bootstrap samples (None without samples)."""
    values = np.array([s[key] for s in samples if np.isfinite(s[key])])
    if not len(values):
        return None
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)
