"""The evaluation's shards and Ray tasks, without a Ray cluster: how the split is cut, that summed shard
counts are the single process's exactly, what each task asks Ray for, the one-line failure of a GPU
profile on a cluster without GPUs (Ray's view faked), and the fps loop's bounded memory.

The stage on a real local Ray, sharded and not: tests/test_evaluate.py.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import SMALL_EXPERIMENT, as_params
from test_evaluate import SleepyModel, tiny_params

from components.evaluation import on_ray
from components.evaluation.on_ray import (
    EvaluationResourceError,
    fps_resources,
    require_resources,
    shard_count,
    task_resources,
)
from components.evaluation.shards import EvalJob, evaluation_device, merge_shards, run_shard, shard_ranges
from components.evaluation.speed import measure_fps
from components.learning.models.speedups import resolve_precision
from components.learning.segment import InferenceSetting
from components.training.data_sync import manifest_hash
from components.weights import sha256_file


def test_shards_cover_the_split_once_in_order():
    assert shard_ranges(5, 2) == [range(0, 2), range(2, 5)]
    assert shard_ranges(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert shard_ranges(2, 5) == [range(0, 1), range(1, 2)]   # never an empty shard
    assert shard_ranges(500, 3) == [range(0, 166), range(166, 333), range(333, 500)]
    with pytest.raises(ValueError, match="at least one image and one shard"):
        shard_ranges(0, 2)


# --- what a task asks Ray for ---------------------------------------------------------------------

def test_a_task_holds_what_a_training_worker_of_the_profile_holds():
    assert task_resources(True, {"CPU": 4, "GPU": 1}) == {"CPU": 4.0, "GPU": 1.0}   # reference
    assert task_resources(False, {"CPU": 1}) == {"CPU": 1.0}                        # sample
    assert task_resources(True, {}) == {"GPU": 1.0}                                  # Ray Train's default
    assert task_resources(False, {"CPU": 4, "GPU": 1}) == {"CPU": 4.0}   # evaluate.device: cpu, on purpose
    assert task_resources(False, {"GPU": 1}) == {"CPU": 1.0}
    # The speed task holds a whole GPU even where the profile's workers share one.
    assert fps_resources({"CPU": 2.0, "GPU": 0.5}) == {"CPU": 2.0, "GPU": 1.0}
    assert fps_resources({"CPU": 1.0}) == {"CPU": 1.0}
    assert on_ray._options({"CPU": 4.0, "GPU": 1.0, "node_slot": 1.0}, {"AWS_ENDPOINT_URL": "http://x"}) == {
        "num_cpus": 4.0, "num_gpus": 1.0, "resources": {"node_slot": 1.0},
        "runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://x"}}}


class FakeRay:
    """What the module reads of Ray: its nodes and free resources."""

    def __init__(self, nodes: list[dict], free: dict | None = None):
        self._nodes, self._free = nodes, free or {}

    def nodes(self):
        return [{"Alive": True, "Resources": n} for n in self._nodes] + [{"Alive": False, "Resources": {"GPU": 8}}]

    def available_resources(self):
        return self._free


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    def use(nodes, free=None):
        fake = FakeRay(nodes, free)
        monkeypatch.setattr(ray, "nodes", fake.nodes)
        monkeypatch.setattr(ray, "available_resources", fake.available_resources)

    monkeypatch.delenv("DNLSEG_RAY_AUTOSCALING", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    return use


def test_a_gpu_profile_on_a_cluster_without_gpus_is_one_line(fake_ray, monkeypatch, capsys):
    fake_ray([{"CPU": 16.0, "memory": 1e10}, {"CPU": 2.0}])   # the dead node's 8 GPUs do not count
    with pytest.raises(EvaluationResourceError) as failure:
        require_resources({"CPU": 4.0, "GPU": 1.0}, "evaluate@exp", "profiles.reference")
    line = str(failure.value)
    assert "\n" not in line
    assert line.startswith("evaluate@exp: one evaluation task needs {CPU: 4, GPU: 1} "
                           "(profiles.reference.resources_per_worker, use_gpu: true)")
    assert "Ray cluster at 10.0.0.1:6379" in line and "{CPU: 18, GPU: 0}" in line
    assert "evaluate.device: cpu" in line
    # A node that holds one task: fine; GPUs spread one per node do not make a two-GPU task fit.
    fake_ray([{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    require_resources({"CPU": 4.0, "GPU": 1.0}, "evaluate@exp", "profiles.reference")
    with pytest.raises(EvaluationResourceError, match=r"needs \{CPU: 4, GPU: 2\}"):
        require_resources({"CPU": 4.0, "GPU": 2.0}, "evaluate@exp", "profiles.reference")
    # Autoscaling clusters get their nodes when the tasks ask: said, not raised.
    monkeypatch.setenv("DNLSEG_RAY_AUTOSCALING", "1")
    fake_ray([{"CPU": 2.0}])
    require_resources({"CPU": 4.0, "GPU": 1.0}, "evaluate@exp", "profiles.reference")
    assert "(autoscaling: the tasks wait for the nodes)" in capsys.readouterr().err


def test_one_shard_per_free_gpu_one_task_on_cpus(fake_ray):
    gpu = {"CPU": 4.0, "GPU": 1.0}
    fake_ray([], free={"CPU": 16.0, "GPU": 3.0})   # one GPU of four held by a training run
    assert shard_count(None, gpu, 500) == 3
    assert shard_count(None, gpu, 2) == 2          # never more shards than images
    fake_ray([], free={"CPU": 6.0, "GPU": 3.0})    # the CPUs decide too
    assert shard_count(None, gpu, 500) == 1
    fake_ray([], free={"CPU": 0.0, "GPU": 0.0})    # all busy: one task, queued in Ray
    assert shard_count(None, gpu, 500) == 1
    assert shard_count(None, {"CPU": 1.0}, 500) == 1
    assert shard_count(2, {"CPU": 1.0}, 500) == 2 and shard_count(8, {"CPU": 1.0}, 3) == 3   # evaluate.shards


def test_a_task_holding_a_gpu_torch_cannot_see_fails_instead_of_using_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError, match=r"this Ray task holds a GPU \(CUDA_VISIBLE_DEVICES='0'\) but torch "
                                           r".* sees none") as failure:
        evaluation_device(True)
    assert "\n" not in str(failure.value)
    assert evaluation_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_device(True) == torch.device("cuda")


# --- sharded == one process, exactly ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_job(tmp_path_factory, sample_data, mlflow_db_template, small_checkpoint):
    """An EvalJob on the main job's sample Cityscapes val split (4 images of 256x512), the session's
    small checkpoint, single scale and ms+flip, on this process's CPU."""
    work = tmp_path_factory.mktemp("shards")
    params = as_params(tiny_params(work, sample_data, mlflow_db_template), work)
    cfg, settings = params.experiment(SMALL_EXPERIMENT), params.eval_settings()
    checkpoint, _ = small_checkpoint
    return EvalJob(cfg=cfg, settings=settings, checkpoint=str(checkpoint), checkpoint_sha256=sha256_file(checkpoint),
                   checkpoint_uri=None, data_digest=manifest_hash(cfg.location.data_dir), data_uri=None,
                   use_gpu=False, precision=resolve_precision(settings.precision, "cpu"))


