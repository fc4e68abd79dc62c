"""Stage `train@<experiment>`: one experiment of params.yaml trained with Ray Train, tracked in MLflow.

Reads the resolved config, starts (or joins) Ray, runs TorchTrainer over `train_loop_per_worker`, and
writes the stage's DVC outputs from the driver only:
    models/<exp>/model.pt      best checkpoint by mIoU, mmseg layout {"state_dict", "meta"}
    metrics/<exp>/train.json   final and best mIoU / mAcc / aAcc (percent), iterations, time
    plots/<exp>/train.csv      one row per logged iteration (loss, lr, img/s; mIoU on evaluation rows)

The Ray run name is `<exp>-<hash of what changes the result>`: rerunning the same experiment resumes
from its latest checkpoint; changed params, data or code start a fresh run.

Before any expensive work the stage runs pipeline/preflight.py (data prepared, tracking reachable,
storage writable, then Ray's resources); a NaN/inf loss stops every worker cleanly (no Ray retry) and
fails the stage with NonFiniteLossError, the last good checkpoint kept in storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.config import REPO_ROOT, TrainConfig, resolve_experiment

# Fields that say where and how fast a run executes, not what it learns: changing them resumes the run.
EXECUTION_FIELDS = frozenset({"ray_address", "tracking_uri", "storage_path", "data_dir", "loader_workers",
                              "max_failures", "num_workers", "use_gpu", "resources_per_worker",
                              "micro_batch_size", "storage_endpoint_url", "storage_region"})
# A Ray the stage starts itself serves its dashboard (which accepts jobs) on loopback only.
LOCAL_RAY_OPTIONS = {"dashboard_host": "127.0.0.1"}


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; the message says where and which checkpoint is kept."""


# The train stage's code deps in dvc.yaml (keep the two lists equal): a change there retrains from
# scratch instead of resuming. storage, tuning and preflight are imported by this stage at run time.
CODE_DEPS = ("components/models", "components/data", "components/training", "components/losses.py",
             "components/metrics.py", "components/schedules.py", "components/tracking.py",
             "components/storage.py", "components/tuning.py", "pipeline/train.py", "pipeline/config.py",
             "pipeline/preflight.py")


