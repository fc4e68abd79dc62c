"""The evaluation's work as Ray tasks, on the cluster the stage joined (components/ray_cluster.py).

Each task holds what one training worker of the profile holds (`profiles.<p>.resources_per_worker`:
the reference profile's GPU and its CPUs, the sample's one CPU), so Ray schedules evaluations beside
the training runs and never two on one GPU. The val split goes out in shards (components/evaluation/
shards.py: their counts summed are the split's), as many as Ray has room for now: on GPUs one per free
GPU, on CPUs one task. Then the speed is timed in a task of its own, after the shards, holding a whole
GPU (no other Ray task or worker runs on it) at batch 1. A profile that asks for GPUs on a cluster
without them fails in one line before any work: the evaluation never falls back to the CPU.
"""

from __future__ import annotations

import os
import sys

import ray
from ray.exceptions import RayTaskError

from components.evaluation.shards import EvalJob, ShardResult, run_fps, run_shard
from components.preflight import worker_bundle

# Ray's own resource names; any other key of resources_per_worker is a custom resource.
_RAY_NAMED = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


class EvaluationResourceError(ValueError):
    """The cluster cannot hold one evaluation task of the profile (one line)."""


def task_resources(use_gpu: bool, resources_per_worker: dict | None) -> dict[str, float]:
    """One evaluation task's Ray resources: a training worker's bundle of the profile (preflight's
    rule), without its GPU when the evaluation runs on CPUs."""
    bundle = worker_bundle(resources_per_worker, use_gpu)
    if not use_gpu:
        bundle.pop("GPU", None)
        bundle = bundle or {"CPU": 1.0}
    return bundle


def fps_resources(bundle: dict[str, float]) -> dict[str, float]:
    """The speed task's: the bundle with a whole GPU (a fraction could share it with other work)."""
    return {**bundle, "GPU": max(1.0, bundle["GPU"])} if bundle.get("GPU") else dict(bundle)


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def require_resources(bundle: dict[str, float], stage: str, where: str) -> None:
    """One line, before any work, when no node of the connected cluster can hold one task `bundle`
    (a GPU profile on a cluster without GPUs, above all). On autoscaling clusters
    (DNLSEG_RAY_AUTOSCALING=1, as the preflight) the nodes are yet to come: said, and on."""

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
        return
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
    line = (f"{stage}: one evaluation task needs {_fmt(bundle)} ({where}.resources_per_worker"
            f"{', use_gpu: true' if bundle.get('GPU') else ''}) and no node of the Ray cluster at "
            f"{os.environ.get('RAY_ADDRESS') or 'this machine'} has it (in all {_fmt(have)}): run it where Ray "
            f"has {'GPUs' if bundle.get('GPU') else 'those resources'} ($RAY_ADDRESS)"
            + (", or set evaluate.device: cpu to evaluate on CPUs on purpose" if bundle.get("GPU") else ""))
    if os.environ.get("DNLSEG_RAY_AUTOSCALING") == "1":
        sys.stderr.write(f"{line} (autoscaling: the tasks wait for the nodes)\n")
        return
    raise EvaluationResourceError(line)


def shard_count(requested: int | None, bundle: dict[str, float], images: int) -> int:
    """`evaluate.shards`, or (None) as many tasks as Ray's free resources hold now when a task holds a
    GPU (one per free GPU, at least one), and one on CPUs; never more than the images."""
    if requested:
        return min(requested, images)
    if not bundle.get("GPU"):
        return 1

    free = ray.available_resources()
    fits = min(int(free.get(k, 0.0) // v) for k, v in bundle.items())
    return max(1, min(fits, images))


def _options(bundle: dict[str, float], env: dict[str, str]) -> dict:
    # Ray's default retries stay: they rerun a task whose node was lost, never one that raised.
    options = {"num_cpus": 0.0}
    custom = {}
    for key, value in bundle.items():
        if key in _RAY_NAMED:
            options[_RAY_NAMED[key]] = value
        else:
            custom[key] = value
    if custom:
        options["resources"] = custom
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def evaluate_on_ray(job: EvalJob, bundle: dict[str, float], shards: list[range], *, env: dict[str, str],
                    predictions_dir: str | None = None) -> tuple[list[ShardResult], dict | None]:
    """The shards as Ray tasks of `bundle` each, then (evaluate.fps_images set) the speed task;
    returns the shards' results and the speed (None: not measured). A task's own error (bad data, a
    GPU torch cannot see) is raised as it is, in one line."""

    shard_task = ray.remote(run_shard).options(**_options(bundle, env), name="evaluate-shard")
    parts = _get([shard_task.remote(job, images, predictions_dir) for images in shards])
    speed = None
    if job.settings.fps_images:
        fps_task = ray.remote(run_fps).options(**_options(fps_resources(bundle), env), name="evaluate-fps")
        [speed] = _get([fps_task.remote(job)])
    return parts, speed


def _get(refs: list):

    try:
        return ray.get(refs)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (ValueError, FileNotFoundError, RuntimeError)):
            raise cause from None
        raise


def describe_shards(parts: list[ShardResult], bundle: dict[str, float]) -> list[dict]:
    """eval.json's record of where each shard ran."""
    return [{"images": [part.images.start, part.images.stop], "resources": bundle, "device": part.device,
             "node": part.node} for part in sorted(parts, key=lambda p: p.images.start)]


def describe_timing(speed: dict, bundle: dict[str, float], shards: int) -> dict:
    """eval.json's `speed.timed_on`: the task the speed was timed in, and what else could run beside it."""
    resources = fps_resources(bundle)
    alone = (f"the task held {resources['GPU']:g} whole GPU: Ray runs no other task or training worker on it"
             if resources.get("GPU") else
             f"the task held {_fmt(resources)}: other Ray work may run on the node's other cores")
    return {"ray_task": "evaluate-fps", "resources": resources, "node": speed["node"],
            "after": f"the {shards} evaluation shard task(s) had finished", "exclusive": alone,
            "timed": "per image: forward + resize to the label size + argmax, batch 1, the image on the device "
                     "before its timer starts (one image at a time)"}
