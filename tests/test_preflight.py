"""Preflight: each failure is ONE line saying what to fix; all failures are reported together; the train
stage runs it before any expensive work (Ray is not even started when it fails)."""

from __future__ import annotations

import shutil

import pytest
from conftest import EXPERIMENT, as_params

from components.preflight import (
    GB,
    PreflightError,
    check_data,
    check_disk,
    check_ray_resources,
    check_storage,
    check_tracking,
    preflight,
    preflight_disk,
    preflight_ray,
    weight_bytes,
    worker_bundle,
)
from components.ray_cluster import free_port


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
    cfg = as_params(make_params(tmp_path)).experiment(EXPERIMENT)     # 2 workers x 1 CPU on 2 CPUs
    preflight_ray(cfg)
    too_big = cfg.updated(execution={"num_workers": 3})
    with pytest.raises(PreflightError, match=r"needs \{CPU: 3\}.*has \{CPU: 2\}"):
        preflight_ray(too_big)
    monkeypatch.setenv("DNLSEG_RAY_AUTOSCALING", "1")   # a cluster that adds nodes: report, go on
    preflight_ray(too_big)


# --- disk ------------------------------------------------------------------------------------------

def test_size_estimates_match_the_files_a_checkpoint_writes(tmp_path):
    """weight_bytes (counted on the meta device) against the real files: model.pt, and the checkpoint
    folder (weights + optimizer state) after one SGD step."""
    import torch

    from components.learning.models import build_dnlnet
    from components.learning.step import sgd
    from components.training.checkpointing import save_train_checkpoint

    model = build_dnlnet(depth=50, num_classes=19)
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    save_train_checkpoint(tmp_path, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          {"iteration": 1}, meta={})
    weights, checkpoint = weight_bytes(50, 19)
    folder = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert weights <= (tmp_path / "model.pt").stat().st_size < 1.01 * weights   # + key names, pickle
    assert checkpoint <= folder < 1.01 * checkpoint


@pytest.fixture
def free_space(monkeypatch, tmp_path):
    """Every filesystem reports `set(gb)` free; temp files go under tmp_path (one filesystem)."""
    import tempfile
    from types import SimpleNamespace

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return lambda gb: monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=gb * GB))


def test_disk_check_adds_up_what_shares_a_filesystem(tmp_path, free_space):
    free_space(1.0)
    runs, models = tmp_path / "runs" / "exp", tmp_path / "models"
    assert check_disk([(runs, int(0.6 * GB), "checkpoints")]) == []
    line = _one_line(check_disk([(runs, int(0.6 * GB), "checkpoints"), (models, int(0.6 * GB), "models/")]))
    assert line == (f"preflight: disk: {tmp_path} has 1.0 GB free, the run writes up to 1.2 GB there "
                    f"(checkpoints 0.6 GB, models/ 0.6 GB): free some space, or point train.storage_path / "
                    f"$TMPDIR elsewhere")


def test_disk_needs_of_a_run_by_hand(make_params, tmp_path, free_space):
    """R-50, 19 classes: weights W = 200.3 MB, checkpoint C = W + momentum = 400.4 MB (weight_bytes).
    A new run: staging C + 3 checkpoints 3C + models/ 2W + MLflow's copy W = 2.2 GB. A resumed run whose
    two checkpoints (2C) are already in its folder needs one more: C + C + 2W + W = 1.4 GB."""
    cfg = as_params(make_params(tmp_path)).experiment(EXPERIMENT)
    run_dir = tmp_path / "runs" / "exp-1234"
    free_space(2.3)
    preflight_disk(cfg, str(run_dir), out_root=tmp_path)
    free_space(2.1)
    with pytest.raises(PreflightError, match=r"has 2.1 GB free, the run writes up to 2.2 GB there \("
                                             r"staging checkpoints 0.4 GB, checkpoints 1.2 GB, models/ 0.4 GB, "
                                             r"MLflow artifacts 0.2 GB\)"):
        preflight_disk(cfg, str(run_dir), out_root=tmp_path)

    _, checkpoint = weight_bytes(50, 19)
    (run_dir / "checkpoint_0").mkdir(parents=True)
    with open(run_dir / "checkpoint_0" / "train_state.pt", "wb") as f:
        f.truncate(2 * checkpoint)   # sparse: its size without the disk space
    free_space(1.5)
    preflight_disk(cfg, str(run_dir), out_root=tmp_path)
    free_space(1.3)
    with pytest.raises(PreflightError, match=r"writes up to 1.4 GB there .*checkpoints 0.4 GB"):
        preflight_disk(cfg, str(run_dir), out_root=tmp_path)


def test_disk_needs_of_a_sweep_by_hand(make_params, tmp_path, free_space):
    """5 trials, 2 at a time (C = 400.4 MB): staging 2C + checkpoints (2 x 5 + 2) C = 14C = 5.6 GB."""
    cfg = as_params(make_params(tmp_path)).experiment(EXPERIMENT)
    free_space(5.7)
    preflight_disk(cfg, str(tmp_path / "sweep"), runs=5, concurrent=2)
    free_space(5.5)
    with pytest.raises(PreflightError, match=r"writes up to 5.6 GB there \(staging checkpoints 0.8 GB, "
                                             r"checkpoints 4.8 GB\)"):
        preflight_disk(cfg, str(tmp_path / "sweep"), runs=5, concurrent=2)


# --- the stage -------------------------------------------------------------------------------------

def test_all_failures_reported_together_one_line_each(make_params, tmp_path):
    params = make_params(tmp_path)
    params["data"]["prepared_dir"] = str(tmp_path / "not-prepared")
    params["tracking"] = {"uri": f"http://127.0.0.1:{free_port()}"}
    (tmp_path / "a-file").write_text("x")
    params["train"]["storage_path"] = str(tmp_path / "a-file" / "runs")
    with pytest.raises(PreflightError) as error:
        preflight(as_params(params).experiment(EXPERIMENT))
    lines = str(error.value).splitlines()
    kinds = [line.split(":")[1].strip() for line in lines]
    assert kinds == ["data", "data", "tracking", "storage (train.storage_path)"]


def test_the_train_stage_fails_before_starting_ray(make_params, tmp_path, monkeypatch, capsys):
    """`dnlseg train` with unprepared data: exit 2, one line, Ray never started, nothing written."""
    import components.ray_cluster
    from pipeline.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the preflight passed")

    # the stage takes connect_ray from components.ray_cluster when it gets there
    monkeypatch.setattr(components.ray_cluster, "connect_ray", no_ray)
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


def test_the_train_stage_checks_the_disk_before_starting_ray(make_params, tmp_path, monkeypatch, capsys,
                                                             free_space):
    import yaml

    import components.ray_cluster
    from pipeline.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the disk check passed")

    # the stage takes connect_ray from components.ray_cluster when it gets there
    monkeypatch.setattr(components.ray_cluster, "connect_ray", no_ray)
    free_space(1.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_params(tmp_path)))
    assert main(["--params", str(tmp_path / "params.yaml"), "train", EXPERIMENT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # models/ is under the repo: one line, or two where the repo is on another filesystem than tmp_path.
    assert err[0].startswith("dnlseg train: error: preflight: disk: ") and len(err) in (1, 2)
    assert all("GB free, the run writes up to" in line for line in err)
    assert any(f"{tmp_path} has 1.0 GB free" in line for line in err)
    assert not (tmp_path / "runs").exists()
