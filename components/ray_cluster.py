"""The Ray cluster a stage runs on: join $RAY_ADDRESS (or train.ray_address), else start a local one
whose dashboard listens on loopback only; and `dnlseg with-ray`, one local Ray for a whole `dvc repro`.
Shared by the train and tune stages (and the tests), so neither imports the other."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess

import ray

# A Ray the stage starts itself serves its dashboard (which accepts jobs) on loopback only.
LOCAL_RAY_OPTIONS = {"dashboard_host": "127.0.0.1"}


# On the clusters we start (theirs decide elsewhere):
# - Ray Train's preemption watcher (an actor process per run, ~2 s of CPU each) polls for nodes a cloud
#   provider drains; a Ray on one machine has none.
# - Ray's log monitor looks for new worker log files every 0.5 s, not every 0.1 s: it globs and stats every
#   file of the session's logs folder each time (4.5 ms at 400 files, as many as the main job leaves).
# Ray Train's controller keeps polling its workers every 2 s: every 0.5 s ends a lone run ~1-3 s sooner
# but costs CPU the main job, whose cores are saturated, does not have (bench/bench_train_startup.py).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}

# What start_local_ray changed in os.environ, restored by shutdown_ray.
_ENV_BEFORE_LOCAL_RAY: dict[str, str | None] = {}


def start_local_ray(**init_kwargs) -> None:
    """Start a Ray on this machine, its dashboard (which accepts jobs) on loopback at a port picked here,
    and point this process, its children and the job's workers at THIS cluster.

    Ray Train's PlacementGroupCleaner (an actor) finds a dead controller through the state API; without an
    address it looks for "the" Ray on the machine and fails when several run (other people's, other
    tests'): "ConnectionError: Found multiple active Ray instances", and the freed CPUs never come back.
    RAY_API_SERVER_ADDRESS, which the state API reads first, goes to every worker in the job's runtime env;
    RAY_ADDRESS (known only once the cluster runs) is for this process and what it starts.
    """

    shutdown_ray()   # a Ray we started before and someone shut down: its addresses are stale
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    _ENV_BEFORE_LOCAL_RAY.update({k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS",
                                                                  *LOCAL_RAY_ENV)})
    os.environ.pop("RAY_ADDRESS", None)   # we start a cluster: ray.init must not join one
    for key, value in LOCAL_RAY_ENV.items():   # the cluster's processes inherit it (unless set already)
        os.environ.setdefault(key, value)
    try:
        # address="local": without it ray.init joins the latest cluster started on this machine
        # (/tmp/ray/ray_current_cluster), e.g. someone else's, instead of starting ours.
        context = ray.init(address="local", **LOCAL_RAY_OPTIONS, dashboard_port=port,
                           runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}}, **init_kwargs)
    except BaseException:
        shutdown_ray()
        raise
    info = context.address_info
    os.environ.update({"RAY_API_SERVER_ADDRESS": api,
                       "RAY_ADDRESS": info.get("gcs_address") or info["address"]})


def shutdown_ray() -> None:
    """ray.shutdown(), and the environment as it was before start_local_ray (if it ran)."""

    ray.shutdown()
    for key, value in _ENV_BEFORE_LOCAL_RAY.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _ENV_BEFORE_LOCAL_RAY.clear()


def run_with_local_ray(command: list[str]) -> int:
    """Run `command` (e.g. `dvc repro`) with one local Ray that lives as long as it: every stage it starts
    joins that cluster through $RAY_ADDRESS instead of starting and stopping its own (a sample training
    stage, measured: 47 s alone, 38-42 s joining). With $RAY_ADDRESS already set, the command runs
    against that cluster and nothing is started. Returns the command's exit status."""

    started = not os.environ.get("RAY_ADDRESS")
    if started:
        start_local_ray()   # sets RAY_ADDRESS / RAY_API_SERVER_ADDRESS / RAY_AUTH_MODE for the child
    try:
        with subprocess.Popen(command) as child:  # noqa: S603 - the user's own command (`dnlseg with-ray -- ...`)
            try:
                return child.wait()
            except KeyboardInterrupt:   # Ctrl-C reached the child too: let it stop cleanly first
                return child.wait()
    finally:
        if started:
            shutdown_ray()


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(address: str) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one. True if we started it
    (end it with shutdown_ray)."""

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None)
    else:
        start_local_ray()
    return True


@contextlib.contextmanager
def scoped_env(env: dict[str, str]):
    """Set these environment variables for the stage (boto3, pyarrow, MLflow read them), then restore."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
