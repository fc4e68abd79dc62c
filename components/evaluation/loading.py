"""A trained network ready for inference: built, its checkpoint loaded strictly, fp32, eval mode, on the
device, channels-last, BN folded. Used by the evaluate stage and `dnlseg predict`."""

from __future__ import annotations

from pathlib import Path

import torch

from components.learning.models import build_dnlnet
from components.learning.models.checkpoint import load_mmseg_checkpoint
from components.learning.models.speedups import prepare_for_inference


def load_model(checkpoint: Path, *, depth: int, num_classes: int, align_corners: bool, attention: str, device,
               channels_last: bool = True, fold_bn: bool = False):
    """(model, the checkpoint's meta). A missing file is one line saying how to get it."""

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found (run the train stage, or fix the path)")
    # Built on the meta device and given the file's tensors: a random init to overwrite costs ~0.7 s.
    with torch.device("meta"):
        model = build_dnlnet(depth=depth, num_classes=num_classes, align_corners=align_corners, attention=attention)
    meta = load_mmseg_checkpoint(model, checkpoint, assign=True)
    model = model.float().to(device)   # fp32 whatever the file holds (assign keeps its dtypes)
    return prepare_for_inference(model, channels_last=channels_last, fold_bn=fold_bn, inplace=True), meta
