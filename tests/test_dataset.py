"""SegmentationDataset on a hand-made prepared split, and build_loader's seeding / sampler handling."""

from __future__ import annotations

import csv
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DistributedSampler, Subset  # noqa: E402

from components.learning.data.dataset import SegmentationDataset, build_loader  # noqa: E402
from components.learning.data.transforms import build_train_transform  # noqa: E402
from components.learning.data.validate import DataError  # noqa: E402

H, W = 32, 48


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """Four prepared pairs written with PIL: image i has R=10+i, G=20, B=30 and a gradient; the label
    is a band pattern with a 255 region."""
    root = tmp_path_factory.mktemp("prepared") / "train"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = []
    for i in range(4):
        image = np.empty((H, W, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = 10 + i, 20, np.arange(W, dtype=np.uint8)[None, :] + 30
        label = np.repeat((np.arange(W) // 12).astype(np.uint8)[None, :], H, 0)
        label[:4] = 255
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(label).save(root / "labels" / f"img{i}.png")
        rows.append([f"images/img{i}.png", f"labels/img{i}.png", H, W, "0" * 64])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "height", "width", "sha256"], *rows])
    return root


def test_items_are_rgb_float_and_int64_labels(split_dir):
    ds = SegmentationDataset(split_dir)
    assert len(ds) == 4
    image, label = ds[2]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert label.dtype == torch.int64 and label.shape == (H, W)
    assert image[:, 5, 7].tolist() == [12.0, 20.0, 37.0]  # RGB order, as written
    assert label[0, 0] == 255 and label[10, 13] == 1 and label[10, 47] == 3


def test_with_the_train_transform(split_dir):
    ds = SegmentationDataset(split_dir, build_train_transform(scale=(48, 32), crop_size=(24, 40)))
    image, label = ds[0]
    assert image.shape == (3, 24, 40) and label.shape == (24, 40)
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert abs(image.mean().item()) < 3  # normalized


def test_max_images_and_manifest_errors(split_dir, tmp_path):
    assert len(SegmentationDataset(split_dir, max_images=3)) == 3
    with pytest.raises(DataError, match="manifest.csv: manifest not found"):
        SegmentationDataset(tmp_path)
    (tmp_path / "manifest.csv").write_text("image,label\n")
    with pytest.raises(DataError, match="manifest.csv: expected the columns image,label,height,width,sha256"):
        SegmentationDataset(tmp_path)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_loader_is_reproducible_in_process(split_dir):
    def run(seed):
        ds = SegmentationDataset(split_dir, build_train_transform(scale=(48, 32), crop_size=(24, 40)))
        return _batches(build_loader(ds, batch_size=2, num_workers=0, shuffle=True, seed=seed))

    first = run(0)
    assert len(first) == 2 and first[0][0].shape == (2, 3, 24, 40) and first[0][1].shape == (2, 24, 40)
    assert _same(first, run(0))
    assert not _same(first, run(1))


@pytest.mark.timeout(120)
def test_workers_are_seeded_differently_and_reproducibly(split_dir):
    """Two workers, the same image four times: each worker draws its own augmentations, and a rerun
    with the same seed repeats them."""

    def run(seed):
        ds = SegmentationDataset(split_dir, build_train_transform(scale=(48, 32), crop_size=(24, 40)))
        ds.rows = [ds.rows[0]] * 4
        loader = build_loader(ds, batch_size=1, num_workers=2, shuffle=False, seed=seed, drop_last=False)
        assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
        # OpenCV's thread pool busy in the parent right before the fork (as after in-process work):
        # workers must not deadlock on it
        cv2.resize(np.zeros((1024, 2048, 3), np.uint8), (4096, 2048))
        return _batches(loader)

    first = run(7)
    assert not torch.equal(first[0][0], first[1][0])  # items 0 and 1 come from workers 0 and 1
    assert _same(first, run(7))


def test_sampler_and_subset(split_dir):
    ds = SegmentationDataset(split_dir)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    loader = build_loader(
        ds, batch_size=1, num_workers=0, shuffle=True, seed=0, drop_last=False, sampler=sampler
    )
    reds = [x[0, 0, 0, 0].item() for x, _ in loader]
    assert reds == [11.0, 13.0]  # rank 1 of 2 takes items 1 and 3
    subset = Subset(SegmentationDataset(split_dir, build_train_transform((48, 32), (24, 40))), [0, 1])
    assert len(_batches(build_loader(subset, batch_size=2, num_workers=0, seed=0))) == 1
