"""The train stage with everything durable in a bucket, and its driver killed (conftest's `s3_stage_run`):
checkpoints go to s3://…/runs, the MLflow server keeps artifacts in s3://…/mlartifacts, the driver is
SIGKILLed after the first checkpoint (iteration 2 of 4) reached the bucket, its local state is deleted,
and the stage rerun in a fresh process resumes from the bucket into the same MLflow run."""

from __future__ import annotations

import csv
import io

import pytest

pytestmark = pytest.mark.integration


def _client(run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=run.server.uri)


def test_driver_killed_then_rerun_resumes_from_the_bucket(s3_stage_run):
    run = s3_stage_run
    assert run.first_returncode == -9                           # SIGKILL, mid-run
    assert run.result["start_iteration"] == 2                   # resumed, not restarted from 0
    assert run.result["final"]["iteration"] == 4
    assert "(resuming)" in run.second_output
    with open(run.result["curve"], newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]

    client = _client(run)
    experiment = client.get_experiment_by_name("cityscapes")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run.result["mlflow_run_id"]]   # one MLflow run across both
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert steps == {1, 2, 3, 4}


def test_checkpoints_live_in_the_bucket(s3_stage_run):
    run = s3_stage_run
    name = run.result["run_name"]
    in_checkpoints = [k.split("/")[2:] for k in run.keys_at_kill
                      if k.startswith(f"runs/{name}/checkpoint_") and k.count("/") == 3]
    assert len({folder for folder, _ in in_checkpoints}) == 1   # the iteration-2 checkpoint, before the kill
    assert {"model.pt", "train_state.pt", "summary.json", "curve.csv"} <= {file for _, file in in_checkpoints}
    assert f"runs/{name}/checkpoint_manager_snapshot.json" in run.keys_at_kill
    final = {k for k in run.keys if k.startswith(f"runs/{name}/checkpoint_") and k.endswith("/model.pt")}
    assert final                                                # the rerun's checkpoints went there too
    assert run.result["result_path"].startswith(f"{run.bucket}/runs/{name}")
    # The driver shipped the prepared data for nodes without it, once, content-addressed.
    assert any(k.startswith("runs/_datasets/cityscapes-") and k.endswith("/_COMPLETE") for k in run.keys)
    assert not (run.work / "runs").exists() and not (run.work / "out-first").exists()   # nothing local


def test_mlflow_artifacts_live_in_the_bucket(s3_stage_run):
    run = s3_stage_run
    run_id = run.result["mlflow_run_id"]
    ours = [k for k in run.keys if k.startswith("mlartifacts/") and f"/{run_id}/artifacts/" in k]
    prefix = ours[0].split(f"/{run_id}/artifacts/")[0] + f"/{run_id}/artifacts/"   # mlartifacts/<exp id>/…
    artifacts = {k[len(prefix):] for k in ours}
    assert {"config.yaml", "curves/train.csv", "metrics/train.json"} <= artifacts
    assert "model/model.pt" not in artifacts   # DVC keeps the model; registering a champion uploads it
    body = run.s3.client().get_object(Bucket=run.bucket, Key=prefix + "curves/train.csv")["Body"].read()
    assert [int(r["iteration"]) for r in csv.DictReader(io.StringIO(body.decode()))] == [1, 2, 3, 4]
