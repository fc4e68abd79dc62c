"""The mmseg training / test pipelines: geometry keeps image and label aligned, labels are never
interpolated, the crop honours cat_max_ratio, padding values, photometric facts, normalization."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from components.learning.data.transforms import (  # noqa: E402
    MEAN,
    STD,
    CatMaxRatioCrop,
    PhotoMetricDistortion,
    RandomResize,
    build_test_transform,
    build_train_transform,
    pad_to,
    rescale_size,
    seed_transform,
)


def _block_label(rng, h, w, block, classes):
    """Random classes in block×block squares."""
    small = rng.choice(classes, size=(-(-h // block), -(-w // block))).astype(np.uint8)
    return np.kron(small, np.ones((block, block), np.uint8))[:h, :w]


def _interior(label, radius=2):
    """Pixels whose (2r+1)² neighbourhood holds a single value: untouched by resize boundaries. The
    crop's border counts as a boundary (bilinear sampling saw pixels beyond it)."""
    h, w = label.shape
    padded = np.pad(label.astype(int), radius, constant_values=-1)
    same = np.ones_like(label, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + h, dx : dx + w] == label
    return same


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [
        ((2048, 1024), (2048, 1024), (2048, 1024)),
        ((500, 375), (2048, 512), (683, 512)),  # factor min(2048/500, 512/375) = 1.3653
        ((683, 512), (2048, 512), (683, 512)),
        ((128, 64), (1024, 512), (1024, 512)),  # upscaling: factor min(1024/128, 512/64) = 8
        ((100, 300), (2048, 1024), (683, 2048)),  # portrait: the long edge (h) meets max(scale)
    ],
)
def test_rescale_size_follows_mmcv(size, scale, expected):
    assert rescale_size(size, scale) == expected


def test_geometry_keeps_image_and_label_aligned():
    """The image's red channel encodes the class (40·c); after resize / crop / flip / pad, every pixel
    away from resize boundaries must still read 40·label, padding reads 0 / 255."""
    rng = np.random.default_rng(0)
    geometry = A.Compose(
        [
            RandomResize((128, 64), ratio_range=(0.5, 2.0)),
            CatMaxRatioCrop((48, 96), cat_max_ratio=0.75),
            A.HorizontalFlip(p=0.5),
            pad_to((48, 96)),
        ]
    )
    checked = flipped = padded = 0
    for seed in range(40):
        label = _block_label(rng, 64, 128, 16, np.arange(6))
        image = np.stack([label * 40, rng.integers(0, 255, label.shape), np.full(label.shape, 7)], -1)
        seed_transform(geometry, seed)
        out = geometry(image=image.astype(np.uint8), mask=label)
        img, lab = out["image"], out["mask"]
        assert img.shape == (48, 96, 3) and lab.shape == (48, 96)
        pad = lab == 255
        assert (img[pad] == 0).all()
        padded += pad.any()
        inner = _interior(lab) & ~pad
        assert inner.sum() > 0.2 * (~pad).sum()
        assert np.array_equal(img[..., 0][inner], lab[inner].astype(np.uint8) * 40)
        assert (img[..., 2][~pad] == 7).all()  # a constant channel stays exactly constant
        checked += inner.sum()
        flipped += geometry.transforms[2].params != {}
    assert checked > 40 * 48 * 96 * 0.2 and 5 < flipped < 35 and padded > 0


def test_train_pipeline_never_interpolates_labels():
    rng = np.random.default_rng(1)
    transform = build_train_transform(scale=(128, 64), crop_size=(48, 96))
    seed_transform(transform, 1)
    values = np.array([3, 7, 250], np.uint8)
    for _ in range(20):
        label = values[rng.integers(0, 3, (64, 128))]  # per-pixel noise: any interpolation would show
        out = transform(image=rng.integers(0, 255, (64, 128, 3), dtype=np.uint8), mask=label)
        assert set(np.unique(out["mask"])) <= {3, 7, 250, 255}
        assert out["image"].dtype == np.float32 and out["image"].shape == (48, 96, 3)


def test_pad_bottom_right_image_zero_label_255():
    """Resized images are always smaller than the crop here, so the output is padded."""
    transform = build_train_transform(scale=(40, 20), crop_size=(64, 96))
    seed_transform(transform, 0)
    rng = np.random.default_rng(2)
    for _ in range(10):
        label = rng.integers(0, 19, (20, 40), dtype=np.uint8)
        out = transform(image=rng.integers(0, 255, (20, 40, 3), dtype=np.uint8), mask=label)
        img, lab = out["image"], out["mask"]
        assert img.shape == (64, 96, 3) and lab.shape == (64, 96)
        rows, cols = np.flatnonzero((lab != 255).any(1)), np.flatnonzero((lab != 255).any(0))
        h, w = rows[-1] + 1, cols[-1] + 1
        assert rows[0] == 0 and cols[0] == 0 and h < 64 and w < 96  # content at the top-left
        assert (lab[h:] == 255).all() and (lab[:, w:] == 255).all()
        assert (img[h:] == 0).all() and (img[:, w:] == 0).all()
        assert (lab[:h, :w] != 255).all()


