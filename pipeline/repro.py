"""`dnlseg repro [--jobs N|auto] [targets]`: DVC's pipeline with independent stages running at once,
against one Ray cluster (the local one this command starts, or $RAY_ADDRESS).

Each stage is still run by DVC itself, `dvc --wait-for-lock repro --single-item <stage>`: DVC holds its repo
lock only while it reads and writes its state, not while a stage's command runs, so independent stages
run side by side and dvc.lock ends as a sequential `dvc repro` leaves it. A stage starts once every stage
it depends on is done; Ray queues the training workers that do not fit the cluster. A failed stage stops
its dependants, the others go on, and the command exits 1 naming it. With several stages at once on the
repo's default SQLite tracking store, the stages write through one `mlflow server` on loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import ray
from dvc.exceptions import DvcException
from dvc.repo import Repo
from mlflow.tracking import MlflowClient

from components.mlflow_server import MlflowServer
from components.ray_cluster import connect_ray, shutdown_ray
from components.tracking import ensure_experiment
from pipeline.config import STORE_SERVER_ENV, Params, default_store

TRAINING_GROUPS = ("train", "train_seed", "train_tuned", "train_tuned_seed", "tune")   # stages that run Ray Train
# Stages whose command runs on Ray: training, and the evaluations' tasks (a training worker's resources each).
RAY_GROUPS = (*TRAINING_GROUPS, "evaluate", "evaluate_seed", "evaluate_imported")
LOG_DIR = Path(".dnlseg") / "logs"   # under the repo: one log per stage (the console gets one line each)
STATUS_EVERY_S = 60.0


@dataclass
class Plan:
    """The stages to run, dependencies first, and which planned stages each waits for."""

    order: list[str]
    upstream: dict[str, set[str]]
    up_to_date: list[str] = field(default_factory=list)


def plan_stages(root: Path, targets: list[str]) -> Plan:
    """The stages of `targets` (default: all) and their dependencies that DVC would run: the changed ones
    (`dvc status`) and everything downstream of them."""

    # From the repo root: stage names (and `dvc status`'s keys) are relative to the working directory.
    with contextlib.chdir(root), Repo(str(root)) as repo:
        graph = repo.index.graph   # edges run from a stage to the stages it depends on
        if targets:
            chosen = {stage for target in targets for stage in _collect(repo, target)}
            nodes = chosen | {dep for stage in chosen for dep in nx.descendants(graph, stage)}
        else:
            nodes = set(graph.nodes)
        changed = set(repo.status())
        sub = graph.subgraph(nodes)
        names = {stage: stage.addressing for stage in nodes}
        order, upstream, up_to_date = [], {}, []
        for stage in reversed(list(nx.topological_sort(sub))):
            deps = {names[d] for d in sub.successors(stage)} & set(order)
            if names[stage] in changed or deps:
                order.append(names[stage])
                upstream[names[stage]] = deps
            else:
                up_to_date.append(names[stage])
    return Plan(order, upstream, up_to_date)


def _collect(repo, target: str) -> list:
    try:
        return repo.stage.collect(target)
    except DvcException as e:
        raise ValueError(f"{target}: not a stage of dvc.yaml ({e})") from None


def per_run_need(params: Params) -> dict[str, float]:
    """Ray resources one training run of the profile holds: its workers' (the driver reserves none)."""
    profile = params.profiles[params.profile_name()]
    return {k: v * profile.num_workers for k, v in profile.resources_per_worker.items() if v}


