"""`dnlseg repro --jobs`: DVC's stages run concurrently, each by DVC itself.

On a toy DVC project (shell stages that sleep and record when they ran): independent stages overlap,
dvc.lock ends complete and `dvc status` clean, a rerun plans nothing, a failing stage (a bad param) stops
its dependants only and is named. Then the real pipeline on a two-node Ray cluster: three training
stages at once, through one MLflow server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import repo_copy, run_dvc
from fixtures.data import small_twin

from pipeline.repro import (
    RAY_ASKED,
    Limits,
    Plan,
    Runner,
    auto_limits,
    fixed_limits,
    plan_stages,
    priorities,
    runs_that_fit,
    runs_waiting,
)

STEP = textwrap.dedent("""
    import json, sys, time, yaml
    key = sys.argv[1]
    settings = yaml.safe_load(open("params.yaml"))["work"][key]
    start = time.time()
    if not settings["ok"]:
        print(f"work.{key}.ok: false, a bad param", flush=True)
        sys.exit(3)
    time.sleep(settings["seconds"])
    json.dump({"start": start, "end": time.time()}, open(f"out/{key}.json", "w"))
""")

DVC_YAML = textwrap.dedent("""
    stages:
      work:
        foreach: ${work}
        do:
          cmd: python step.py ${key}
          deps:
            - step.py
          params:
            - work.${key}
          outs:
            - out/${key}.json
      combine:
        cmd: python combine.py
        deps: [out/a.json, out/b.json]
        outs: [all.txt]
