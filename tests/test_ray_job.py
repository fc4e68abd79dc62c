"""Cluster submission: `ray job submit --working-dir .` of the training stage against a Ray head started
here with token auth on (as Ray 2.60 starts heads), the job running the uploaded copy of the repo."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from conftest import EXPERIMENT, REPO, SMALL_EXPERIMENT, repo_copy

from components.ray_cluster import free_port

EXP = SMALL_EXPERIMENT   # the orchestration is what is tested: the small backbone
pytestmark = pytest.mark.integration


@pytest.fixture
def token_auth_head():
    """`ray start --head --block` in its own process group (stopped by signalling that group: never a
    bare `ray stop`), token auth on with a token of its own, its session files in a short temp folder."""
    token, port, dashboard = secrets.token_hex(16), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    # Every port of its own: the defaults (e.g. the job agent's 52365) may be held by another Ray on
    # the machine (the session's), and the head then has no job agent ("No available agent").
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port", "node-manager-port",
                                                     "object-manager-port")]
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                             "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                if requests.get(f"{address}/api/version", timeout=2,
                                headers={"Authorization": f"Bearer {token}"}).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the Ray head's job server did not come up"
            time.sleep(1)
        yield address, env
    finally:
        # A test cluster: its graceful stop took 34 s of the suite's time; after 5 s the group is killed (its
        # state lives in `temp`, removed below).
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_submitted_training_stage_runs_in_the_uploaded_copy(tmp_path, token_auth_head):
    address, env = token_auth_head
    work, _ = repo_copy(tmp_path, EXPERIMENT)   # shrunk sample params, storage and tracking in tmp_path
    env = {**env, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("PYTHONPATH", None)     # the job must import the upload, not a copy on the path
    # What deploy/submit_experiment.sh submits with.
    runtime_env = json.loads(subprocess.run([sys.executable, str(REPO / "deploy" / "runtime_env.py"),
                                             "submitted-by-the-test", str(tmp_path / "results")],
                                            check=True, capture_output=True, text=True).stdout)
    runtime_env["env_vars"]["NO_ALBUMENTATIONS_UPDATE"] = "1"
    probe = "import json, os, pipeline; print('JOB', json.dumps({'code': pipeline.__file__, 'cwd': os.getcwd()}))"
    entrypoint = (f"dvc config --local core.no_scm true && dvc repro train@{EXP} && python -c \"{probe}\" && "
                  f"cat metrics/{EXP}/train.json")
    unauthenticated = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address],
                                     env={**env, "RAY_AUTH_TOKEN": "wrong"}, capture_output=True, text=True,
                                     timeout=120)
    assert unauthenticated.returncode != 0   # token auth is on

    for _ in range(10):   # a fresh head's job agent comes up a few seconds after its job server
        done = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
                               "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--", "bash",
                               "-c", entrypoint], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    job = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("JOB "))[4:])
    uploaded = Path(job["cwd"])
    assert Path(job["code"]).is_relative_to(uploaded)                # the uploaded copy's code ran
    assert not uploaded.is_relative_to(work) and not uploaded.is_relative_to(REPO)
    assert '"final"' in done.stdout and f"Running stage 'train@{EXP}'" in done.stdout
    assert not (work / "metrics" / EXP).exists()                    # nothing written into the submitter's copy
    assert any((tmp_path / "runs").glob(f"{EXP}-*/checkpoint_*"))    # the run in params' storage_path
