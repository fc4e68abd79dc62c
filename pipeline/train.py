"""Stage `train@<experiment>`: one experiment of params.yaml trained with Ray Train, tracked in MLflow.

Reads the resolved config, starts (or joins) Ray, runs TorchTrainer over `train_loop_per_worker`, and
writes the stage's DVC outputs from the driver only:
    models/<exp>/model.pt      best checkpoint by mIoU, mmseg layout {"state_dict", "meta"}
    metrics/<exp>/train.json   final and best mIoU / mAcc / aAcc (percent), iterations, time
    plots/<exp>/train.csv      one row per logged iteration (loss, lr, img/s; mIoU on evaluation rows)

The Ray run name is `<exp>-<hash of what changes the result>`: rerunning the same experiment resumes
from its latest checkpoint; changed params, data or code start a fresh run.
"""

from __future__ import annotations

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
                              "micro_batch_size"})


# The train stage's code deps in dvc.yaml: a change there retrains from scratch instead of resuming.
CODE_DEPS = ("components", "pipeline/train.py", "pipeline/config.py")


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


def _connect_ray(address: str) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    # Local: keep the dashboard; Ray Train's placement-group cleaner polls the state API it serves.
    ray.init(address=address or None)
    return True


def _run_exists(storage_path: str, name: str) -> bool:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    return fs.get_file_info(f"{root.rstrip('/')}/{name}").type != pyarrow.fs.FileType.NotFound


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


def build_trainer(cfg: TrainConfig, ray_name: str, loop_config: dict):
    """TorchTrainer over the per-worker loop: DDP workers, checkpoints kept (best by mIoU + latest),
    worker-group restarts from the latest checkpoint on failure."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from components.training.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=cfg.resources_per_worker or None),
        run_config=ray.train.RunConfig(
            name=ray_name, storage_path=cfg.storage_path,
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
    from components.data import class_names
    from components.tracking import flat_params, git_commit, open_run
    from components.training.data_sync import manifest_hash, publish_dataset
    from components.training.distributed import plan_batches

    cfg = resolve_experiment(params, name, profile)
    out_root = Path(out_root)
    # Bad input fails here, in one line, before Ray starts: the batch split and the prepared data.
    plan_batches(cfg.batch_size, cfg.num_workers, getattr(cfg, "micro_batch_size", 0))
    data_hash, code = manifest_hash(cfg.data_dir), code_hash()
    ray_name = run_name(cfg, data_hash, code)
    started_ray = _connect_ray(cfg.ray_address)
    try:
        resuming = _run_exists(cfg.storage_path, ray_name)
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
            loop_config = {**flat, "mlflow_run_id": tracker.run_id, "log_interval": log_interval(cfg),
                           "class_names": list(class_names(cfg.dataset)), "manifest_sha256": data_hash,
                           "data_uri": publish_dataset(cfg.data_dir, cfg.storage_path, data_hash),
                           "test_hooks": test_hooks or {}}
            result = build_trainer(cfg, ray_name, loop_config).fit()
            outputs = write_outputs(result, cfg, out_root)
        except KeyboardInterrupt:
            tracker.set_status("KILLED")
            raise
        except BaseException:
            tracker.set_status("FAILED")   # the Ray run stays in storage: rerunning resumes it
            raise
        tracker.log_metrics({f"best_{k}": v for k, v in outputs["best"].items() if k != "iteration"},
                            step=outputs["final"]["iteration"])
        for path, folder in ((outputs["model"], "model"), (outputs["curve"], "curves"),
                             (outputs["metrics"], "metrics")):
            tracker.log_artifact(path, folder)
        tracker.set_status("FINISHED")
        worker = result.return_value or {}
        print(f"[train driver] {name}: done in {time.perf_counter() - tic:.0f} s; best mIoU "
              f"{outputs['best']['mIoU']:.2f} at iteration {outputs['best']['iteration']}, final "
              f"{outputs['final']['mIoU']:.2f}; wrote {outputs['model']}", flush=True)
        return {**outputs, "run_name": ray_name, "mlflow_run_id": tracker.run_id, "result_path": result.path,
                "start_iteration": worker.get("start_iteration"),
                "median_step_s": worker.get("median_step_s")}
    finally:
        if started_ray:
            import ray

            ray.shutdown()
