"""mmseg's training and test pipelines, built from albumentations 2.0.8 transforms.

Train (mmseg's DNLNet configs): RandomResize ratio U[0.5, 2.0] of `scale`, keep ratio -> RandomCrop to
`crop_size` with cat_max_ratio -> HorizontalFlip p .5 -> PhotoMetricDistortion -> Normalize -> Pad to
`crop_size` (image 0, label 255). Test: keep-ratio resize to `scale` -> Normalize; the label is left at
full resolution (metrics compare logits resized back to it).

Where albumentations' own transforms differ from mmseg's semantics (keep-ratio rescale rule, crop with
cat_max_ratio, the photometric distortion's order and uint8 rounding) they are written out here as
small DualTransform / ImageOnlyTransform classes. Sizes: `scale` is (width, height) as in mmseg,
`crop_size` is (height, width). Images are RGB uint8 H×W×3, labels uint8 H×W.

Randomness comes from each transform's own generators (`self.random_generator`, `self.py_random`), as
albumentations 2 wants; `seed_transform` gives a whole pipeline one seeded stream (the loader does this
per worker), so augmentations are reproducible.
"""

from __future__ import annotations

import os
import random

import cv2
import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call at import
import albumentations as A  # noqa: E402

from components.learning.data.classes import MEAN, STD  # noqa: E402


def rescale_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rule: the largest (w, h) whose long edge <= max(scale) and short edge
    <= min(scale), rounded half up (mmcv.rescale_size)."""
    w, h = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


class RandomResize(A.DualTransform):
    """mmseg Resize(keep_ratio=True) with ratio_range: target = int(scale * r), r ~ U(ratio_range);
    bilinear for the image, nearest for the label. ratio_range=None: a fixed scale (the test resize);
    resize_mask=False leaves the label untouched."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] | None = (0.5, 2.0),
                 resize_mask: bool = True, p: float = 1.0):
        super().__init__(p=p)
        self.scale = tuple(scale)
        self.ratio_range = None if ratio_range is None else tuple(ratio_range)
        self.resize_mask = resize_mask

    def get_params_dependent_on_data(self, params, data):
        h, w = data["image"].shape[:2]
        if self.ratio_range is None:
            target = self.scale
        else:
            lo, hi = self.ratio_range
            ratio = self.random_generator.random() * (hi - lo) + lo
            target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return {"new_size": rescale_size((w, h), target)}

    def apply(self, img, new_size=None, **params):
        return cv2.resize(img, new_size, interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask, new_size=None, **params):
        if not self.resize_mask:
            return mask
        return cv2.resize(mask, new_size, interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self):
        return ("scale", "ratio_range", "resize_mask")


