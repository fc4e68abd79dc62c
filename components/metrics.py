"""Segmentation metrics exactly as mmseg's IoUMetric (spec section 4).

Counts are summed over the whole dataset before any ratio is taken, so the result does not depend on
how images are batched or split across workers: merging workers is an all-reduce of four vectors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class IoUAccumulator:
    """Accumulates per-class intersect / union / pred / label pixel counts on the tensors' device."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # float64 holds exact integer counts up to 2**53 pixels: far beyond any dataset here.
        self.counts = torch.zeros(4, num_classes, dtype=torch.float64, device=device)

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

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one batch: `pred` and `label` are integer class maps of the same shape."""
        if pred.shape != label.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        valid = label != self.ignore_index
        pred = pred[valid].long()
        label = label[valid].long()
        if label.numel() and (int(label.max()) >= self.num_classes or int(label.min()) < 0):
            raise ValueError(f"label values must be in [0, {self.num_classes}) or {self.ignore_index}")
        n = self.num_classes
        # Predictions outside [0, n) (never produced by argmax) would corrupt bincount: reject them.
        if pred.numel() and (int(pred.max()) >= n or int(pred.min()) < 0):
            raise ValueError(f"pred values must be in [0, {n})")
        intersect = torch.bincount(pred[pred == label], minlength=n)
        area_pred = torch.bincount(pred, minlength=n)
        area_label = torch.bincount(label, minlength=n)
        union = area_pred + area_label - intersect
        batch = torch.stack([intersect, union, area_pred, area_label]).to(self.counts)
        self.counts += batch

    def merge(self, other: IoUAccumulator) -> None:
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum the counts over every process of the default process group (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            # gloo has no float64 all-reduce on every build: reduce as int64, which is exact anyway.
            counts = self.counts.to(torch.int64)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            self.counts.copy_(counts.to(torch.float64))

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
