"""Small MLflow helpers: one run per training run, logging that never takes training down.

The driver finds or creates the run (`open_run`) and hands its id to the workers; rank 0 logs into it
through a `RunLogger`; the driver sets the final status. Every MLflow call goes through
`RunLogger.safely`, so an unreachable tracking server costs a warning (once), not the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from components.console import redact, redact_text, warn  # redact / redact_text: re-exported

RUN_NAME_TAG = "dnlseg.run_name"       # the deterministic Ray run name: the key to resume a run
RETRY_AFTER_S = 60.0                   # after a failure, skip MLflow calls this long instead of blocking
# Fail-fast HTTP settings for calls made while training runs (MLflow's defaults retry for minutes).
FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _first_line(error: Exception) -> str:
    text = redact_text(str(error).strip())
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def with_env_credentials(uri: str) -> str:
    """The driver hands workers the tracking URI without credentials (Ray keeps its train config in its
    state API); a process whose own $MLFLOW_TRACKING_URI is that URI plus credentials uses its own."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    return env if env and redact(env) == uri else uri


@contextlib.contextmanager
def environment_defaults(defaults: dict[str, str]):
    """MLflow reads its settings from the environment at each call: set these for one call only
    (settings the user exported win)."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / and spaces), e.g. ADE20K's 'bed ' -> 'bed'."""
    return re.sub(r"[^\w\-./ ]", "_", name.strip())


