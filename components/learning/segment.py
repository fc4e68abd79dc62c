"""Label maps at the ORIGINAL image size, as mmseg's test pipeline produces them (logits resized back, then argmax).

The image goes in at the size the test transform resized it to; the scores (logits for one pass,
averaged softmax probabilities for ms+flip) are bilinearly resized to the ground truth's size and only
then argmax-ed. `evaluate_split` runs both settings over a val split and sums IoU and confusion counts.

ms+flip comes from components.learning.models.inference.predict_logits, which averages the 12 passes' softmax
at the test-scale size; mmseg averages them after resizing each to the original size. The two differ
only by where a linear resize sits relative to the softmax: identical where the test scale is the
original size (Cityscapes 512x1024: 2048x1024 images at scale (2048, 1024)), negligible elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from components.learning.metrics import ConfusionMatrix, IoUAccumulator
from components.learning.models.inference import predict_logits
from components.learning.models.speedups import autocast


@dataclass(frozen=True)
class InferenceSetting:
    """How one prediction is made: whole / slide, and the test-time augmentation."""

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None     # slide window (h, w)
    stride: tuple[int, int] | None = None        # slide stride (h, w)
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False

    @property
    def augmented(self) -> bool:
        return self.ratios != (1.0,) or self.flip


@torch.no_grad()
def predict_scores(model, img: torch.Tensor, out_size: tuple[int, int],
                   setting: InferenceSetting) -> torch.Tensor:
    """N×C×H×W scores at `out_size` (the original image size), fp32."""
    return scores_at(predict_logits(model, img, mode=setting.mode, crop_size=setting.crop_size,
                                    stride=setting.stride, ratios=setting.ratios, flip=setting.flip),
                     out_size, model)


def scores_at(scores: torch.Tensor, out_size: tuple[int, int], model) -> torch.Tensor:
    """Scores at the test scale resized (bilinear) to `out_size`, the original image size."""
    if tuple(scores.shape[2:]) != tuple(out_size):
        scores = F.interpolate(scores, size=tuple(out_size), mode="bilinear",
                               align_corners=getattr(model, "align_corners", False))
    return scores


@torch.no_grad()
def predict_label(model, img: torch.Tensor, out_size: tuple[int, int],
                  setting: InferenceSetting) -> torch.Tensor:
    """N×H×W int64 class ids at `out_size`."""
    return predict_scores(model, img, out_size, setting).argmax(dim=1)


@dataclass
class SplitResult:
    """Counts of one setting over a split; `metrics()` gives mmseg's numbers (fractions 0..1)."""

    iou: IoUAccumulator
    confusion: ConfusionMatrix
    images: int = 0
    samples: list = field(default_factory=list)    # (image index, pred H×W uint8) kept for the pictures

    def metrics(self) -> dict:
        return self.iou.compute()


@torch.no_grad()
def evaluate_split(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   settings: dict[str, InferenceSetting], device: torch.device, ignore_index: int = 255,
                   keep_samples: int = 0, channels_last: bool = False, precision: str = "fp32",
                   on_prediction: Callable[[int, str, torch.Tensor], None] | None = None,
                   first_index: int = 0) -> dict[str, SplitResult]:
    """Every named setting over `batches` of (image 1×3×h×w at the test scale, label 1×H×W at full size).

    `on_prediction(index, setting_name, pred H×W)` sees every label map (e.g. to save it);
    the first `keep_samples` predictions of each setting are kept for the overlay pictures.
    `precision`: autocast of the forward passes (components/learning/models/speedups.py). `first_index`: the
    split index of the first batch (a shard of the split): the indices kept and passed on are the split's.
    """
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    results = {name: SplitResult(IoUAccumulator(num_classes, ignore_index, device="cpu"),
                                 ConfusionMatrix(num_classes, ignore_index)) for name in settings}
    for index, (img, label) in enumerate(batches, start=first_index):
        if img.shape[0] != 1:
            raise ValueError(f"evaluate_split takes batches of one image (sizes differ), got {img.shape[0]}")
        img = img.to(device).contiguous(memory_format=memory_format)
        label = label[0]
        plain = {}   # this image's one-pass logits per window: ms+flip's unscaled, unflipped pass reuses them
        for name, setting in settings.items():
            window = (setting.mode, setting.crop_size, setting.stride)
            with autocast(device, precision):
                scores = predict_logits(model, img, mode=setting.mode, crop_size=setting.crop_size,
                                        stride=setting.stride, ratios=setting.ratios, flip=setting.flip,
                                        plain=plain.get(window))
                if not setting.augmented:
                    plain[window] = scores
                pred = scores_at(scores, tuple(label.shape), model).argmax(dim=1)[0].cpu()
            result = results[name]
            result.iou.update(pred, label)
            result.confusion.update(pred, label)
            result.images += 1
            if index < keep_samples:
                result.samples.append((index, pred.to(torch.uint8).numpy()))
            if on_prediction is not None:
                on_prediction(index, name, pred)
    return results


def ms_flip_setting(base: InferenceSetting, ratios: Sequence[float], flip: bool) -> InferenceSetting:
    ratios = tuple(float(r) for r in ratios)
    return InferenceSetting(base.mode, base.crop_size, base.stride, ratios, bool(flip))
