"""Security: checkpoints and imported files are only ever unpickled with weights_only=True (ruff's security
rules and a scan of torch.load's argument, and a malicious checkpoint refused by every loader); servers the
project starts bind to loopback unless a documented exception says otherwise; no secret reaches MLflow
params, tags, artifacts or the stage's output.

ruff (pyproject.toml) does the code checks it can: S301 pickle / dill loads, S506 yaml.load without a safe
loader, S104 "0.0.0.0" in Python, S602-S605 shell=True, and TID251 bans the loaders S does not know
(cloudpickle, joblib, mlflow.pytorch.load_model, yaml.unsafe_load / full_load). What no ruff rule checks
stays here: torch.load / np.load by their arguments, and bind addresses in shell, YAML and Markdown."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from torch import nn

SCANNED = ("components", "pipeline", "deploy", "bench", "tests")
SECURITY_RULES = "S,TID251"   # flake8-bandit and the banned loaders, as configured in pyproject.toml


def ruff_security(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--select", SECURITY_RULES, *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_ruffs_security_rules_pass_on_all_the_code():
    """deploy/ included, which scripts/test.sh's ruff run does not cover."""
    out = ruff_security(*SCANNED)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruffs_security_rules_catch_unsafe_loads():
    source = ("import pickle\nimport joblib\nimport yaml\npickle.loads(b)\nyaml.load(s)\n"
              "yaml.load(s, Loader=yaml.SafeLoader)\njoblib.load(p)\nyaml.unsafe_load(s)\n")
    out = ruff_security("--stdin-filename", "components/x.py", "-", stdin=source)
    found = [(int(m[1]), m[2]) for m in re.finditer(r"^components/x\.py:(\d+):\d+: (\w+)", out.stdout, re.M)]
    assert found == [(4, "S301"), (5, "S506"), (7, "TID251"), (8, "TID251")], out.stdout + out.stderr


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _is_true(call: ast.Call, keyword: str) -> bool:
    value = next((k.value for k in call.keywords if k.arg == keyword), None)
    return isinstance(value, ast.Constant) and value.value is True


def unsafe_loads(source: str, filename: str) -> tuple[list[str], int]:
    """The loads no ruff rule judges by their arguments, as 'file:line: what', and the torch.load calls seen:
    torch.load without weights_only=True (and a bare `load` imported from torch, which would escape this),
    np.load with allow_pickle=True."""
    offenders, checked = [], 0
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            offenders.append(f"{filename}:{node.lineno}: from torch import load")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name == "torch.load":
            checked += 1
            if not _is_true(node, "weights_only"):
                offenders.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and _is_true(node, "allow_pickle"):
            offenders.append(f"{filename}:{node.lineno}: {name} with allow_pickle=True")
    return offenders, checked


def test_every_torch_load_in_the_code_is_weights_only():
    offenders, checked = [], 0
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*.py")):
            if path == Path(__file__):      # this file unpickles its payload unsafely once, on purpose
                continue
            found, n = unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
            offenders += found
            checked += n
    assert offenders == []
    assert checked >= 2      # it does see the real loaders (models/checkpoint.py, training/checkpointing.py)


def test_the_scan_catches_unsafe_loads():
    source = ("import torch, numpy as np\nfrom torch import load\ntorch.load(p)\n"
              "torch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\nnp.load(p)\n"
              "np.load(p, allow_pickle=True)\n")
    offenders, checked = unsafe_loads(source, "x.py")
    assert [o.split(": ", 1)[0] for o in offenders] == ["x.py:2", "x.py:3", "x.py:4", "x.py:7"]
    assert checked == 3