class CatMaxRatioCrop(A.DualTransform):
    """mmseg RandomCrop: a random crop_size (h, w) window (smaller images are kept whole). With
    cat_max_ratio < 1, up to `max_tries` windows are checked for one whose largest class (ignoring
    `ignore_index`) covers < cat_max_ratio of the labelled pixels and which holds more than one class;
    as in mmseg, when all tries fail the window drawn after the last failure is used."""

    def __init__(self, crop_size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = 255,
                 max_tries: int = 10, p: float = 1.0):
        super().__init__(p=p)
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _random_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = self.crop_size
        y = int(self.random_generator.integers(0, max(h - ch, 0) + 1))
        x = int(self.random_generator.integers(0, max(w - cw, 0) + 1))
        return y, y + ch, x, x + cw

    def get_params_dependent_on_data(self, params, data):
        h, w = data["image"].shape[:2]
        box = self._random_box(h, w)
        label = data.get("mask")
        if self.cat_max_ratio < 1.0 and label is not None:
            for _ in range(self.max_tries):
                y0, y1, x0, x1 = box
                # np.unique's counts via bincount (several times faster on 512×1024 crops)
                counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=self.ignore_index + 1)
                counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._random_box(h, w)
        return {"box": box}

    def apply(self, img, box=None, **params):
        y0, y1, x0, x1 = box
        return np.ascontiguousarray(img[y0:y1, x0:x1])

    def apply_to_mask(self, mask, box=None, **params):
        y0, y1, x0, x1 = box
        return np.ascontiguousarray(mask[y0:y1, x0:x1])

    def get_transform_init_args_names(self):
        return ("crop_size", "cat_max_ratio", "ignore_index", "max_tries")


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's PhotoMetricDistortion.convert: float math, clip, truncate back to uint8."""
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg's PhotoMetricDistortion on an RGB uint8 image (the label is never touched):
    brightness +U(-32, 32) (p .5); contrast ×U(.5, 1.5) (p .5) either first or last (mode p .5);
    saturation ×U(.5, 1.5) (p .5) and hue + randint(-18, 18) on OpenCV's 0..180 scale (p .5), each via
    HSV. Every step rounds back to uint8 like mmseg. HSV from RGB equals mmseg's HSV from BGR."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18, p: float = 1.0):
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def get_params(self):
        g = self.random_generator
        d = self.brightness_delta
        return {
            "brightness": float(g.uniform(-d, d)) if g.integers(2) else None,
            "contrast_last": bool(g.integers(2) == 0),  # mmseg: mode 0 -> contrast after the HSV ops
            "contrast": float(g.uniform(*self.contrast_range)) if g.integers(2) else None,
            "saturation": float(g.uniform(*self.saturation_range)) if g.integers(2) else None,
            # numpy's randint(-18, 18) as in mmseg: the upper bound is exclusive
            "hue": int(g.integers(-self.hue_delta, self.hue_delta)) if g.integers(2) else None,
        }

    def apply(self, img, brightness=None, contrast_last=True, contrast=None, saturation=None, hue=None,
              **params):
        if brightness is not None:
            img = _convert(img, beta=brightness)
        if contrast is not None and not contrast_last:
            img = _convert(img, alpha=contrast)
        if saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + hue) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and contrast_last:
            img = _convert(img, alpha=contrast)
        return img

    def get_transform_init_args_names(self):
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def normalize() -> A.Normalize:
    """(img - mean) / std on RGB 0..255 values, float32."""
    return A.Normalize(mean=MEAN, std=STD, max_pixel_value=1.0)


def pad_to(crop_size: tuple[int, int], ignore_index: int = 255) -> A.PadIfNeeded:
    """Pad bottom / right up to crop_size (h, w): image 0 (after Normalize), label ignore_index."""
    return A.PadIfNeeded(min_height=crop_size[0], min_width=crop_size[1], position="top_left",
                         border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index)


def build_train_transform(scale=(2048, 1024), crop_size=(512, 1024), cat_max_ratio=0.75, ignore_index=255,
                          seed: int | None = None) -> A.Compose:
    """mmseg's training pipeline; call as `t(image=rgb_uint8, mask=label_uint8)`."""
    return A.Compose(
        [
            RandomResize(scale, ratio_range=(0.5, 2.0)),
            CatMaxRatioCrop(crop_size, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
            A.HorizontalFlip(p=0.5),
            PhotoMetricDistortion(),
            normalize(),
            pad_to(crop_size, ignore_index),
        ],
        seed=seed,
    )


def build_test_transform(scale=(2048, 1024)) -> A.Compose:
    """Keep-ratio resize of the image to `scale` (w, h) and Normalize; the label stays full size."""
    return A.Compose([RandomResize(scale, ratio_range=None, resize_mask=False), normalize()], seed=0)


def seed_transform(transform, seed: int | np.random.SeedSequence) -> None:
    """Give every transform of a pipeline one shared, seeded random stream. (Compose(seed=...) seeds
    each transform with the same number, so their draws would be correlated.)"""
    if transform is None or not hasattr(transform, "set_random_state"):
        return
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    transform.set_random_state(np.random.default_rng(ss), random.Random(int(ss.generate_state(1)[0])))  # noqa: S311 - augmentation, not cryptography
