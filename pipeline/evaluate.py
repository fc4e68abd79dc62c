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

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import REPO_ROOT, ConfigError, TrainConfig, resolve_experiment

EVAL_FILE = "eval.json"
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)   # spec section 2
SETTING_KEYS = ("ms_ratios", "flip", "max_images", "fps_images", "fps_warmup", "overlays", "device", "precision",
                "fold_bn")
EVAL_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EvalSettings:
    ms_ratios: tuple[float, ...] = MS_RATIOS
    flip: bool = True
    max_images: int = 0          # 0 = the whole val split
    fps_images: int = 200        # the seed: 200 images, the first 5 not timed
    fps_warmup: int = 5
    overlays: int = 4            # val images drawn as image | ground truth | prediction
    device: str = "auto"         # auto | cpu | cuda
    precision: str = "auto"      # auto (fp16 on CUDA, bf16 on CPU) | fp32 | bf16 | fp16: autocast of inference
    fold_bn: bool = True         # BatchNorm folded into the convs (exact in fp32; bench/README.md)

    def precision_on(self, device) -> str:
        """The autocast precision this evaluation runs with on `device`."""
        if self.precision != "auto":
            return self.precision
        return "fp16" if str(device).startswith("cuda") else "bf16"


def _count(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"params.yaml: {where}: expected an integer >= {minimum}, got {value!r}")
    return value


def eval_settings(params: dict, profile: str | None = None) -> EvalSettings:
    """`evaluate:` of params.yaml with `evaluate.profiles.<profile>` laid over it (missing keys: defaults)."""
    section = params.get("evaluate") or {}
    if not isinstance(section, dict):
        raise ConfigError("params.yaml: evaluate: expected a mapping")
    profile = profile or params.get("profile", "")
    overrides = (section.get("profiles") or {}).get(profile) or {}
    merged = {k: v for k, v in section.items() if k != "profiles"} | overrides
    where = lambda key: f"evaluate.profiles.{profile}.{key}" if key in overrides else f"evaluate.{key}"  # noqa: E731
    unknown = sorted(set(merged) - set(SETTING_KEYS))
    if unknown:
        raise ConfigError(f"params.yaml: {where(unknown[0])}: unknown setting "
                          f"(known: {', '.join(SETTING_KEYS)})")
    d = EvalSettings()
    ratios = merged.get("ms_ratios", list(d.ms_ratios))
    if (not isinstance(ratios, list) or not ratios
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios)):
        raise ConfigError(f"params.yaml: {where('ms_ratios')}: expected a list of positive numbers like "
                          f"[0.5, 0.75, 1.0], got {ratios!r}")
    flip = merged.get("flip", d.flip)
    if not isinstance(flip, bool):
        raise ConfigError(f"params.yaml: {where('flip')}: expected true or false, got {flip!r}")
    device = merged.get("device", d.device)
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"params.yaml: {where('device')}: expected one of auto, cpu, cuda, got {device!r}")
    precision = merged.get("precision", d.precision)
    if precision not in EVAL_PRECISIONS:
        raise ConfigError(f"params.yaml: {where('precision')}: expected one of {', '.join(EVAL_PRECISIONS)}, "
                          f"got {precision!r}")
    if precision == "fp16" and device == "cpu":
        raise ConfigError(f"params.yaml: {where('precision')}: fp16 needs a GPU (use bf16 on CPU)")
    fold_bn = merged.get("fold_bn", d.fold_bn)
    if not isinstance(fold_bn, bool):
        raise ConfigError(f"params.yaml: {where('fold_bn')}: expected true or false, got {fold_bn!r}")
    settings = EvalSettings(
        ms_ratios=tuple(float(r) for r in ratios), flip=flip, precision=precision, fold_bn=fold_bn,
        max_images=_count(merged.get("max_images", d.max_images), where("max_images"), 0),
        fps_images=_count(merged.get("fps_images", d.fps_images), where("fps_images"), 0),
        fps_warmup=_count(merged.get("fps_warmup", d.fps_warmup), where("fps_warmup"), 0),
        overlays=_count(merged.get("overlays", d.overlays), where("overlays"), 0),
        device=device)
    if settings.fps_images and settings.fps_images <= settings.fps_warmup:
        raise ConfigError(f"params.yaml: {where('fps_images')}: {settings.fps_images} must be larger than "
                          f"fps_warmup {settings.fps_warmup} (or 0 to skip the speed measurement)")
    return settings


def evaluation_names(params: dict) -> list[str]:
    return list(params.get("experiments") or {}) + list(params.get("imported_checkpoints") or {})


