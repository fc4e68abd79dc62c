"""Preflight: each failure is ONE line saying what to fix; all failures are reported together; the train
stage runs it before any expensive work (Ray is not even started when it fails)."""

from __future__ import annotations

import shutil

import pytest
from conftest import EXPERIMENT, free_port

from pipeline.preflight import (
    PreflightError,
    check_data,
    check_ray_resources,
    check_storage,
    check_tracking,
    preflight,
    preflight_ray,
    worker_bundle,
)


def _one_line(problems: list[str]) -> str:
    assert len(problems) == 1 and "\n" not in problems[0], problems
    return problems[0]


# --- data ------------------------------------------------------------------------------------------

def test_prepared_data_passes(tiny_data):
    assert check_data(tiny_data / "cityscapes", "cityscapes") == []


def test_missing_manifest_says_to_prepare(tiny_data, tmp_path):
    data = tmp_path / "cityscapes"
    shutil.copytree(tiny_data / "cityscapes", data)
    (data / "val" / "manifest.csv").unlink()
    line = _one_line(check_data(data, "cityscapes"))
    assert line.startswith(f"preflight: data: {data / 'val' / 'manifest.csv'} not found")
    assert "dnlseg prepare cityscapes" in line


def test_file_listed_but_missing_is_named(tiny_data, tmp_path):
    data = tmp_path / "cityscapes"
    shutil.copytree(tiny_data / "cityscapes", data)
    victim = sorted((data / "train").rglob("*.png"))[0]
    victim.unlink()
    line = _one_line(check_data(data, "cityscapes"))
    manifest = data / "train" / "manifest.csv"
    assert f"preflight: data: {victim} (listed in {manifest}) is missing, 1 of " in line


def test_empty_manifest(tiny_data, tmp_path):
    data = tmp_path / "cityscapes"
    shutil.copytree(tiny_data / "cityscapes", data)
    (data / "train" / "manifest.csv").write_text("image,label,height,width,sha256\n")
    assert "lists no images" in _one_line(check_data(data, "cityscapes"))


# --- tracking --------------------------------------------------------------------------------------

def test_tracking_server_down_is_one_line_without_credentials():
    port = free_port()
    line = _one_line(check_tracking(f"http://alice:s3cr3t@127.0.0.1:{port}", timeout=2))
    assert line.startswith(f"preflight: tracking: MLflow server http://127.0.0.1:{port} not reachable")
    assert "s3cr3t" not in line and "start it" in line


def test_sqlite_store_in_a_writable_folder_passes(tmp_path):
    assert check_tracking(f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}") == []


