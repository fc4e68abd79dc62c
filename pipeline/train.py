"""Stage `train@<experiment>`: one experiment of params.yaml trained with Ray Train, tracked in MLflow.

Runs the preflight, starts (or joins) Ray, fits a TorchTrainer over the per-worker loop
(components/training), and writes the stage's DVC outputs from the driver only:
    models/<exp>/model.pt      the final iteration's weights, mmseg layout {"state_dict", "meta"}
    metrics/<exp>/train.json   final and best mIoU / mAcc / aAcc (percent), iterations, time
    plots/<exp>/train.csv      one row per logged iteration (loss, lr, img/s; mIoU on evaluation rows)

The Ray run name is `<exp>-<hash of what changes the result>` (components/training/identity.py):
rerunning the same experiment resumes from its latest checkpoint; changed params, data or code start
a fresh run. A NaN/inf loss stops every worker cleanly (no Ray retry) and fails the stage with
NonFiniteLossError, the last good checkpoint kept in storage.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import yaml

from components.atomic import atomic_write_text
from components.behind_published import behind_summary, noise_band
from components.console import warn
from components.learning.data.validate import DataError
from components.learning.distributed import BatchSplitError, plan_batches
from components.learning.experiment import RunConfig, flat_settings
from components.learning.tuning import apply_tuned
from components.preflight import preflight, preflight_disk, preflight_hardware, preflight_ray
from components.published_log import recorded_curve
from components.ray_cluster import connect_ray, scoped_env, shutdown_ray
from components.storage import endpoint_env
from components.tracking import flat_params, git_commit, open_run
from components.training.checkpointing import (
    DamagedCheckpointError,
    export_weights,
    finished_checkpoint,
    prune_finished_run,
    read_curve,
    read_summary,
)
from components.training.contract import NonFiniteLossError, RunInfo, WorkerResult
from components.training.data_sync import manifest_hash, publish_dataset
from components.training.identity import code_hash, run_name
from components.training.trainer import build_trainer, describe_init, fetch_pretrained, log_interval, run_exists
from components.weights import publish
from pipeline.config import (
    CODE_ROOT,
    Params,
    code_deps,
    model_file,
    plots_dir,
    published_record,
    seeded_name,
    train_metrics_file,
    tune_dir,
)


def train_experiment(params: Params, name: str, *, tuned: bool = False, profile: str | None = None,
                     out_root: Path | str | None = None, hooks=None, seed: int | None = None) -> dict:
    """Train experiment `name` (resuming its Ray run if one exists); write its DVC outputs under out_root
    (default: the repo). `tuned`: on the schedule its sweep found (tune/<name>/best_params.yaml), as
    experiment `<name>-tuned` (stage train_tuned). `seed`: one of params' seeds (default train.seed), as
    `<name>-s<seed>` (stages train_seed, train_tuned_seed). `hooks` (tests only): the loop's
    fault-injection seam."""
    cfg, stage = run_config(params, name, tuned=tuned, profile=profile, seed=seed)
    # Bad input fails here, in one line each, before Ray starts: the batch split, the pretrained weights
    # (fetched once, checked), then the preflight (prepared data, tracking server, storage writable).
    for workers in range(cfg.execution.min_workers or cfg.execution.num_workers, cfg.execution.num_workers + 1):
        plan_batches(cfg.recipe.batch_size, workers, cfg.execution.micro_batch_size)
    cfg, weights = fetch_pretrained(cfg, params.root, params.cache_dir)
    with scoped_env(endpoint_env(cfg.location.endpoint_url, cfg.location.region)):
        preflight(cfg)
        return _train(cfg, stage, Path(out_root or params.root), hooks, params.root, weights)


def run_config(params: Params, name: str, *, tuned: bool = False, profile: str | None = None,
               seed: int | None = None) -> tuple[RunConfig, str]:
    """(config, DVC stage) of one training run: `name` with `seed` (`<name>-s<seed>` unless train.seed),
    on its sweep's schedule when `tuned` (`<name>-tuned`, `<name>-tuned-s<seed>`)."""

    cfg = params.experiment(name, profile, seed=seed)
    stage = f"train@{name}" if cfg.name == name else f"train_seed@{name}-{cfg.recipe.seed}"
    if tuned:   # a missing or mismatched file fails in one line saying how to get it
        tuned_name = seeded_name(f"{name}-tuned", cfg.recipe.seed, params.train.seed)
        cfg = apply_tuned(cfg.updated(name=name), tune_dir(params.root, name) / "best_params.yaml")
        cfg = cfg.updated(name=tuned_name)
        stage = "train_tuned" if tuned_name == f"{name}-tuned" else f"train_tuned_seed@{cfg.recipe.seed}"
    return cfg, stage


