"""Stage `evaluate@<name>`: one trained experiment (or an imported mmseg checkpoint) on its val split.

Single scale and ms+flip mIoU / mAcc / aAcc with per-class IoU (mmseg's test pipeline: the image
resized keep-ratio to the test scale, the scores resized back to the original label size, then argmax),
inference speed as the seed measures it, the training's peak memory, and the pictures. Writes
    metrics/<name>/eval.json            DVC metrics (percent), device and dtype next to every figure
    plots/<name>/per_class_iou.csv      DVC bar chart
    plots/<name>/per_class_iou.png      matplotlib bar chart (single scale and ms+flip)
    plots/<name>/confusion.png          row-normalized confusion matrix (single scale)
    plots/<name>/overlays/*.png         image | ground truth | prediction for the first val images
and logs the same into the experiment's MLflow run (the training run; imported checkpoints get a run
of their own), with the model as a state_dict artifact (model/model.pt + model/config.json).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from components.atomic import atomic_write_text
from components.console import warn
from components.evaluation.on_ray import (
    describe_shards,
    describe_timing,
    evaluate_on_ray,
    require_resources,
    shard_count,
    task_resources,
)
from components.evaluation.protocol import protocol, protocol_hash
from components.evaluation.registry import ModelSpec, ensure_model_file, log_model_config
from components.evaluation.shards import EvalJob, merge_shards, shard_ranges, val_count
from components.evaluation.visualize import (
    finite_or_none,
    save_confusion_chart,
    save_iou_chart,
    save_panel,
)
from components.learning.data import get_dataset
from components.learning.data.dataset import SegmentationDataset
from components.learning.experiment import RunConfig, flat_settings
from components.learning.models.speedups import resolve_precision, slow_precision_warning
from components.ray_cluster import connect_ray, scoped_env, shutdown_ray
from components.storage import endpoint_env
from components.tracking import RunLogger, find_training_run, mark_training_experiment, metric_name, open_run, redact
from components.training.data_sync import manifest_hash, publish_dataset
from components.weights import fetch, publish, sha256_file
from pipeline.config import Params, eval_metrics_file, plots_dir


def _percent(metrics: dict, class_names) -> dict:
    # NaN (no labelled pixel at all) becomes null: JSON has no NaN.
    return {**{k: finite_or_none(round(100 * metrics[k], 4)) for k in ("mIoU", "mAcc", "aAcc")},
            "IoU": {n: finite_or_none(round(100 * v, 4))
                    for n, v in zip(class_names, metrics["IoU"], strict=True)}}


def training_memory(client, run_id: str | None) -> dict | None:
    """Peak training memory: the largest `memory_gb` rank 0 logged to the training run (GPU:
    max_memory_allocated; CPU: peak RSS of the worker process)."""
    if client is None or run_id is None:
        return None
    history = client.get_metric_history(run_id, "memory_gb")
    if not history:
        return None
    params = client.get_run(run_id).data.params
    on_gpu = params.get("use_gpu") == "True"
    return {"peak_gb": round(max(m.value for m in history), 3),
            "measure": ("torch.cuda.max_memory_allocated, rank 0" if on_gpu
                        else "peak RSS of the rank-0 worker"),
            "device": "cuda" if on_gpu else "cpu", "dtype": params.get("precision", "unknown"),
            "workers": int(params.get("num_workers", 0) or 0) or None, "source": "mlflow metric memory_gb"}


def evaluate_experiment(params: Params, name: str, *, out_root: Path | str | None = None,
                        predictions_dir: Path | str | None = None, seed: int | None = None) -> dict:
    """Evaluate `name` (an experiments key, with `seed` one of its seeds, or an imported_checkpoints key)
    as Ray tasks on the cluster the stage joins ($RAY_ADDRESS, train.ray_address, else a local Ray);
    returns what eval.json holds.

    `predictions_dir` (tests, debugging): every label map is also saved there as
    `<single_scale|ms_flip>/<index>.png` in manifest order (by the tasks: a folder they can write).
    """
    out_root = Path(out_root or params.root)
    cfg, source, imported = params.evaluation_target(name, out_root, seed)
    name = cfg.name   # <experiment>-s<seed> for a seed other than train.seed: its own outputs and run
    settings = params.eval_settings(cfg.profile)
    if not imported and not Path(source).is_file():
        raise FileNotFoundError(f"{source}: checkpoint not found (run the train stage, or fix the path)")
    started_ray = connect_ray(cfg.execution.ray_address)
    try:
        use_gpu = settings.device == "cuda" or (settings.device == "auto" and cfg.execution.use_gpu)
        bundle = task_resources(use_gpu, cfg.execution.resources_per_worker)
        require_resources(bundle, f"evaluate@{name}", f"profiles.{cfg.profile}")   # before any work
        # A released checkpoint: fetched once into the download cache, its sha256 checked against its name.
        checkpoint = fetch(source, root=params.root, cache_dir=params.cache_dir) if imported else Path(source)
        with scoped_env(endpoint_env(cfg.location.endpoint_url, cfg.location.region)):
            run = _infer(cfg, settings, name, checkpoint, bundle, predictions_dir)
    finally:
        if started_ray:
            shutdown_ray()

    tracker, experiment_id = _open_tracking(cfg, name, imported, source)
    client, run_id = (tracker.client, tracker.run_id) if tracker else (None, None)
    memory = None if imported else _training_memory_or_none(client, run_id, name)
    summary = _summary(params, name, cfg, settings, run, source if imported else _display_path(checkpoint, out_root),
                       imported, memory, {"run_id": run_id, "experiment_id": experiment_id})
    plots = _write_pictures(plots_dir(out_root, name), run.dataset, run.results, cfg.class_names, run.colours, name)
    metrics_path = eval_metrics_file(out_root, name)
    atomic_write_text(metrics_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if tracker is not None:
        _log_to_mlflow(tracker, cfg, summary, checkpoint, metrics_path, plots, run.results["single_scale"])
    ss, ms = summary["single_scale"], summary["ms_flip"]
    fps = f"{run.speed['fps']:.2f} fps" if run.speed else "fps not measured"
    print(f"[evaluate] {name}: mIoU {ss['mIoU']} (ms+flip {ms['mIoU']}), mAcc {ss['mAcc']}, "
          f"aAcc {ss['aAcc']}; {fps} ({summary['device']}, {run.precision}); wrote {metrics_path}", flush=True)
    return summary


@dataclass(frozen=True)
class _Inference:
    """What the model did on the val split: the metrics' accumulators, the speed, and on what."""

    meta: dict                      # the checkpoint's (its iteration)
    dataset: SegmentationDataset
    colours: list
    results: dict                   # {"single_scale" | "ms_flip": evaluate_split's result}, shards summed
    speed: dict | None              # None: fps_images is 0
    device: str                     # described, with the threads the evaluation runs on
    precision: str
    shards: list[dict]              # where each shard ran (eval.json `evaluation.shards`)


