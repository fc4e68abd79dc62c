"""The tune stage: search space and resource arithmetic (no Ray), then real sweeps on the session's local
Ray (ray_local, 2 CPUs): ASHA stops a trial that does not learn, MLflow nests one child run per trial
under the sweep's parent, and a sweep killed mid-way is restored, its finished trials kept as they were.

Trials are the sample profile shrunk to 32x64 crops, 1 worker, a few iterations, two evaluations.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXPERIMENT, REPO, SMALL_EXPERIMENT, as_params

from components.learning import tuning
from pipeline.tune import search_space

# In 2-8 iterations from random init a model can learn the class prior (predict the most frequent class
# everywhere: aAcc = its pixel share, 24% on this data) or not. mIoU cannot tell the two apart yet
# (measured at 2: 1.85 for the prior, 2.00 for the untrained model), so the sweeps rank trials by aAcc.
GOOD_LR, DEAD_LR = 0.02, 1e-7      # DEAD_LR: the weights do not move


# --- no Ray ----------------------------------------------------------------------------------------

def test_space_errors_name_the_key():
    with pytest.raises(ValueError, match=r"tune\.space\.lr\.loguniform: expected a positive value, got 0"):
        tuning.check_space({"lr": {"loguniform": [0, 0.1]}})
    with pytest.raises(ValueError, match=r"tune\.space\.lr\.loguniform: expected \[low, high\] with 0 < low"):
        tuning.check_space({"lr": {"loguniform": [0.1, 0.01]}})
    with pytest.raises(ValueError, match=r"tune\.space\.batch_size: not a tunable field"):
        tuning.check_space({"batch_size": {"choice": [2, 4]}})
    with pytest.raises(ValueError, match=r"tune\.space\.max_iters: max_iters is an integer"):
        tuning.check_space({"max_iters": {"uniform": [4, 8]}})
    with pytest.raises(ValueError, match=r"tune\.space\.warmup_iters\.choice: expected an integer"):
        tuning.check_space({"warmup_iters": {"choice": [0, 2.5]}})


def test_search_space_samples_inside_the_bounds():
    from ray.tune.search.sample import Domain

    space = search_space({"lr": {"loguniform": [1e-3, 1e-1]}, "max_iters": {"choice": [8, 16]},
                                 "warmup_iters": {"randint": [0, 2]}, "poly_power": 0.9,
                                 "weight_decay": {"grid": [1e-4, 5e-4]}})
    assert space["poly_power"] == 0.9 and space["weight_decay"] == {"grid_search": [1e-4, 5e-4]}
    lrs = [space["lr"].sample() for _ in range(200)]
    assert all(1e-3 <= v <= 1e-1 for v in lrs) and min(lrs) < 1e-2 < max(lrs)   # log scale reaches both
    assert {space["max_iters"].sample() for _ in range(50)} == {8, 16}
    assert isinstance(space["warmup_iters"], Domain)
    assert {space["warmup_iters"].sample() for _ in range(100)} == {0, 1, 2}   # high inclusive, as written


def test_max_concurrent_trials_from_cluster_resources():
    # 4 GPU nodes' worth: 32 CPUs, 8 GPUs. A trial: driver 0.5 CPU + 2 workers x (4 CPU, 1 GPU)
    # = 8.5 CPUs, 2 GPUs.
    demand = tuning.trial_demand(2, {"CPU": 4, "GPU": 1}, {"cpu": 0.5})
    assert demand == {"CPU": 8.5, "GPU": 2.0}
    assert tuning.max_concurrent_trials({"CPU": 32.0, "GPU": 8.0, "memory": 1e11}, demand) == 3   # 32 / 8.5
    assert tuning.max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, demand) == 4                  # 8 / 2
    # This machine: 2 CPUs; driver 0.1 CPU + 1 worker x 1 CPU -> 1 at a time (2 would need 2.2 CPUs).
    assert tuning.max_concurrent_trials({"CPU": 2.0}, tuning.trial_demand(1, {"CPU": 1}, {"CPU": 0.1})) == 1
    with pytest.raises(ValueError, match=r"resources_per_trial: one trial does not fit.*GPU"):
        tuning.max_concurrent_trials({"CPU": 2.0}, tuning.trial_demand(1, {"CPU": 1, "GPU": 1}, {"CPU": 0.1}))


def test_trial_summary_and_best_trial():
    rows = [{"iteration": 2, "mIoU": 3.0}, {"iteration": 4, "mIoU": 5.0}, {"iteration": 6, "mIoU": 5.0}]
    done = tuning.summarize_trial(rows, max_iters=6, metric="mIoU", mode="max", failed=False)
    assert done == {"best_mIoU": 5.0, "best_iteration": 6, "iterations_run": 6, "stopped_early": False,
                    "status": "completed"}
    stopped = tuning.summarize_trial(rows[:1], max_iters=6, metric="mIoU", mode="max", failed=False)
    assert stopped["stopped_early"] and stopped["iterations_run"] == 2
    assert stopped["status"] == "stopped early"
    failed = tuning.summarize_trial([], max_iters=6, metric="mIoU", mode="max", failed=True)
    assert failed["best_mIoU"] is None and not failed["stopped_early"] and failed["status"] == "failed"
    trials = [{"trial_id": "a", **stopped}, {"trial_id": "b", **done}, {"trial_id": "c", **failed}]
    assert tuning.best_trial(trials, "mIoU", "max")["trial_id"] == "b"
    assert tuning.best_trial(trials, "mIoU", "min")["trial_id"] == "a"


def test_apply_tuned_overrides_the_schedule(tmp_path):
    from pipeline.config import load

    cfg = load().experiment(EXPERIMENT, "sample")
    cfg = cfg.with_schedule(max_iters=16).updated(recipe={"evals_per_run": 2})   # an evaluation every 8
    assert cfg.eval_interval == 8
    path = tmp_path / "best_params.yaml"
    path.write_text(yaml.safe_dump({"experiment": EXPERIMENT, "profile": "sample",
                                    "params": {"lr": 0.02, "max_iters": 8, "warmup_iters": 2}}))
    tuned = tuning.apply_tuned(cfg, path)
    assert (tuned.schedule.lr, tuned.max_iters, tuned.schedule.warmup_iters) == (0.02, 8, 2)
    assert tuned.eval_interval == 4                         # still 2 evaluations per run
    assert tuned.schedule.weight_decay == cfg.schedule.weight_decay and tuned.recipe == cfg.recipe
    path.write_text(yaml.safe_dump({"experiment": EXPERIMENT, "profile": "reference",
                                    "params": {"lr": 0.02}}))
    with pytest.raises(ValueError, match=r"best_params.yaml: tuned for profile 'reference', but training "
                                         r"'sample'"):
        tuning.apply_tuned(cfg, path)
    path.write_text(yaml.safe_dump({"experiment": EXPERIMENT, "profile": "sample", "params": {"lr": -1}}))
    with pytest.raises(ValueError, match=r"best_params.yaml: params.lr: expected a positive value"):
        tuning.apply_tuned(cfg, path)
    with pytest.raises(FileNotFoundError, match=r"missing.yaml: tuned parameters not found"):
        tuning.apply_tuned(cfg, tmp_path / "missing.yaml")


def test_train_tuned_trains_the_sweeps_schedule_as_its_own_experiment(make_params, tmp_path, monkeypatch):
    """Stage train_tuned (`dnlseg train <exp> --tuned`): the tuned experiment on tune/<exp>/best_params.yaml,
    as `<exp>-tuned` beside the untuned row (a missing file is one line saying how to make it); train@<exp>
    keeps params.yaml's schedule."""
    import pipeline.train

    seen = []

    def stop_at_preflight(cfg, **kwargs):   # the config the stage would train, before any Ray
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.train, "preflight", stop_at_preflight)   # imported at its top
    params = make_params(tmp_path / "work")
    params["tune"]["experiment"] = EXPERIMENT
    with pytest.raises(FileNotFoundError, match=r"best_params.yaml: tuned parameters not found: run `dvc "
                                                r"repro tune`.*: the train_tuned stage trains on them$"):
        pipeline.train.train_experiment(as_params(params, tmp_path), EXPERIMENT, tuned=True)
    assert seen == []
    best = tmp_path / "tune" / EXPERIMENT / "best_params.yaml"
    best.parent.mkdir(parents=True)
    best.write_text(yaml.safe_dump({"experiment": EXPERIMENT, "profile": "sample", "params": {"lr": 0.0375}}))
    for tuned, expected_lr, name in ((True, 0.0375, f"{EXPERIMENT}-tuned"), (False, params["train"]["lr"], EXPERIMENT)):
        with pytest.raises(KeyboardInterrupt):
            pipeline.train.train_experiment(as_params(params, tmp_path), EXPERIMENT, tuned=tuned)
        assert seen[-1].schedule.lr == expected_lr and seen[-1].name == name


def test_a_new_sweep_result_makes_train_tuned_stale():
    """DVC sees the tuned schedule: train_tuned depends on the tune stage's best_params.yaml, so a sweep
    runs before it and a new sweep result reruns it; the untuned train stages do not wait for tune."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        graph = repo.index.graph
        by_name = {stage.addressing.split(":")[-1]: stage for stage in graph.nodes}
        upstream = {name: {s.addressing.split(":")[-1] for s in graph.successors(stage)}
                    for name, stage in by_name.items()}
    assert "tune" in upstream["train_tuned"]
    assert "tune" not in upstream[f"train@{EXPERIMENT}"]
    tune_experiment = yaml.safe_load((REPO / "params.yaml").read_text())["tune"]["experiment"]
    tuned_deps = {d.def_path for d in by_name["train_tuned"].deps}
    assert f"tune/{tune_experiment}/best_params.yaml" in tuned_deps


def test_repo_params_tune_section_resolves_and_bad_values_name_the_key():
    import copy

    from pipeline.config import ConfigError, parse, read_raw

    params = read_raw(REPO / "params.yaml")
    settings = parse(params, REPO).tune
    assert settings.experiment in params["experiments"]
    assert settings.metric == "mIoU" and settings.mode == "max" and settings.num_samples >= 1
    for where, value, message in (
            (("metric",), "loss", r"tune\.metric: expected one of mIoU, mAcc, aAcc, got 'loss'"),
            (("scheduler", "grace_period"), 0, r"tune\.scheduler\.grace_period: expected an integer >= 1"),
            (("space", "lr"), {"normal": [0, 1]}, r"tune\.space\.lr: expected one of \{loguniform"),
            (("resources_per_trial", "driver_memory_gb"), 0, r"driver_cpu and driver_memory_gb must be")):
        bad = copy.deepcopy(params)
        section = bad["tune"]
        for key in where[:-1]:
            section = section[key]
        section[where[-1]] = value
        if where[0] == "resources_per_trial":
            section["driver_cpu"] = 0
        with pytest.raises(ConfigError, match=message):
            parse(bad, REPO)


def test_sweep_name_follows_what_is_searched_not_where_it_runs():
    """The sweep's name decides restore-or-start-over: same search elsewhere restores, a changed search
    (or data) starts a fresh sweep."""
    from components.training.identity import sweep_name as named
    from pipeline.config import load

    def sweep_name(cfg, settings, data):
        return named(cfg, settings.learned(), data, "code-1")

    params = load()
    cfg, settings = params.experiment(EXPERIMENT, "sample"), params.tune
    name = sweep_name(cfg, settings, "data-1")
    assert name.startswith(f"{EXPERIMENT}-tune-")
    trial = settings.resources_per_trial.model_copy(
        update={"num_workers": 4, "max_concurrent_trials": 2, "driver_cpu": 1})
    moved = settings.model_copy(update={"resources_per_trial": trial})
    assert sweep_name(cfg.updated(location={"storage_path": "s3://bucket/runs"}), moved, "data-1") == name
    assert sweep_name(cfg, settings.model_copy(update={"seed": 1}), "data-1") != name
    assert sweep_name(cfg, settings.model_copy(update={"space": {"lr": 0.02}}), "data-1") != name
    assert sweep_name(cfg.with_schedule(momentum=0.8), settings, "data-1") != name
    assert sweep_name(cfg, settings, "data-2") != name
    assert named(cfg, settings.learned(), "data-1", "code-2") != name   # other code: a fresh sweep


# --- real sweeps -----------------------------------------------------------------------------------

def sweep_params(make_params, work: Path, lrs: list[float], max_iters: int, evals: int) -> dict:
    """`evals` evaluations evenly spaced, ASHA comparing trials from the first; one trial at a time
    (1 worker x 2 CPUs), in the grid's order."""
    params = make_params(work, max_iters=max_iters, evals_per_run=evals, num_workers=1,
                         resources_per_worker={"CPU": 2})
    params["tune"] = {"experiment": SMALL_EXPERIMENT, "num_samples": 1, "seed": 0, "metric": "aAcc", "mode": "max",
                      "space": {"lr": {"grid": lrs}}, "eval_interval": None,
                      "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                      "resources_per_trial": {"driver_cpu": 0, "driver_memory_gb": 0.25, "num_workers": None,
                                              "resources_per_worker": None}}
    return params


