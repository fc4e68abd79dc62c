"""The TorchTrainer of one training run. Used by the train stage (one run) and the tune stage (one run
per trial); what it leaves in storage is read through components/training/checkpointing.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from components.learning.experiment import RunConfig
from components.learning.models.checkpoint import check_pretrained_backbone
from components.storage import endpoint_env, exists, pyarrow_filesystem
from components.tracking import redact
from components.training.contract import RunInfo, WorkerResult
from components.weights import fetch, sha256_file

if TYPE_CHECKING:
    from components.learning.loop import LoopHooks

RESIZE_INTERVAL_ENV = "DNLSEG_RESIZE_INTERVAL_S"


def train_loop_per_worker(config: dict) -> WorkerResult:
    """What every Ray Train worker runs. The loop (torch's training stack, the data pipeline) is imported
    here, in the worker: the driver and Ray Train's controller unpickle this function and need none of it."""
    from components.training.worker import run_worker

    return run_worker(config)


class LeanTorchTrainer(TorchTrainer):
    """TorchTrainer without the helper actors our runs do not use, each an actor process that imports
    Ray Train (bench/bench_train_startup.py measures them):
    - Ray Data's dataset manager, started for every run to serve `datasets=`, which ours never pass (the
      loop reads its own files); its callback also made the controller import Ray Data;
    - with `pg_cleaner=False`, the placement-group cleaner, which frees the workers' placement group
      when the controller dies while its driver lives on. A driver that runs one fit and exits (the train
      stage) needs none: Ray removes a job's placement groups when the job ends."""

    def __init__(self, *args, pg_cleaner: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._unused = () if pg_cleaner else (PlacementGroupCleanerCallback,)
        self._unused += () if self.datasets else (DatasetsCallback,)

    def _create_default_callbacks(self):
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, self._unused)]


def log_interval(cfg: RunConfig) -> int:
    """mmseg logs every 50 iterations; short runs log every iteration so their curves have points."""
    return max(1, min(50, cfg.eval_interval // 10))


def build_trainer(cfg: RunConfig, ray_name: str, run: RunInfo, *, hooks: LoopHooks | None = None,
                  callbacks: list | None = None, pg_cleaner: bool = True):
    """TorchTrainer over the per-worker loop: DDP workers, checkpoints kept (best by mIoU + latest),
    worker-group restarts from the latest checkpoint on failure. The loop gets the config itself
    (credentials never travel in it: Ray shows it in its state API, so workers get the tracking URI
    without them and use their own environment's). An s3:// storage_path on a custom endpoint gets an
    explicit filesystem (Ray's controller may not share the driver's environment) and the workers get
    the endpoint variables; credentials stay in each node's own environment."""

    storage, env = {"storage_path": cfg.location.storage_path}, {}
    if cfg.location.storage_path.startswith("s3://") or cfg.location.endpoint_url:
        env = endpoint_env(cfg.location.endpoint_url, cfg.location.region)
    if cfg.location.storage_path.startswith("s3://"):
        fs, path = pyarrow_filesystem(cfg.location.storage_path, cfg.location.endpoint_url, cfg.location.region)
        storage = {"storage_path": path, "storage_filesystem": fs}
    return LeanTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.updated(tracking_uri=redact(cfg.tracking_uri)), "run": run,
                           "hooks": hooks},
        scaling_config=ray.train.ScalingConfig(**worker_count(cfg), use_gpu=cfg.execution.use_gpu,
                                               resources_per_worker=cfg.execution.resources_per_worker or None),
        run_config=ray.train.RunConfig(
            name=ray_name, **storage, callbacks=callbacks or None,
            worker_runtime_env={"env_vars": env} if env else None,
            # num_to_keep=1 by mIoU keeps the best; Ray always keeps the latest too (for resume).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="mIoU",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.execution.max_failures)),
        pg_cleaner=pg_cleaner,
    )


def worker_count(cfg: RunConfig) -> dict:
    """ScalingConfig's worker count: fixed, or elastic, (min, max) (Ray Train starts with what the cluster
    has, at least min, shrinks when a node is lost, grows back; each time the group restarts from the latest
    checkpoint). How often Ray considers growing: $DNLSEG_RESIZE_INTERVAL_S (Ray's default, 60 s; tests
    set it small)."""
    ex = cfg.execution
    if not ex.elastic:
        return {"num_workers": ex.num_workers}
    interval = os.environ.get(RESIZE_INTERVAL_ENV)
    return {"num_workers": (ex.min_workers, ex.num_workers),
            **({"elastic_resize_monitor_interval_s": float(interval)} if interval else {})}


def fetch_pretrained(cfg: RunConfig, root: Path, cache_dir: Path) -> tuple[RunConfig, Path | None]:
    """Before Ray starts: the backbone's ImageNet weights fetched once into the cache, verified (sha256
    prefix in the name, every backbone tensor present), and their sha256 put in the config, hence in
    the run identity and the MLflow params. Random init (`none`) gives (cfg, None)."""

    if cfg.recipe.pretrained == "none":
        return cfg, None
    path = fetch(cfg.recipe.pretrained, root=root, cache_dir=cache_dir)
    check_pretrained_backbone(path, cfg.depth)
    return cfg.updated(recipe={"pretrained_sha256": sha256_file(path)}), path


def describe_init(cfg: RunConfig) -> str:
    """How the backbone starts, for the stage's first line."""
    if cfg.recipe.pretrained == "none":
        return "backbone from random init (pretrained: none)"
    return f"backbone from {cfg.recipe.pretrained} (sha256 {cfg.recipe.pretrained_sha256[:12]})"


def run_exists(storage_path: str, name: str) -> bool:
    """Whether Ray run `name` has anything in storage (S3 through storage.exists, with retries)."""

    return exists(f"{storage_path.rstrip('/')}/{name}" + ("/" if "://" in storage_path else ""))
