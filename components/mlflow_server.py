"""`mlflow server` on loopback for one tracking store: concurrent stages write through it instead of
opening the SQLite file each (SQLite with several writing processes: `database is locked`, and migration
races when they create it). Used by `dnlseg repro --jobs`, and by the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from components.ray_cluster import free_port


class MlflowServer:
    """`mlflow server` on 127.0.0.1, in its own process group (stop() ends it and its workers only)."""

    def __init__(self, backend_store_uri: str, artifacts_destination: str, log: Path | str,
                 env: dict | None = None):
        self.backend_store_uri, self.artifacts_destination = backend_store_uri, artifacts_destination
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        # No job execution (MLflow's GenAI scorers and trace rollups, none used here): its Huey consumer
        # processes cost ~35 s of CPU over the 2-core main job, measured. Set it to override.
        self.env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, **(env or {})}
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        return self.launch().wait_ready(timeout)

    def launch(self) -> MlflowServer:
        """Start the process without waiting for it (wait_ready does): it boots while the caller works."""
        # The `mlflow` beside this interpreter: the venv's, whatever PATH says.
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", self.artifacts_destination, "--workers", "1"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # S603: an argv built here (this venv's mlflow, the store's paths), no shell
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,  # noqa: S603
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 90.0) -> MlflowServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not up after {timeout:.0f} s (log: {self.log})")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)   # its own group: the server and its workers only
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
