"""Confusion matrix counts: rows are ground-truth classes, columns predictions (ignored pixels left out)."""

from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """Pixel counts C×C (int64), summed over every image added."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        if pred.shape != label.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        valid = label != self.ignore_index
        n = self.num_classes
        gt, pr = label[valid].long().cpu(), pred[valid].long().cpu()
        both = torch.cat([gt, pr])
        if both.numel() and (int(both.max()) >= n or int(both.min()) < 0):
            raise ValueError(f"class ids must be in [0, {n}) or {self.ignore_index}")
        self.counts += torch.bincount(gt * n + pr, minlength=n * n).reshape(n, n)

    def normalized(self) -> np.ndarray:
        """Each row divided by its ground-truth pixel count (rows of absent classes stay 0)."""
        counts = self.counts.double().numpy()
        totals = counts.sum(axis=1, keepdims=True)
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
