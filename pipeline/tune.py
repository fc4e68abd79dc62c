"""Stage `tune`: a Ray Tune sweep over one experiment's schedule, ASHA on validation mIoU, in MLflow.

Each trial is a function trainable that builds and fits one TorchTrainer (the train stage's, with
`TuneReportCallback`, so rank 0's evaluations reach Tune and ASHA). The driver writes, under tune/<exp>/:
    best_params.yaml   the best trial's schedule; stage train_tuned (`dnlseg train <exp> --tuned`) trains
                       the experiment again on it, as `<exp>-tuned`
    trials.csv         one row per trial: its params, best mIoU, iterations run, stopped early?
    trials.png         best mIoU against learning rate and against iterations run

The sweep's name is `<exp>-tune-<hash of what changes the result>`: rerunning an interrupted sweep
restores it (finished trials are kept, unfinished ones resume their Train run from its checkpoint);
changed params, data or code start a fresh sweep. MLflow: one parent run per sweep, one child per trial.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import ray
import ray.tune
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from components import ray_cluster
from components.atomic import atomic_path, atomic_write_text
from components.learning import tuning
from components.learning.distributed import plan_batches
from components.learning.experiment import RunConfig, flat_settings
from components.preflight import preflight, preflight_disk, preflight_hardware, preflight_ray, worker_bundle
from components.storage import endpoint_env, pyarrow_filesystem
from components.tracking import flat_params, git_commit, open_run
from components.training.contract import NonFiniteLossError, RunInfo
from components.training.data_sync import manifest_hash, publish_dataset
from components.training.identity import code_hash, sweep_name
from components.training.trainer import build_trainer, describe_init, fetch_pretrained, log_interval, run_exists
from components.weights import publish
from pipeline.config import CODE_ROOT, ConfigError, Params, Tune, code_deps, tune_dir


def search_space(space: dict) -> dict:
    """`tune.space` (validated once: check_space) as a Ray Tune param_space (randint's high inclusive, as in YAML)."""
    make = {"loguniform": lambda a: tune.loguniform(a[0], a[1]),
            "uniform": lambda a: tune.uniform(a[0], a[1]),
            "randint": lambda a: tune.randint(a[0], a[1] + 1),
            "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for key, spec in space.items():   # validated once, with params.yaml (tune.space)
        if isinstance(spec, dict):
            kind, args = next(iter(spec.items()))
            out[key] = make[kind](list(args))
        else:
            out[key] = spec
    return out


def asha_scheduler(metric: str, mode: str, eval_interval: int, grace_period: int, reduction_factor: float,
                   max_iters: int):
    """ASHA on the metric rank 0 reports at each evaluation, its clock the training iteration.

    `grace_period` counts evaluations (every trial evaluates every `eval_interval` iterations), so a
    trial is first compared with the others after `grace_period * eval_interval` iterations.
    """
    grace = grace_period * eval_interval   # at or past the longest schedule: nothing is stopped early
    # max_t one past the longest schedule: a trial that reaches its end finishes by itself (its Train
    # run shuts down cleanly) instead of being stopped by ASHA at its last report.
    return ASHAScheduler(time_attr="iteration", metric=metric, mode=mode, grace_period=grace,
                         reduction_factor=reduction_factor, max_t=max_iters + 1)


def sweep_base(cfg: RunConfig, settings: Tune, trials_storage: str) -> RunConfig:
    """The config every trial starts from: the sweep's workers, a common evaluation interval (ASHA's
    rungs then compare trials after the same number of iterations), the trials' Train runs storage."""
    trial = settings.resources_per_trial
    return cfg.updated(
        execution={"num_workers": trial.num_workers or cfg.execution.num_workers, "min_workers": None,   # fixed
                   "resources_per_worker": trial.resources_per_worker or cfg.execution.resources_per_worker},
        recipe={"eval_every": settings.eval_interval or cfg.eval_interval},
        location={"storage_path": trials_storage})


def trial_dirname(trial) -> str:
    """Trial folders named by trial id, so a result's folder says which trial (and MLflow child) it is."""
    return trial.trial_id


def run_trial(config: dict, setup: dict) -> None:
    """One trial: the sweep's base config with this trial's schedule, trained by one TorchTrainer whose
    rank 0 reports each evaluation to Tune. Restarted (sweep restored), it resumes its Train run and
    its MLflow child run. A NaN/inf loss fails the trial (the loop stops cleanly, Tune records why)."""

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = tuning.trial_config(setup["base"], config)
    name = f"{setup['sweep']}-{trial_id}"
    tags = {**setup["tags"], "tune.trial_id": trial_id}
    if setup["parent_run_id"]:
        tags["mlflow.parentRunId"] = setup["parent_run_id"]   # what makes the MLflow UI nest it
    tracker = open_run(cfg.tracking_uri, experiment=cfg.recipe.dataset, run_name=name,
                       resume=run_exists(cfg.location.storage_path, name), params=flat_settings(cfg), tags=tags)
    run = dataclasses.replace(setup["run"], mlflow_run_id=tracker.run_id, log_interval=log_interval(cfg))
    result = build_trainer(cfg, name, run, callbacks=[TuneReportCallback()]).fit()
    # The loop ends cleanly on a NaN/inf loss (so Ray does not retry it): raising here makes Tune record
    # the trial as failed, not as stopped early, and keeps it out of the best trial.
    stopped = result.return_value.stopped if result.return_value else None
    if stopped:
        raise non_finite_trial_error(trial_id, cfg, stopped)


def non_finite_trial_error(trial_id: str, cfg: RunConfig, stopped: str):
    """A trial's one-line failure for a NaN/inf stop: which trial, its learning rate, the loss and iteration
    (`stopped` is the loop's message; what it says about checkpoints is the train stage's business)."""

    return NonFiniteLossError(f"trial {trial_id} (lr {cfg.schedule.lr:g}): {stopped.split(': stopping')[0]}")


def _trial_rows(result) -> list[dict]:
    frame = result.metrics_dataframe
    if frame is None or "iteration" not in frame:
        return []
    return [r for r in frame.to_dict("records") if r.get("iteration") == r.get("iteration")]   # not NaN


def collect_trials(results, base: RunConfig, settings: Tune) -> list[dict]:
    """One dict per trial: id, its schedule (lr and max_iters always), and what it achieved."""
    columns = [k for k in tuning.TUNABLE if k in settings.space or k in ("lr", "max_iters")]
    trials = []
    for result in results:
        cfg = tuning.trial_config(base, {k: v for k, v in (result.config or {}).items() if k in tuning.TUNABLE})
        summary = tuning.summarize_trial(_trial_rows(result), cfg.max_iters, settings.metric, settings.mode,
                                         failed=result.error is not None)
        error = "" if result.error is None else str(result.error).strip().splitlines()[-1][:300]
        trials.append({"trial_id": Path(result.path).name, **{k: getattr(cfg.schedule, k) for k in columns}, **summary,
                       "error": error})
    return sorted(trials, key=lambda t: t["trial_id"])


def write_trials_csv(path: Path, trials: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(trials[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(trials)
    atomic_write_text(path, out.getvalue())


def write_best_params(path: Path, cfg: RunConfig, settings: Tune, best: dict, sweep: str) -> dict:
    key = f"best_{settings.metric}"
    data = {"experiment": cfg.name, "profile": cfg.profile, "sweep": sweep, "metric": settings.metric,
            "mode": settings.mode, "trial_id": best["trial_id"], settings.metric: best[key],
            "iteration": best["best_iteration"],
            "params": {k: best[k] for k in tuning.TUNABLE if k in settings.space}}
    atomic_write_text(path, "# written by `dnlseg tune`; `dnlseg train <exp> --tuned` trains on it\n"
                 + yaml.safe_dump(data, sort_keys=False))
    return data


def plot_trials(path: Path, trials: list[dict], metric: str) -> None:
    """Best metric against learning rate (log) and against iterations run; stopped trials as crosses."""
    # Here, not at the top: the backend must be chosen before pyplot is first imported.

    matplotlib.use("Agg")

    key = f"best_{metric}"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for status, marker in (("completed", "o"), ("stopped early", "x")):
        shown = [t for t in trials if t["status"] == status and t[key] is not None]
        scores = [t[key] for t in shown]
        axes[0].scatter([t["lr"] for t in shown], scores, marker=marker, label=status)
        axes[1].scatter([t["iterations_run"] for t in shown], scores, marker=marker, label=status)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("learning rate")
    axes[1].set_xlabel("iterations run")
    axes[0].set_ylabel(f"best val {metric} (%)")
    axes[1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def _finish_child_runs(cfg: RunConfig, sweep: str, parent_run_id: str | None, trials: list[dict],
                       metric: str) -> None:
    """The driver closes each trial's MLflow child: final metrics, status. (An ASHA-stopped trial's
    process is ended by Tune, so it cannot close its own run; a trial that failed before it opened one
    gets one here, nested like the others.)"""
    for t in trials:
        tags = {"tune.trial_id": t["trial_id"], "tune.status": t["status"]}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        child = open_run(cfg.tracking_uri, experiment=cfg.recipe.dataset, run_name=f"{sweep}-{t['trial_id']}",
                         resume=True, tags=tags)
        final = {"iterations_run": t["iterations_run"], "stopped_early": int(t["stopped_early"])}
        if t[f"best_{metric}"] is not None:
            final[f"best_{metric}"] = t[f"best_{metric}"]
        child.log_metrics(final, step=t["iterations_run"])
        child.set_status("FAILED" if t["status"] == "failed" else "FINISHED")


def tune_experiment(params: Params, name: str | None = None, *, profile: str | None = None,
                    out_root: Path | str | None = None) -> dict:
    """Sweep experiment `name` (default: tune.experiment), restoring the sweep if it was interrupted;
    write tune/<exp>/{best_params.yaml, trials.csv, trials.png} under out_root (default: the repo)."""
    # looked up when called, as the train stage does: the tests replace it to stop before Ray

    settings = params.tune
    name = name or settings.experiment
    if not name:
        raise ConfigError("params.yaml: tune.experiment: missing (or name one on the command line)")
    cfg = params.experiment(name, profile)
    probe = sweep_base(cfg, settings, cfg.location.storage_path)
    # Bad input fails here, in one line each, before Ray starts (as in the train stage).
    plan_batches(probe.recipe.batch_size, probe.execution.num_workers, probe.execution.micro_batch_size)
    cfg, weights = fetch_pretrained(cfg, params.root, params.cache_dir)
    with ray_cluster.scoped_env(endpoint_env(cfg.location.endpoint_url, cfg.location.region)):
        preflight(cfg)
        return _tune(cfg, settings, name, Path(out_root or params.root), params.root, weights)


def _tune(cfg: RunConfig, settings: Tune, name: str, out_root: Path, repo: Path,
          weights: Path | None) -> dict:
    """The sweep itself, from its name to its outputs and the parent run's results."""
    storage = f"{cfg.location.storage_path.rstrip('/')}/tune"
    data_hash = manifest_hash(cfg.location.data_dir)
    sweep = sweep_name(sweep_base(cfg, settings, storage), settings.learned(), data_hash,
                       code_hash(CODE_ROOT, code_deps("tune")))
    sweep_path = f"{storage}/{sweep}"
    base = sweep_base(cfg, settings, f"{sweep_path}/train_runs")
    max_iters = tuning.largest_value(settings.space, "max_iters", base.max_iters)
    scheduler = asha_scheduler(settings.metric, settings.mode, base.eval_interval,
                                      settings.scheduler.grace_period, settings.scheduler.reduction_factor, max_iters)
    store = _SweepStore.at(storage, cfg)
    out_dir = tune_dir(out_root, name)

    with contextlib.ExitStack() as stack:
        # ray_cluster.connect_ray looked up when called: the tests replace it to prove Ray starts last.
        if ray_cluster.connect_ray(cfg.execution.ray_address):
            stack.callback(ray_cluster.shutdown_ray)
        concurrent, demand = _concurrency(base, settings, sweep_path)
        restoring = tune.Tuner.can_restore(f"{store.path}/{sweep}", **store.kwargs)
        print(f"[tune driver] {name}: sweep {sweep} under {storage} ({'restoring' if restoring else 'new'}), "
              f"{settings.num_samples} samples, {concurrent} at a time (each {demand}), {describe_init(cfg)}",
              flush=True)
        parent, tags = _open_parent_run(cfg, base, settings, name, sweep, data_hash, concurrent, restoring, repo)
        setup = {"base": base, "sweep": sweep, "parent_run_id": parent.run_id, "tags": tags,
                 "run": _run_info(cfg, data_hash, weights)}
        # The trial driver's own bundle is small: Ray Train places the workers in their own placement group.
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                        settings.resources_per_trial.driver)
        tic = time.perf_counter()
        with _status_on_error(parent):   # the sweep stays in storage: rerunning restores it
            tuner = (_restored_tuner(trainable, store, sweep) if restoring
                     else _new_tuner(trainable, store, sweep, settings, scheduler, concurrent))
            trials, best, best_params = _sweep_outputs(tuner.fit(), cfg, base, settings, sweep, sweep_path,
                                                       parent.run_id, out_dir, store)
        _log_sweep_result(parent, settings, trials, best, out_dir)
        print(f"[tune driver] {name}: {len(trials)} trials in {time.perf_counter() - tic:.0f} s "
              f"({sum(t['stopped_early'] for t in trials)} stopped early); best {settings.metric} "
              f"{best[f'best_{settings.metric}']:.2f} by trial {best['trial_id']}: {best_params['params']}; "
              f"wrote {out_dir}", flush=True)
        return {"sweep": sweep, "path": sweep_path, "restored": restoring, "trials": trials,
                "best": best_params, "mlflow_run_id": parent.run_id, "max_concurrent_trials": concurrent,
                "out_dir": out_dir}


@dataclasses.dataclass(frozen=True)
class _SweepStore:
    """Where Tune keeps the sweeps: the path Tune is given, and the filesystem that path is on."""

    fs: object        # pyarrow filesystem
    fs_path: str      # `path` on `fs`
    path: str         # what Tune gets: the URI, or the path on `fs` when Tune gets `fs` too
    kwargs: dict      # {"storage_filesystem": fs} for a URI, else nothing

    @classmethod
    def at(cls, storage: str, cfg: RunConfig) -> _SweepStore:
        """s3:// on a custom endpoint: an explicit filesystem, as the train stage gives Ray Train."""
        fs, fs_path = pyarrow_filesystem(storage, cfg.location.endpoint_url, cfg.location.region)
        kwargs = {"storage_filesystem": fs} if "://" in storage else {}
        return cls(fs, fs_path, fs_path if kwargs else storage, kwargs)


def _concurrency(base: RunConfig, settings: Tune, sweep_path: str) -> tuple[int, dict]:
    """How many trials run at once (and what each holds), after checking one fits the cluster and the
    sweep's checkpoints fit the disk."""
    driver = settings.resources_per_trial.driver
    preflight_ray(base, driver=driver)   # one trial (its driver + workers) fits the cluster
    preflight_hardware(base)             # GPU profiles: every GPU node's torch, driver, kernels, /dev/shm
    run_on = base.execution
    demand = tuning.trial_demand(run_on.num_workers, worker_bundle(run_on.resources_per_worker, run_on.use_gpu),
                                 driver)
    n_trials = settings.num_samples * _grid_size(settings.space)
    concurrent = min(n_trials, settings.resources_per_trial.max_concurrent_trials
                     or tuning.max_concurrent_trials(ray.cluster_resources(), demand))
    preflight_disk(base, sweep_path, runs=n_trials, concurrent=concurrent)
    return concurrent, demand


def _open_parent_run(cfg: RunConfig, base: RunConfig, settings: Tune, name: str, sweep: str, data_hash: str,
                     concurrent: int, restoring: bool, repo: Path):
    """The sweep's MLflow parent run (resumed when the sweep is), with its params and config.yaml;
    returns it and the tags its trials' children share."""
    commit = git_commit(repo)
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "dvc_stage": f"tune@{name}",
            "dataset_manifest_sha256": data_hash, "experiment": name, "profile": cfg.profile,
            "tune.sweep": sweep}
    sweep_params = {**flat_settings(base), "tune.num_samples": settings.num_samples,
                    "tune.metric": settings.metric, "tune.mode": settings.mode,
                    "tune.seed": settings.seed,
                    "tune.space": json.dumps(settings.space, sort_keys=True),
                    "tune.grace_period_evals": settings.scheduler.grace_period,
                    "tune.reduction_factor": settings.scheduler.reduction_factor,
                    "tune.max_concurrent_trials": concurrent}
    # The swept fields' base values would mislead in the parent: the children hold them.
    parent = open_run(cfg.tracking_uri, experiment=cfg.recipe.dataset, run_name=sweep, resume=restoring,
                      params={k: v for k, v in sweep_params.items() if k not in settings.space},
                      tags=tags)
    parent.log_text(yaml.safe_dump(flat_params(sweep_params), sort_keys=False), "config.yaml")
    return parent, tags


def _run_info(cfg: RunConfig, data_hash: str, weights: Path | None) -> RunInfo:
    """What every trial's workers get besides their own MLflow run: the data and the pretrained weights."""
    return RunInfo(manifest_sha256=data_hash,
                   data_uri=publish_dataset(cfg.location.data_dir, cfg.location.storage_path, data_hash),
                   pretrained_path=str(weights) if weights else None,
                   pretrained_uri=publish(weights, cfg.location.storage_path, cfg.recipe.pretrained_sha256)
                   if weights else None)


@contextlib.contextmanager
def _status_on_error(run):
    """An error inside marks the MLflow `run` KILLED (Ctrl-C) or FAILED (anything else), then goes on."""
    try:
        yield
    except KeyboardInterrupt:
        run.set_status("KILLED")
        raise
    except BaseException:
        run.set_status("FAILED")
        raise


def _restored_tuner(trainable, store: _SweepStore, sweep: str) -> tune.Tuner:
    """The interrupted sweep: finished trials kept, unfinished ones resumed."""
    return tune.Tuner.restore(f"{store.path}/{sweep}", trainable=trainable, resume_unfinished=True,
                              **store.kwargs)


def _new_tuner(trainable, store: _SweepStore, sweep: str, settings: Tune, scheduler, concurrent: int) -> tune.Tuner:
    """A fresh sweep: the seeded search, ASHA, `concurrent` trials at once, no retries."""
    # max_concurrent on the search algorithm: Tune applies TuneConfig's max_concurrent_trials
    # only to the default one it builds itself.
    search = BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrent)
    return tune.Tuner(
        trainable, param_space=search_space(settings.space),
        tune_config=tune.TuneConfig(num_samples=settings.num_samples, scheduler=scheduler,
                                    search_alg=search, max_concurrent_trials=concurrent,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=sweep, storage_path=store.path, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0), **store.kwargs))


def _sweep_outputs(results, cfg: RunConfig, base: RunConfig, settings: Tune, sweep: str, sweep_path: str,
                   parent_run_id: str | None, out_dir: Path, store: _SweepStore) -> tuple[list[dict], dict, dict]:
    """From the finished sweep: close the trials' MLflow children, write trials.csv, trials.png and
    best_params.yaml, drop the trials' Train runs. Returns the trials, the best one, best_params."""
    unfinished = len(results) - results.num_terminated - results.num_errors
    if unfinished:
        raise RuntimeError(f"sweep {sweep}: {unfinished} trial(s) did not finish (interrupted?): "
                           f"rerun to resume it")
    trials = collect_trials(results, base, settings)
    _finish_child_runs(cfg, sweep, parent_run_id, trials, settings.metric)
    best = tuning.best_trial(trials, settings.metric, settings.mode)
    if best is None:
        raise RuntimeError(f"sweep {sweep}: no trial reported {settings.metric} "
                           f"(all {len(trials)} failed; see trials' errors under {sweep_path})")
    write_trials_csv(out_dir / "trials.csv", trials)
    plot_trials(out_dir / "trials.png", trials, settings.metric)
    best_params = write_best_params(out_dir / "best_params.yaml", cfg, settings, best, sweep)
    # The finished sweep's result is best_params.yaml: its trials' Train runs (checkpoints with the
    # optimizer state, 0.4 GB each on the sample profile) served restoring an interrupted sweep only.
    with contextlib.suppress(FileNotFoundError):
        store.fs.delete_dir(f"{store.fs_path.rstrip('/')}/{sweep}/train_runs")
    return trials, best, best_params


def _log_sweep_result(parent, settings: Tune, trials: list[dict], best: dict, out_dir: Path) -> None:
    """The parent run's final metrics, best trial, output files, and FINISHED."""
    key = f"best_{settings.metric}"
    parent.log_metrics({key: best[key], "trials": len(trials),
                        "trials_stopped_early": sum(t["stopped_early"] for t in trials),
                        "trials_failed": sum(t["status"] == "failed" for t in trials)}, step=0)
    parent.set_tags({"tune.best_trial": best["trial_id"]})
    for filename in ("best_params.yaml", "trials.csv", "trials.png"):
        parent.log_artifact(out_dir / filename, "tune")
    parent.set_status("FINISHED")


def _grid_size(space: dict) -> int:
    size = 1
    for spec in space.values():
        if isinstance(spec, dict) and "grid" in spec:
            size *= len(spec["grid"])
    return size