""")


def _toy(tmp_path: Path, ok_c: bool = True) -> tuple[Path, dict]:
    root = tmp_path / "toy"
    (root / "out").mkdir(parents=True)
    (root / "step.py").write_text(STEP)
    (root / "combine.py").write_text("import glob\nopen('all.txt', 'w').write(str(sorted(glob.glob('out/*'))))\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    work = {key: {"seconds": 4, "ok": True} for key in "abc"}
    work["c"]["ok"] = ok_c
    (root / "params.yaml").write_text(yaml.safe_dump({"work": work}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    run_dvc(["init", "-q"], root, env)
    return root, env


def _run(plan: Plan, root: Path, env: dict, jobs: int) -> tuple[int, list[str]]:
    lines: list[str] = []
    status = Runner(plan, fixed_limits(jobs), root, env, say=lines.append).run()
    return status, lines


def _locked(root: Path) -> set[str]:
    return set(yaml.safe_load((root / "dvc.lock").read_text())["stages"])


def test_independent_stages_overlap_and_end_as_a_sequential_repro(tmp_path):
    root, env = _toy(tmp_path)
    plan = plan_stages(root, [])
    assert sorted(plan.order) == ["combine", "work@a", "work@b", "work@c"]
    assert plan.upstream["combine"] == {"work@a", "work@b"} and plan.upstream["work@a"] == set()
    status, lines = _run(plan, root, env, jobs=3)
    assert status == 0, "\n".join(lines)

    spans = [json.loads((root / "out" / f"{k}.json").read_text()) for k in "abc"]
    assert max(s["start"] for s in spans) < min(s["end"] for s in spans)   # all three at once
    combine_began = (root / ".dnlseg" / "logs" / "combine.log").stat().st_ctime
    assert combine_began >= max(spans[0]["end"], spans[1]["end"])        # after what it depends on
    assert _locked(root) == {"work@a", "work@b", "work@c", "combine"}
    assert "up to date" in run_dvc(["status"], root, env)
    assert sum(line.startswith("[repro] start") for line in lines) == 4
    assert any(line.startswith("[repro] done  combine in ") for line in lines)

    again = plan_stages(root, [])
    assert again.order == [] and len(again.up_to_date) == 4                 # a rerun is a no-op

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["work"]["a"]["seconds"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert plan_stages(root, []).order == ["work@a", "combine"]             # a change and what follows it
    assert plan_stages(root, ["work@b"]).order == []                        # a target and its dependencies


def test_a_failing_stage_stops_its_dependants_and_is_named(tmp_path):
    root, env = _toy(tmp_path, ok_c=False)
    # c fails; combine needs a and b only, so it still runs: make it depend on c too.
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc_yaml["stages"]["combine"]["deps"].append("out/c.json")
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    status, lines = _run(plan_stages(root, []), root, env, jobs=3)

    assert status == 1
    failed = next(line for line in lines if line.startswith("[repro] FAILED work@c"))
    assert "(exit " in failed and "work.c.ok: false, a bad param" in failed   # the stage's own last lines
    assert "[repro] skip  combine: depends on work@c, which did not finish" in lines
    assert _locked(root) == {"work@a", "work@b"}                          # the others completed and locked
    assert plan_stages(root, []).order == ["work@c", "combine"]


def test_the_cluster_decides_how_many_runs_at_once():
    assert runs_that_fit({"CPU": 8.0, "GPU": 12.0}, {"CPU": 16, "GPU": 4}) == 1   # at least one
    assert runs_that_fit({"CPU": 48.0, "GPU": 12.0}, {"CPU": 16, "GPU": 4}) == 3  # three 4-GPU nodes
    assert runs_that_fit({"CPU": 3.0}, {"CPU": 1}) == 3
    # auto: the runs that fit plus one queued in Ray; light stages share those slots, and get one more per
    # two cores of this machine when the cluster is elsewhere.
    assert auto_limits(3, spare_cores=16) == Limits(ray=4, light=12, total=12)
    assert auto_limits(1, spare_cores=0) == Limits(ray=2, light=2, total=2)


def test_limits_keep_ray_stages_and_light_stages_apart():
    order = ["train@a", "train@b", "train@c", "prepare@x"]
    plan = Plan(order=order, upstream={stage: set() for stage in order})
    runner = Runner(plan, Limits(ray=2, light=1, total=3), Path("."), {})
    runner.running = {"train@a": (None, 0.0), "train@b": (None, 0.0)}
    assert not runner.can_start("train@c") and runner.can_start("prepare@x")   # Ray full, a light slot left
    runner.running["prepare@x"] = (None, 0.0)
    assert not runner.can_start("report") and not runner.can_start("tune")
    runner.running.pop("prepare@x")
    assert not runner.can_start("train_tuned")   # it runs on Ray too
    # The evaluations' work is Ray tasks of a training worker's resources: they count as Ray stages.
    assert not runner.can_start("evaluate@x") and not runner.can_start("evaluate_imported@y")
    runner.running.pop("train@b")
    assert runner.can_start("evaluate@x")


def test_the_status_line_names_the_stages_waiting_for_ray(tmp_path):
    """From Ray Train's own lines in each stage's log (as Ray 2.60 writes them): a run that asked for
    its workers and has not got them waits; a sweep's trials are counted."""
    asked = "(TrainController pid=24183) Requesting resources: {'CPU': 1} * 1\n"
    placed = "(TrainController pid=24183) Started training worker group of size 1: \n"
    logs = {"train@a": asked + placed, "train@b": asked, "tune": 3 * asked + placed, "evaluate@x": ""}
    runner = Runner(Plan(list(logs), {stage: set() for stage in logs}), fixed_limits(4), tmp_path, {})
    for stage, text in logs.items():
        runner.log(stage).parent.mkdir(parents=True, exist_ok=True)
        runner.log(stage).write_text(text)
        runner.running[stage] = (None, 0.0)
    assert runner.waiting_for_ray() == ["train@b", "tune (2 trial(s))"]


