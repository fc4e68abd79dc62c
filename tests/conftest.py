"""Shared fixtures: a tiny prepared dataset, params for tiny runs, one local Ray per session, and real
servers on loopback (moto's S3, MLflow) that the tests start and stop themselves.

Ray allows one `ray.init` per process: tests that need a Ray of their own (the two-node cluster) shut
the shared one down; `ray_local` starts it again for whoever needs it next. Nothing here runs a bare
`ray stop`: only the processes this session started are stopped.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

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

from components import mlflow_server  # noqa: E402 (after the environment above)
from components.ray_cluster import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

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
    from components.sample import generate_sample
    from pipeline.prepare import prepare_dataset

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


def as_params(raw: dict, root: Path = REPO):
    """A params.yaml dict (as the tests change it) resolved as the stages get it."""
    from pipeline.config import parse

    return parse(raw, root)


@pytest.fixture
def make_params(params_factory):
    """params.yaml of the repo as a dict (as_params() gives the stages' Params), with the sample profile
    shrunk to a few ~1 s steps and every output (Ray storage, MLflow store) under `work`."""
    return params_factory


@pytest.fixture(scope="session")
def params_factory(tiny_data, mlflow_db_template):
    """make_params for session-scoped fixtures."""
    from pipeline.config import read_raw

    base = read_raw(REPO / "params.yaml")

    def make(work: Path, data_root: Path | None = None, **profile) -> dict:
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "mlflow.db").exists():
            shutil.copyfile(mlflow_db_template, work / "mlflow.db")
        params = copy.deepcopy(base)
        params["profile"] = "sample"
        params["profiles"]["sample"].update({
            "size_scale": 0.0625, "max_iters": 4, "batch_size": 2, "num_workers": 2, "evals_per_run": 2,
            "use_gpu": False, "resources_per_worker": {"CPU": 1}, "loader_workers": 0, "precision": "bf16",
            "val_max_images": None, **profile})
        params["data"]["prepared_dir"] = str(data_root or tiny_data)
        params["train"].update({"storage_path": str(work / "runs"), "max_failures": 0, "ray_address": None})
        params["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}"}
        return params

    return make


@pytest.fixture(scope="session")
def _shutdown_ray_at_end():
    yield
    from components.ray_cluster import shutdown_ray

    shutdown_ray()


@pytest.fixture
def ray_local(_shutdown_ray_at_end):
    """The session's local Ray (2 CPUs), started on first use as the stage starts one: dashboard on
    loopback, its state API's address in this process's and every worker's environment (Ray Train's
    placement-group cleaner needs it when other people's Ray clusters run on this machine too)."""
    import ray

    from components.ray_cluster import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, configure_logging=False)
    return ray


# --- servers on loopback ---------------------------------------------------------------------------

class FileServer:
    """A threaded http.server on 127.0.0.1 (port 0) serving registered files, counting requests.

    `add(name, path, send=n)` announces the full Content-Length but sends only n bytes before closing
    the connection (a cut download); unknown names get a 404.
    """

    def __init__(self):
        self.files: dict[str, tuple[Path, int | None]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                entry = server.files.get(self.path)
                if entry is None:
                    self.send_error(404)
                    return
                path, send = entry
                size = path.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                remaining = size if send is None else send
                with open(path, "rb") as f:
                    while remaining > 0 and (chunk := f.read(min(1 << 20, remaining))):
                        self.wfile.write(chunk)
                        remaining -= len(chunk)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, name: str, path: Path, send: int | None = None) -> str:
        self.files[f"/{name}"] = (path, send)
        return f"{self.base}/{name}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.stop()



