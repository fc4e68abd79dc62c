"""The evaluation protocol as a fingerprint: what an eval.json measured, so that two figures are compared
only when they were measured the same way (the report's verdicts, pipeline/report.py).

`protocol()` lists the settings that change an mIoU figure (test mode, crop and stride, test scale, the
ms+flip ratios and flip, align_corners, the label conversion, the number of val images, the precision);
`protocol_hash()` is a short sha256 of them; `differences()` says in words which settings of ours differ
from the published run's (`50 of 500 images`, `precision bf16 (published fp32)`).
"""

from __future__ import annotations

import hashlib
import json

# How the val labels become train ids (0..C-1, 255 ignored), as components/learning/data/datasets does it at
# preparation (the published runs read the same: mmseg's trainIds and reduce_zero_label).
LABEL_CONVERSION = {
    "cityscapes": "gtFine polygons -> labelTrainIds (cityscapesscripts json2labelImg), 255 ignored",
    "ade20k": "reduce_zero_label (0 -> 255, k -> k-1)",
}

# The val split the published table was measured on (the official datasets' val images).
PUBLISHED_VAL_IMAGES = {"cityscapes": 500, "ade20k": 2000}

KEYS = ("mode", "crop", "stride", "scale", "align_corners", "ms_ratios", "flip", "label_conversion", "images",
        "precision")


def protocol(recipe, ms_ratios, flip: bool, images: int, precision: str) -> dict:
    """The protocol of an evaluation of a run with `recipe` (components.learning.experiment.Recipe, the test
    settings of its row under its profile) on `images` val images with autocast `precision`."""
    return {
        "mode": recipe.test_mode,
        # the slide window and stride matter only in slide mode: whole-image tests do not differ by them
        "crop": list(recipe.test_crop) if recipe.test_mode == "slide" else None,
        "stride": list(recipe.test_stride) if recipe.test_mode == "slide" else None,
        "scale": list(recipe.scale),
        "align_corners": recipe.align_corners,
        "ms_ratios": [float(r) for r in ms_ratios],
        "flip": flip,
        "label_conversion": LABEL_CONVERSION.get(
            recipe.dataset, f"make_label of components/learning/data/datasets/{recipe.dataset}.py"),
        "images": images,
        "precision": precision,
    }


def protocol_hash(settings: dict) -> str:
    """16 hex digits of the sha256 of the protocol's settings (key order and number format fixed)."""
    blob = json.dumps({k: settings.get(k) for k in KEYS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _words(key: str, ours, published) -> str:
    if key == "images":
        return f"{ours} of {published} images"
    if key == "ms_ratios":
        return f"ms ratios {ours} (published {published})"
    return f"{key.replace('_', ' ')} {ours} (published {published})"


# The seed's V100s have no TF32, so its fp32 is what `tf32` (PyTorch's default, as mmsegmentation runs)
# computes there; on newer GPUs the two differ far below run-to-run noise: one precision when comparing.
SAME_PRECISION = {"tf32": "fp32"}


def _compared(key: str, value):
    return SAME_PRECISION.get(value, value) if key == "precision" else value


def differences(ours: dict, published: dict, keys: tuple[str, ...] = KEYS) -> list[str]:
    """Each of `keys` whose value differs between two protocols, in words; [] when they are the same."""
    return [_words(key, ours.get(key), published.get(key)) for key in keys
            if _compared(key, ours.get(key)) != _compared(key, published.get(key))]


SINGLE_SCALE_KEYS = tuple(k for k in KEYS if k not in ("ms_ratios", "flip"))   # what a single-scale figure depends on