def _infer(cfg: RunConfig, settings, name: str, checkpoint: Path, bundle: dict,
           predictions_dir: Path | str | None) -> _Inference:
    """Single scale and ms+flip over the val images in shards, then the speed, each a Ray task."""
    job = _job(cfg, settings, checkpoint, bundle)
    images = val_count(cfg, settings.max_images)
    shards = shard_ranges(images, shard_count(settings.shards, bundle, images))
    print(f"[evaluate] {name}: {images} val images, {cfg.recipe.test_mode} at scale {list(cfg.recipe.scale)}, "
          f"ms+flip ratios {list(settings.ms_ratios)} flip {settings.flip}, {job.precision}"
          f"{', BN folded' if settings.fold_bn else ''}; {len(shards)} Ray task(s) of {bundle}"
          f"{', then the speed' if settings.fps_images else ''}", flush=True)
    if slow := slow_precision_warning(job.precision, "cuda" if job.use_gpu else "cpu"):
        warn(f"[evaluate] {name}: {slow}")
    env = endpoint_env(cfg.location.endpoint_url, cfg.location.region)   # the tasks' S3 endpoint, as the workers'
    parts, speed = evaluate_on_ray(job, bundle, shards, env=env,
                                   predictions_dir=str(predictions_dir) if predictions_dir else None)
    if speed is not None:
        speed = _rounded_speed(speed, cfg) | {"timed_on": describe_timing(speed, bundle, len(shards))}
    dataset = SegmentationDataset(Path(cfg.location.data_dir) / "val", max_images=settings.max_images)
    return _Inference(parts[0].meta, dataset, get_dataset(cfg.recipe.dataset).palette, merge_shards(parts),
                      speed, parts[0].device, job.precision, describe_shards(parts, bundle))