def test_crop_honours_cat_max_ratio():
    """Bands of 100 columns alternating between two classes, crops 100 wide: only about half of the
    windows have a largest class < 75%. With the constraint nearly every crop must; without it, about
    half do."""
    label = ((np.arange(1000)[None, :] // 100) % 2).repeat(100, 0).astype(np.uint8)
    image = np.zeros((100, 1000, 3), np.uint8)

    def share_ok(cat_max_ratio):
        crop = A.Compose([CatMaxRatioCrop((100, 100), cat_max_ratio=cat_max_ratio)])
        seed_transform(crop, 0)
        good = 0
        for _ in range(200):
            out = crop(image=image, mask=label)["mask"]
            counts = np.bincount(out.ravel(), minlength=2)
            good += (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75
        return good / 200

    assert share_ok(0.75) > 0.97
    assert 0.35 < share_ok(1.0) < 0.65


def test_crop_ratio_ignores_255_and_falls_back():
    # one window only (image == crop): 60% ignore, 25% class 0, 15% class 1 -> class 0 is 62.5% < 75%
    label = np.full((10, 20), 255, np.uint8)
    label[:, :5], label[:, 5:8] = 0, 1
    crop = CatMaxRatioCrop((10, 20), 0.75)
    seed_transform(A.Compose([crop]), 0)
    assert crop.get_params_dependent_on_data({}, {"image": label[..., None], "mask": label})["box"] == (
        0,
        10,
        0,
        20,
    )
    # a single class everywhere: no window qualifies, a crop of the right size is still returned
    one = A.Compose([CatMaxRatioCrop((8, 8), 0.75)])
    out = one(image=np.zeros((32, 32, 3), np.uint8), mask=np.ones((32, 32), np.uint8))
    assert out["mask"].shape == (8, 8)


def test_photometric_distortion_leaves_the_label_untouched():
    rng = np.random.default_rng(3)
    transform = A.Compose([PhotoMetricDistortion()])
    seed_transform(transform, 3)
    changed = 0
    for _ in range(10):
        image = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
        label = rng.integers(0, 19, (16, 24), dtype=np.uint8)
        out = transform(image=image, mask=label.copy())
        assert np.array_equal(out["mask"], label)
        changed += not np.array_equal(out["image"], image)
    assert changed >= 5


def test_photometric_steps_by_hand():
    t = PhotoMetricDistortion()
    gray = np.full((2, 2, 3), 100, np.uint8)
    assert (t.apply(gray, brightness=10.7) == 110).all()  # 110.7 truncated
    assert (t.apply(np.full((1, 1, 3), 250, np.uint8), brightness=20.0) == 255).all()  # clipped
    assert (t.apply(np.full((1, 1, 3), 101, np.uint8), contrast=0.5) == 50).all()  # 50.5 truncated
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert t.apply(red, hue=60).tolist() == [[[0, 255, 0]]]  # 0° + 120° (60 on the 0..180 scale)
    assert t.apply(red, hue=-60).tolist() == [[[0, 0, 255]]]  # wraps to 240°
    assert t.apply(red, saturation=0.5).tolist() == [[[255, 128, 128]]]  # S 255 -> 127 at V 255


def test_photometric_parameter_ranges():
    t = PhotoMetricDistortion()
    seed_transform(A.Compose([t]), 5)
    draws = [t.get_params() for _ in range(2000)]
    for key in ("brightness", "contrast", "saturation", "hue"):
        applied = [d[key] for d in draws if d[key] is not None]
        assert 0.45 < len(applied) / len(draws) < 0.55
    assert 0.45 < np.mean([d["contrast_last"] for d in draws]) < 0.55
    assert -32 <= min(d["brightness"] or 0 for d in draws) and max(d["brightness"] or 0 for d in draws) <= 32
    assert 0.5 <= min(d["contrast"] or 1 for d in draws) and max(d["contrast"] or 1 for d in draws) <= 1.5
    hues = {d["hue"] for d in draws if d["hue"] is not None}
    assert min(hues) == -18 and max(hues) == 17  # numpy randint's exclusive upper bound, as mmseg


def test_test_transform_resizes_image_only_and_normalizes():
    image = np.empty((64, 128, 3), np.uint8)
    image[:] = (124, 116, 104)
    label = np.arange(64 * 128).reshape(64, 128).astype(np.uint8)
    out = build_test_transform(scale=(512, 128))(image=image, mask=label)
    assert out["image"].shape == (128, 256, 3) and out["image"].dtype == np.float32  # factor min(4, 2)
    assert np.array_equal(out["mask"], label)
    expected = (np.array([124, 116, 104]) - np.array(MEAN)) / np.array(STD)
    assert np.allclose(out["image"], expected, atol=1e-5)


def test_train_pipeline_order_and_seeding():
    transform = build_train_transform(scale=(128, 64), crop_size=(32, 64))
    names = [type(t).__name__ for t in transform.transforms]
    assert names == [
        "RandomResize",
        "CatMaxRatioCrop",
        "HorizontalFlip",
        "PhotoMetricDistortion",
        "Normalize",
        "PadIfNeeded",
    ]
    rng = np.random.default_rng(4)
    image, label = (
        rng.integers(0, 255, (64, 128, 3), dtype=np.uint8),
        rng.integers(0, 5, (64, 128), dtype=np.uint8),
    )

    def run(seed):
        seed_transform(transform, seed)
        return [transform(image=image, mask=label)["image"] for _ in range(3)]

    a, b, c = run(0), run(0), run(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
