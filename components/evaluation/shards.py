"""One evaluation split into shards of the val split, each run on its own (a Ray task, components/
evaluation/on_ray.py), their counts summed: the same metrics, bit for bit, as one process.

Every figure of an evaluation comes from integer pixel counts (components/learning/metrics.py: the confusion
matrix, and intersect / union / pred / label derived from it) summed over the images; a shard's counts
are those of its images, so the sum of the shards' is the split's, exactly (int64), whatever the
number of shards. What a shard runs is what one process runs: the model loaded strictly from the same
file, each image predicted on its own (batch 1), so every label map is the same.

`EvalJob` is what crosses Ray to each task: the experiment's RunConfig, the evaluation settings, where
the checkpoint and the prepared data are (and their copies in run storage for nodes that lack them).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.evaluation.loading import load_model
from components.evaluation.speed import describe_device, measure_fps
from components.evaluation.visualize import save_label_png
from components.learning.data import get_dataset
from components.learning.data.dataset import SegmentationDataset, read_manifest
from components.learning.data.transforms import build_test_transform
from components.learning.experiment import RunConfig
from components.learning.metrics import ConfusionMatrix, IoUAccumulator
from components.learning.models.speedups import cpu_threads, use_precision
from components.learning.segment import InferenceSetting, SplitResult, evaluate_split, ms_flip_setting
from components.training.data_sync import local_dataset
from components.weights import on_this_node


@dataclass(frozen=True)
class EvalJob:
    """What every evaluation task gets."""

    cfg: RunConfig                 # the model, its test mode and scale, and where its prepared data is
    settings: Any                  # pipeline.config.EvalSettings: ms+flip, images, fps, threads, BN folding
    checkpoint: str                # the weights file on the driver's machine
    checkpoint_sha256: str
    checkpoint_uri: str | None     # its copy in run storage, for nodes without it (None: local storage)
    data_digest: str               # the prepared splits' manifest hash (components/training/data_sync.py)
    data_uri: str | None           # their copy in run storage (None: local storage)
    use_gpu: bool                  # the task holds a GPU: it evaluates on it, never on the CPU instead
    precision: str                 # autocast of the forward passes (fp32: none)

    @property
    def single(self) -> InferenceSetting:
        recipe = self.cfg.recipe
        return InferenceSetting(recipe.test_mode, recipe.test_crop, recipe.test_stride)

    def tests(self) -> dict[str, InferenceSetting]:
        return {"single_scale": self.single,
                "ms_flip": ms_flip_setting(self.single, self.settings.ms_ratios, self.settings.flip)}


@dataclass
class ShardResult:
    """One shard's counts per test setting, and what it ran on."""

    images: range
    results: dict[str, SplitResult]
    meta: dict                     # the checkpoint's (its iteration)
    device: str                    # described (components/evaluation/speed.py), threads included
    node: str


def val_count(cfg: RunConfig, max_images: int | None) -> int:
    """The val images an evaluation covers (the driver's copy of the manifest)."""
    rows = len(read_manifest(Path(cfg.location.data_dir) / "val"))
    return min(rows, max_images) if max_images else rows


def shard_ranges(images: int, shards: int) -> list[range]:
    """`images` split into `shards` contiguous ranges whose sizes differ by at most one (none empty)."""
    if images < 1 or shards < 1:
        raise ValueError(f"shards: need at least one image and one shard, got {images} images, {shards} shards")
    shards = min(shards, images)
    bounds = [images * k // shards for k in range(shards + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def merge_shards(parts: list[ShardResult]) -> dict[str, SplitResult]:
    """The split's results from its shards': counts summed, overlay samples in image order."""
    parts = sorted(parts, key=lambda part: part.images.start)
    merged = {}
    for name in parts[0].results:
        first = parts[0].results[name].iou
        total = SplitResult(IoUAccumulator(first.num_classes, first.ignore_index),
                            ConfusionMatrix(first.num_classes, first.ignore_index))
        for part in parts:
            result = part.results[name]
            total.iou.merge(result.iou)
            total.confusion.merge(result.confusion)
            total.images += result.images
            total.samples.extend(result.samples)
        merged[name] = total
    return merged


def evaluation_device(use_gpu: bool) -> torch.device:
    """The task's device: the GPU Ray gave it (CUDA_VISIBLE_DEVICES makes it cuda:0), else the CPU. A task
    that holds a GPU torch cannot see fails here, in one line, instead of evaluating on the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"evaluate: node {socket.gethostname()}: this Ray task holds a GPU "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) but torch "
                           f"{torch.__version__} (CUDA {torch.version.cuda}) sees none: install a torch wheel "
                           f"built for this node's GPU and driver")
    return torch.device("cuda")


def _open(job: EvalJob):
    """(model, the checkpoint's meta, device, the val dataset) on this node."""
    device = evaluation_device(job.use_gpu)
    cfg = job.cfg
    checkpoint = on_this_node(job.checkpoint, job.checkpoint_uri, job.checkpoint_sha256)
    model, meta = load_model(checkpoint, depth=cfg.depth, num_classes=cfg.num_classes,
                             align_corners=cfg.recipe.align_corners, attention=cfg.recipe.attention, device=device,
                             channels_last=cfg.recipe.channels_last, fold_bn=job.settings.fold_bn)
    use_precision(job.precision)
    data_dir = local_dataset(cfg.location.data_dir, job.data_uri, job.data_digest)
    dataset = SegmentationDataset(Path(data_dir) / "val", build_test_transform(scale=cfg.recipe.scale),
                                  max_images=job.settings.max_images)
    return model, meta, device, dataset


def run_shard(job: EvalJob, images: range, predictions_dir: str | None = None) -> ShardResult:
    """Single scale and ms+flip over the val images `images` (indices of the split), batch 1."""
    with cpu_threads(job.settings.cpu_threads):
        model, meta, device, dataset = _open(job)
        batches = ((img[None], label[None]) for img, label in (dataset[i] for i in images))
        results = evaluate_split(model, batches, job.cfg.num_classes, job.tests(), device,
                                 keep_samples=job.settings.overlays, channels_last=job.cfg.recipe.channels_last,
                                 precision=job.precision, first_index=images.start,
                                 on_prediction=_prediction_saver(predictions_dir, job.cfg.recipe.dataset))
        return ShardResult(images, results, meta, describe_device(device), socket.gethostname())


class _FpsImages:
    """(image 1×3×h×w at the test scale, original (H, W)) by index, read from disk when asked."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        return img[None], tuple(label.shape)


def run_fps(job: EvalJob) -> dict:
    """Inference speed on the first val images (components/evaluation/speed.py), with the node it ran on."""
    settings = job.settings
    with cpu_threads(settings.cpu_threads):
        model, _, device, dataset = _open(job)
        speed = measure_fps(model, _FpsImages(dataset), device, job.single, settings.fps_images,
                            settings.fps_warmup, channels_last=job.cfg.recipe.channels_last,
                            precision=job.precision)
    return {**speed, "node": socket.gethostname()}


def _prediction_saver(predictions_dir: str | None, dataset: str):
    """evaluate_split's on_prediction (tests, debugging): each label map as <setting>/<index>.png."""
    if predictions_dir is None:
        return None
    colours = get_dataset(dataset).palette

    def save(index: int, setting: str, pred: torch.Tensor) -> None:
        save_label_png(Path(predictions_dir) / setting / f"{index:05d}.png", pred.numpy(), colours)

    return save