def mlflow_client(work: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    return client, client.get_experiment_by_name("cityscapes").experiment_id


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
def test_sweep_asha_stops_the_dead_trial_and_mlflow_nests_trials(ray_local, make_params, tmp_path):
    from pipeline.tune import tune_experiment

    out_root = tmp_path / "out"
    tic = time.perf_counter()
    # Evaluations at 8 and 16: ASHA's stop reaches a trial a little after its report (Ray Train polls
    # its workers every 0.5 s here, 2 s by default), so the dead trial needs a tail longer than that to
    # show the stop. Measured: stopped at 12 with 2 s polls, at 8 with 0.5 s.
    params = sweep_params(make_params, tmp_path, [GOOD_LR, DEAD_LR, 0.01], max_iters=16, evals=2)
    out = tune_experiment(as_params(params), SMALL_EXPERIMENT, out_root=out_root)
    print(f"sweep took {time.perf_counter() - tic:.0f} s")
    assert not out["restored"]

    rows = read_csv(out_root / "tune" / SMALL_EXPERIMENT / "trials.csv")
    print(rows)
    assert len(rows) == 3
    by_lr = {float(r["lr"]): r for r in rows}
    assert set(by_lr) == {GOOD_LR, DEAD_LR, 0.01}
    assert by_lr[GOOD_LR]["stopped_early"] == "False" and by_lr[GOOD_LR]["iterations_run"] == "16"
    # The dead trial is compared with the first at its first evaluation (iteration 8) and stopped there.
    assert by_lr[DEAD_LR]["stopped_early"] == "True" and by_lr[DEAD_LR]["iterations_run"] == "8"
    assert float(by_lr[DEAD_LR]["best_aAcc"]) < float(by_lr[GOOD_LR]["best_aAcc"])

    best = yaml.safe_load((out_root / "tune" / SMALL_EXPERIMENT / "best_params.yaml").read_text())
    best_row = max(rows, key=lambda r: (float(r["best_aAcc"]), int(r["iterations_run"])))
    assert best["params"] == {"lr": float(best_row["lr"])} and best["params"]["lr"] != DEAD_LR
    assert best["experiment"] == SMALL_EXPERIMENT and best["profile"] == "sample"
    assert (out_root / "tune" / SMALL_EXPERIMENT / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The finished sweep keeps Tune's record, not its trials' Train runs (checkpoints with optimizer state).
    assert not (Path(out["path"]) / "train_runs").exists() and any(Path(out["path"]).glob("experiment_state-*"))

    client, experiment_id = mlflow_client(tmp_path)
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dvc_stage"] == f"tune@{SMALL_EXPERIMENT}"
    assert parent.data.metrics["best_aAcc"] == pytest.approx(float(best_row["best_aAcc"]))
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    assert {float(c.data.params["lr"]) for c in children} == {GOOD_LR, DEAD_LR, 0.01}
    for child in children:
        lr = float(child.data.params["lr"])
        assert child.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss"))   # from rank 0
        if lr == DEAD_LR:   # stopped after its evaluation at 8; it logs a few steps more meanwhile
            assert steps == list(range(1, len(steps) + 1)) and 8 <= len(steps) < 16
        else:
            assert steps == list(range(1, 17))
        assert child.data.metrics["stopped_early"] == (1.0 if lr == DEAD_LR else 0.0)
        assert {"mIoU", "aAcc", "lr", "best_aAcc", "iterations_run"} <= set(child.data.metrics)


def finished_trial_ids(sweep_dir: Path) -> list[str]:
    """Trials the sweep's saved state (what a restore starts from) records as TERMINATED."""
    from ray.tune import ExperimentAnalysis

    try:
        return [t.trial_id for t in ExperimentAnalysis(str(sweep_dir)).trials if t.status == "TERMINATED"]
    except Exception:  # noqa: BLE001 - the state file may be mid-write: look again
        return []


@pytest.mark.integration
def test_killed_sweep_resumes_keeping_finished_trials(ray_local, make_params, tmp_path):
    """A sweep in another process is killed (SIGKILL) once its saved state records a finished trial;
    rerun, it restores: the finished trial is not trained again, the other one completes, and MLflow
    still has one parent with one child per trial."""
    from components.tracking import RUN_NAME_TAG
    from pipeline.tune import tune_experiment

    params = sweep_params(make_params, tmp_path, [GOOD_LR, 0.01], max_iters=2, evals=1)
    params["train"]["ray_address"] = ray_local.get_runtime_context().gcs_address   # join this cluster
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out_root = tmp_path / "out"
    code = ("import sys; from pipeline.config import load; from pipeline.tune import tune_experiment; "
            "tune_experiment(load(sys.argv[1], root='.'), sys.argv[2], out_root=sys.argv[3])")
    log = open(tmp_path / "first_run.log", "w")
    first = subprocess.Popen([sys.executable, "-c", code, str(params_file), SMALL_EXPERIMENT, str(out_root)],
                             cwd=REPO, env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        finished: list[str] = []
        while not finished and first.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            sweeps = list((tmp_path / "runs" / "tune").glob("*/experiment_state-*.json"))
            finished = finished_trial_ids(sweeps[0].parent) if sweeps else []
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    killed_at = time.time()
    assert len(finished) == 1, (tmp_path / "first_run.log").read_text()[-3000:]
    assert not (out_root / "tune" / SMALL_EXPERIMENT / "best_params.yaml").exists()   # it did not get that far

    out = tune_experiment(as_params(params), SMALL_EXPERIMENT, out_root=out_root)
    assert out["restored"]
    rows = read_csv(out_root / "tune" / SMALL_EXPERIMENT / "trials.csv")
    assert len(rows) == 2 and finished[0] in {r["trial_id"] for r in rows}
    assert all(r["iterations_run"] == "2" and r["status"] == "completed" for r in rows)

    client, experiment_id = mlflow_client(tmp_path)
    parents = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{out['sweep']}'")
    assert [p.info.run_id for p in parents] == [out["mlflow_run_id"]] and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{out['mlflow_run_id']}'")
    assert len(children) == 2
    done_before = next(c for c in children if c.data.tags["tune.trial_id"] == finished[0])
    losses = client.get_metric_history(done_before.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2]                       # trained once ...
    assert all(m.timestamp / 1000 < killed_at for m in losses)            # ... before the kill
    assert done_before.info.status == "FINISHED"
