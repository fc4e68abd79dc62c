"""S3 against a real S3 API: moto's server on 127.0.0.1 (a fresh port per test, stopped after).

The storage helpers (round trip, write probe, one clear line for a missing bucket), S3 briefly
unavailable (retries with backoff ride it out; an endpoint that stays down gives up with an error naming
the object), a DVC remote in a bucket (push / pull round trip, the secret only in .dvc/config.local),
and MLflow artifacts in a bucket through the client (MLFLOW_S3_ENDPOINT_URL). The training run whose
checkpoints live in a bucket is in test_s3_training.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest
from conftest import REPO, VENV_BIN, as_params

from components import storage
from components.ray_cluster import free_port
from components.storage import StorageError

pytestmark = pytest.mark.integration


def test_round_trip_listing_and_the_write_probe(moto_s3):
    bucket = moto_s3.bucket("dnlseg-helpers")
    uri = f"s3://{bucket}/runs/exp-1/a.txt"
    storage.put_bytes(uri, b"hello", endpoint_url=moto_s3.endpoint)
    assert storage.get_bytes(uri, endpoint_url=moto_s3.endpoint) == b"hello"
    assert storage.list_keys(f"s3://{bucket}/runs", endpoint_url=moto_s3.endpoint) == ["runs/exp-1/a.txt"]
    assert storage.exists(f"s3://{bucket}/runs/exp-1/", endpoint_url=moto_s3.endpoint)
    assert not storage.exists(f"s3://{bucket}/runs/exp-2/", endpoint_url=moto_s3.endpoint)

    storage.probe_writable(f"s3://{bucket}/runs", endpoint_url=moto_s3.endpoint)
    assert moto_s3.keys(bucket) == ["runs/exp-1/a.txt"]          # the probe object was deleted again
    storage.delete(uri, endpoint_url=moto_s3.endpoint)
    assert moto_s3.keys(bucket) == []


def test_missing_bucket_is_one_line_and_not_retried(moto_s3, capsys):
    tic = time.monotonic()
    with pytest.raises(StorageError) as error:
        storage.probe_writable("s3://no-such-bucket/runs", endpoint_url=moto_s3.endpoint)
    message = str(error.value)
    assert message.startswith("s3://no-such-bucket/runs/.dnlseg-write-probe-") and "\n" not in message
    assert "NoSuchBucket" in message and "create the bucket" in message and moto_s3.endpoint in message
    assert time.monotonic() - tic < 5 and "retry" not in capsys.readouterr().err   # a 404 is no outage


def test_s3_briefly_unavailable_is_retried_with_backoff(moto_s3, capsys):
    """The server goes away, then comes back on the same port 1.5 s later: the upload retries with
    doubling delays and succeeds; each retry is one stderr line naming the object."""
    bucket = moto_s3.bucket("dnlseg-outage")
    moto_s3.stop()
    restart = threading.Timer(1.5, moto_s3.start)
    delays = []

    def sleep(seconds):
        delays.append(seconds)
        time.sleep(seconds)

    uri = f"s3://{bucket}/runs/exp-1/checkpoint_000000/model.pt"
    restart.start()
    try:
        storage.put_bytes(uri, b"x" * 4096, endpoint_url=moto_s3.endpoint, attempts=6, first_delay=0.4,
                          sleep=sleep)
    finally:
        restart.join()
    assert moto_s3.keys(bucket) == ["runs/exp-1/checkpoint_000000/model.pt"]
    assert 1 <= len(delays) <= 4 and delays == [0.4 * 2 ** i for i in range(len(delays))]
    retries = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[storage] put")]
    assert len(retries) == len(delays) and all(uri in line for line in retries)


def test_s3_down_for_good_gives_up_with_a_clear_error(capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"        # nothing listens there
    delays = []
    uri = "s3://dnlseg-down/runs/exp-1/checkpoint_000000/model.pt"
    with pytest.raises(StorageError) as error:
        storage.put_bytes(uri, b"x", endpoint_url=endpoint, attempts=4, first_delay=0.1, sleep=delays.append)
    message = str(error.value)
    assert delays == [0.1, 0.2, 0.4]                     # backoff: 3 waits between 4 attempts
    assert message.startswith(f"{uri}: put failed after 4 attempts") and "\n" not in message
    assert endpoint in message and "AWS_ENDPOINT_URL" in message


def _run(cmd, cwd, env):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}: {done.stdout[-1500:]} {done.stderr[-1500:]}"
    return done.stdout + done.stderr


def test_dvc_remote_in_a_bucket_push_pull_round_trip(moto_s3, tmp_path):
    """A temp git + DVC repo with a tiny tracked file and a remote on the moto endpoint: the secret
    goes to .dvc/config.local (git-ignored) only; push puts the file in the bucket; after the file and
    the cache are deleted, pull brings it back byte for byte."""
    bucket = moto_s3.bucket("dnlseg-dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    secret = "dvc-s3cr3t-" + os.urandom(4).hex()
    # No AWS_* variables: the remote's endpoint and keys come from the DVC config alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1")
    dvc = str(VENV_BIN / "dvc")
    _run(["git", "init", "-q"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    (repo / "data").mkdir()
    payload = os.urandom(2048)
    (repo / "data" / "tiny.bin").write_bytes(payload)
    _run([dvc, "add", "-q", "data/tiny.bin"], repo, env)
    _run([dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dnlseg/dvc"], repo, env)
    _run([dvc, "remote", "modify", "store", "endpointurl", moto_s3.endpoint], repo, env)
    _run([dvc, "remote", "modify", "--local", "store", "access_key_id", "testing"], repo, env)
    _run([dvc, "remote", "modify", "--local", "store", "secret_access_key", secret], repo, env)

    assert secret not in (repo / ".dvc" / "config").read_text()           # the committed config
    assert secret in (repo / ".dvc" / "config.local").read_text()
    _run(["git", "check-ignore", "-q", ".dvc/config.local"], repo, env)   # never committed

    _run([dvc, "push", "-q"], repo, env)
    keys = moto_s3.keys(bucket, "dnlseg/dvc/")
    assert len(keys) == 1 and keys[0].startswith("dnlseg/dvc/files/md5/")

    (repo / "data" / "tiny.bin").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([dvc, "pull", "-q"], repo, env)
    assert (repo / "data" / "tiny.bin").read_bytes() == payload


def test_mlflow_client_artifacts_land_in_the_bucket(moto_s3, mlflow_db_template, tmp_path, monkeypatch):
    """A store whose experiment's artifact location is s3://…: the client uploads straight to the
    bucket (MLFLOW_S3_ENDPOINT_URL). The MLflow-server route (--artifacts-destination) is exercised by
    the training run in test_s3_training.py."""
    from mlflow.tracking import MlflowClient

    bucket = moto_s3.bucket("dnlseg-mlflow")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_s3.endpoint)
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("cityscapes", artifact_location=f"s3://{bucket}/mlartifacts")
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "iteration,loss\n1,2.5\n", "curves/train.csv")
    assert moto_s3.keys(bucket) == [f"mlartifacts/{run.info.run_id}/artifacts/curves/train.csv"]
    assert client.download_artifacts(run.info.run_id, "curves/train.csv", str(tmp_path))


def storage_settings(params: dict) -> dict[str, str]:
    """The repo's params.yaml with `params` laid over it (no `storage:` section unless `params` has one),
    parsed: the endpoint and region the stages use."""
    from pipeline.config import read_raw

    raw = {k: v for k, v in read_raw(REPO / "params.yaml").items() if k != "storage"} | params
    parsed = as_params(raw)
    return {"endpoint_url": parsed.storage_endpoint_url, "region": parsed.storage_region}


def test_endpoint_and_region_from_params_else_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert storage_settings({}) == {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1"}
    params = {"storage": {"endpoint_url": "https://minio.internal", "region": "us-east-2"}}
    assert storage_settings(params) == {"endpoint_url": "https://minio.internal", "region": "us-east-2"}
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    empty = {"endpoint_url": None, "region": None}
    assert storage_settings({"storage": dict(empty)}) == empty       # AWS itself, its default region