def _job(cfg: RunConfig, settings, checkpoint: Path, bundle: dict) -> EvalJob:
    """The tasks' job: the checkpoint and the prepared data, published to run storage (s3://) for
    nodes without them, as the train stage does (once per content)."""
    use_gpu = bool(bundle.get("GPU"))
    digest, sha256 = manifest_hash(cfg.location.data_dir), sha256_file(checkpoint)
    storage = cfg.location.storage_path
    return EvalJob(cfg=cfg, settings=settings, checkpoint=str(Path(checkpoint).resolve()), checkpoint_sha256=sha256,
                   checkpoint_uri=publish(checkpoint, storage, sha256), data_digest=digest,
                   data_uri=publish_dataset(cfg.location.data_dir, storage, digest), use_gpu=use_gpu,
                   precision=resolve_precision(settings.precision, "cuda" if use_gpu else "cpu"))


def _rounded_speed(speed: dict, cfg: RunConfig) -> dict:
    """eval.json's `speed`: measure_fps's figures, rounded, with the test mode and scale."""
    return {**{k: v for k, v in speed.items() if k not in ("timed_seconds", "node")}, "fps": round(speed["fps"], 4),
            "timed_seconds": round(speed["timed_seconds"], 3), "test_mode": cfg.recipe.test_mode,
            "scale": list(cfg.recipe.scale)}


def _training_memory_or_none(client, run_id: str | None, name: str) -> dict | None:
    """training_memory, or None with a warning: a missing figure must not lose the evaluation."""
    try:
        return training_memory(client, run_id)
    except Exception as e:  # noqa: BLE001 - a missing figure must not lose the evaluation
        warn(f"[evaluate] {name}: training memory unavailable ({type(e).__name__}: {e})")
        return None


def _summary(params: Params, name: str, cfg: RunConfig, settings, run: _Inference, checkpoint: str,
             imported: bool, memory: dict | None, mlflow: dict) -> dict:
    """eval.json: what was evaluated, how, and the figures (percent)."""
    names = cfg.class_names
    return {
        "experiment": name,
        "dataset": cfg.recipe.dataset,
        "profile": cfg.profile,
        "checkpoint": checkpoint,
        "imported": imported,
        "backbone": cfg.recipe.backbone,
        "train": _trained_as(params, name, cfg, imported),
        "iteration": run.meta.get("iteration"),
        "split": "val",
        "images": run.results["single_scale"].images,
        "device": run.device,
        "dtype": run.precision,   # the precision: fp32 / tf32 (fp32 math, IEEE / TF32 convs) or autocast
        "bn_folded": settings.fold_bn,
        "test": {"mode": cfg.recipe.test_mode, "scale": list(cfg.recipe.scale), "crop": list(cfg.recipe.test_crop),
                 "stride": list(cfg.recipe.test_stride), "align_corners": cfg.recipe.align_corners},
        "single_scale": _percent(run.results["single_scale"].metrics(), names),
        "ms_flip": {"ratios": list(settings.ms_ratios), "flip": settings.flip,
                    **_percent(run.results["ms_flip"].metrics(), names)},
        "speed": run.speed,
        "evaluation": {"ray_tasks": len(run.shards), "shards": run.shards},
        "train_memory": memory,
        "mlflow": mlflow,
        "protocol": evaluation_protocol(cfg, settings, run),
    }