class Payload:
    """Unpickling this creates a file: the stand-in for whatever a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil_checkpoint(path: Path, marker: Path, state_dict: dict) -> Path:
    torch.save({"state_dict": state_dict, "meta": {"note": Payload(marker)}}, path)
    return path


def test_a_malicious_checkpoint_is_refused_by_every_loader(tmp_path):
    from components.learning.models import build_dnlnet
    from components.learning.models.checkpoint import load_mmseg_checkpoint, load_pretrained_backbone
    from components.training.checkpointing import load_train_checkpoint

    marker = tmp_path / "pwned"
    small = nn.Conv2d(3, 4, 1)
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker, small.state_dict())
    torch.load(evil, weights_only=False).get("meta")["note"].close()     # the payload is live ...
    assert marker.exists()
    marker.unlink()                                                       # ... when unpickled unsafely

    for load in (lambda: load_mmseg_checkpoint(small, evil),                       # evaluate / predict
                 lambda: load_pretrained_backbone(build_dnlnet(depth=50, num_classes=19).backbone, evil)):
        with pytest.raises(ValueError, match="weights_only=True"):
            load()
    folder = tmp_path / "checkpoint"                                      # a Ray checkpoint folder to resume
    folder.mkdir()
    torch.save({"state_dict": small.state_dict(), "meta": {}}, folder / "model.pt")
    torch.save({"iteration": 2, "optimizer": Payload(marker)}, folder / "train_state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_train_checkpoint(folder, small)
    assert not marker.exists()


# --- servers ---------------------------------------------------------------------------------------

def test_the_stage_starts_ray_with_its_dashboard_on_loopback(monkeypatch):
    from types import SimpleNamespace

    import ray

    import components.ray_cluster

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(address_info={"gcs_address": "127.0.0.1:6379"})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        assert components.ray_cluster.connect_ray("") is True
        started = calls[-1]
        assert started["address"] == "local"   # a new cluster, never the machine's latest one
        assert started["dashboard_host"] == "127.0.0.1"
        # Ray Train's placement-group cleaner must find this cluster's state API, not another one's.
        api = f"http://127.0.0.1:{started['dashboard_port']}"
        assert started["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == api
        assert components.ray_cluster.connect_ray("ray://head:10001") is True        # joining: the cluster's own
        assert calls[-1] == {"address": "ray://head:10001"}
    finally:
        components.ray_cluster.shutdown_ray()   # restores RAY_ADDRESS / RAY_API_SERVER_ADDRESS


@pytest.mark.integration
def test_a_local_ray_dashboard_listens_on_loopback_only(ray_local):
    """The session's Ray is started with the stage's options: its dashboard (which accepts jobs) listens
    on 127.0.0.1. (Ray's internal gRPC ports listen on all interfaces, behind Ray's token auth.)"""
    import psutil
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    assert host == "127.0.0.1"
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)}
    assert listening == {"127.0.0.1"}


# How a bind address is given: CLI flags, a flag in an argv list, keyword arguments, an options dict.
HOST_PATTERNS = [re.compile(p) for p in (
    r"(?:--host|--dashboard-host)(?:=|\s+)[\"']?([^\s\"',]+)",
    r"[\"'](?:--host|--dashboard-host)[\"']\s*,\s*[\"']?([^\"',\]]+)",
    r"\b(?:dashboard_host|ip_address|host)\s*=\s*[\"']([^\"']+)[\"']",
    r"[\"'](?:dashboard_host|host)[\"']\s*:\s*[\"']([^\"']+)[\"']",
)]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def test_servers_in_code_deploy_and_docs_bind_loopback_unless_justified():
    """Every address a server is told to bind to, in the code, deploy/ and the docs: loopback, or a
    'bind-all:' comment within the three lines above saying why (deploy's MLflow server, which the GPU
    nodes log to)."""
    files = [p for root in (*SCANNED, "docs") for p in sorted((REPO / root).rglob("*"))
             if p.suffix in (".py", ".sh", ".yaml", ".yml", ".md") and p.is_file()]
    files += [REPO / name for name in ("README.md", "dvc.yaml") if (REPO / name).exists()]
    unjustified, seen = [], []
    for path in files:
        if path == Path(__file__):
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            for host in (h for pattern in HOST_PATTERNS for h in pattern.findall(line)):
                seen.append(f"{path.relative_to(REPO)}:{i + 1}")
                justified = any("bind-all:" in above for above in lines[max(0, i - 3):i + 1])
                if host not in LOOPBACK and not justified:
                    unjustified.append(f"{path.relative_to(REPO)}:{i + 1}: {line.strip()}")
    assert unjustified == []
    # The scan does see the real ones: the stage's Ray options, deploy's servers, the tests' servers.
    files_seen = {x.split(":")[0] for x in seen}
    assert {"components/ray_cluster.py", "deploy/cluster.yaml", "tests/fixtures/servers.py"} <= files_seen


# --- secrets ---------------------------------------------------------------------------------------

@pytest.mark.integration
def test_no_secret_in_mlflow_params_tags_artifacts_or_stage_output(s3_stage_run):
    """The S3 stage run (conftest) had AWS_SECRET_ACCESS_KEY in its environment and user:password in its
    tracking URL ($MLFLOW_TRACKING_URI): neither shows in the run's params, tags, config.yaml artifact,
    nor in anything either driver printed (Ray's worker lines included)."""
    from mlflow.tracking import MlflowClient

    run = s3_stage_run
    secrets = (run.secret, run.password)
    client = MlflowClient(tracking_uri=run.server.uri)
    mlflow_run = client.get_run(run.result["mlflow_run_id"])
    assert "tracking_uri" not in mlflow_run.data.params   # where a run logs is not one of its settings
    logged = [*mlflow_run.data.params.values(), *mlflow_run.data.tags.values()]
    config = Path(client.download_artifacts(mlflow_run.info.run_id, "config.yaml", str(run.work))).read_text()
    for secret in secrets:
        assert not any(secret in value for value in logged)
        assert secret not in config
        assert secret not in run.first_output and secret not in run.second_output
    assert "[train driver]" in run.first_output and "(resuming)" in run.second_output   # output was captured