def code_hash(root: Path = REPO_ROOT) -> str:
    """sha256 over the .py files of CODE_DEPS (paths and contents; caches and data ignored)."""
    digest = hashlib.sha256()
    files = []
    for entry in CODE_DEPS:
        path = root / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_name(cfg: TrainConfig, data_hash: str, code: str) -> str:
    """`<exp>-<8 hex>` over what the run learns: the config minus EXECUTION_FIELDS, the data, the code."""
    learned = {k: v for k, v in cfg.to_flat_dict().items() if k not in EXECUTION_FIELDS}
    blob = json.dumps({"config": learned, "data": data_hash, "code": code}, sort_keys=True, default=str)
    return f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def log_interval(cfg: TrainConfig) -> int:
    """mmseg logs every 50 iterations; short runs log every iteration so their curves have points."""
    return max(1, min(50, cfg.eval_interval // 10))


def loop_config(cfg: TrainConfig, *, mlflow_run_id: str, data_hash: str, data_uri: str,
                test_hooks: dict | None = None) -> dict:
    """What every worker's loop gets (TorchTrainer's train_loop_config): the flat config and where the
    run logs and reads its data. Credentials never travel in it (Ray shows it in its state API): workers
    get the tracking URI without them and use their own environment's (tracking.with_env_credentials)."""
    from components.data import class_names
    from components.tracking import redact

    return {**cfg.to_flat_dict(), "tracking_uri": redact(cfg.tracking_uri), "mlflow_run_id": mlflow_run_id,
            "log_interval": log_interval(cfg), "class_names": list(class_names(cfg.dataset)),
            "manifest_sha256": data_hash, "data_uri": data_uri, "test_hooks": test_hooks or {}}


# What start_local_ray changed in os.environ, restored by shutdown_ray.
_ENV_BEFORE_LOCAL_RAY: dict[str, str | None] = {}


def start_local_ray(**init_kwargs) -> None:
    """Start a Ray on this machine, its dashboard (which accepts jobs) on loopback at a port picked here,
    and point this process, its children and the job's workers at THIS cluster.

    Ray Train's PlacementGroupCleaner (an actor) finds a dead controller through the state API; without an
    address it looks for "the" Ray on the machine and fails when several run (other people's, other
    tests'): "ConnectionError: Found multiple active Ray instances", and the freed CPUs never come back.
    RAY_API_SERVER_ADDRESS, which the state API reads first, goes to every worker in the job's runtime env;
    RAY_ADDRESS (known only once the cluster runs) is for this process and what it starts.
    """
    import ray

    shutdown_ray()   # a Ray we started before and someone shut down: its addresses are stale
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    _ENV_BEFORE_LOCAL_RAY.update({k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")})
    os.environ.pop("RAY_ADDRESS", None)   # we start a cluster: ray.init must not join one
    try:
        # address="local": without it ray.init joins the latest cluster started on this machine
        # (/tmp/ray/ray_current_cluster), e.g. someone else's, instead of starting ours.
        context = ray.init(address="local", **LOCAL_RAY_OPTIONS, dashboard_port=port,
                           runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}}, **init_kwargs)
    except BaseException:
        shutdown_ray()
        raise
    info = context.address_info
    os.environ.update({"RAY_API_SERVER_ADDRESS": api,
                       "RAY_ADDRESS": info.get("gcs_address") or info["address"]})


def shutdown_ray() -> None:
    """ray.shutdown(), and the environment as it was before start_local_ray (if it ran)."""
    import ray

    ray.shutdown()
    for key, value in _ENV_BEFORE_LOCAL_RAY.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _ENV_BEFORE_LOCAL_RAY.clear()


def run_with_local_ray(command: list[str]) -> int:
    """Run `command` (e.g. `dvc repro`) with one local Ray that lives as long as it: every stage it starts
    joins that cluster through $RAY_ADDRESS instead of starting and stopping its own (a sample training
    stage, measured: 47 s alone, 38-42 s joining). With $RAY_ADDRESS already set, the command runs
    against that cluster and nothing is started. Returns the command's exit status."""
    import subprocess

    started = not os.environ.get("RAY_ADDRESS")
    if started:
        start_local_ray()   # sets RAY_ADDRESS / RAY_API_SERVER_ADDRESS / RAY_AUTH_MODE for the child
    try:
        with subprocess.Popen(command) as child:
            try:
                return child.wait()
            except KeyboardInterrupt:   # Ctrl-C reached the child too: let it stop cleanly first
                return child.wait()
    finally:
        if started:
            shutdown_ray()


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(address: str) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one. True if we started it
    (end it with shutdown_ray)."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None)
    else:
        start_local_ray()
    return True


def run_exists(storage_path: str, name: str) -> bool:
    """Whether Ray run `name` has anything in storage (S3 through storage.exists, with retries)."""
    from components.storage import exists

    return exists(f"{storage_path.rstrip('/')}/{name}" + ("/" if "://" in storage_path else ""))


@contextlib.contextmanager
def scoped_env(env: dict[str, str]):
    """Set these environment variables for the stage (boto3, pyarrow, MLflow read them), then restore."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _read_text(checkpoint, filename: str) -> str:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{filename}") as f:
        return f.read().decode()


def _copy_atomic(checkpoint, filename: str, dest: Path) -> None:
    """Stream a file out of a checkpoint (local or s3://) into `dest` via a temp file + os.replace."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)   # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, "wb") as out, \
                checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{filename}") as src:
            shutil.copyfileobj(src, out, length=16 << 20)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    from components.training.checkpointing import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def write_outputs(result, cfg: TrainConfig, out_root: Path) -> dict:
    """models/, metrics/ and plots/ of the experiment, from the run's latest and best checkpoints."""
    latest = result.checkpoint
    if latest is None:
        raise RuntimeError(f"{cfg.name}: training reported no checkpoint (max_iters {cfg.max_iters})")
    summary = json.loads(_read_text(latest, "summary.json"))
    best = summary["best"]
    # The best checkpoint: the one the loop marked best (CheckpointConfig keeps it next to the latest).
    kept = {metrics.get("iteration"): ckpt for ckpt, metrics in (result.best_checkpoints or [])}
    if best["iteration"] not in kept:
        raise RuntimeError(f"{cfg.name}: the best checkpoint (iteration {best['iteration']}) is not among "
                           f"the kept ones {sorted(kept)} under {result.path}")
    best_ckpt = kept[best["iteration"]]

    model_path = out_root / "models" / cfg.name / "model.pt"
    metrics_path = out_root / "metrics" / cfg.name / "train.json"
    curve_path = out_root / "plots" / cfg.name / "train.csv"
    _copy_atomic(best_ckpt, "model.pt", model_path)
    _write_text_atomic(curve_path, _read_text(latest, "curve.csv"))
    images = cfg.max_iters * cfg.batch_size
    metrics = {
        "final": {k: summary[k] for k in ("iteration", "mIoU", "mAcc", "aAcc")},
        "best": {k: best[k] for k in ("iteration", "mIoU", "mAcc", "aAcc")},
        "train_time_s": round(summary["train_time_s"], 1),
        "img_s": round(images / summary["train_time_s"], 3) if summary["train_time_s"] > 0 else None,
    }
    _write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return {"model": model_path, "metrics": metrics_path, "curve": curve_path, **metrics}


def build_trainer(cfg: TrainConfig, ray_name: str, loop_config: dict, callbacks: list | None = None):
    """TorchTrainer over the per-worker loop: DDP workers, checkpoints kept (best by mIoU + latest),
    worker-group restarts from the latest checkpoint on failure. An s3:// storage_path on a custom
    endpoint gets an explicit filesystem (Ray's controller may not share the driver's environment) and
    the workers get the endpoint variables; credentials stay in each node's own environment."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from components.storage import endpoint_env, pyarrow_filesystem
    from components.training.loop import train_loop_per_worker

    storage, env = {"storage_path": cfg.storage_path}, {}
    if cfg.storage_path.startswith("s3://") or cfg.storage_endpoint_url:
        env = endpoint_env(cfg.storage_endpoint_url, cfg.storage_region)
    if cfg.storage_path.startswith("s3://"):
        fs, path = pyarrow_filesystem(cfg.storage_path, cfg.storage_endpoint_url, cfg.storage_region)
        storage = {"storage_path": path, "storage_filesystem": fs}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=cfg.resources_per_worker or None),
        run_config=ray.train.RunConfig(
            name=ray_name, **storage, callbacks=callbacks or None,
            worker_runtime_env={"env_vars": env} if env else None,
            # num_to_keep=1 by mIoU keeps the best; Ray always keeps the latest too (for resume).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="mIoU",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
    )


def train_experiment(params: dict, name: str, *, profile: str | None = None,
                     out_root: Path | str = REPO_ROOT, test_hooks: dict | None = None) -> dict:
    """Train experiment `name` (resuming its Ray run if one exists); write its DVC outputs under out_root.

    `test_hooks` (tests only) reach the loop: fault injection, a fixed batch, per-rank fact dumps.
    """
    from components.storage import endpoint_env
    from components.training.distributed import plan_batches
    from components.tuning import apply_tuned
    from pipeline.preflight import preflight

    cfg = resolve_experiment(params, name, profile)
    if params["train"].get("use_tuned") and name == (params.get("tune") or {}).get("experiment"):
        # The schedule the tune stage found; a missing file fails in one line saying how to get it.
        cfg = apply_tuned(cfg, REPO_ROOT / "tune" / name / "best_params.yaml")
    # Bad input fails here, in one line each, before Ray starts: the batch split, then the preflight
    # (prepared data, tracking server, storage writable).
    plan_batches(cfg.batch_size, cfg.num_workers, getattr(cfg, "micro_batch_size", 0))
    with scoped_env(endpoint_env(cfg.storage_endpoint_url, cfg.storage_region)):
        preflight(cfg)
        return _train(cfg, name, Path(out_root), test_hooks)


def _train(cfg: TrainConfig, name: str, out_root: Path, test_hooks: dict | None) -> dict:
    from components.tracking import flat_params, git_commit, open_run
    from components.training.data_sync import manifest_hash, publish_dataset
    from pipeline.preflight import preflight_disk, preflight_ray

    data_hash, code = manifest_hash(cfg.data_dir), code_hash()
    ray_name = run_name(cfg, data_hash, code)
    preflight_disk(cfg, f"{cfg.storage_path.rstrip('/')}/{ray_name}", out_root=out_root)
    started_ray = connect_ray(cfg.ray_address)
    try:
        preflight_ray(cfg)
        resuming = run_exists(cfg.storage_path, ray_name)
        print(f"[train driver] {name}: Ray run {ray_name} under {cfg.storage_path} "
              f"({'resuming' if resuming else 'new'}), {cfg.num_workers} workers, profile {cfg.profile}",
              flush=True)
        flat = cfg.to_flat_dict()
        commit = git_commit(REPO_ROOT)
        tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "dvc_stage": f"train@{name}",
                "dataset_manifest_sha256": data_hash, "code_sha256": code, "experiment": name,
                "profile": cfg.profile}
        tracker = open_run(cfg.tracking_uri, experiment=cfg.dataset, run_name=ray_name, resume=resuming,
                           params=flat, tags=tags)
        tracker.log_text(yaml.safe_dump(flat_params(flat), sort_keys=False), "config.yaml")
        tic = time.perf_counter()
        try:
            config = loop_config(cfg, mlflow_run_id=tracker.run_id, data_hash=data_hash,
                                 data_uri=publish_dataset(cfg.data_dir, cfg.storage_path, data_hash),
                                 test_hooks=test_hooks)
            result = build_trainer(cfg, ray_name, config).fit()
            worker = result.return_value or {}
            tracker.fail_fast = True   # after a long run, a dead server must not hold the stage for minutes
            if worker.get("stopped"):
                raise _non_finite_error(cfg, worker["stopped"], result, tracker)
            outputs = write_outputs(result, cfg, out_root)
        except KeyboardInterrupt:
            tracker.set_status("KILLED")
            raise
        except BaseException as e:
            tracker.set_status("FAILED")   # the Ray run stays in storage: rerunning resumes it
            bad_data = _worker_data_error(e)
            if bad_data is not None:       # one line naming the file, not Ray's multi-page report
                raise bad_data from None
            raise
        tracker.log_metrics({f"best_{k}": v for k, v in outputs["best"].items() if k != "iteration"},
                            step=outputs["final"]["iteration"])
        for path, folder in ((outputs["model"], "model"), (outputs["curve"], "curves"),
                             (outputs["metrics"], "metrics")):
            tracker.log_artifact(path, folder)
        tracker.set_status("FINISHED")
        print(f"[train driver] {name}: done in {time.perf_counter() - tic:.0f} s; best mIoU "
              f"{outputs['best']['mIoU']:.2f} at iteration {outputs['best']['iteration']}, final "
              f"{outputs['final']['mIoU']:.2f}; wrote {outputs['model']}", flush=True)
        worker_failures = worker.get("mlflow_failures") or 0
        if worker_failures or tracker.failures:
            print(f"[train driver] {name}: MLflow tracking failed during the run ({worker_failures} failed "
                  f"call(s) on rank 0, {tracker.failures} in the driver): MLflow run {tracker.run_id} may "
                  f"lack metrics or artifacts; the stage's outputs are complete", flush=True)
        return {**outputs, "run_name": ray_name, "mlflow_run_id": tracker.run_id, "result_path": result.path,
                "start_iteration": worker.get("start_iteration"),
                "median_step_s": worker.get("median_step_s"), "mlflow_failures": worker_failures,
                "driver_mlflow_failures": tracker.failures}
    finally:
        if started_ray:
            shutdown_ray()


def _worker_data_error(error: BaseException):
    """The DataError (a prepared file unreadable) behind a Ray worker-group failure, with the fix."""
    from components.data.validate import DataError

    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)   # Ray wraps the worker's exception with its traceback
        if isinstance(base, DataError):
            return DataError(f"{base} (the prepared data changed after `dnlseg prepare`: rerun it, "
                             f"or `dvc pull` the prepared splits)")
    return None


def _non_finite_error(cfg: TrainConfig, message: str, result, tracker) -> NonFiniteLossError:
    """The stage's error for a NaN/inf stop: what happened and which checkpoint is kept where."""
    latest = result.checkpoint
    kept = (f"the last good checkpoint ({json.loads(_read_text(latest, 'summary.json'))['iteration']}) is "
            f"kept in {latest.path}" if latest else "no checkpoint was reported before it")
    text = (f"{cfg.name}: {message.split(': stopping')[0]}: training stopped, {kept}; rerunning resumes "
            f"there and meets it again: lower train.lr or use precision fp32 (a fresh run)")
    tracker.set_tags({"dnlseg.failure": text[:500]})
    print(f"[train driver] {text}", flush=True)
    return NonFiniteLossError(text)
