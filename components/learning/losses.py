"""Cross entropy reduced as mmseg's CrossEntropyLoss: the pixels' sum divided by ALL pixels, ignored ones
included (avg_non_ignore=False; PyTorch's mean divides by the valid pixels only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = torch.finfo(torch.float32).eps


def cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255,
                  avg_non_ignore: bool = False) -> torch.Tensor:
    """Mean pixel cross entropy; logits N×C×H×W, label N×H×W (long, `ignore_index` = ignore).

    avg_non_ignore=False (mmseg default): sum over valid pixels / ALL pixels, ignored ones included.
    avg_non_ignore=True: sum / number of valid pixels (PyTorch's 'mean'); mmseg adds float32 eps to
    the divisor so a crop with no valid pixel gives 0 instead of NaN.
    Computed in fp32 whatever the logits' dtype (bf16 autocast).
    """
    if logits.dim() != 4 or label.dim() != 3 or logits.shape[0] != label.shape[0] \
            or logits.shape[2:] != label.shape[1:]:
        raise ValueError(f"cross_entropy: expected logits N×C×H×W and label N×H×W of the same N, H, W; "
                         f"got {tuple(logits.shape)} and {tuple(label.shape)}")
    per_pixel = F.cross_entropy(logits.float(), label.long(), ignore_index=ignore_index, reduction="none")
    if not avg_non_ignore:
        return per_pixel.mean()
    num_valid = (label != ignore_index).sum()
    return per_pixel.sum() / (num_valid + _EPS)
