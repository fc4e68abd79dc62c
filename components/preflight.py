"""Checks that run before any expensive work (the train stage calls them first; tune and evaluate can).

Each failure is ONE line that says what is wrong and what to fix; all failures are reported together:

    preflight: data: /repo/data/prepared/cityscapes/val/manifest.csv not found: run `dnlseg prepare ...`
    preflight: tracking: MLflow server http://127.0.0.1:5000 not reachable (ConnectionError): start it ...
    preflight: storage: s3://bucket/runs/.dnlseg-write-probe-1a2b3c4d: put failed ... create the bucket ...
    preflight: ray: the experiment needs 4 GPU (4 workers x {GPU: 1}), the Ray cluster has 0 GPU: ...
    preflight: disk: /repo has 1.2 GB free, the run writes up to 2.2 GB there (staging checkpoints 0.4 GB, ...

`preflight(cfg)` covers data, tracking and storage (no Ray needed); `preflight_disk(...)` checks that the
local folders the run writes to have room for its checkpoints and outputs; `preflight_ray(cfg)` runs
after ray.init and compares the cluster's resources with what the experiment asks for;
`preflight_hardware(cfg)`, for profiles that use GPUs, checks every GPU node (components/hardware.py). Set
DNLSEG_RAY_AUTOSCALING=1 on clusters that add nodes on demand (deploy/): their current resources say
nothing about what they can get, so the Ray check only reports there.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

import ray
import requests
import torch

from components.hardware import check_gpu_nodes, loader_shm_bytes
from components.learning.distributed import plan_batches
from components.learning.models import build_dnlnet
from components.storage import StorageError, probe_writable
from components.tracking import redact

SPLITS = ("train", "val")


class PreflightError(ValueError):
    """One or more preflight failures, one line each."""


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160]}" if text else type(error).__name__


# --- data ------------------------------------------------------------------------------------------

def check_data(data_dir: Path | str, dataset: str, splits=SPLITS) -> list[str]:
    """Each split's manifest.csv exists, lists images, and every file it lists is there (stat only)."""
    fix = f"run `dnlseg prepare {dataset}` (or `dvc pull` the prepared data)"
    problems = []
    for split in splits:
        split_dir = Path(data_dir) / split
        manifest = split_dir / "manifest.csv"
        try:
            with open(manifest, newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            problems.append(f"preflight: data: {manifest} not found: {fix}")
            continue
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            problems.append(f"preflight: data: {manifest} unreadable ({_reason(e)}): {fix}")
            continue
        if not rows or not {"image", "label"} <= set(rows[0]):
            problems.append(f"preflight: data: {manifest} lists no images (or lacks the image,label "
                            f"columns): {fix}")
            continue
        listed = [split_dir / row[column] for row in rows for column in ("image", "label")]
        missing = [path for path in listed if not path.is_file()]
        if missing:
            problems.append(f"preflight: data: {missing[0]} (listed in {manifest}) is missing, "
                            f"{len(missing)} of {len(listed)} files: {fix}")
    return problems


# --- tracking --------------------------------------------------------------------------------------

def check_tracking(uri: str, timeout: float = 5.0) -> list[str]:
    """An http(s) tracking URI must answer MLflow's /health; a sqlite store's folder must be writable."""

    fix = "start it, or set tracking.uri / $MLFLOW_TRACKING_URI to a reachable server (empty: local SQLite)"
    if uri.startswith(("http://", "https://")):
        try:
            response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        except requests.RequestException as e:
            return [f"preflight: tracking: MLflow server {redact(uri)} not reachable ({type(e).__name__}): "
                    f"{fix}"]
        if response.status_code != 200:
            return [f"preflight: tracking: MLflow server {redact(uri)} answered HTTP {response.status_code} "
                    f"on /health: {fix}"]
        return []
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            probe_writable(str(folder))
        except StorageError as e:
            return [f"preflight: tracking: the SQLite store's folder {e}: set tracking.uri to a writable "
                    f"place"]
    return []


# --- storage ---------------------------------------------------------------------------------------

def check_storage(location: str, endpoint_url: str = "", region: str = "", key: str = "train.storage_path",
                  attempts: int = 3) -> list[str]:
    """Write and delete a probe object (S3) or file (local folder) under `location`."""

    try:
        probe_writable(location, endpoint_url=endpoint_url or None, region=region or None,
                       attempts=attempts, first_delay=0.5)
    except StorageError as e:
        return [f"preflight: storage ({key}): {e}"]
    return []


# --- Ray -------------------------------------------------------------------------------------------

def worker_bundle(resources_per_worker: dict | None, use_gpu: bool) -> dict[str, float]:
    """What Ray Train reserves per worker (ScalingConfig's rule): the given resources (zeros dropped),
    else 1 CPU, or 1 GPU when use_gpu; use_gpu adds GPU: 1 when it is not given."""
    if resources_per_worker:
        bundle = {k: float(v) for k, v in resources_per_worker.items() if v}
    else:
        bundle = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    if use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def check_ray_resources(num_workers: int, resources_per_worker: dict | None, use_gpu: bool, *,
                        cluster: dict, nodes: list[dict], where: str,
                        driver: dict | None = None) -> list[str]:
    """Total: num_workers x bundle (+ driver) within the cluster's resources; and one worker's bundle must
    fit on a single node. `cluster` = ray.cluster_resources(), `nodes` = alive nodes' resource dicts."""
    bundle = worker_bundle(resources_per_worker, use_gpu)
    need = {k: v * num_workers for k, v in bundle.items()}
    for k, v in (driver or {}).items():
        need[k] = need.get(k, 0.0) + float(v)
    short = {k: v for k, v in need.items() if float(cluster.get(k, 0.0)) + 1e-9 < v}
    problems = []
    if short:
        have = {k: float(cluster.get(k, 0.0)) for k in short}
        asked = f"{num_workers} workers x {_fmt(bundle)}" + (f" + driver {_fmt(driver)}" if driver else "")
        problems.append(f"preflight: ray: the experiment needs {_fmt({k: need[k] for k in short})} "
                        f"({asked}), the Ray cluster has {_fmt(have)}: lower {where}.num_workers or "
                        f"{where}.resources_per_worker, or add nodes")
    elif nodes and not any(all(float(n.get(k, 0.0)) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
        largest = max(nodes, key=lambda n: tuple(float(n.get(k, 0.0)) for k in sorted(bundle)))
        problems.append(f"preflight: ray: no node can hold one worker {_fmt(bundle)} (the largest has "
                        f"{_fmt({k: float(largest.get(k, 0.0)) for k in bundle})}): lower "
                        f"{where}.resources_per_worker")
    return problems


# --- disk ------------------------------------------------------------------------------------------

GB = 1e9


def weight_bytes(depth: int, num_classes: int) -> tuple[int, int]:
    """(model.pt, training checkpoint) sizes of a DNLNet in fp32: the weights, and the weights plus SGD's
    momentum (one buffer per parameter). Built on the meta device: no memory used."""

    with torch.device("meta"):
        model = build_dnlnet(depth=depth, num_classes=num_classes)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights, weights + momentum


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_disk(needs: list[tuple[Path, int, str]]) -> list[str]:
    """`needs`: (folder, bytes, what) the run writes locally; folders on one filesystem share its space."""
    by_device: dict[int, list] = {}
    for folder, size, what in needs:
        anchor = _existing(Path(folder).absolute())
        by_device.setdefault(anchor.stat().st_dev, []).append((anchor, size, what))
    problems = []
    for entries in by_device.values():
        anchor, need = entries[0][0], sum(size for _, size, _ in entries)
        free = shutil.disk_usage(anchor).free
        if need > free:
            what = ", ".join(f"{w} {s / GB:.1f} GB" for _, s, w in entries)
            problems.append(f"preflight: disk: {anchor} has {free / GB:.1f} GB free, the run writes up to "
                            f"{need / GB:.1f} GB there ({what}): free some space, or point "
                            f"train.storage_path / $TMPDIR elsewhere")
    return problems


def preflight_disk(cfg, run_dir: str, *, out_root: Path | str | None = None, runs: int = 1,
                   concurrent: int = 1) -> None:
    """Room for the peak on each local filesystem. A run (Ray Train) keeps its best and latest checkpoints
    and writes a third before dropping one; rank 0 stages each in a temp folder. A sweep has `runs`
    trials under run_dir, `concurrent` of them writing at once. What is already under run_dir (a resumed
    run's or sweep's own checkpoints) is counted as there. The train stage also writes
    out_root/models/<exp>/model.pt (temp + rename) and, with a local MLflow store, MLflow's copy of it."""
    weights, checkpoint = weight_bytes(cfg.depth, cfg.num_classes)
    needs = [(Path(tempfile.gettempdir()), concurrent * checkpoint, "staging checkpoints")]
    if "://" not in cfg.location.storage_path:
        kept = (2 * runs + concurrent) * checkpoint - _bytes_under(Path(run_dir))
        needs.append((Path(run_dir), max(concurrent * checkpoint, kept), "checkpoints"))
    if out_root is not None:
        needs.append((Path(out_root) / "models", 2 * weights, "models/"))
        if cfg.tracking_uri.startswith("sqlite:///"):
            needs.append((Path(cfg.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts", weights,
                          "MLflow artifacts"))
    _raise(check_disk(needs))


# --- entry points ----------------------------------------------------------------------------------

def _raise(problems: list[str]) -> None:
    if problems:
        raise PreflightError("\n".join(problems))


def preflight(cfg, *, data: bool = True, tracking: bool = True, storage: bool = True,
              storage_path: str | None = None) -> None:
    """Data prepared, tracking reachable, storage writable for RunConfig `cfg`; PreflightError if not."""
    problems = []
    if data:
        problems += check_data(cfg.location.data_dir, cfg.recipe.dataset)
    if tracking:
        problems += check_tracking(cfg.tracking_uri)
    if storage:
        problems += check_storage(storage_path or cfg.location.storage_path, cfg.location.endpoint_url,
                                  cfg.location.region)
    _raise(problems)


def preflight_ray(cfg, driver: dict | None = None, num_workers: int | None = None,
                  resources_per_worker: dict | None = None) -> None:
    """After ray.init: the cluster holds what `cfg` asks for (tune: pass its trial driver and workers)."""

    problems = check_ray_resources(
        num_workers or cfg.execution.num_workers, resources_per_worker or cfg.execution.resources_per_worker,
        cfg.execution.use_gpu,
        cluster=ray.cluster_resources(), nodes=[n["Resources"] for n in ray.nodes() if n.get("Alive")],
        where=f"profiles.{cfg.profile}", driver=driver)
    if problems and os.environ.get("DNLSEG_RAY_AUTOSCALING") == "1":
        for line in problems:   # the autoscaler adds nodes when the workers ask: report, go on
            sys.stderr.write(line.replace("preflight: ray:", "preflight: ray (autoscaling, go on):") + "\n")
        return
    _raise(problems)


# --- GPU nodes ---------------------------------------------------------------------------------------

def node_shm_need(cfg, node_resources: dict, num_workers: int | None = None) -> tuple[int, str]:
    """(bytes, how they add up) of loader batches in /dev/shm on a node, for as many of the run's ranks as
    the node holds (components/hardware.py loader_shm_bytes)."""

    workers = num_workers or cfg.execution.num_workers
    bundle = worker_bundle(cfg.execution.resources_per_worker, cfg.execution.use_gpu)
    fits = min(int(float(node_resources.get(k, 0.0)) // v) for k, v in bundle.items())
    per_rank, _ = plan_batches(cfg.recipe.batch_size, workers, cfg.execution.micro_batch_size)
    scale_w, scale_h = cfg.recipe.scale   # val images come at the test scale (keep-ratio within it)
    return loader_shm_bytes(max(1, min(workers, fits)), cfg.execution.loader_workers, per_rank,
                            cfg.recipe.crop_size, (scale_h, scale_w))


def preflight_hardware(cfg, num_workers: int | None = None) -> None:
    """After ray.init, for a run on GPUs: every alive GPU node checked by a task pinned there (torch sees
    the GPUs, has kernels for them, the driver runs its CUDA, a kernel runs, /dev/shm holds the loader
    batches). With no GPU node up yet (an autoscaling cluster) there is nothing to check: it says so."""

    if not cfg.execution.use_gpu:
        return
    if not any(n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0 for n in ray.nodes()):
        sys.stderr.write("preflight: gpu: no GPU node is up yet: the nodes the autoscaler adds are not "
                         "checked before the workers start\n")
        return
    _raise(check_gpu_nodes(lambda resources: node_shm_need(cfg, resources, num_workers)))