@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def imagenet_v1c50(tmp_path_factory):
    """mmcv's resnet50_v1c layout: {'state_dict': ResNetV1c-50 state dict + fc.*}, named with its hash
    (`resnet50_v1c-<8 hex>.pth`); values unlike a fresh model's init, so a skipped key shows. Returns
    (path, state_dict)."""
    import hashlib

    import torch

    from components.models.resnet import ResNetV1c

    gen = torch.Generator().manual_seed(0)
    sd = ResNetV1c(depth=50).state_dict()
    for k, v in sd.items():
        if v.is_floating_point():
            v.copy_(torch.rand(v.shape, generator=gen) + 0.5 if k.endswith("running_var")
                    else torch.randn(v.shape, generator=gen) * 0.1)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048, generator=gen), torch.zeros(1000)
    folder = tmp_path_factory.mktemp("zoo")
    torch.save({"state_dict": sd}, folder / "tmp.pth")
    digest = hashlib.sha256((folder / "tmp.pth").read_bytes()).hexdigest()
    path = folder / f"resnet50_v1c-{digest[:8]}.pth"
    (folder / "tmp.pth").rename(path)
    return path, sd



class MotoS3:
    """moto's S3 server (a real HTTP endpoint) on 127.0.0.1; stop() and start() again keep the port and,
    moto's state being per process, the buckets."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def moto_s3():
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


class MlflowServer(mlflow_server.MlflowServer):
    """The production loopback server (components/mlflow_server.py) on a copy of the session's migrated
    template database."""

    def __init__(self, work: Path, db_template: Path, artifacts: str | None = None, env: dict | None = None):
        work.mkdir(parents=True, exist_ok=True)
        self.db = work / "mlflow-server.db"
        if not self.db.exists():
            shutil.copyfile(db_template, self.db)
        super().__init__(f"sqlite:///{self.db}", artifacts or (work / "mlartifacts").as_uri(),
                         work / "mlflow-server.log", env)

    def listening_addresses(self) -> set[str]:
        import psutil

        group = [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        return {c.laddr.ip for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.pid in group}


# --- the stage on S3, its driver killed and rerun (test_s3_training.py, test_security.py) -------------

# A stage driver in its own process. The code hash is pinned: engineers editing the shared checkout
# between the two drivers would otherwise (rightly) make the rerun a fresh run instead of a resume.
DRIVER = """
import json, sys
import pipeline.train
from pipeline.config import load
from pipeline.train import train_experiment
from loop_hooks import FaultHooks
pipeline.train.code_hash = lambda *args: "pinned-by-the-test"
params_file, experiment, out_root, hooks, result_file = sys.argv[1:]
out = train_experiment(load(params_file, root="."), experiment, out_root=out_root,
                       hooks=FaultHooks(**json.loads(hooks)))
with open(result_file, "w") as f:
    json.dump(out, f, default=str)
