"""Distributed validation: every rank predicts its own shard, the IoU counts are summed over ranks.

Summing counts (not averaging per-rank mIoU) gives exactly the single-process result: mmseg's IoUMetric
sums the per-class intersection / union / label pixel counts over the whole dataset before any ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.learning.metrics import IoUAccumulator
from components.learning.models.inference import predict_logits
from components.learning.models.speedups import autocast


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, mode: str = "whole",
             crop_size: tuple[int, int] = (512, 1024), stride: tuple[int, int] = (512, 1024),
             align_corners: bool = False, ignore_index: int = 255, channels_last: bool = False,
             precision: str = "fp32") -> dict:
    """mIoU / mAcc / aAcc (fractions) and per-class IoU / Acc over all ranks' shards of `loader`.

    `loader` yields (image N×3×h×w at the test scale, label N×H×W at the original size), as the test
    transform produces; logits are resized to the label's size before argmax, as mmseg does.
    Every rank must call this (it ends in an all-reduce), even one with an empty shard.
    """
    was_training = model.training
    model.eval()
    counts = IoUAccumulator(num_classes, ignore_index=ignore_index, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for img, label in loader:
        img = img.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        label = label.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = predict_logits(model, img, mode=mode, crop_size=tuple(crop_size), stride=tuple(stride))
        if logits.shape[-2:] != label.shape[-2:]:
            logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear",
                                   align_corners=align_corners)
        counts.update(logits.argmax(dim=1), label)
    counts.all_reduce()
    model.train(was_training)
    return counts.compute()
