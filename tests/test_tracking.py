"""MLflow helpers: names and params as MLflow wants them, one run found again for a resumed Ray run,
and an unreachable tracking server costing a warning, never an exception."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from components.tracking import RunLogger, flat_params, git_commit, metric_name, open_run, redact


def test_metric_names_mlflow_accepts():
    assert metric_name("bed ") == "bed"
    assert metric_name("IoU.traffic light") == "IoU.traffic light"
    assert metric_name("a,b(c)") == "a_b_c_"


def test_redact_drops_credentials_only():
    assert redact("http://user:secret@mlflow.example:5000/x") == "http://mlflow.example:5000/x"
    assert redact("sqlite:////work/main/mlflow.db") == "sqlite:////work/main/mlflow.db"
    assert redact("not a url") == "not a url"


def test_flat_params_are_strings_without_secrets():
    params = flat_params({"crop_size": [512, 1024], "resources_per_worker": {"GPU": 1, "CPU": 4},
                          "tracking_uri": "https://u:p@host/", "lr": 0.01, "use_gpu": True})
    assert params == {"crop_size": "512x1024", "resources_per_worker": "CPU=4,GPU=1",
                      "tracking_uri": "https://host/", "lr": "0.01", "use_gpu": "True"}


def test_git_commit_from_the_environment_where_there_is_no_git(monkeypatch, tmp_path):
    monkeypatch.setenv("DNLSEG_GIT_COMMIT", "abc123")
    assert git_commit(tmp_path) == "abc123"
    monkeypatch.delenv("DNLSEG_GIT_COMMIT")
    assert git_commit(tmp_path) == "unknown"     # tmp_path is no git repository


@pytest.fixture
def sqlite_uri(mlflow_db_template, tmp_path) -> str:
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_open_run_creates_then_finds_the_run_to_resume(sqlite_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    first = open_run(sqlite_uri, "cityscapes", "exp-1234abcd", resume=False,
                     params={"lr": 0.01, "crop_size": [8, 16]}, tags={"dvc_stage": "train@exp"})
    assert first.log_metrics({"loss": 2.5, "IoU.bed ": float("nan"), "IoU.road": 40.0}, step=1)
    assert first.set_status("FAILED")

    resumed = open_run(sqlite_uri, "cityscapes", "exp-1234abcd", resume=True, params={"lr": 0.01})
    assert resumed.run_id == first.run_id
    fresh = open_run(sqlite_uri, "cityscapes", "exp-1234abcd", resume=False)
    assert fresh.run_id != first.run_id

    client = MlflowClient(tracking_uri=sqlite_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING"          # reopened for the resumed attempt
    assert run.info.run_name == "exp-1234abcd" and run.data.tags["dvc_stage"] == "train@exp"
    assert run.data.params == {"lr": "0.01", "crop_size": "8x16"}
    assert run.data.metrics == {"loss": 2.5, "IoU.road": 40.0}   # NaN (class absent) left out
    experiment = client.get_experiment_by_name("cityscapes")
    assert experiment.artifact_location == (Path(tmp_path) / "mlartifacts" / "cityscapes").as_uri()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_warns_once_and_never_raises(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    logger = RunLogger(f"http://127.0.0.1:{_closed_port()}", run_id="0" * 32, who="test", fail_fast=True)
    assert logger.log_metrics({"loss": 1.0}, step=1) is False
    tic = time.monotonic()
    assert logger.log_metrics({"loss": 0.9}, step=2) is False     # paused: no second connection attempt
    assert logger.failures == 1
    assert logger.set_status("FINISHED") is False   # the final status is tried even while paused, once
    assert time.monotonic() - tic < 0.5
    warnings = [line for line in capsys.readouterr().err.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and "training continues" in warnings[0]
    assert logger.failures == 2


def test_fail_fast_settings_hold_for_the_call_only(monkeypatch):
    """MLflow's default HTTP retries last minutes; a fail-fast logger shortens them for its own calls and
    leaves the process environment as it was (the driver goes on using MLflow afterwards)."""
    import os

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")     # the user's own setting wins
    seen = {}
    logger = RunLogger("http://127.0.0.1:1", run_id="0" * 32, fail_fast=True)
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    logger.safely("probe", lambda: seen.update({k: os.environ.get(k) for k in keys}))
    assert seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_credentials_never_reach_warnings_and_workers_take_them_from_their_environment(monkeypatch, capsys):
    from components.tracking import redact_text, with_env_credentials

    text = "API request to http://alice:s3cr3t@10.0.0.1:5000/api/2.0/runs failed; see https://bob:pw@x/y"
    assert redact_text(text) == "API request to http://10.0.0.1:5000/api/2.0/runs failed; see https://x/y"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = _closed_port()
    logger = RunLogger(f"http://alice:s3cr3t@127.0.0.1:{port}", run_id="0" * 32, who="test")
    assert logger.log_metrics({"loss": 1.0}, step=1) is False
    err = capsys.readouterr().err
    assert "MLflow" in err and "s3cr3t" not in err

    # The driver passes the URI without credentials; a worker whose environment has them uses its own.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cr3t@127.0.0.1:{port}")
    assert with_env_credentials(f"http://127.0.0.1:{port}") == f"http://alice:s3cr3t@127.0.0.1:{port}"
    assert with_env_credentials("http://elsewhere:5000") == "http://elsewhere:5000"


def test_open_run_without_a_server_gives_a_logger_that_does_nothing(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = open_run(f"http://127.0.0.1:{_closed_port()}", "cityscapes", "exp-1", resume=False,
                      params={"lr": 0.01})
    assert logger.run_id is None
    assert logger.log_metrics({"loss": 1.0}, step=1) is False
    assert "training continues without tracking" in capsys.readouterr().err