def resolve_target(params: dict, name: str, out_root: Path) -> tuple[TrainConfig, Path, bool]:
    """(config, checkpoint, imported) of a trained experiment or an imported checkpoint entry."""
    imported = params.get("imported_checkpoints") or {}
    if name in (params.get("experiments") or {}):
        return resolve_experiment(params, name), out_root / "models" / name / "model.pt", False
    if name not in imported:
        raise ConfigError(f"params.yaml: no experiment or imported_checkpoints entry named {name!r} "
                          f"(known: {', '.join(sorted(evaluation_names(params)))})")
    entry = imported[name]
    where = f"imported_checkpoints.{name}"
    if not isinstance(entry, dict) or not entry.get("experiment") or not entry.get("path"):
        raise ConfigError(f"params.yaml: {where}: expected {{experiment: <experiments key>, "
                          f"path: <checkpoint>}}, got {entry!r}")
    if entry["experiment"] not in (params.get("experiments") or {}):
        raise ConfigError(f"params.yaml: {where}.experiment: unknown experiment {entry['experiment']!r}")
    cfg = resolve_experiment(params, entry["experiment"]).with_overrides(name=name)
    path = Path(entry["path"])
    return cfg, path if path.is_absolute() else REPO_ROOT / path, True


# --- the measurement --------------------------------------------------------------------------------

def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params.yaml: evaluate.device: cuda asked for but torch sees no GPU")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def load_model(cfg: TrainConfig, checkpoint: Path, device, fold_bn: bool = False):
    """The network of `cfg` with the checkpoint's weights (strict), fp32, eval mode, on `device`,
    channels-last when the experiment trains so, BN folded into the convs when `fold_bn`."""
    from components.models import build_dnlnet
    from components.models.checkpoint import load_mmseg_checkpoint
    from components.models.speedups import prepare_for_inference

    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found (run the train stage, or fix the path)")
    model = build_dnlnet(depth=cfg.depth, num_classes=cfg.num_classes, align_corners=cfg.align_corners,
                         attention=cfg.attention)
    meta = load_mmseg_checkpoint(model, checkpoint)
    return prepare_for_inference(model.to(device), channels_last=cfg.channels_last, fold_bn=fold_bn), meta