def write_outputs(latest, cfg: RunConfig, out_root: Path) -> dict:
    """models/, metrics/ and plots/ of the experiment from the run's final checkpoint `latest`: the final
    model is the table's model (as mmseg's, the last iteration), never the best of the validation
    checkpoints, which would pick on the split the table reports; the best validation figure is kept,
    labelled. The model file is checked against the checkpoint's checksums.json."""

    summary = read_summary(latest)
    if summary["iteration"] != cfg.max_iters:
        raise RuntimeError(f"{cfg.name}: the last checkpoint is at iteration {summary['iteration']}, not "
                           f"{cfg.max_iters}, under {latest.path}")
    best = summary["best"]

    model_path, metrics_path = model_file(out_root, cfg.name), train_metrics_file(out_root, cfg.name)
    curve_path = plots_dir(out_root, cfg.name) / "train.csv"
    export_weights(latest, model_path)
    atomic_write_text(curve_path, read_curve(latest))
    images = cfg.max_iters * cfg.recipe.batch_size
    metrics = {
        "final": {k: summary[k] for k in ("iteration", "mIoU", "mAcc", "aAcc")},   # models/<exp>/model.pt
        "best_val": {k: best[k] for k in ("iteration", "mIoU", "mAcc", "aAcc")},   # for reference only
        "precision": cfg.recipe.precision, "pretrained": cfg.recipe.pretrained,
        "train_time_s": round(summary["train_time_s"], 1),
        # [[iteration, workers], ...]: where the run started and every elastic resize (a checkpoint written
        # before this was recorded: none known)
        "world_sizes": summary.get("world_sizes", []),
        "img_s": round(images / summary["train_time_s"], 3) if summary["train_time_s"] > 0 else None,
    }
    published = _published_val(cfg, out_root)
    if published:   # since when the run trails the published curve by more than the noise (report)
        ours = [{"iteration": int(r["iteration"]), "mIoU": float(r["mIoU"])}
                for r in csv.DictReader(io.StringIO(read_curve(latest))) if r.get("mIoU")]
        metrics["behind_published"] = behind_summary(ours, published, noise_band(cfg.recipe.dataset))
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return {"model": model_path, "metrics": metrics_path, "curve": curve_path, **metrics}


def _train(cfg: RunConfig, stage: str, out_root: Path, hooks, repo: Path, weights: Path | None) -> dict:
    data_hash, code = manifest_hash(cfg.location.data_dir), code_hash(CODE_ROOT, code_deps("train"))
    ray_name = run_name(cfg, data_hash, code)
    run_uri = f"{cfg.location.storage_path.rstrip('/')}/{ray_name}"
    resuming = run_exists(cfg.location.storage_path, ray_name)
    track = _Tracking(cfg, ray_name, resuming, _tags(cfg, stage, data_hash, code, repo))
    tic = time.perf_counter()
    final = finished_checkpoint(run_uri, cfg.max_iters) if resuming else None
    if final is not None:   # finished before (the stage forced, or only execution settings changed)
        outputs = _outputs_of_finished_run(cfg, final, ray_name, out_root, track, tic)
        if outputs is not None:
            return outputs
    preflight_disk(cfg, run_uri, out_root=out_root)
    started_ray = connect_ray(cfg.execution.ray_address)
    try:
        return _fit(cfg, ray_name, resuming, out_root, hooks, weights, track, data_hash, tic)
    finally:
        if started_ray:
            shutdown_ray()


def _tags(cfg: RunConfig, stage: str, data_hash: str, code: str, repo: Path) -> dict:
    commit = git_commit(repo)
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "dvc_stage": stage,
            "dataset_manifest_sha256": data_hash, "code_sha256": code, "experiment": cfg.name, "profile": cfg.profile}


class _Tracking:
    """Opens the run's MLflow run (resumed with the Ray run), with its params, tags and config.yaml."""

    def __init__(self, cfg: RunConfig, ray_name: str, resuming: bool, tags: dict):
        self.cfg, self.ray_name, self.resuming, self.tags = cfg, ray_name, resuming, tags

    def open(self):
        flat = flat_settings(self.cfg)
        tracker = open_run(self.cfg.tracking_uri, experiment=self.cfg.recipe.dataset, run_name=self.ray_name,
                           resume=self.resuming, params=flat, tags=self.tags)
        tracker.log_text(yaml.safe_dump(flat_params(flat), sort_keys=False), "config.yaml")
        return tracker


def _outputs_of_finished_run(cfg: RunConfig, final, ray_name: str, out_root: Path, track: _Tracking,
                             tic: float) -> dict | None:
    """The stage's outputs from a finished run's final checkpoint, no training; None where its weights
    are damaged or gone (said in one line): the caller trains again."""

    print(f"[train driver] {cfg.name}: Ray run {ray_name} under {cfg.location.storage_path} finished already: its "
          f"outputs from the final checkpoint, no training", flush=True)
    try:
        outputs = write_outputs(final, cfg, out_root)
    except DamagedCheckpointError as e:
        warn(f"[train driver] {cfg.name}: {e}: training again")
        return None
    prune_finished_run(final)   # a run finished before this pruning existed
    tracker = track.open()
    _log_outputs(tracker, cfg.name, outputs, None, tic)
    return {**outputs, "run_name": ray_name, "mlflow_run_id": tracker.run_id, "result_path": final.path,
            "start_iteration": cfg.max_iters, "median_step_s": None, "mlflow_failures": 0,
            "driver_mlflow_failures": tracker.failures}


def _fit(cfg: RunConfig, ray_name: str, resuming: bool, out_root: Path, hooks, weights: Path | None,
         track: _Tracking, data_hash: str, tic: float) -> dict:
    """Trains the run on Ray (resuming it when it exists) and writes the stage's outputs from its final
    checkpoint; the MLflow run says FINISHED, FAILED or KILLED."""

    preflight_ray(cfg, num_workers=cfg.execution.min_workers)   # elastic: it starts with min_workers
    preflight_hardware(cfg)   # GPU profiles: every GPU node's torch, driver, kernels, /dev/shm
    print(f"[train driver] {cfg.name}: Ray run {ray_name} under {cfg.location.storage_path} "
          f"({'resuming' if resuming else 'new'}), {_workers(cfg)}, profile {cfg.profile}, "
          f"{cfg.recipe.precision}, {describe_init(cfg)}", flush=True)
    tracker = track.open()
    try:
        run_info = _run_info(cfg, tracker.run_id, data_hash, weights, out_root)
        # The stage's process ends after this one run: Ray frees its placement group with it.
        result = build_trainer(cfg, ray_name, run_info, hooks=hooks, pg_cleaner=False).fit()
        worker: WorkerResult | None = result.return_value
        tracker.fail_fast = True   # after a long run, a dead server must not hold the stage for minutes
        if worker is not None and worker.stopped:
            raise _non_finite_error(cfg, worker.stopped, result, tracker)
        if result.checkpoint is None:
            raise RuntimeError(f"{cfg.name}: training reported no checkpoint (max_iters {cfg.max_iters})")
        outputs = write_outputs(result.checkpoint, cfg, out_root)
    except KeyboardInterrupt:
        tracker.set_status("KILLED")
        raise
    except BaseException as e:
        tracker.set_status("FAILED")   # the Ray run stays in storage: rerunning resumes it
        bad_data = _worker_data_error(e)
        if bad_data is not None:       # one line naming the file, not Ray's multi-page report
            raise bad_data from None
        raise
    prune_finished_run(result.checkpoint)
    _log_outputs(tracker, cfg.name, outputs, worker, tic)
    return {**outputs, "run_name": ray_name, "mlflow_run_id": tracker.run_id, "result_path": result.path,
            "start_iteration": worker.start_iteration if worker else None,
            "median_step_s": worker.median_step_s if worker else None,
            "mlflow_failures": worker.mlflow_failures if worker else 0, "driver_mlflow_failures": tracker.failures}


def _workers(cfg: RunConfig) -> str:
    ex = cfg.execution
    if not ex.elastic:
        return f"{ex.num_workers} workers"
    return (f"{ex.min_workers}..{ex.num_workers} workers (elastic: a lost node shrinks the run, which resumes "
            f"from its latest checkpoint with the same global batch {cfg.recipe.batch_size})")