def evaluation_protocol(cfg: RunConfig, settings, run: _Inference) -> dict:
    """eval.json's `protocol`: the settings its figures depend on, and their hash (the report compares a
    row with the published one only under the same protocol)."""
    measured = protocol(cfg.recipe, settings.ms_ratios, settings.flip, run.results["single_scale"].images,
                        run.precision)
    return {**measured, "hash": protocol_hash(measured)}


def _trained_as(params: Params, name: str, cfg: RunConfig, imported: bool) -> dict:
    """Crop and schedule of the checkpoint, for the table's Crop Size / Lr schd columns: what this
    pipeline ran (profile applied), or for an imported checkpoint the experiment's own (the release's)."""
    if imported:
        exp = params.experiments[params.imported[name].experiment]
        return {"crop_size": list(exp.crop_size), "max_iters": params.schedules[exp.schedule].max_iters,
                "batch_size": exp.batch_size}
    return {"crop_size": list(cfg.recipe.crop_size), "max_iters": cfg.max_iters, "batch_size": cfg.recipe.batch_size}


# --- outputs ----------------------------------------------------------------------------------------

def _display_path(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _write_pictures(folder: Path, dataset, results: dict, names, colours, title: str) -> dict:
    """per_class_iou.csv / .png, confusion.png, overlays/*.png; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    ss, ms = results["single_scale"].metrics(), results["ms_flip"].metrics()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "IoU", "IoU_ms_flip"])
    for n, a, b in zip(names, ss["IoU"], ms["IoU"], strict=True):
        writer.writerow([n, "" if a != a else f"{100 * a:.4f}", "" if b != b else f"{100 * b:.4f}"])
    atomic_write_text(folder / "per_class_iou.csv", text.getvalue())
    paths = {"per_class_iou_csv": folder / "per_class_iou.csv"}
    paths["per_class_iou"] = save_iou_chart(
        folder / "per_class_iou.png", names,
        {"single scale": [100 * v for v in ss["IoU"]], "ms+flip": [100 * v for v in ms["IoU"]]},
        title=f"{title}: per-class IoU (val)")
    paths["confusion"] = save_confusion_chart(
        folder / "confusion.png", results["single_scale"].confusion.normalized(), names,
        title=f"{title}: confusion (val, single scale)")
    overlays = folder / "overlays"
    if overlays.exists():
        shutil.rmtree(overlays)   # pictures of an earlier run with other images must not linger
    paths["overlays"] = []
    for index, pred in results["single_scale"].samples:
        image, label = dataset.read(index)
        stem = Path(dataset.rows[index]["image"]).stem
        paths["overlays"].append(save_panel(overlays / f"{index:03d}_{stem}.png", image, label, pred, colours,
                                            title=f"{title}: {stem}"))
    return paths


def _open_tracking(cfg: RunConfig, name: str, imported: bool, source: str):
    """The MLflow run to log into: the experiment's training run; for imported checkpoints (or when no
    training run is found) a run of the evaluation's own, found again by its deterministic name on the
    next evaluation."""
    try:
        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        run_id = None if imported else find_training_run(client, cfg.recipe.dataset, name)
        if run_id is not None:
            logger = RunLogger(cfg.tracking_uri, run_id, who=f"evaluate {name}", client=client)
        else:
            if not imported:
                warn(f"[evaluate] {name}: no training run found in MLflow experiment {cfg.recipe.dataset!r}; "
                     f"logging into an evaluation run")
            tags = {"experiment": name, "dvc_stage": f"evaluate@{name}", "profile": cfg.profile,
                    "imported_checkpoint": source if imported else ""}
            logger = open_run(cfg.tracking_uri, cfg.recipe.dataset, run_name=f"{name}-eval", resume=True, tags=tags,
                              params=flat_settings(cfg))
            if logger.run_id is None:
                return None, None
        return logger, mark_training_experiment(client, cfg.recipe.dataset)
    except Exception as e:  # noqa: BLE001 - eval.json is the stage's output; tracking is a copy of it
        warn(f"[evaluate] warning: MLflow at {redact(cfg.tracking_uri)} unavailable "
             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); eval.json is still written")
        return None, None


def eval_metrics(summary: dict) -> dict:
    """The MLflow metrics of an evaluation (percent; per-class IoU under eval.IoU.<class>)."""

    ss, ms = summary["single_scale"], summary["ms_flip"]
    metrics = {f"eval.{k}": ss[k] for k in ("mIoU", "mAcc", "aAcc")}
    metrics |= {f"eval.ms_flip.{k}": ms[k] for k in ("mIoU", "mAcc", "aAcc")}
    metrics |= {f"eval.IoU.{metric_name(n)}": v for n, v in ss["IoU"].items() if v is not None}
    metrics |= {f"eval.ms_flip.IoU.{metric_name(n)}": v for n, v in ms["IoU"].items() if v is not None}
    if summary.get("speed"):
        metrics["eval.fps"] = summary["speed"]["fps"]
    if summary.get("train_memory"):
        metrics["train.peak_memory_gb"] = summary["train_memory"]["peak_gb"]
    return metrics


def _log_to_mlflow(tracker, cfg: RunConfig, summary: dict, checkpoint: Path, metrics_path: Path,
                   plots: dict, single) -> None:

    tracker.log_metrics(eval_metrics(summary), step=int(summary.get("iteration") or 0))
    tags = {"eval.device": summary["device"], "eval.dtype": summary["dtype"],
            "eval.images": summary["images"],
            "eval.ms_ratios": ",".join(map(str, summary["ms_flip"]["ratios"])),
            "eval.flip": summary["ms_flip"]["flip"], "eval.checkpoint": summary["checkpoint"],
            "eval.ray_tasks": summary["evaluation"]["ray_tasks"]}
    if summary.get("speed"):
        tags |= {"eval.fps.device": summary["speed"]["device"], "eval.fps.dtype": summary["speed"]["dtype"],
                 "eval.fps.images": summary["speed"]["images"],
                 "eval.fps.timed_on": summary["speed"]["timed_on"]["exclusive"]}
    if summary.get("train_memory"):
        tags |= {"train.memory.measure": summary["train_memory"].get("measure", ""),
                 "train.memory.device": summary["train_memory"].get("device", "")}
    tracker.set_tags(tags)
    tracker.log_artifact(metrics_path, "evaluation")
    for key in ("per_class_iou", "per_class_iou_csv", "confusion"):
        tracker.log_artifact(plots[key], "evaluation")
    for path in plots["overlays"]:
        tracker.log_artifact(path, "evaluation/overlays")
    tracker.log_text(json.dumps({"classes": list(summary["single_scale"]["IoU"]),
                                 "rows_ground_truth_columns_prediction": single.confusion.counts.tolist()}),
                     "evaluation/confusion_counts.json")
    tracker.safely("log model config", lambda: log_model_config(tracker.client, tracker.run_id, ModelSpec.of(cfg)))
    if summary["imported"]:   # a trained run's model is uploaded when registered (report), from models/
        tracker.safely("log model file", lambda: ensure_model_file(tracker.client, tracker.run_id, checkpoint))
    own_run = tracker.client.get_run(tracker.run_id).data.tags.get("dvc_stage", "").startswith("evaluate@")
    if own_run:   # an evaluation run of its own ends here; a training run keeps the status training gave it
        tracker.set_status("FINISHED")