def runs_that_fit(total: dict[str, float], need: dict[str, float]) -> int:
    """How many runs needing `need` the cluster's `total` resources hold at once (at least 1)."""
    return max(1, min((int(total.get(k, 0) // v) for k, v in need.items()), default=1))


@dataclass(frozen=True)
class Limits:
    """How many stages run at once: Ray stages (train, tune), the others, and in all."""

    ray: int
    light: int
    total: int


def auto_limits(fits: int, spare_cores: int) -> Limits:
    """`--jobs auto`: the training runs the cluster holds plus one waiting in Ray's queue (its driver and
    Ray Train's start-up done, it starts the moment a run ends); the evaluations, whose tasks hold a
    training worker's resources, count among these Ray stages; light stages (prepare, report) take those
    slots too, and one more per two `spare_cores`: this machine's cores when the cluster is
    elsewhere ($RAY_ADDRESS), none when the local Ray uses them (measured on 2 cores: a light stage
    beside the training runs that fill them made the sample pipeline slower)."""
    slots = fits + 1 + spare_cores // 2
    return Limits(ray=fits + 1, light=slots, total=slots)


def fixed_limits(jobs: int) -> Limits:
    """`--jobs N`: N stages at once, of any kind."""
    return Limits(ray=jobs, light=jobs, total=jobs)


def _group(stage: str) -> str:
    return stage.split(":")[-1].split("@")[0]


def _experiment_datasets(params: Params, stages: list[str]) -> set[str]:
    """The MLflow experiments (one per dataset) the planned stages log into."""
    datasets = set()
    for stage in stages:
        group, _, key = stage.split(":")[-1].partition("@")
        if group in ("tune", "train_tuned", "train_tuned_seed"):
            key = params.tune.experiment
        if group in ("train_seed", "evaluate_seed"):   # <experiment>-<seed>
            key = key.rpartition("-")[0]
        if key in params.imported:
            key = params.imported[key].experiment
        if key in params.experiments:
            datasets.add(params.experiments[key].dataset)
    return datasets


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


class Runner:
    """Launches the plan's stages as their dependencies finish, within `limits`."""

    def __init__(self, plan: Plan, limits: Limits, root: Path, env: dict, need: dict | None = None, say=print):
        self.plan, self.limits, self.root, self.env, self.need, self.say = plan, limits, root, env, need, say
        self.dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.priority = priorities(plan)
        self.done: list[str] = []
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def log(self, stage: str) -> Path:
        return self.root / LOG_DIR / f"{stage.replace('/', '_').replace(':', '_')}.log"

    def can_start(self, stage: str) -> bool:
        on_ray = _group(stage) in RAY_GROUPS
        alike = sum((_group(s) in RAY_GROUPS) == on_ray for s in self.running)
        return len(self.running) < self.limits.total and alike < (self.limits.ray if on_ray else self.limits.light)

    def start(self, stage: str) -> None:
        log = self.log(stage)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            # S603: this venv's dvc and a stage name from dvc.yaml's graph, no shell
            proc = subprocess.Popen([self.dvc, "--wait-for-lock", "repro", "--single-item", stage],  # noqa: S603
                                    cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.running[stage] = (proc, time.monotonic())
        note = ""
        if self.need and _group(stage) in TRAINING_GROUPS:
            free = _ray_free()
            if any(free.get(k, 0) < v for k, v in self.need.items()):
                note = f" (Ray has {_resources(free) or 'nothing'} free now: its workers wait in Ray's queue)"
        self.say(f"[repro] start {stage}{note}  (log: {log.relative_to(self.root)})")

    def finish(self, stage: str, code: int) -> None:
        _, began = self.running.pop(stage)
        took = _duration(time.monotonic() - began)
        if code == 0:
            self.done.append(stage)
            self.say(f"[repro] done  {stage} in {took}  ({len(self.done)}/{len(self.plan.order)})")
        else:
            self.failed.append(stage)
            self.say(f"[repro] FAILED {stage} after {took} (exit {code}); the end of {self.log(stage)}:\n"
                     f"{_tail(self.log(stage))}")

    def waiting_for_ray(self) -> list[str]:
        """The running Ray stages whose runs wait for Ray's resources (how many, for a sweep)."""
        waiting = []
        for stage in self.running:
            if _group(stage) in TRAINING_GROUPS:
                runs = runs_waiting(self.log(stage).read_text(errors="replace"))
                if runs:
                    waiting.append(stage if _group(stage) != "tune" else f"{stage} ({runs} trial(s))")
        return waiting

    def run(self) -> int:
        pending = sorted(self.plan.order, key=lambda stage: self.priority[stage], reverse=True)
        last_status = time.monotonic()
        try:
            while pending or self.running:
                for stage in list(pending):
                    deps = self.plan.upstream[stage]
                    stopped = deps & set(self.failed + self.skipped)
                    if stopped:
                        pending.remove(stage)
                        self.skipped.append(stage)
                        self.say(f"[repro] skip  {stage}: depends on {', '.join(sorted(stopped))}, "
                                 f"which did not finish")
                    elif deps <= set(self.done) and self.can_start(stage):
                        pending.remove(stage)
                        self.start(stage)
                for stage, (proc, _) in list(self.running.items()):
                    if proc.poll() is not None:
                        self.finish(stage, proc.returncode)
                        last_status = time.monotonic()
                if time.monotonic() - last_status >= STATUS_EVERY_S and self.running:
                    last_status = time.monotonic()
                    now = time.monotonic()
                    waiting = self.waiting_for_ray()
                    waiting = f"; waiting for Ray's resources: {', '.join(waiting)}" if waiting else ""
                    self.say("[repro] running: " + ", ".join(f"{s} ({_duration(now - t)})" for s, (_, t)
                                                             in self.running.items())
                             + f"{waiting}; {len(pending)} to start")
                time.sleep(0.2)
        except KeyboardInterrupt:   # Ctrl-C reached the stages too: let DVC stop them cleanly
            for proc, _ in self.running.values():
                proc.wait()
            raise
        return 1 if self.failed else 0


def priorities(plan: Plan) -> dict[str, tuple[int, int]]:
    """Per stage: the most training stages on a path from it (itself included) to the end of the plan,
    and from the start to it. Ready stages start in decreasing order of these: the pipeline ends no
    sooner than its longest chain of training runs (tune -> train_tuned), so that chain goes first and,
    once begun, goes on before the stages that are still at its first step (the single trains); the
    evaluations, minutes against hours, do not lengthen a chain."""
    below: dict[str, set[str]] = {stage: set() for stage in plan.order}
    for stage, deps in plan.upstream.items():
        for dep in deps:
            below[dep].add(stage)
    on_ray = {stage: int(_group(stage) in TRAINING_GROUPS) for stage in plan.order}
    to_end: dict[str, int] = {}
    for stage in reversed(plan.order):   # dependants first
        to_end[stage] = on_ray[stage] + max((to_end[s] for s in below[stage]), default=0)
    from_start: dict[str, int] = {}
    for stage in plan.order:             # dependencies first
        from_start[stage] = on_ray[stage] + max((from_start[s] for s in plan.upstream[stage]), default=0)
    return {stage: (to_end[stage], from_start[stage]) for stage in plan.order}


def _resources(need: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(need.items()))


def _ray_free() -> dict[str, float]:
    return {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}


# Ray Train's controller logs these into the stage's log when a run asks Ray for its workers, and when
# it has them (ray/train/v2/_internal/execution: scaling_policy.py, worker_group.py).
RAY_ASKED, RAY_PLACED = "Requesting resources:", "Started training worker group"


def runs_waiting(log_text: str) -> int:
    """Training runs of a Ray stage (one; a sweep's trials) that asked Ray for their workers and do not
    have them yet, from the stage's log."""
    return max(0, log_text.count(RAY_ASKED) - log_text.count(RAY_PLACED))


def repro(params: Params, targets: list[str], jobs: str = "auto", say=print) -> int:
    """Run the pipeline (or `targets` and what they depend on); 0 when every stage finished."""
    root = params.root
    if jobs != "auto" and (not jobs.isdigit() or int(jobs) < 1):
        raise ValueError(f"--jobs: expected a number >= 1 or auto, got {jobs!r}")
    tic = time.monotonic()
    plan = plan_stages(root, targets)
    if not plan.order:
        say(f"[repro] nothing to do: {len(plan.up_to_date)} stages up to date")
        return 0
    need = per_run_need(params)
    uses_ray = any(_group(s) in RAY_GROUPS for s in plan.order)
    server = started_ray = None
    try:
        server = _launch_store_server(params, plan, jobs)
        started_ray = connect_ray(params.train.ray_address) if uses_ray else False
        fits = _cluster_fits(need) if uses_ray else 1
        limits = _limits(params, jobs, fits)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if server:
            env[STORE_SERVER_ENV] = server.wait_ready().uri
        cluster = f"Ray at {os.environ.get('RAY_ADDRESS')}, {fits} run(s) of {_resources(need)} at once" \
            if uses_ray else "no Ray stage"
        tracking = f"; MLflow through {server.uri}" if server else ""
        say(f"[repro] {len(plan.order)} stage(s) to run, {len(plan.up_to_date)} up to date; at most "
            f"{limits.total} at once, {limits.ray} on Ray ({cluster}){tracking}")
        runner = Runner(plan, limits, root, env, need if uses_ray else None, say)
        status = runner.run()
    finally:
        if server:
            server.stop()
        if started_ray:
            shutdown_ray()
    say(f"[repro] {_outcome(runner)} in {_duration(time.monotonic() - tic)}")
    return status


def _launch_store_server(params: Params, plan: Plan, jobs: str) -> MlflowServer | None:
    """With several stages at once on the repo's SQLite store, one `mlflow server` they all write through
    (launched, not yet ready); None otherwise."""
    root = params.root
    if not ((jobs == "auto" or int(jobs) > 1) and params.tracking_uri == default_store(root)):
        return None
    # Lazy, as ray's below: mlflow's import takes seconds, and most runs of repro need neither.

    # The experiments first, in the file (artifacts beside it, as a sequential run makes them);
    # the server then boots while Ray does.
    client = MlflowClient(tracking_uri=params.tracking_uri)
    for dataset in sorted(_experiment_datasets(params, plan.order)):
        ensure_experiment(client, dataset)
    return MlflowServer(params.tracking_uri, (root / "mlartifacts").as_uri(),
                        root / LOG_DIR / "mlflow-server.log").launch()


def _cluster_fits(need: dict[str, float]) -> int:
    """How many training runs the connected Ray cluster holds at once."""

    return runs_that_fit(ray.cluster_resources(), need)


def _limits(params: Params, jobs: str, fits: int) -> Limits:
    """`--jobs`'s limits, given the training runs the cluster holds at once."""
    external = bool(params.train.ray_address or os.environ.get("RAY_ADDRESS"))   # else a local Ray, our cores
    spare = (os.cpu_count() or 1) if external else 0
    return auto_limits(fits, spare) if jobs == "auto" else fixed_limits(int(jobs))


def _outcome(runner: Runner) -> str:
    """How many stages finished, which failed, which were not run."""
    summary = f"{len(runner.done)} done"
    if runner.failed:
        summary += f", FAILED: {', '.join(runner.failed)}"
    if runner.skipped:
        summary += f", not run: {', '.join(runner.skipped)}"
    return summary
