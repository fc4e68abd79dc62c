"""Faults, each a test, on the real stage where it matters (Ray, a real MLflow server):

- the MLflow server dies mid-run: training goes on, the failure is reported once, no retry storm, the
  stage completes with its outputs;
- a NaN loss: every worker stops at once, Ray does NOT retry it, the stage fails with one clear message
  and the last good checkpoint stays in storage, loadable and finite;
- a crash in the middle of writing any output (the process SIGKILLed mid-write): no partial file, the
  previous file intact.

Elsewhere: a worker killed mid-run (test_ray_train.py), the driver killed and the stage rerun
(test_s3_training.py), S3 briefly unavailable (test_s3.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, MlflowServer, as_params
from conftest import SMALL_EXPERIMENT as EXPERIMENT
from loop_hooks import FaultHooks


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.2)
    return False


def _runs(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("cityscapes")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.integration
def test_mlflow_server_down_mid_run_training_goes_on(ray_local, make_params, mlflow_db_template, tmp_path,
                                                     capfd):
    """A real `mlflow server`; rank 0 logs iteration 1, then holds while the test kills the server, then
    trains on. Rank 0 fails exactly one MLflow call (then pauses logging instead of retrying every step),
    the driver reports the outage in one line at the end, and every DVC output is written."""
    from pipeline.train import train_experiment

    server = MlflowServer(tmp_path / "mlflow", mlflow_db_template).start()
    try:
        assert server.listening_addresses() == {"127.0.0.1"}        # loopback only, as everywhere
        params = make_params(tmp_path)
        params["tracking"] = {"uri": server.uri}
        hold = {"iteration": 1, "rank": 0, "marker": str(tmp_path / "held"), "release": str(tmp_path / "go")}

        def kill_server_while_rank0_holds():
            if _wait_for(Path(hold["marker"]), 300):
                server.stop()
            Path(hold["release"]).touch()

        killer = threading.Thread(target=kill_server_while_rank0_holds, daemon=True)
        killer.start()
        out = train_experiment(as_params(params), EXPERIMENT, out_root=tmp_path / "out", hooks=FaultHooks(hold=hold))
        killer.join()
    finally:
        server.stop()

    assert out["final"]["iteration"] == 4                                   # the run completed
    for path in (out["model"], out["metrics"], out["curve"]):
        assert Path(path).stat().st_size > 0
    assert out["mlflow_failures"] == 1          # rank 0: one failed call, then paused: no crash loop
    assert out["driver_mlflow_failures"] >= 1   # the driver's final logging met the dead server too
    reported = [line for line in capfd.readouterr().out.splitlines() if "MLflow tracking failed" in line]
    assert len(reported) == 1 and f"MLflow run {out['mlflow_run_id']}" in reported[0]

    # The server's store (read directly, the server being dead): one run, iteration 1 logged before it died.
    client, runs = _runs(f"sqlite:///{server.db}")
    assert [r.info.run_id for r in runs] == [out["mlflow_run_id"]]
    assert [m.step for m in client.get_metric_history(out["mlflow_run_id"], "loss")] == [1]


@pytest.mark.integration
def test_nan_loss_stops_cleanly_is_not_retried_and_keeps_the_last_good_checkpoint(ray_local, make_params,
                                                                                  tmp_path):
    """Iteration 3's batch is poisoned with NaN (checkpoint at 2): the stage raises NonFiniteLossError in
    one line naming the iteration and the kept checkpoint; with max_failures 2 the workers started once
    (a NaN is not transient: no Ray restart); the checkpoint at 2 is complete, loads, and is finite;
    no DVC output was written; the MLflow run is FAILED with the reason as a tag."""
    from components.learning.models import build_dnlnet
    from components.learning.models.checkpoint import load_mmseg_checkpoint
    from components.training.contract import NonFiniteLossError
    from pipeline.train import train_experiment

    params = make_params(tmp_path)
    params["train"]["max_failures"] = 2
    attempts = tmp_path / "attempts"
    with pytest.raises(NonFiniteLossError) as error:
        train_experiment(as_params(params), EXPERIMENT, out_root=tmp_path / "out",
                         hooks=FaultHooks(nan_at=3, attempts_file=str(attempts)))
    message = str(error.value)
    assert "\n" not in message and "loss is [nan" in message and "at iteration 3" in message
    assert "the last good checkpoint (2) is kept in" in message and "lower train.lr" in message
    assert attempts.read_text().split() == ["0"]          # one start of the workers, no retry

    snapshots = list((tmp_path / "runs").glob("*/checkpoint_manager_snapshot.json"))
    assert len(snapshots) == 1
    snapshot = json.loads(snapshots[0].read_text())
    latest = snapshot["latest_checkpoint_result"]
    assert latest["metrics"]["iteration"] == 2
    folder = snapshots[0].parent / latest["checkpoint_dir_name"]
    assert str(folder) in message
    meta = load_mmseg_checkpoint(build_dnlnet(depth=18, num_classes=19), folder / "model.pt")
    assert meta["iteration"] == 2
    weights = torch.load(folder / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())

    assert not (tmp_path / "out").exists()                # nothing half-written
    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "at iteration 3" in runs[0].data.tags["dnlseg.failure"]


# --- atomic writes ---------------------------------------------------------------------------------

# Runs one writer with os.fdopen patched so the first write() puts half its bytes on disk, flushes,
# signals, then hangs: the test SIGKILLs the process right there, mid-write.
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from types import SimpleNamespace
    how, dest, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    real_fdopen = os.fdopen

    class Stalling:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            data = bytes(data)
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            ready.touch()
            time.sleep(120)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    os.fdopen = lambda *a, **k: Stalling(real_fdopen(*a, **k))
    if how == "atomic_write_bytes":    # metrics/<exp>/train.json, plots/<exp>/train.csv, train_state.pt
        from components.atomic import atomic_write_bytes
        atomic_write_bytes(dest, b"NEW" * 100000)
    elif how == "copy_atomic":         # models/<exp>/model.pt, streamed out of the (local or s3) checkpoint
        import pyarrow.fs
        from components.training.checkpointing import copy_from_checkpoint
        source = dest.parent / "checkpoint"
        source.mkdir()
        (source / "model.pt").write_bytes(b"NEW" * 100000)
        checkpoint = SimpleNamespace(filesystem=pyarrow.fs.LocalFileSystem(), path=str(source))
        copy_from_checkpoint(checkpoint, "model.pt", dest)
    elif how == "save_checkpoint":     # a checkpoint's model.pt
        import torch
        from components.training.checkpointing import save_checkpoint
        save_checkpoint(dest, torch.nn.Linear(300, 300), {"iteration": 2})
""")


@pytest.mark.parametrize("how", ["atomic_write_bytes", "copy_atomic", "save_checkpoint"])
def test_crash_mid_write_leaves_no_partial_file(tmp_path, how):
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "output.bin"
    dest.write_bytes(b"OLD")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, how, str(dest), str(ready)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    try:
        assert _wait_for(ready, 120), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert dest.read_bytes() == b"OLD"                  # the output is the previous one, whole
    leftovers = [p.name for p in out.iterdir() if p.name not in ("output.bin", "checkpoint")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".output.bin.") and leftovers[0].endswith(".tmp")


def test_failed_copy_keeps_the_previous_output_and_cleans_up(tmp_path):
    """An error while streaming the model out of the checkpoint (storage gone): the previous model stays,
    no temp file remains."""
    import pyarrow.fs

    from components.training.checkpointing import copy_from_checkpoint

    dest = tmp_path / "models" / "exp" / "model.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"OLD")
    checkpoint = SimpleNamespace(filesystem=pyarrow.fs.LocalFileSystem(), path=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError):
        copy_from_checkpoint(checkpoint, "model.pt", dest)
    assert dest.read_bytes() == b"OLD" and [p.name for p in dest.parent.iterdir()] == ["model.pt"]