def flat_params(config: dict) -> dict[str, str]:
    """The flat resolved config as MLflow params (strings, secrets removed)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
        elif isinstance(value, (list, tuple)):
            value = "x".join(map(str, value)) if all(isinstance(v, int) for v in value) else str(list(value))
        out[key] = redact(str(value))[:6000]
    return out


def git_commit(repo: Path | str) -> str:
    """HEAD of the repo (+'-dirty'), or $DNLSEG_GIT_COMMIT where there is no .git (ray job working dirs)."""
    if os.environ.get("DNLSEG_GIT_COMMIT"):
        return os.environ["DNLSEG_GIT_COMMIT"]
    try:   # S603 / S607: fixed arguments, no shell; the user's git, from PATH
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,  # noqa: S603, S607
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],  # noqa: S603, S607
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a local sqlite store, keep artifacts next to the database (not in whatever the cwd is)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


class RunLogger:
    """Logs into one existing MLflow run. Failures are reported once and never raised.

    After a failure, calls are skipped for RETRY_AFTER_S seconds so an outage does not stall every
    training step on connection retries; logging resumes by itself when the server is back.
    """

    def __init__(self, tracking_uri: str, run_id: str | None, who: str = "mlflow", fail_fast: bool = False,
                 client=None):
        self.tracking_uri, self.run_id, self.who = tracking_uri, run_id, who
        # MLflow's HTTP client retries for minutes by default: while training runs, give up quickly.
        self.fail_fast = fail_fast
        self.failures = 0
        self._client = client
        self._paused_until = 0.0

    @property
    def client(self):
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def safely(self, what: str, call, final: bool = False) -> bool:
        """Run `call()` (any MLflow call on this run); a failure is a warning. `final` calls (the run's
        status) are tried even while paused: they are the last chance."""
        if self.run_id is None or (time.monotonic() < self._paused_until and not final):
            return False
        try:
            with environment_defaults(FAIL_FAST_ENV) if self.fail_fast else contextlib.nullcontext():
                call()
            return True
        except Exception as e:  # noqa: BLE001 - any tracking failure must leave training running
            self.failures += 1
            self._paused_until = time.monotonic() + RETRY_AFTER_S
            if self.failures == 1:
                warn(f"[{self.who}] warning: MLflow {what} failed ({_first_line(e)}); training continues, "
                     f"retrying every {RETRY_AFTER_S:.0f} s")
            return False

    def log_metrics(self, metrics: dict, step: int) -> bool:
        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and v == v]  # NaN (class absent) is left out, as mmseg's nanmean does
        return self.safely("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: dict) -> bool:
        items = [Param(k, v) for k, v in flat_params(params).items()]
        # log_batch takes at most 100 params per call.
        return self.safely("log_params", lambda: [self.client.log_batch(self.run_id, params=items[i:i + 100])
                                                  for i in range(0, len(items), 100)])

    def set_tags(self, tags: dict) -> bool:
        items = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        return self.safely("set_tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> bool:
        return self.safely("log_artifact",
                          lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> bool:
        return self.safely("log_text", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def set_status(self, status: str) -> bool:
        """RUNNING, FINISHED, FAILED or KILLED."""
        if status == "RUNNING":
            return self.safely("update_run", lambda: self.client.update_run(self.run_id, status="RUNNING"))

        def terminate():
            # MLflow prints "View run ... at: <tracking URI>" here, credentials included: print it redacted.
            with environment_defaults({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
                self.client.set_terminated(self.run_id, status)
            if self.tracking_uri.startswith(("http://", "https://")):
                sys.stdout.write(f"[{self.who}] MLflow run {self.run_id}: "
                                 f"{redact(self.tracking_uri).rstrip('/')}/#/runs/{self.run_id}\n")

        return self.safely("set_terminated", terminate, final=True)


def open_run(tracking_uri: str, experiment: str, run_name: str, resume: bool, tags: dict | None = None,
             params: dict | None = None) -> RunLogger:
    """Find the run to resume (the latest with tag RUN_NAME_TAG == run_name) or create one.

    `resume` says whether the Ray run exists in storage: a fresh Ray run always gets a fresh MLflow run,
    so one MLflow run holds exactly one Ray run's history. Params are logged on creation only (MLflow
    refuses to change a param). If MLflow is unreachable the returned logger has no run and does nothing.
    """
    logger = RunLogger(tracking_uri, run_id=None, who="train driver")
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, experiment)
        previous = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if resume and previous:
            run = previous[0]
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
        logger = RunLogger(tracking_uri, run.info.run_id, who="train driver", client=client)
    except Exception as e:  # noqa: BLE001 - tracking is optional for training
        warn(f"[train driver] warning: MLflow at {redact(tracking_uri)} unavailable ({_first_line(e)}); "
             f"training continues without tracking")
        return logger
    if not (resume and previous) and params:
        logger.log_params(params)
    logger.set_tags(tags or {})
    return logger


def ensure_experiment(client, experiment: str) -> str:
    """The id of MLflow experiment `experiment`, created if missing (a SQLite store keeps its artifacts
    beside the database)."""
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=artifact_location(client.tracking_uri, experiment))


def find_training_run(client, dataset: str, experiment: str) -> str | None:
    """The MLflow run of experiment `experiment`'s training (the latest finished one tagged with a train
    stage: train@<experiment>, or train_seed@... for a seed's run `<exp>-s<seed>`; else the latest), in
    MLflow experiment `dataset`."""
    found = client.get_experiment_by_name(dataset)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id],
                              filter_string=(f"tags.experiment = '{experiment}' "
                                             f"and tags.dvc_stage LIKE 'train%'"),
                              order_by=["attributes.start_time DESC"], max_results=20)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs)[0].info.run_id if runs else None


def mark_training_experiment(client, dataset: str) -> str:
    """MLflow 3's UI opens an experiment on its GenAI overview unless told it holds model training runs.
    Returns the experiment id."""
    experiment = client.get_experiment_by_name(dataset)
    if "mlflow.experimentKind" not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return experiment.experiment_id


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str | None, node_id: str | None = None, interval_s: float = 10.0):
    """While the block runs, this node's CPU, memory, disk, network and (where nvidia-ml-py sees NVIDIA
    GPUs) each GPU's utilisation and memory go into the run every `interval_s` as `system/...` metrics
    (`system/<node_id>/...` on a multi-node run), so an idle GPU shows in the MLflow UI. A monitor
    that cannot start costs a warning, never the run."""
    monitor = None
    if run_id:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a restarted worker group continues the steps instead of overwriting them.
            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                           node_id=node_id, tracking_uri=tracking_uri)
            monitor.start()
        except Exception as e:  # noqa: BLE001 - monitoring is optional
            warn(f"[{run_id}] warning: MLflow system metrics unavailable ({_first_line(e)})")
            monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.finish()