def test_summed_shards_equal_one_process_exactly(sample_job):
    whole = run_shard(sample_job, range(0, 4))
    assert whole.results["single_scale"].images == 4
    predicted = torch.nonzero(whole.results["single_scale"].confusion.counts.sum(0)).numel()
    assert predicted >= 3, "a trivial prediction would check little"
    for cuts in ([range(0, 2), range(2, 4)], [range(3, 4), range(0, 1), range(1, 3)]):   # any order back
        merged = merge_shards([run_shard(sample_job, images) for images in cuts])
        for setting, expected in whole.results.items():
            got = merged[setting]
            assert torch.equal(got.confusion.counts, expected.confusion.counts), setting
            assert torch.equal(got.iou.counts, expected.iou.counts), setting
            assert got.images == expected.images == 4
            # every metric, per class too, bit for bit (NaN where a class is absent, in both)
            a, b = got.metrics(), expected.metrics()
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(torch.tensor(a[key], dtype=torch.float64).nan_to_num(-1.0),
                                   torch.tensor(b[key], dtype=torch.float64).nan_to_num(-1.0)), (setting, key)
            # the overlays' label maps: the first `overlays` images, in order, the same pixels
            assert [i for i, _ in got.samples] == [i for i, _ in expected.samples] == [0]
            assert all((p == q).all() for (_, p), (_, q) in zip(got.samples, expected.samples, strict=True))


# --- fps: one image on the device at a time ----------------------------------------------------------

class CountingImages:
    """A val split of `count` distinct images read on demand; counts how many of the tensors it handed
    out are alive at once (on the CPU `.to(device)` is the tensor itself, so alive = on the device)."""

    def __init__(self, count: int):
        self.count, self.alive, self.most_alive, self.reads = count, 0, 0, 0

    def __len__(self) -> int:
        return self.count

    def _gone(self) -> None:
        self.alive -= 1

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        img = torch.full((1, 3, 8, 8), float(index))
        self.alive += 1
        self.reads += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(img, self._gone)
        return img, (16, 16)


@pytest.mark.parametrize("count", [10, 60])
def test_fps_holds_one_image_at_a_time_whatever_the_number(count):
    images = CountingImages(count)
    result = measure_fps(SleepyModel(0, 0.0, 0.0), images, "cpu", InferenceSetting("whole"),
                         n_images=count + 5, warmup=2)
    assert images.reads == count + 5 and result["distinct_images"] == count   # cycled past the end
    # Taking all of them first (what measure_fps did before) would keep `count` alive at once.
    assert images.most_alive == 1
    assert images.alive == 0
