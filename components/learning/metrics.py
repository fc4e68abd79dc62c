"""Segmentation metrics exactly as mmseg's IoUMetric.

Pixels whose ground truth is 255 are dropped; per class c, intersect, pred, label and union = pred + label -
intersect are counted. aAcc = Σintersect / Σlabel, IoU_c = intersect_c / union_c, Acc_c = intersect_c /
label_c; mIoU and mAcc are nan-means (a class with union 0 is left out, one predicted but absent scores 0),
in percent.

Counts are summed over the whole dataset before any ratio is taken, so the result does not depend on
how images are batched or split across workers: merging workers is an all-reduce of the counts.
`count_pixels` is the only pixel counter: the IoU areas and the confusion matrix both come from it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def count_pixels(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                 ignore_index: int = 255) -> torch.Tensor:
    """The one pixel counter: a num_classes x num_classes int64 confusion matrix on the inputs' device,
    rows ground truth, columns prediction, pixels labelled `ignore_index` left out."""
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    n = num_classes
    valid = label != ignore_index
    pred = pred[valid].long()
    label = label[valid].long()
    if label.numel() and (int(label.max()) >= n or int(label.min()) < 0):
        raise ValueError(f"label values must be in [0, {n}) or {ignore_index}")
    # Predictions outside [0, n) (never produced by argmax) would corrupt bincount: reject them.
    if pred.numel() and (int(pred.max()) >= n or int(pred.min()) < 0):
        raise ValueError(f"pred values must be in [0, {n})")
    return torch.bincount(label * n + pred, minlength=n * n).reshape(n, n)


class ConfusionMatrix:
    """Pixel counts C×C (int64) on `device`, summed over every image added: rows are ground-truth
    classes, columns predictions (ignored pixels left out)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one batch: `pred` and `label` are integer class maps of the same shape."""
        self.counts += count_pixels(pred, label, self.num_classes, self.ignore_index).to(self.counts.device)

    def merge(self, other: ConfusionMatrix) -> None:
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum the counts over every process of the default process group (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)   # int64: exact, and gloo has it

    def normalized(self) -> np.ndarray:
        """Each row divided by its ground-truth pixel count (rows of absent classes stay 0)."""
        counts = self.counts.double().cpu().numpy()
        totals = counts.sum(axis=1, keepdims=True)
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


class IoUAccumulator:
    """Per-class intersect / union / pred / label pixel counts, derived from a ConfusionMatrix kept on
    the tensors' device: intersect = its diagonal, pred = column sums, label = row sums."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = ConfusionMatrix(num_classes, ignore_index, device)

    @property
    def counts(self) -> torch.Tensor:
        """4 x C float64: intersect, union, pred, label. float64 holds exact integer counts up to 2**53
        pixels: far beyond any dataset here."""
        cm = self.confusion.counts
        intersect, area_pred, area_label = cm.diagonal(), cm.sum(dim=0), cm.sum(dim=1)
        union = area_pred + area_label - intersect
        return torch.stack([intersect, union, area_pred, area_label]).to(torch.float64)

    @property
    def area_intersect(self) -> torch.Tensor:
        return self.counts[0]

    @property
    def area_union(self) -> torch.Tensor:
        return self.counts[1]

    @property
    def area_pred(self) -> torch.Tensor:
        return self.counts[2]

    @property
    def area_label(self) -> torch.Tensor:
        return self.counts[3]

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one batch: `pred` and `label` are integer class maps of the same shape."""
        self.confusion.update(pred, label)

    def merge(self, other: IoUAccumulator) -> None:
        self.confusion.merge(other.confusion)

    def all_reduce(self) -> None:
        """Sum the counts over every process of the default process group (no-op when not distributed)."""
        self.confusion.all_reduce()

    def compute(self) -> dict:
        """Fractions in [0, 1]; per-class IoU/Acc are NaN where the class has no union / no label pixels."""
        intersect, union, _, label = self.counts.cpu()
        with torch.no_grad():
            iou = intersect / union  # 0/0 -> nan: class absent from gt and prediction
            acc = intersect / label  # x/0 -> nan (or inf-free since intersect <= label)
        total = label.sum()
        return {
            "aAcc": float(intersect.sum() / total) if total > 0 else float("nan"),
            "mIoU": float(torch.nanmean(iou)) if (~iou.isnan()).any() else float("nan"),
            "mAcc": float(torch.nanmean(acc)) if (~acc.isnan()).any() else float("nan"),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }
