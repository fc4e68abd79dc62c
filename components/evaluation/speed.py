"""Inference speed as the seed table measures it (mmseg's tools/analysis_tools/benchmark.py; the table's
fps: 200 images, 5 warm-up, fp32 on a V100): batch 1, `n_images` test images of which the first `warmup`
are not timed, timing only forward + resize to the original size + argmax (each image is decoded,
normalized and put on the device before its timer starts). The images are taken one at a time: only the
one being timed is on the device, whatever the number of images.
Every figure carries the device and dtype it was measured on.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence

import torch

from components.learning.models.speedups import autocast
from components.learning.segment import InferenceSetting, predict_label


def describe_device(device: torch.device | str) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: <processor>, N threads': what a reader needs to compare."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_fps(model, samples: Sequence[tuple[torch.Tensor, tuple[int, int]]], device: torch.device | str,
                setting: InferenceSetting, n_images: int = 200, warmup: int = 5,
                channels_last: bool = False, precision: str = "fp32") -> dict:
    """Images per second over images warmup+1 .. n_images (mmseg: fps = timed images / timed seconds).

    `samples`: (image 1×3×h×w at the test scale, original (H, W)) by index, read when asked (e.g. from
    the val split); cycled when there are fewer than n_images. One image at a time goes to the device and
    is dropped before the next is read. `precision`: autocast (components/learning/models/speedups.py); fp32 for
    the seed's exact setting.
    """
    if n_images <= warmup:
        raise ValueError(f"fps: n_images ({n_images}) must be larger than warmup ({warmup})")
    if not len(samples):
        raise ValueError("fps: no images to time")
    device = torch.device(device)
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    timed_seconds = 0.0
    with autocast(device, precision):
        for i in range(n_images):
            img, size = samples[i % len(samples)]
            img = img.to(device).contiguous(memory_format=memory_format)
            _sync(device)
            tic = time.perf_counter()
            predict_label(model, img, size, setting)
            _sync(device)
            if i >= warmup:
                timed_seconds += time.perf_counter() - tic
            del img   # the next image is read with this one gone
    timed = n_images - warmup
    return {
        "fps": timed / timed_seconds,
        "images": n_images,
        "warmup": warmup,
        "timed_seconds": timed_seconds,
        "batch_size": 1,
        "distinct_images": min(len(samples), n_images),
        "device": describe_device(device),
        "dtype": precision,
        "channels_last": channels_last,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "cpu_count": os.cpu_count(),
    }