"""


def _wait(condition, timeout: float, proc=None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    tail = lambda: log.read_text()[-3000:] if log else ""  # noqa: E731
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"driver exited with {proc.returncode}: {tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"not reached in {timeout:.0f} s: {tail()}")


@pytest.fixture(scope="session")
def s3_stage_run(tmp_path_factory, params_factory, mlflow_db_template, _shutdown_ray_at_end):
    """The train stage with checkpoints in a bucket (moto on loopback) and tracking on a real MLflow
    server whose artifacts go to the same bucket; a secret in the environment and credentials in the
    tracking URL (from $MLFLOW_TRACKING_URI). Each driver is a real process joined to the session's Ray:

    1. the first is SIGKILLed once its first checkpoint (iteration 2 of 4) is in the bucket;
    2. its local state (its out_root) is deleted;
    3. the stage is rerun in a fresh process: it must resume from the bucket.
    """
    import json
    import uuid
    from types import SimpleNamespace

    import ray
    import yaml

    from components.ray_cluster import start_local_ray

    work = tmp_path_factory.mktemp("s3_stage")
    s3 = MotoS3().start()
    server = None
    try:
        bucket = s3.bucket("dnlseg-stage")
        s3_env = {"AWS_ENDPOINT_URL": s3.endpoint, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        server = MlflowServer(work / "mlflow", mlflow_db_template, artifacts=f"s3://{bucket}/mlartifacts",
                              env=s3_env).start()
        secret, password = f"aws-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"
        params = params_factory(work)
        params["train"]["storage_path"] = f"s3://{bucket}/runs"
        params["storage"] = {"endpoint_url": s3.endpoint, "region": ""}
        params["tracking"] = {"uri": ""}
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if not ray.is_initialized():
            start_local_ray(num_cpus=2, configure_logging=False)
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
               "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "AWS_SECRET_ACCESS_KEY": secret,
               "MLFLOW_TRACKING_URI": f"http://alice:{password}@127.0.0.1:{server.port}"}

        def driver(tag: str, hooks: dict):
            log = work / f"{tag}.log"
            with open(log, "wb") as f:
                args = [str(work / "params.yaml"), EXPERIMENT, str(work / f"out-{tag}"), json.dumps(hooks),
                        str(work / f"{tag}.json")]
                proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env, stdout=f,
                                        stderr=subprocess.STDOUT)
            return proc, log

        def first_checkpoint_in_bucket() -> bool:
            snapshots = [k for k in s3.keys(bucket, "runs/")
                         if k.endswith("/checkpoint_manager_snapshot.json")]
            if not snapshots:
                return False
            body = s3.client().get_object(Bucket=bucket, Key=snapshots[0])["Body"].read()
            return json.loads(body).get("latest_checkpoint_result") is not None

        held = work / "held"
        hold = {"iteration": 2, "rank": 0, "marker": str(held), "release": str(work / "never"),
                "timeout_s": 600}
        first, first_log = driver("first", {"hold": hold})
        try:
            _wait(lambda: held.exists() and first_checkpoint_in_bucket(), 420, first, first_log)
            keys_at_kill = s3.keys(bucket, "runs/")
        finally:
            first.send_signal(signal.SIGKILL)   # the driver only; Ray ends its job's workers
            first.wait(timeout=60)
        # Ray frees the killed job's workers; the rerun needs the CPUs back.
        _wait(lambda: ray.available_resources().get("CPU", 0) >= 2, 120)
        shutil.rmtree(work / "out-first", ignore_errors=True)

        second, second_log = driver("second", {})
        second.wait(timeout=600)
        if second.returncode != 0:
            raise RuntimeError(f"rerun failed: {second_log.read_text()[-4000:]}")
        result = json.loads((work / "second.json").read_text())
        yield SimpleNamespace(work=work, s3=s3, bucket=bucket, server=server, secret=secret,
                              password=password, keys_at_kill=keys_at_kill, keys=s3.keys(bucket),
                              result=result,
                              first_output=first_log.read_text(), second_output=second_log.read_text(),
                              first_returncode=first.returncode)
    finally:
        if server is not None:
            server.stop()
        s3.stop()


# --- a copy of the repo, for DVC and the CLI (test_dvc_pipeline.py, test_repro.py) ----------------------

def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _shrink_params(path: Path, tmp: Path) -> dict:
    params = yaml.safe_load(path.read_text())
    params["sample"]["cityscapes"] = {"train": 2, "val": 1, "height": 128, "width": 256}
    params["sample"]["ade20k"] = {"train": 2, "val": 1, "height": 64, "width": 64}
    params["profiles"]["sample"].update(max_iters=2, evals_per_run=1, batch_size=1)
    params["evaluate"]["profiles"]["sample"].update(fps_images=2, fps_warmup=1, overlays=1, ms_ratios=[1.0])
    params["train"]["storage_path"] = str(tmp / "runs")
    params["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def repo_copy(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the repo's tracked files (a fresh git repo) on tiny sample sizes, and the environment that
    runs its own code: its stages and Ray workers import from the copy, not from the editable install."""
    work = tmp_path / "repo"
    _copy_repo(work)
    _shrink_params(work / "params.yaml", tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The copy's code, not the editable install's: the stages and the Ray workers import from here.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(work),
               NO_ALBUMENTATIONS_UPDATE="1")
    return work, env


def run_dvc(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr
