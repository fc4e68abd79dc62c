"""Elastic training (profiles.<p>.min_workers) on the two-node Ray cluster (fixtures/ray_clusters.py): a
run started on 2 workers, one per node, loses a node, goes on with 1 worker at the same global batch, and
grows back to 2 when the node returns; one MLflow run, every iteration trained once."""

from __future__ import annotations

import csv
import threading
import time

import pytest
from conftest import SMALL_EXPERIMENT, as_params
from fixtures.ray_clusters import NODE_SLOT
from loop_hooks import FaultHooks

pytestmark = pytest.mark.integration
ONE_PER_NODE = {"CPU": 1, NODE_SLOT: 1}


def wait_for(path, training: threading.Thread, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline or not training.is_alive():
            raise TimeoutError(f"{path} not written in {timeout_s:.0f} s (training ended: {not training.is_alive()})")
        time.sleep(0.2)


def test_elastic_run_shrinks_on_node_loss_and_grows_back(two_node_cluster, make_params, tmp_path, monkeypatch,
                                                         capfd):
    """6 iterations, global batch 2, a checkpoint every 2. Rank 0 waits after iteration 2 (checkpoint
    committed) while the test removes the second node: Ray Train restarts the group on the 1 worker left,
    from that checkpoint; after iteration 4 (committed) the test adds a node back and Ray grows the group
    to 2 again (it considers resizing every second here), from the checkpoint at 4. Ray decides the
    counts; the run keeps batch 2 (2 x 1 image, then 1 x 2, then 2 x 1) and its data order (the sampler's
    unit tests), and logs world_size at 0, 2, 4."""
    from mlflow.tracking import MlflowClient

    from components.training.trainer import RESIZE_INTERVAL_ENV
    from pipeline.train import train_experiment

    monkeypatch.setenv(RESIZE_INTERVAL_ENV, "1")
    cluster = two_node_cluster
    second = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    params = make_params(tmp_path, max_iters=6, evals_per_run=3, num_workers=2, min_workers=1,
                         resources_per_worker=ONE_PER_NODE)
    params["train"]["max_failures"] = 3
    lost, back = tmp_path / "lost", tmp_path / "back"
    holds = [{"iteration": 2, "rank": 0, "marker": str(lost), "committed_reports": 1, "timeout_s": 180},
             {"iteration": 4, "rank": 0, "marker": str(back), "committed_reports": 2, "timeout_s": 180}]
    result = {}

    def train():   # in a thread: Ray's Cluster adds a node from the main thread only (signal handlers)
        try:
            result["out"] = train_experiment(as_params(params), SMALL_EXPERIMENT, out_root=tmp_path / "out",
                                             hooks=FaultHooks(hold=holds, attempts_file=str(tmp_path / "attempts")))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    training = threading.Thread(target=train, daemon=True)
    training.start()
    wait_for(lost, training)   # the held rank is torn down with its group: no release is needed
    cluster.remove_node(second)
    wait_for(back, training)
    cluster.add_node(num_cpus=2, resources={NODE_SLOT: 1})
    training.join(timeout=600)
    assert "error" not in result, result
    out = result["out"]
    log = capfd.readouterr().out

    assert out["final"]["iteration"] == 6 and out["start_iteration"] == 4
    assert out["world_sizes"] == [[0, 2], [2, 1], [4, 2]]
    assert (tmp_path / "attempts").read_text().split() == ["0", "2", "4"]   # resumed, not restarted from 0
    for line in ("starting at iteration 0/6: 2 workers x 1 images x 1 accumulation steps = batch 2",
                 "resuming at iteration 2/6: 1 workers x 2 images x 1 accumulation steps = batch 2",
                 "resuming at iteration 4/6: 2 workers x 1 images x 1 accumulation steps = batch 2"):
        assert line in log, log[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cityscapes").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    sizes = sorted(client.get_metric_history(run_id, "world_size"), key=lambda m: (m.step, m.timestamp))
    assert [(m.step, int(m.value)) for m in sizes] == [(0, 2), (2, 1), (4, 2)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]  # once each
    with open(tmp_path / "out" / "plots" / SMALL_EXPERIMENT / "train.csv", newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
