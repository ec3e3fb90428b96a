"""Scaling laws: read pretraining runs as (N, D, loss) points, fit Chinchilla's parametric law and IsoFLOP profiles
(Hoffmann et al. 2022) with bootstrap intervals, and train the grid of small runs to fit them to."""

from llamakit.scaling.analysis import Analysis, FitOptions, analyse, report
from llamakit.scaling.fit import ChinchillaFit, IsoFlopFit, fit_chinchilla, fit_isoflop
from llamakit.scaling.runs import RunCurve, count_params, read_run, read_runs, scaling_points

__all__ = ["Analysis", "ChinchillaFit", "FitOptions", "IsoFlopFit", "RunCurve", "analyse", "count_params",
           "fit_chinchilla", "fit_isoflop", "read_run", "read_runs", "report", "scaling_points"]
