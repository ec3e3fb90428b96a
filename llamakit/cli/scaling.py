"""`llamakit scaling fit|sweep`: fit scaling laws to pretraining runs; train a grid of small runs to fit them to."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llamakit.cli.argtypes import positive_int
from llamakit.errors import LlamakitError


def scaling(args: argparse.Namespace) -> None:
    """Fit scaling laws (Chinchilla's parametric law and IsoFLOP profiles) to pretraining runs, or train a sweep."""
    {"fit": _fit, "sweep": _sweep}[args.action](args)


def _fit(args: argparse.Namespace) -> None:
    from llamakit.files import write_atomic
    from llamakit.scaling import FitOptions, analyse, read_runs, report

    opts = FitOptions(points=args.points, bootstrap=args.bootstrap, resample=args.resample, level=args.level,
                      width=args.width, budgets=args.budget or [], predict=args.predict or [], seed=args.seed)
    runs = read_runs(args.runs, args.metric, args.params)
    analysis = analyse(runs, opts)
    result = report(analysis) | {"metric": args.metric, "params": args.params}
    print(_summary(result))
    if args.plot:
        from llamakit.scaling.plots import plot_analysis

        print(f"plot: {plot_analysis(analysis, args.plot)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.json), (json.dumps(result, indent=1) + "\n").encode())
        print(f"results: {args.json}")


def _summary(result: dict) -> str:
    """The fitted constants with their intervals, the compute-optimal sizes and the predictions, as text."""
    opts, chin = result["options"], result["chinchilla"]
    level = f"{opts['level']:.0%}"
    lines = [f"{len(result['runs'])} runs, {result['points']} points ({opts['points']} evaluations; N = "
             f"{result['params']} parameters, D = tokens seen, L = {result['metric']})",
             "",
             "parametric fit (Hoffmann et al. approach 3): L(N, D) = E + A/N^alpha + B/D^beta",
             f"  Huber (delta 1e-3) on log L by L-BFGS; {level} intervals from {chin['bootstrap_fits']} of "
             f"{opts['bootstrap']} refits on {opts['resample']} resampled with replacement"]
    lines += [_constant(k, v, chin["interval"][k]) for k, v in chin["constants"].items()]
    iso = result["isoflop"]
    lines += ["", "IsoFLOP fit (approach 2): N_opt = k_n C^a, D_opt = k_d C^b"]
    for p in iso["profiles"]:
        if p["n_opt"] is None:
            n_opt, where = "none", "  (the parabola opens downwards: not used)"
        else:
            n_opt, where = f"{p['n_opt']:.4g}", "" if p["inside"] else "  (outside the sizes trained: not used)"
        lines.append(f"  C = {p['flops']:.3g}: {len(p['n'])} sizes, N_opt = {n_opt}{where}")
    if "error" in iso:
        lines.append(f"  no fit: {iso['error']}")
    else:
        lines += [_constant(k, iso["constants"][k], iso["interval"][k]) for k in ("a", "b")]
    for b in result["budgets"]:
        lines += ["", f"compute-optimal at C = {b['flops']:.3g} FLOPs (parametric): N = {b['n_opt']:.4g} "
                      f"{_interval(b['n_opt_interval'])}, D = {b['d_opt']:.4g} {_interval(b['d_opt_interval'])} "
                      f"({b['tokens_per_param']:.3g} tokens/parameter), loss {b['loss']:.4f}"]
        if "isoflop_n_opt" in b:
            lines.append(f"  IsoFLOP power law: N = {b['isoflop_n_opt']:.4g}, D = {b['isoflop_d_opt']:.4g}")
    for p in result["predictions"]:
        lines += ["", f"predicted loss at N = {p['n']:.4g}, D = {p['d']:.4g}: {p['loss']:.4f} "
                      f"{_interval(p['loss_interval'])}; D is {p['d_over_d_opt']:.3g}x the compute-optimal D for its "
                      f"{p['flops']:.3g} FLOPs"]
    return "\n".join(lines)


def _constant(name: str, value: float, bounds) -> str:
    return f"  {name:<6} {value:>12.5g}  {_interval(bounds)}"


def _interval(bounds) -> str:
    return f"[{bounds[0]:.4g}, {bounds[1]:.4g}]" if bounds else "[no bootstrap]"


def _sweep(args: argparse.Namespace) -> None:
    import logging

    from llamakit.scaling.sweep import command, plan_sweep, run_sweep

    overrides = [part for item in args.set or [] for part in _override(item)]
    runs = plan_sweep(args.config, args.sizes, args.tokens or [], args.flops or [], args.evals, args.params, overrides)
    out = Path(args.out)
    print(f"{len(runs)} runs into {out}:")
    for run in runs:
        print(f"  {run.name:<16} N = {run.n:>10,}  {run.steps:>6} steps  D = {run.tokens:>12,}  C = {run.flops:.3g}")
    if args.dry_run:
        print("commands:\n" + "\n".join("  " + " ".join(command(args.config, r, out)) for r in runs))
        return
    logging.getLogger("llamakit").setLevel(logging.INFO)
    run_sweep(args.config, runs, out, args.jobs,
              on_done=lambda r: print(f"  {r.name}: {r.status} in {r.seconds} s", flush=True))
    failed = [r.name for r in runs if r.status == "failed"]
    if failed:
        raise LlamakitError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see {out / 'logs'}/NAME.log, fix, "
                            "and rerun the same command (finished runs are skipped)")
    print(f"grid: {out / 'grid.json'}\nfit: llamakit scaling fit {out} --plot {out / 'scaling.png'}")


def _override(item: str) -> list[str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise LlamakitError(f"--set {item!r}: write KEY=VALUE, e.g. --set data.path=runs/scaling/data")
    return [f"--{key.removeprefix('--')}", value]


def _number_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive numbers, e.g. 1e5,3e5")
    return values


def _positive(text: str) -> float:
    values = _number_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one positive number, e.g. 1e21")
    return values[0]


def _n_and_d(text: str) -> tuple[float, float]:
    values = _number_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not N,D (parameters,tokens), e.g. 8e9,15e12")
    return values[0], values[1]


def add_scaling(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fit = sub.add_parser("fit", help="fit scaling laws to pretraining run folders",
                         description="Fit L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, approach 3) and "
                                     "IsoFLOP profiles (approach 2) to the validation curves of llamakit pretrain runs.")
    fit.add_argument("runs", nargs="*", metavar="RUN_DIR",
                     help="llamakit pretrain run folders (checkpoint.out_dir), or a scaling sweep folder (its runs)")
    fit.add_argument("--budget", type=_positive, action="append", metavar="FLOPS",
                     help="a compute budget to size a model for (repeatable), e.g. 1e21")
    fit.add_argument("--predict", type=_n_and_d, action="append", metavar="N,D",
                     help="predict the loss of N parameters trained on D tokens (repeatable), e.g. 8e9,15e12")
    fit.add_argument("--points", choices=["final", "all"], default="final",
                     help="each run's final evaluation, where its schedule ended (default), or every evaluation "
                          "(more points, but mid-schedule losses are higher than a run of that length reaches)")
    fit.add_argument("--params", choices=["non-embedding", "all"], default="non-embedding",
                     help="N: parameters outside the embedding/output matrices (Kaplan; default) or all (Chinchilla)")
    fit.add_argument("--metric", default="val_loss", help="the metrics.jsonl key to fit (default val_loss)")
    fit.add_argument("--bootstrap", type=int, default=100, metavar="K", help="refits on resamples for the intervals "
                     "(default 100; 0: none)")
    fit.add_argument("--resample", choices=["runs", "points"], default="runs",
                     help="what a bootstrap resample draws: whole runs (default; a run's points are correlated) or "
                          "single points")
    fit.add_argument("--level", type=float, default=0.9, help="the interval's coverage (default 0.9)")
    fit.add_argument("--width", type=float, default=0.1,
                     help="IsoFLOP groups: points within this many decades of compute 6ND (default 0.1)")
    fit.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    fit.add_argument("--plot", metavar="OUT.png", help="write the curves, IsoFLOP profiles and N_opt(C) as a PNG")
    fit.add_argument("--json", metavar="OUT.json", help="write every result as JSON")
    sweep = sub.add_parser("sweep", help="train a grid of small pretraining runs for a fit",
                           description="Train model sizes x token (or compute) budgets from a base pretrain config, "
                                       "each run in DIR/NAME; finished runs are skipped, interrupted ones resumed.")
    sweep.add_argument("config", help="a base pretrain config, e.g. configs/scaling/tiny-sweep.yaml")
    sweep.add_argument("--sizes", type=lambda t: [s for s in t.split(",") if s], required=True,
                       help="model sizes DIMxLAYERS[xHEADS[xKV_HEADS]], comma-separated, e.g. 32x2,64x2,96x3")
    budget = sweep.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=_number_list, help="token budgets per run, e.g. 2.5e5,5e5,1e6")
    budget.add_argument("--flops", type=_number_list,
                        help="compute budgets C: each size trains on C/(6N) tokens (an IsoFLOP grid), e.g. 1e11,3e11")
    sweep.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder: one run folder per grid point")
    sweep.add_argument("--evals", type=positive_int, default=8, help="validation evaluations per run (default 8)")
    sweep.add_argument("--params", choices=["non-embedding", "all"], default="non-embedding",
                       help="N for --flops (as in scaling fit)")
    sweep.add_argument("--jobs", type=positive_int, default=1, help="runs trained at once (default 1)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a base config value for every run, e.g. --set data.path=runs/scaling/data")
    sweep.add_argument("--dry-run", action="store_true", help="print the grid and the commands; train nothing")
