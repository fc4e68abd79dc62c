"""The test environment, the tiers, and the fixture modules (tests/fixtures/: data, servers, Ray, repo).

Tiers (pytest markers, registered in pyproject.toml), run a tier with `bash scripts/test.sh -m unit`:
- unit: one function or module, in-process, seconds in all (an unmarked test is a unit test);
- stage: a stage's Python entry point (prepare, evaluate, predict, report, the CLI) on tiny generated
  data, in-process, no Ray (except the evaluate stage, whose work is Ray tasks: on the session's local
  Ray of 2 CPUs);
- integration: a real Ray cluster, real servers (MLflow, S3 on loopback), `dvc repro` in a repo copy;
- parity: against mmsegmentation in a separate venv (opt-in: DNLSEG_PARITY=1, on in CI).
A module's tier is STAGE_MODULES / INTEGRATION_MODULES below or the test's own mark.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# One actor process less per fit (it watches for cloud preemption notices; there are none here).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller polls its workers every 2 s by default: reports, stops and a run's end reach it
# that much later. The tests' runs are a few seconds long, so poll 4x as often (a poll that misses its
# 0.5 s is only a missed health check; a worker is declared dead after 10 min of them).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# MLflow's system metrics every second (10 s by default): the tests' runs last seconds.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
# Tests only ever talk to moto on loopback: fake credentials, set before Ray starts so its workers
# inherit them too, and never a developer's real ones.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"})
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
    os.environ.pop(_name, None)

pytest.register_assert_rewrite("fixtures")   # their asserts report values, as the test modules' do
pytest_plugins = ["fixtures.data", "fixtures.servers", "fixtures.ray_clusters", "fixtures.repo"]

# The names the test modules import from here (`from conftest import ...`).
from fixtures.data import EXPERIMENT, REPO, SMALL_EXPERIMENT, VENV_BIN, as_params  # noqa: E402
from fixtures.repo import repo_copy, run_dvc  # noqa: E402
from fixtures.servers import MlflowServer  # noqa: E402

__all__ = ["EXPERIMENT", "REPO", "SMALL_EXPERIMENT", "VENV_BIN", "MlflowServer", "as_params", "repo_copy",
           "run_dvc"]

TIERS = ("unit", "stage", "integration", "parity")
STAGE_MODULES = {"test_bad_input", "test_evaluate", "test_predict", "test_prepare", "test_report", "test_repro",
                 "test_sample", "test_tune", "test_preflight"}
INTEGRATION_MODULES = {"test_dvc_pipeline", "test_elastic", "test_faults", "test_mlflow_ui", "test_ray_job",
                       "test_ray_multinode", "test_ray_train", "test_s3", "test_s3_training", "test_training_data_sync"}


def pytest_collection_modifyitems(config, items):
    """Each test gets exactly one tier: its own mark, else its module's, else unit."""
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        module = item.path.stem
        tier = ("stage" if module in STAGE_MODULES else "integration" if module in INTEGRATION_MODULES
                else "unit")
        item.add_marker(tier)
    if os.environ.get("DNLSEG_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow: set DNLSEG_SLOW=1 to run")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