def test_sqlite_store_under_a_file_fails(tmp_path):
    (tmp_path / "a-file").write_text("x")
    line = _one_line(check_tracking(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"))
    folder = tmp_path / "a-file"
    assert line.startswith(f"preflight: tracking: the SQLite store's folder {folder}: not writable")


# --- storage ---------------------------------------------------------------------------------------

def test_local_storage_is_probed_and_left_clean(tmp_path):
    assert check_storage(str(tmp_path / "runs" / "deeper")) == []
    assert list(tmp_path.iterdir()) == []          # folders it made for the probe are gone again
    (tmp_path / "runs").mkdir()
    assert check_storage(str(tmp_path / "runs")) == [] and (tmp_path / "runs").is_dir()


def test_local_storage_that_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_text("x")
    line = _one_line(check_storage(str(tmp_path / "a-file" / "runs")))
    folder = tmp_path / "a-file" / "runs"
    assert line.startswith(f"preflight: storage (train.storage_path): {folder}: not writable")


@pytest.mark.integration
def test_s3_storage_writable_missing_bucket_and_endpoint_down(moto_s3):
    bucket = moto_s3.bucket("dnlseg-preflight")
    assert check_storage(f"s3://{bucket}/runs", moto_s3.endpoint) == []
    assert moto_s3.keys(bucket) == []                                     # probe written and deleted
    line = _one_line(check_storage("s3://dnlseg-nope/runs", moto_s3.endpoint))
    assert "s3://dnlseg-nope/runs/" in line and "create the bucket" in line
    down = f"http://127.0.0.1:{free_port()}"
    line = _one_line(check_storage(f"s3://{bucket}/runs", down, attempts=2))
    assert f"s3://{bucket}/runs/" in line and "failed after 2 attempts" in line and down in line


# --- Ray resources ---------------------------------------------------------------------------------

def test_worker_bundle_follows_ray_scaling_config():
    assert worker_bundle({}, use_gpu=False) == {"CPU": 1.0}
    assert worker_bundle({}, use_gpu=True) == {"GPU": 1.0}
    assert worker_bundle({"CPU": 4}, use_gpu=True) == {"CPU": 4.0, "GPU": 1.0}
    assert worker_bundle({"CPU": 2, "GPU": 0}, use_gpu=False) == {"CPU": 2.0}


NODE = {"CPU": 2.0, "memory": 8e9}


@pytest.mark.parametrize("workers, per_worker, use_gpu, driver, expected", [
    (2, {"CPU": 1}, False, None, None),
    (3, {"CPU": 1}, False, None, "needs {CPU: 3} (3 workers x {CPU: 1}), the Ray cluster has {CPU: 2}"),
    (4, {"CPU": 4, "GPU": 1}, True, None, "needs {CPU: 16, GPU: 4} (4 workers x {CPU: 4, GPU: 1})"),
    (1, {"CPU": 2}, False, {"CPU": 1}, "needs {CPU: 3} (1 workers x {CPU: 2} + driver {CPU: 1})"),
])
def test_ray_resource_check(workers, per_worker, use_gpu, driver, expected):
    problems = check_ray_resources(workers, per_worker, use_gpu, cluster={"CPU": 2.0}, nodes=[NODE],
                                   where="profiles.sample", driver=driver)
    if expected is None:
        assert problems == []
    else:
        line = _one_line(problems)
        assert line.startswith("preflight: ray: the experiment") and expected in line
        assert "profiles.sample.num_workers" in line


def test_a_worker_must_fit_on_one_node():
    """4 CPUs in total over two 2-CPU nodes cannot hold one 3-CPU worker."""
    line = _one_line(check_ray_resources(1, {"CPU": 3}, False, cluster={"CPU": 4.0}, nodes=[NODE, NODE],
                                         where="profiles.sample"))
    assert "no node can hold one worker {CPU: 3} (the largest has {CPU: 2})" in line


@pytest.mark.integration
def test_ray_check_against_the_live_cluster(ray_local, make_params, tmp_path, monkeypatch):
    from pipeline.config import resolve_experiment

    cfg = resolve_experiment(make_params(tmp_path), EXPERIMENT)     # 2 workers x 1 CPU on 2 CPUs
    preflight_ray(cfg)
    too_big = cfg.with_overrides(num_workers=3)
    with pytest.raises(PreflightError, match=r"needs \{CPU: 3\}.*has \{CPU: 2\}"):
        preflight_ray(too_big)
    monkeypatch.setenv("DNLSEG_RAY_AUTOSCALING", "1")   # a cluster that adds nodes: report, go on
    preflight_ray(too_big)


# --- the stage -------------------------------------------------------------------------------------

def test_all_failures_reported_together_one_line_each(make_params, tmp_path):
    from pipeline.config import resolve_experiment

    params = make_params(tmp_path)
    params["data"]["prepared_dir"] = str(tmp_path / "not-prepared")
    params["tracking"] = {"uri": f"http://127.0.0.1:{free_port()}"}
    (tmp_path / "a-file").write_text("x")
    params["train"]["storage_path"] = str(tmp_path / "a-file" / "runs")
    with pytest.raises(PreflightError) as error:
        preflight(resolve_experiment(params, EXPERIMENT))
    lines = str(error.value).splitlines()
    kinds = [line.split(":")[1].strip() for line in lines]
    assert kinds == ["data", "data", "tracking", "storage (train.storage_path)"]


def test_the_train_stage_fails_before_starting_ray(make_params, tmp_path, monkeypatch, capsys):
    """`dnlseg train` with unprepared data: exit 2, one line, Ray never started, nothing written."""
    import pipeline.train
    from pipeline.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the preflight passed")

    monkeypatch.setattr(pipeline.train, "connect_ray", no_ray)
    params = make_params(tmp_path)
    params["data"]["prepared_dir"] = str(tmp_path / "not-prepared")
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml"), "train", EXPERIMENT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("dnlseg train: error: preflight: data: ")
    assert "dnlseg prepare cityscapes" in err[0]
    assert len(err) == 2 and all("preflight: data:" in line for line in err)   # train and val
    assert not (tmp_path / "runs").exists()