def test_the_longest_chain_of_ray_stages_goes_first(tmp_path):
    """In the repo's own pipeline, tune -> train_tuned is the longest chain of Ray stages: tune starts
    before the single trains, and train_tuned, once tune is done, before the trains still waiting (at
    the back of the queue it alone was the last 3 minutes of the sample pipeline); evaluations come
    after the trains that are ready."""
    root, _ = repo_copy(tmp_path)
    plan = plan_stages(root, [])   # nothing run yet: every stage
    rank = priorities(plan)
    order = sorted(plan.order, key=lambda stage: rank[stage], reverse=True)
    trains = [order.index(s) for s in plan.order if s.startswith("train@")]
    evaluations = [order.index(s) for s in plan.order if s.startswith("evaluate@")]
    assert len(trains) == 13 and order.index("tune") < order.index("train_tuned") < min(trains)
    assert max(trains) < min(evaluations)
    assert {"prepare@cityscapes", "prepare@ade20k"} <= {order[i] for i in range(min(trains))}


def test_unknown_target_is_one_line(tmp_path):
    root, _ = _toy(tmp_path)
    with pytest.raises(ValueError, match=r"^nope@x: not a stage of dvc.yaml"):
        plan_stages(root, ["nope@x"])


# --- the real pipeline: three training stages at once on a two-node cluster -------------------------

R50_EXPERIMENTS = ("dnl_r50-d8_512x1024_40k_cityscapes", "dnl_r50-d8_769x769_40k_cityscapes",
                   "dnl_r50-d8_512x1024_80k_cityscapes")
EXPERIMENTS = tuple(small_twin(name) for name in R50_EXPERIMENTS)   # the orchestration is tested: R-18-D8


@pytest.mark.integration
def test_three_runs_at_once_on_two_nodes_through_one_mlflow_server(tmp_path, two_node_cluster):
    from mlflow.tracking import MlflowClient

    work, env = repo_copy(tmp_path, *R50_EXPERIMENTS)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["profiles"]["sample"].update(num_workers=1, resources_per_worker={"CPU": 1})
    params["tracking"]["uri"] = ""     # the repo's own SQLite store: concurrent writers go through a server
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env, "RAY_ADDRESS": two_node_cluster.address}
    env.pop("MLFLOW_TRACKING_URI", None)
    targets = [f"train@{name}" for name in EXPERIMENTS]

    def repro() -> str:
        done = subprocess.run([str(Path(sys.executable).parent / "dnlseg"), "repro", "--jobs", "auto", *targets],
                              cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        return done.stdout

    out = repro()
    assert f"at most {4 + os.cpu_count() // 2} at once, 4 on Ray" in out and "3 run(s) of 1 CPU at once" in out
    assert "MLflow through http://127.0.0.1:" in out
    assert all(f"[repro] done  train@{name}" in out for name in EXPERIMENTS)

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = {r.data.tags["experiment"]: r for r in client.search_runs(
        [client.get_experiment_by_name("cityscapes").experiment_id], filter_string="tags.dvc_stage LIKE 'train@%'")}
    assert set(runs) == set(EXPERIMENTS)
    assert max(r.info.start_time for r in runs.values()) < min(r.info.end_time for r in runs.values())   # at once
    node_sets = [r.data.tags["ray_nodes"] for r in runs.values()]
    assert len(set(node_sets)) > 1                                  # workers of different runs on different nodes
    for run in runs.values():                                       # every run's metrics complete
        assert run.info.status == "FINISHED" and "final_mIoU" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert run.info.artifact_uri.startswith((work / "mlartifacts" / "cityscapes").as_uri())
    logs = "".join(p.read_text() for p in (work / ".dnlseg" / "logs").glob("*.log"))
    assert "database is locked" not in logs
    for name in EXPERIMENTS:   # Ray Train said when each run asked for its workers and got them
        log = (work / ".dnlseg" / "logs" / f"train@{name}.log").read_text()
        assert log.count(RAY_ASKED) == 1 and runs_waiting(log) == 0

    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert set(targets) <= set(lock)
    assert "up to date" in run_dvc(["status", *targets], work, env)
    assert "[repro] nothing to do" in repro()                       # a rerun is a no-op
