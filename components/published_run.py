"""A published run in MLflow: its curve as a run of the dataset's experiment, beside ours.

The run is `<exp> (published)` in MLflow experiment `<dataset>` (where our runs of that dataset are,
components/tracking.py), tagged `source: published`, with OUR metric names and units at the same steps
(the training iteration): loss, decode_loss, aux_loss, lr, memory_gb every logged iteration, mIoU / mAcc /
aAcc in percent at each evaluation. So the UI's compare view overlays our runs on it with no setting.

Idempotent: a finished run of the same log (same sha256) is reused as it is; one of another log (the
file changed) or one cut short (status not FINISHED) is deleted and logged again.
"""

from __future__ import annotations

import time

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from components.published_log import TRAIN_COLUMNS, VAL_COLUMNS, PublishedCurve
from components.tracking import ensure_experiment, environment_defaults, flat_params, mark_training_experiment

SOURCE_TAG, SOURCE = "source", "published"
SHA256_TAG = "dnlseg.published_sha256"
_BATCH = 1000   # MLflow's log_batch takes at most 1000 metrics per call


def run_name(experiment: str) -> str:
    return f"{experiment} (published)"


def metric_rows(curve: PublishedCurve) -> list[tuple[str, float, int]]:
    """(name, value, step) of every value the curve has, steps = training iterations."""
    rows = []
    for table, columns in ((curve.train, TRAIN_COLUMNS), (curve.val, VAL_COLUMNS)):
        for row in table:
            rows += [(k, row[k], row["iteration"]) for k in columns[1:] if row.get(k) is not None]
    return rows


def _existing(client, experiment_id: str, experiment: str) -> list:
    return client.search_runs([experiment_id], filter_string=(f"tags.{SOURCE_TAG} = '{SOURCE}' and "
                                                              f"tags.experiment = '{experiment}'"))


def log_published_run(tracking_uri: str, dataset: str, experiment: str, curve: PublishedCurve, *,
                      sha256: str, source: str) -> tuple[str, bool]:
    """The MLflow run of experiment `experiment`'s published curve: (run_id, created)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = ensure_experiment(client, dataset)
    mark_training_experiment(client, dataset)
    for run in _existing(client, experiment_id, experiment):
        if run.data.tags.get(SHA256_TAG) == sha256 and run.info.status == "FINISHED":
            return run.info.run_id, False
        client.delete_run(run.info.run_id)   # another version of the log, or a logging cut short
    tags = {SOURCE_TAG: SOURCE, "experiment": experiment, "dataset": dataset, "dvc_stage": f"published@{experiment}",
            SHA256_TAG: sha256, "dnlseg.published_log": source}
    run = client.create_run(experiment_id, run_name=run_name(experiment), tags=tags)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[_param(k, v) for k, v in flat_params(curve.meta).items()])
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, int(step)) for name, value, step in metric_rows(curve)]
    for i in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
    with environment_defaults({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):   # it would print credentials
        client.set_terminated(run_id, "FINISHED")
    return run_id, True


def _param(key: str, value: str) -> Param:
    return Param(f"published.{key}", value)
