"""A prepared split as a torch Dataset, and the DataLoader the trainer uses.

`SegmentationDataset(split_dir, transform)` reads `split_dir/manifest.csv` (written by `dnlseg prepare`)
and returns `(image float32 3×H×W, label int64 H×W)`; labels are train ids with 255 = ignore for both
datasets (ADE20K's reduce_zero_label was applied at prepare time).

`build_loader` seeds augmentation per worker: each worker's pipeline gets a stream derived from the
loader's seed, the worker id and the distributed rank, so a run is reproducible and ranks / workers
never repeat each other's augmentations.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from components.learning.data.io import MANIFEST_COLUMNS
from components.learning.data.transforms import seed_transform
from components.learning.data.validate import DataError


def read_manifest(split_dir: Path) -> list[dict]:
    path = Path(split_dir) / "manifest.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                raise DataError(f"{path}: expected the columns {','.join(MANIFEST_COLUMNS)}, "
                                f"got {','.join(reader.fieldnames or ())}")
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found (run `dnlseg prepare` first)") from None
    if not rows:
        raise DataError(f"{path}: the manifest lists no images")
    return rows


class SegmentationDataset(Dataset):
    """Images and train-id labels of one prepared split. `transform(image=rgb_uint8, mask=label_uint8)`
    returns numpy arrays (see transforms.py); without one, the image is returned as float 0..255.
    max_images (set) keeps only the first max_images (a quick validation subset)."""

    def __init__(self, split_dir: Path | str, transform=None, max_images: int | None = None):
        self.split_dir = Path(split_dir)
        rows = read_manifest(self.split_dir)
        self.rows = rows[:max_images] if max_images else rows
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw pair: RGB uint8 H×W×3 and uint8 H×W."""
        row = self.rows[index]
        image_path, label_path = self.split_dir / row["image"], self.split_dir / row["label"]
        # OpenCV decodes PNG / JPEG faster than PIL; EXIF rotation is ignored because the labels (and
        # the sizes checked at prepare time) follow the stored pixel grid
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise DataError(f"{image_path}: unreadable image")
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        if label is None or label.ndim != 2:
            raise DataError(f"{label_path}: unreadable or not a single-channel label image")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.read(index)
        if self.transform is not None:
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        return image, torch.from_numpy(label.astype(np.int64))


def _transform_of(dataset):
    """The augmentation pipeline of a dataset, also through Subset-style wrappers (`.dataset`)."""
    while dataset is not None:
        if hasattr(dataset, "transform"):
            return dataset.transform
        dataset = getattr(dataset, "dataset", None)
    return None


def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


class WorkerSeeder:
    """worker_init_fn: seeds numpy / random / the dataset's transform from torch's per-worker seed
    (loader seed + worker id) and the rank. A class, not a closure, so it pickles for spawn."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        ss = np.random.SeedSequence([torch.initial_seed() % 2**63, self.rank])
        np.random.seed(ss.generate_state(1)[0])
        random.seed(int(ss.generate_state(1)[0]))
        info = torch.utils.data.get_worker_info()
        seed_transform(_transform_of(info.dataset), ss)


def build_loader(dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, sampler=None) -> DataLoader:
    """A DataLoader with reproducible shuffling and augmentation. With a `sampler` (e.g. a
    DistributedSampler; remember `sampler.set_epoch`), `shuffle` is left to it. Ray's
    `prepare_data_loader` may rebuild the loader: it keeps `worker_init_fn` and the generator."""
    rank = _dist_rank()
    if num_workers > 0:
        # As mmengine does: no OpenCV thread pool when loader processes already run in parallel. Set
        # here, in the parent, before the fork: calling it inside a forked worker after the parent has
        # used OpenCV's pool deadlocks.
        cv2.setNumThreads(0)
    generator = torch.Generator()
    generator.manual_seed(seed)
    if num_workers == 0:  # augmentations run in this process
        seed_transform(_transform_of(dataset), np.random.SeedSequence([seed, rank]))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=WorkerSeeder(rank) if num_workers > 0 else None,
        generator=generator,
    )
