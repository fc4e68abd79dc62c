"""What the driver and the Ray Train workers hand each other: RunInfo in (beside the RunConfig), a
WorkerResult out, NonFiniteLossError when a NaN/inf loss stops the run. Imported by the loop (in the
workers), by trainer.py and by the drivers (pipeline/train.py, pipeline/tune.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunInfo:
    """What the driver adds to the config: where the run logs and where its data comes from."""

    mlflow_run_id: str | None = None
    log_interval: int = 1
    manifest_sha256: str | None = None    # of the prepared data: a node lacking it fetches this version
    data_uri: str | None = None           # where the driver published it (None: every node has data_dir)
    pretrained_path: str | None = None    # the driver's verified copy of cfg.recipe.pretrained
    pretrained_uri: str | None = None     # where the driver published it (None: every node reads the path)
    published_val: tuple = ()             # the published run's evaluations ({iteration, mIoU}): none, no check
    noise_band: float | None = None       # mIoU points our run may trail them by (the dataset's)
    checkpoint_on_preemption: bool = False  # on Ray's notice (not in Tune: its trials count reports)


@dataclass(frozen=True)
class WorkerResult:
    """What a worker's loop returns (Ray hands rank 0's to the driver as `Result.return_value`)."""

    start_iteration: int                  # where this attempt started (0: fresh; else resumed)
    iteration: int                        # the last iteration trained
    train_time_s: float
    median_step_s: float | None = None    # None: no step timed (stopped, or nothing left to train)
    mlflow_failures: int = 0              # failed MLflow calls on this rank
    stopped: str | None = None            # a NaN/inf loss stopped the run: the loop's message


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; the message says where and which checkpoint is kept."""
