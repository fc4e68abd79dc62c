"""Multi-node DDP on the two-node Ray cluster (fixtures/ray_clusters.py `two_node_cluster`): two workers
each needing one CPU and the node's one NODE_SLOT, so the process group really spans the nodes."""

from __future__ import annotations

import json

import pytest
from conftest import EXPERIMENT, SMALL_EXPERIMENT, as_params
from fixtures.ray_clusters import NODE_SLOT
from loop_hooks import FaultHooks

pytestmark = pytest.mark.integration
ONE_PER_NODE = {"CPU": 1, NODE_SLOT: 1}


def test_two_workers_on_two_nodes_train_one_run(two_node_cluster, make_params, tmp_path):
    import ray

    from pipeline.train import train_experiment

    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2

    params = make_params(tmp_path, max_iters=2, evals_per_run=1, resources_per_worker=ONE_PER_NODE)
    out = train_experiment(as_params(params), SMALL_EXPERIMENT, out_root=tmp_path / "out",
                           hooks=FaultHooks(dump_dir=str(tmp_path / "facts")))

    facts = [json.loads((tmp_path / "facts" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {f["node_id"] for f in facts} == node_ids              # one rank on each node
    assert facts[0]["params_sha256"] == facts[1]["params_sha256"]  # DDP across nodes kept them in step
    assert out["final"]["iteration"] == 2
    assert (tmp_path / "out" / "models" / SMALL_EXPERIMENT / "model.pt").stat().st_size > 0


def test_workers_on_both_nodes_start_from_the_served_imagenet_weights(two_node_cluster, make_params, tmp_path,
                                                                      file_server, imagenet_v1c50):
    """train.pretrained is a URL on a loopback server: the driver fetches it once into the download cache
    before Ray starts, and every worker, on either node, starts from it: after one step at a tiny learning
    rate the backbone parameters equal the file's (up to that step) and are far from a random init. The
    file's sha256 is in the run's params, so other weights would be another run."""
    import hashlib

    from mlflow.tracking import MlflowClient

    from components.learning.models import build_dnlnet
    from pipeline.train import train_experiment

    path, state_dict = imagenet_v1c50
    url = file_server.add(path.name, path)
    # The table's R-50: its ImageNet weights are what the workers must start from.
    params = make_params(tmp_path, max_iters=1, evals_per_run=1, pretrained="imagenet",
                         resources_per_worker=ONE_PER_NODE)
    params["train"]["pretrained"]["R-50-D8"] = url
    params["train"]["lr"] = 1e-6
    params["downloads"] = {"cache_dir": str(tmp_path / "cache")}
    out = train_experiment(as_params(params), EXPERIMENT, out_root=tmp_path / "out",
                           hooks=FaultHooks(dump_dir=str(tmp_path / "facts"), weights_file=str(path)))

    facts = [json.loads((tmp_path / "facts" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len({f["node_id"] for f in facts}) == 2
    assert all(f["backbone_max_abs_diff"] < 1e-4 for f in facts), facts
    random_init = build_dnlnet(depth=50, num_classes=19).backbone.state_dict()
    far = max((random_init[k] - state_dict[k]).abs().max().item() for k in ("stem.0.weight", "layer4.2.conv3.weight"))
    assert far > 0.1   # so a random init would have shown
    assert file_server.requests == [f"/{path.name}"]                      # downloaded once
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]   # complete and verified only
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(out["mlflow_run_id"])
    assert run.data.params["pretrained"] == url and run.data.params["pretrained_sha256"] == sha
    # System metrics from the node(s) while it trained. (Ray Train groups workers by IP: both "nodes" of
    # this one-machine cluster are one host to it, so there is one monitor, unnamed.)
    assert "system/cpu_utilization_percentage" in run.data.metrics
