"""Multi-node DDP: a two-node Ray cluster on this machine (ray.cluster_utils.Cluster, Ray's own test
utility), one CPU per node, two workers needing one CPU each, so the process group really spans nodes."""

from __future__ import annotations

import json

import pytest
from conftest import as_params
from loop_hooks import FaultHooks

EXPERIMENT = "dnl_r50-d8_512x1024_40k_cityscapes"   # the sample profile in make_params shrinks it
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    from components.ray_cluster import shutdown_ray

    shutdown_ray()   # the session's shared local Ray, if a test started it: one ray.init per process
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_workers_on_two_nodes_train_one_run(two_nodes, make_params, tmp_path):
    import ray

    from pipeline.train import train_experiment

    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2

    params = make_params(tmp_path, max_iters=2, evals_per_run=1)
    out = train_experiment(as_params(params), EXPERIMENT, out_root=tmp_path / "out",
                           hooks=FaultHooks(dump_dir=str(tmp_path / "facts")))

    facts = [json.loads((tmp_path / "facts" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {f["node_id"] for f in facts} == node_ids              # one rank on each node
    assert facts[0]["params_sha256"] == facts[1]["params_sha256"]  # DDP across nodes kept them in step
    assert out["final"]["iteration"] == 2
    assert (tmp_path / "out" / "models" / EXPERIMENT / "model.pt").stat().st_size > 0
