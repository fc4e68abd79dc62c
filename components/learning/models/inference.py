"""Test-time inference as mmseg 1.2.2: whole image, sliding window, multi-scale + flip.

Every function takes a normalized N×3×H×W image (at the size the test pipeline resized it to) and
returns N×C×H×W at that size; resizing to the original image size is the caller's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

MODES = ("whole", "slide")


def whole_inference(model, img: torch.Tensor) -> torch.Tensor:
    return model.encode_decode(img).float()


def slide_windows(h_img: int, w_img: int, crop_size: tuple[int, int],
                  stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, exactly as mmseg's slide_inference places them: a regular
    grid of `stride` steps, the last row/column shifted back so it ends at the border."""
    h_crop, w_crop = crop_size
    h_stride, w_stride = stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def slide_inference(model, img: torch.Tensor, crop_size: tuple[int, int],
                    stride: tuple[int, int]) -> torch.Tensor:
    """Window logits summed into a canvas, divided by how many windows covered each pixel."""
    n, _, h_img, w_img = img.shape
    logits = None
    count = img.new_zeros((n, 1, h_img, w_img), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(h_img, w_img, crop_size, stride):
        crop_logits = model.encode_decode(img[:, :, y1:y2, x1:x2]).float()
        if logits is None:
            logits = img.new_zeros((n, crop_logits.shape[1], h_img, w_img), dtype=torch.float32)
        logits[:, :, y1:y2, x1:x2] += crop_logits
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def _scaled_size(h: int, w: int, ratio: float) -> tuple[int, int]:
    # mmcv's rescale_size rounding: int(x * ratio + 0.5).
    return int(h * ratio + 0.5), int(w * ratio + 0.5)


def predict_logits(model, img: torch.Tensor, mode: str = "whole", crop_size: tuple[int, int] | None = None,
                   stride: tuple[int, int] | None = None, ratios: Sequence[float] = (1.0,),
                   flip: bool = False, plain: torch.Tensor | None = None) -> torch.Tensor:
    """Segmentation scores N×C×H×W (fp32) at the input size.

    One pass (ratios == (1.0,), no flip): the logits. Otherwise, as mmseg's test-time augmentation:
    for each ratio the input is resized (bilinear), run whole or slide, the flipped pass flipped
    back, its logits resized to the input size, softmaxed; the probabilities are averaged.
    `plain`: the one-pass logits of `img` in this mode, when the caller has them (an evaluation of
    single-scale and ms+flip): the pass at the input size, unflipped, takes them instead of running.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("mode='slide' needs crop_size=(h, w) and stride=(h, w)")
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"img must be N×3×H×W, got {tuple(img.shape)}")
    ratios = tuple(ratios)
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of positive numbers, got {ratios}")
    align_corners = getattr(model, "align_corners", False)
    h, w = img.shape[2:]

    def run(x: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return slide_inference(model, x, crop_size, stride)
        return whole_inference(model, x)

    with torch.no_grad():
        if ratios == (1.0,) and not flip:
            return plain if plain is not None else run(img)
        probs = None
        passes = 0
        for ratio in ratios:
            size = _scaled_size(h, w, ratio)
            # Image resize like cv2's bilinear (half-pixel centres), whatever the model's align_corners.
            scaled = img if size == (h, w) else F.interpolate(img, size=size, mode="bilinear",
                                                              align_corners=False)
            for flipped in (False, True) if flip else (False,):
                x = scaled.flip(dims=(3,)) if flipped else scaled
                logits = plain if plain is not None and x is img else run(x)
                if flipped:
                    logits = logits.flip(dims=(3,))
                if tuple(logits.shape[2:]) != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=align_corners)
                p = logits.softmax(dim=1)
                probs = p if probs is None else probs + p
                passes += 1
        return probs / passes