def _published_val(cfg: RunConfig, out_root: Path) -> list[dict]:
    """The published run's evaluations, as the published@ stage recorded them ([]: none for this row)."""
    curve = recorded_curve(published_record(out_root, cfg.name))
    return curve.val if curve else []


def _run_info(cfg: RunConfig, mlflow_run_id: str, data_hash: str, weights: Path | None, out_root: Path) -> RunInfo:
    """What the workers get beside the config: the MLflow run, the data and pretrained weights published
    where every node can fetch them, and the published run's evaluations to compare with."""
    published = _published_val(cfg, out_root)

    return RunInfo(mlflow_run_id=mlflow_run_id, log_interval=log_interval(cfg), manifest_sha256=data_hash,
                   published_val=tuple(published), noise_band=noise_band(cfg.recipe.dataset) if published else None,
                   checkpoint_on_preemption=True,
                   data_uri=publish_dataset(cfg.location.data_dir, cfg.location.storage_path, data_hash),
                   pretrained_path=str(weights) if weights else None,
                   pretrained_uri=publish(weights, cfg.location.storage_path, cfg.recipe.pretrained_sha256)
                   if weights else None)


def _log_outputs(tracker, name: str, outputs: dict, worker: WorkerResult | None, tic: float) -> None:
    """The finished run into MLflow: the final model's figures (the table's) and the best validation
    one labelled as such, the curve and metrics files; one line saying what was written."""
    tracker.log_metrics({f"best_val_{k}": v for k, v in outputs["best_val"].items() if k != "iteration"}
                        | {f"final_{k}": v for k, v in outputs["final"].items() if k != "iteration"},
                        step=outputs["final"]["iteration"])
    tracker.set_tags({"best_val_iteration": outputs["best_val"]["iteration"]})
    # Not the model: models/<exp>/model.pt is DVC's; the report uploads the champions' when registering.
    for path, folder in ((outputs["curve"], "curves"), (outputs["metrics"], "metrics")):
        tracker.log_artifact(path, folder)
    tracker.set_status("FINISHED")
    print(f"[train driver] {name}: done in {time.perf_counter() - tic:.0f} s; final mIoU "
          f"{outputs['final']['mIoU']:.2f} (the model written; best on val {outputs['best_val']['mIoU']:.2f} "
          f"at iteration {outputs['best_val']['iteration']}); wrote {outputs['model']}", flush=True)
    worker_failures = worker.mlflow_failures if worker else 0
    if worker_failures or tracker.failures:
        print(f"[train driver] {name}: MLflow tracking failed during the run ({worker_failures} failed "
              f"call(s) on rank 0, {tracker.failures} in the driver): MLflow run {tracker.run_id} may "
              f"lack metrics or artifacts; the stage's outputs are complete", flush=True)


def _worker_data_error(error: BaseException):
    """The DataError (a prepared file unreadable) or BatchSplitError (an elastic group of a size the global
    batch does not split over) behind a Ray worker-group failure, in one line with the fix."""

    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)   # Ray wraps the worker's exception with its traceback
        if isinstance(base, DataError):
            return DataError(f"{base} (the prepared data changed after `dnlseg prepare`: rerun it, "
                             f"or `dvc pull` the prepared splits)")
        if isinstance(base, BatchSplitError):
            return BatchSplitError(f"{base} (in the worker group Ray Train started: every count from "
                                   f"min_workers to num_workers must split the global batch)")
    return None


def _non_finite_error(cfg: RunConfig, message: str, result, tracker) -> NonFiniteLossError:
    """The stage's error for a NaN/inf stop: what happened and which checkpoint is kept where."""

    latest = result.checkpoint
    kept = (f"the last good checkpoint ({read_summary(latest)['iteration']}) is "
            f"kept in {latest.path}" if latest else "no checkpoint was reported before it")
    text = (f"{cfg.name}: {message.split(': stopping')[0]}: training stopped, {kept}; rerunning resumes "
            f"there and meets it again: lower train.lr or use precision fp32 (a fresh run)")
    tracker.set_tags({"dnlseg.failure": text[:500]})
    print(f"[train driver] {text}", flush=True)
    return NonFiniteLossError(text)
