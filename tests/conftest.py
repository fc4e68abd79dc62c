"""Shared fixtures: a tiny prepared dataset, params for tiny runs, and one local Ray per session.

Ray allows one `ray.init` per process: tests that need a Ray of their own (the two-node cluster) shut
the shared one down; `ray_local` starts it again for whoever needs it next. Nothing here runs a bare
`ray stop`: only the processes this session started are stopped.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# One actor process less per fit (it watches for cloud preemption notices; there are none here).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

EXPERIMENT = "dnl_r50-d8_512x1024_40k_cityscapes"   # crop 512x1024 x size_scale 1/16 -> 32x64


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long CPU runs (learning check), opt-in with DNLSEG_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DNLSEG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set DNLSEG_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """data/prepared-like root holding cityscapes/{train,val}: 4 train / 2 val images of 64x128."""
    from pipeline.prepare import generate_sample, prepare_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    generate_sample(root / "raw", seed=0, cityscapes={"train": 4, "val": 2, "height": 64, "width": 128},
                    ade20k={"train": 1, "val": 1, "height": 64, "width": 64})
    prepare_dataset("cityscapes", root / "raw" / "cityscapes", root / "prepared" / "cityscapes",
                    root / "stats.json", workers=1)
    return root / "prepared"


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store: copying it saves each test the ~7 s of migrations."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def make_params(tiny_data, mlflow_db_template):
    """params.yaml of the repo, with the sample profile shrunk to a few ~1 s steps and every output
    (Ray storage, MLflow store) under `work`."""
    from pipeline.config import load_params

    base = load_params()

    def make(work: Path, data_root: Path | None = None, **profile) -> dict:
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "mlflow.db").exists():
            shutil.copyfile(mlflow_db_template, work / "mlflow.db")
        params = copy.deepcopy(base)
        params["profile"] = "sample"
        params["profiles"]["sample"].update({
            "size_scale": 0.0625, "max_iters": 4, "batch_size": 2, "num_workers": 2, "evals_per_run": 2,
            "use_gpu": False, "resources_per_worker": {"CPU": 1}, "loader_workers": 0, "precision": "bf16",
            "val_max_images": 0, **profile})
        params["data"]["prepared_dir"] = str(data_root or tiny_data)
        params["train"].update({"storage_path": str(work / "runs"), "max_failures": 0, "ray_address": ""})
        params["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}"}
        return params

    return make


@pytest.fixture(scope="session")
def _shutdown_ray_at_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_local(_shutdown_ray_at_end):
    """The session's local Ray (2 CPUs), started on first use. The dashboard stays on: Ray Train's
    placement-group cleaner polls the state API it serves."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, configure_logging=False)
    return ray