class _ValImages:
    """(image 1×3×h×w at the test scale, original (H, W)) by index, loaded on demand (for the fps loop)."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count = dataset, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        return img[None], tuple(label.shape)


def _percent(metrics: dict, class_names) -> dict:
    from components.evaluation.visualize import finite_or_none

    # NaN (no labelled pixel at all) becomes null: JSON has no NaN.
    return {**{k: finite_or_none(round(100 * metrics[k], 4)) for k in ("mIoU", "mAcc", "aAcc")},
            "IoU": {n: finite_or_none(round(100 * v, 4))
                    for n, v in zip(class_names, metrics["IoU"], strict=True)}}


def training_memory(out_root: Path, name: str, client, run_id: str | None) -> dict | None:
    """Peak training memory as the train stage recorded it: metrics/<exp>/train.json's `memory` when it
    has one, else the largest `memory_gb` rank 0 logged to the run (GPU: max_memory_allocated; CPU: peak
    RSS of the worker process)."""
    train_json = out_root / "metrics" / name / "train.json"
    recorded = json.loads(train_json.read_text()) if train_json.is_file() else {}
    if isinstance(recorded.get("memory"), dict) and recorded["memory"].get("peak_gb") is not None:
        return {**recorded["memory"], "source": str(train_json.relative_to(out_root))}
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


def evaluate_experiment(params: dict, name: str, *, out_root: Path | str = REPO_ROOT,
                        predictions_dir: Path | str | None = None) -> dict:
    """Evaluate `name` (an experiments key or an imported_checkpoints key); returns what eval.json holds.

    `predictions_dir` (tests, debugging): every label map is also saved there as
    `<single_scale|ms_flip>/<index>.png` in manifest order.
    """
    import torch

    from components.data import class_names, palette
    from components.data.dataset import SegmentationDataset
    from components.data.transforms import build_test_transform
    from components.evaluation.segment import InferenceSetting, evaluate_split, ms_flip_setting
    from components.evaluation.speed import describe_device, measure_fps
    from components.evaluation.visualize import save_label_png

    out_root = Path(out_root)
    cfg, checkpoint, imported = resolve_target(params, name, out_root)
    settings = eval_settings(params, cfg.profile)
    device = _device(settings.device)
    model, meta = load_model(cfg, checkpoint, device, fold_bn=settings.fold_bn)
    precision = settings.precision_on(device)
    names, colours = class_names(cfg.dataset), palette(cfg.dataset)
    dataset = SegmentationDataset(Path(cfg.data_dir) / "val", build_test_transform(scale=tuple(cfg.scale)),
                                  max_images=settings.max_images)

    single = InferenceSetting(cfg.test_mode, tuple(cfg.test_crop), tuple(cfg.test_stride))
    tests = {"single_scale": single, "ms_flip": ms_flip_setting(single, settings.ms_ratios, settings.flip)}
    save = None
    if predictions_dir is not None:
        def save(index: int, setting: str, pred: torch.Tensor) -> None:
            save_label_png(Path(predictions_dir) / setting / f"{index:05d}.png", pred.numpy(), colours)

    print(f"[evaluate] {name}: {len(dataset)} val images, {cfg.test_mode} at scale {list(cfg.scale)}, "
          f"ms+flip ratios {list(settings.ms_ratios)} flip {settings.flip}, {describe_device(device)}, "
          f"{precision}{', BN folded' if settings.fold_bn else ''}",
          flush=True)
    batches = ((img[None], label[None]) for img, label in dataset)
    results = evaluate_split(model, batches, cfg.num_classes, tests, device, keep_samples=settings.overlays,
                             channels_last=cfg.channels_last, precision=precision, on_prediction=save)
    speed = None
    if settings.fps_images:
        speed = measure_fps(model, _ValImages(dataset, len(dataset)), device, single, settings.fps_images,
                            settings.fps_warmup, channels_last=cfg.channels_last, precision=precision)
        speed = {**{k: v for k, v in speed.items() if k != "timed_seconds"}, "fps": round(speed["fps"], 4),
                 "timed_seconds": round(speed["timed_seconds"], 3), "test_mode": cfg.test_mode,
                 "scale": list(cfg.scale)}

    tracker, experiment_id = _open_tracking(cfg, name, imported, checkpoint, out_root)
    client, run_id = (tracker.client, tracker.run_id) if tracker else (None, None)
    memory = None
    if not imported:
        try:
            memory = training_memory(out_root, name, client, run_id)
        except Exception as e:  # noqa: BLE001 - a missing figure must not lose the evaluation
            _warn(f"[evaluate] {name}: training memory unavailable ({type(e).__name__}: {e})")

    summary = {
        "experiment": name,
        "dataset": cfg.dataset,
        "profile": cfg.profile,
        "checkpoint": _display_path(checkpoint, out_root),
        "imported": imported,
        "backbone": cfg.backbone,
        "train": _trained_as(params, name, cfg, imported),
        "iteration": meta.get("iteration"),
        "split": "val",
        "images": results["single_scale"].images,
        "device": describe_device(device),
        "dtype": precision,   # autocast of the convs and matmuls (fp32: none)
        "bn_folded": settings.fold_bn,
        "test": {"mode": cfg.test_mode, "scale": list(cfg.scale), "crop": list(cfg.test_crop),
                 "stride": list(cfg.test_stride), "align_corners": cfg.align_corners},
        "single_scale": _percent(results["single_scale"].metrics(), names),
        "ms_flip": {"ratios": list(settings.ms_ratios), "flip": settings.flip,
                    **_percent(results["ms_flip"].metrics(), names)},
        "speed": speed,
        "train_memory": memory,
        "mlflow": {"run_id": run_id, "experiment_id": experiment_id},
    }
    plots = _write_pictures(out_root / "plots" / name, dataset, results, names, colours, name)
    metrics_path = out_root / "metrics" / name / EVAL_FILE
    _write_json(metrics_path, summary)
    if tracker is not None:
        _log_to_mlflow(tracker, cfg, summary, checkpoint, metrics_path, plots, results["single_scale"])
    ss, ms = summary["single_scale"], summary["ms_flip"]
    fps = f"{speed['fps']:.2f} fps" if speed else "fps not measured"
    print(f"[evaluate] {name}: mIoU {ss['mIoU']} (ms+flip {ms['mIoU']}), mAcc {ss['mAcc']}, "
          f"aAcc {ss['aAcc']}; {fps} ({summary['device']}, {precision}); wrote {metrics_path}", flush=True)
    return summary


def _trained_as(params: dict, name: str, cfg: TrainConfig, imported: bool) -> dict:
    """Crop and schedule of the checkpoint, for the table's Crop Size / Lr schd columns: what this
    pipeline ran (profile applied), or for an imported checkpoint the experiment's own (the release's)."""
    if imported:
        exp = params["experiments"][params["imported_checkpoints"][name]["experiment"]]
        return {"crop_size": list(exp["crop_size"]), "max_iters": exp["max_iters"],
                "batch_size": exp["batch_size"]}
    return {"crop_size": list(cfg.crop_size), "max_iters": cfg.max_iters, "batch_size": cfg.batch_size}


# --- outputs ----------------------------------------------------------------------------------------

def _warn(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _display_path(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _write_json(path: Path, data: dict) -> None:
    from components.training.checkpointing import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def _write_pictures(folder: Path, dataset, results: dict, names, colours, title: str) -> dict:
    """per_class_iou.csv / .png, confusion.png, overlays/*.png; returns their paths."""
    import csv
    import io

    from components.evaluation.visualize import save_confusion_chart, save_iou_chart, save_panel
    from components.training.checkpointing import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    ss, ms = results["single_scale"].metrics(), results["ms_flip"].metrics()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "IoU", "IoU_ms_flip"])
    for n, a, b in zip(names, ss["IoU"], ms["IoU"], strict=True):
        writer.writerow([n, "" if a != a else f"{100 * a:.4f}", "" if b != b else f"{100 * b:.4f}"])
    atomic_write_bytes(folder / "per_class_iou.csv", text.getvalue().encode())
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


def _open_tracking(cfg: TrainConfig, name: str, imported: bool, checkpoint: Path, out_root: Path):
    """The MLflow run to log into: the training run of the experiment (train.json's mlflow_run_id, else
    the latest run tagged dvc_stage=train@<name>); for imported checkpoints (or when no training run is
    found) a run of the evaluation's own, found again by its deterministic name on the next evaluation."""
    from components.tracking import RunLogger, open_run, redact

    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        run_id = None if imported else find_training_run(client, cfg.dataset, name, out_root)
        if run_id is not None:
            logger = RunLogger(cfg.tracking_uri, run_id, who=f"evaluate {name}")
            logger._client = client
        else:
            if not imported:
                _warn(f"[evaluate] {name}: no training run found in MLflow experiment {cfg.dataset!r}; "
                      f"logging into an evaluation run")
            tags = {"experiment": name, "dvc_stage": f"evaluate@{name}", "profile": cfg.profile,
                    "imported_checkpoint": str(checkpoint) if imported else ""}
            logger = open_run(cfg.tracking_uri, cfg.dataset, run_name=f"{name}-eval", resume=True, tags=tags,
                              params=cfg.to_flat_dict())
            if logger.run_id is None:
                return None, None
        experiment_id = mark_training_experiment(client, cfg.dataset)
        return logger, experiment_id
    except Exception as e:  # noqa: BLE001 - eval.json is the stage's output; tracking is a copy of it
        _warn(f"[evaluate] warning: MLflow at {redact(cfg.tracking_uri)} unavailable "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); eval.json is still written")
        return None, None


def find_training_run(client, dataset: str, name: str, out_root: Path) -> str | None:
    train_json = out_root / "metrics" / name / "train.json"
    if train_json.is_file():
        run_id = json.loads(train_json.read_text()).get("mlflow_run_id")
        if run_id:
            return run_id
    experiment = client.get_experiment_by_name(dataset)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.experiment = '{name}' and tags.dvc_stage = 'train@{name}'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs)[0].info.run_id if runs else None


def mark_training_experiment(client, dataset: str) -> str:
    """MLflow 3's UI opens an experiment on its GenAI overview unless told it holds model training runs.
    Returns the experiment id."""
    experiment = client.get_experiment_by_name(dataset)
    if "mlflow.experimentKind" not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind",
                                  "custom_model_development")
    return experiment.experiment_id


def eval_metrics(summary: dict) -> dict:
    """The MLflow metrics of an evaluation (percent; per-class IoU under eval.IoU.<class>)."""
    from components.tracking import metric_name

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


def _log_to_mlflow(tracker, cfg: TrainConfig, summary: dict, checkpoint: Path, metrics_path: Path,
                   plots: dict, single) -> None:
    from components.evaluation.registry import ensure_model_artifacts, model_config

    tracker.log_metrics(eval_metrics(summary), step=int(summary.get("iteration") or 0))
    tags = {"eval.device": summary["device"], "eval.dtype": summary["dtype"],
            "eval.images": summary["images"],
            "eval.ms_ratios": ",".join(map(str, summary["ms_flip"]["ratios"])),
            "eval.flip": summary["ms_flip"]["flip"], "eval.checkpoint": summary["checkpoint"]}
    if summary.get("speed"):
        tags |= {"eval.fps.device": summary["speed"]["device"], "eval.fps.dtype": summary["speed"]["dtype"],
                 "eval.fps.images": summary["speed"]["images"]}
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
    tracker._safe("log model artifacts", lambda: ensure_model_artifacts(tracker.client, tracker.run_id,
                                                                        checkpoint, model_config(cfg)))
    own_run = tracker.client.get_run(tracker.run_id).data.tags.get("dvc_stage", "").startswith("evaluate@")
    if own_run:   # an evaluation run of its own ends here; a training run keeps the status training gave it
        tracker.set_status("FINISHED")
