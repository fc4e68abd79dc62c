"""Building blocks of a schedule sweep: the search space's checks, how many trials fit the cluster at once,
what each trial achieved, the best parameters, and applying them to a training config.

Pure functions over plain values (pipeline/config validates params.yaml and the tune stage passes them in). Errors
name the params key, e.g. `params.yaml: tune.space.lr: loguniform needs 0 < low < high, got [0, 1]`.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from components.learning.experiment import schedule_field_types

# What a sweep may change: the fields of a Schedule, with their types.
TUNABLE = schedule_field_types()
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
WHERE = "params.yaml: tune"


# --- search space ----------------------------------------------------------------------------------

def _number(value, integer: bool) -> bool:
    kind = int if integer else (int, float)
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_value(key: str, value, where: str) -> None:
    """A single value of `key` must have its field's type and sign (lr > 0, iterations > 0, ...)."""
    integer = TUNABLE[key] is int
    if not _number(value, integer):
        raise ValueError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if value < 0 or (value == 0 and key in ("lr", "max_iters", "warmup_ratio")):
        sign = "positive" if key in ("lr", "max_iters") else "non-negative"
        raise ValueError(f"{where}: expected a {sign} value, got {value!r}")


def check_space(space: dict) -> dict:
    """Validate `tune.space`: {field: {distribution: args}} or {field: fixed value}. Returns it."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{WHERE}.space: expected a mapping of fields to distributions, got {space!r}")
    for key, spec in space.items():
        where = f"{WHERE}.space.{key}"
        if key not in TUNABLE:
            raise ValueError(f"{where}: not a tunable field (tunable: {', '.join(TUNABLE)})")
        if not isinstance(spec, dict):
            _check_value(key, spec, where)
            continue
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
        for value in args:
            _check_value(key, value, f"{where}.{kind}")
        if kind in ("loguniform", "uniform", "randint"):
            log = kind == "loguniform"
            if len(args) != 2 or (log and args[0] <= 0) or not args[0] < args[1]:
                bounds = "0 < low < high" if log else "low < high"
                raise ValueError(f"{where}.{kind}: expected [low, high] with {bounds}, got {args!r}")
            if kind in ("loguniform", "uniform") and TUNABLE[key] is int:
                raise ValueError(f"{where}: {key} is an integer: use randint, choice or grid")
    return space


def largest_value(space: dict, key: str, default):
    """The largest value `key` can take in the space (ASHA's max_t for max_iters), else `default`."""
    spec = space.get(key, default)
    if not isinstance(spec, dict):
        return spec
    return max(next(iter(spec.values())))


# --- scheduler and resources -----------------------------------------------------------------------

def trial_demand(num_workers: int, worker_bundle: dict, driver: dict) -> dict[str, float]:
    """What one trial holds while it trains: its driver (the Tune trial, which builds and waits on one
    TorchTrainer) plus the TorchTrainer's workers, which Ray Train places outside the trial's bundle.
    `worker_bundle`: what Ray Train reserves per worker (e.g. {CPU: 4, GPU: 1})."""
    demand: dict[str, float] = {}
    for resources, times in ((driver, 1), (worker_bundle, num_workers)):
        for name, amount in resources.items():
            name = {"cpu": "CPU", "gpu": "GPU"}.get(name, name)
            demand[name] = demand.get(name, 0.0) + times * float(amount)
    return {k: v for k, v in demand.items() if v > 0}


def max_concurrent_trials(cluster: dict, demand: dict[str, float]) -> int:
    """How many trials fit in the cluster at once. Tune only sees the drivers' bundles, so without this
    cap it would start trials whose workers then wait for each other's resources forever."""
    fits = []
    for name, need in demand.items():
        have = float(cluster.get(name, 0.0))
        fits.append(math.floor(have / need + 1e-9))
    count = min(fits) if fits else 1
    if count < 1:
        short = {n: f"{need:g} needed, {float(cluster.get(n, 0.0)):g} in the cluster"
                 for n, need in demand.items() if float(cluster.get(n, 0.0)) + 1e-9 < need}
        raise ValueError(f"{WHERE}.resources_per_trial: one trial does not fit in the cluster ({short}): "
                         f"lower num_workers or resources_per_worker")
    return count


# --- results ---------------------------------------------------------------------------------------

def summarize_trial(rows: list[dict], max_iters: int, metric: str, mode: str, failed: bool) -> dict:
    """Best metric (and its iteration), iterations run, stopped early? from a trial's reported rows
    (each with `iteration` and the metric; a restarted trial may repeat iterations)."""
    scored = [r for r in rows if r.get(metric) is not None and r[metric] == r[metric]]
    sign = 1 if mode == "max" else -1
    best = max(scored, key=lambda r: (sign * r[metric], r["iteration"]), default=None)   # tie: the later
    iterations = max((int(r["iteration"]) for r in rows if r.get("iteration") is not None), default=0)
    return {f"best_{metric}": None if best is None else float(best[metric]),
            "best_iteration": None if best is None else int(best["iteration"]),
            "iterations_run": iterations,
            "stopped_early": not failed and iterations < max_iters,
            "status": "failed" if failed else ("stopped early" if iterations < max_iters else "completed")}


def best_trial(trials: list[dict], metric: str, mode: str) -> dict | None:
    """The trial with the best metric; a tie goes to the one that trained longer. Failed trials and
    trials that never evaluated are not candidates."""
    key = f"best_{metric}"
    candidates = [t for t in trials if t["status"] != "failed" and t.get(key) is not None]
    if not candidates:
        return None
    sign = 1 if mode == "max" else -1
    return max(candidates, key=lambda t: (sign * t[key], t["iterations_run"]))


# --- tuned parameters into training ---------------------------------------------------------------

def read_best_params(path: Path | str) -> dict:
    """best_params.yaml as written by the tune stage: {experiment, profile, metric, params: {...}}."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: tuned parameters not found: run `dvc repro tune` (or "
                                f"`dnlseg tune`) first: the train_tuned stage trains on them") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise ValueError(f"{path}: expected a mapping with a `params` mapping")
    for key, value in data["params"].items():
        if key not in TUNABLE:
            raise ValueError(f"{path}: params.{key}: not a tunable field (tunable: {', '.join(TUNABLE)})")
        _check_value(key, value, f"{path}: params.{key}")
    return data


def apply_tuned(cfg, path: Path | str):
    """`cfg` (a RunConfig) with the schedule from best_params.yaml. It must have been tuned for the same
    experiment and profile. A tuned max_iters keeps the number of evaluations per run (evals_per_run)."""
    data = read_best_params(path)
    for field, ours in (("experiment", cfg.name), ("profile", cfg.profile)):
        if data.get(field) != ours:
            raise ValueError(f"{path}: tuned for {field} {data.get(field)!r}, but training {ours!r} "
                             f"(rerun `dvc repro tune`)")
    return cfg.with_schedule(**{k: TUNABLE[k](v) for k, v in data["params"].items()})


def trial_config(base, sampled: dict):
    """A trial's RunConfig: the sweep's base with the schedule values Tune sampled for it."""
    return base.with_schedule(**{k: TUNABLE[k](v) for k, v in sampled.items()})
