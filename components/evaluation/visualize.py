"""Pictures people look at: label maps in the dataset palette, overlays, image | ground truth | prediction
panels, the per-class IoU bar chart and the confusion matrix. matplotlib runs headless (Agg).
Every file is written atomically (components.atomic: a temp file in the same folder, then os.replace'd).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from components.atomic import atomic_path

IGNORE_COLOR = (0, 0, 0)


def palette_array(palette: Sequence[tuple[int, int, int]], ignore_index: int = 255) -> np.ndarray:
    """256×3 uint8 lookup table: class ids in palette order, everything else (255 = ignore) black."""
    if len(palette) > 255:
        raise ValueError(f"palette has {len(palette)} colours; at most 255 fit next to the ignore index")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[ignore_index] = IGNORE_COLOR
    return table


def colorize(label: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """H×W class ids -> H×W×3 uint8 RGB."""
    return palette_array(palette)[np.asarray(label, dtype=np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, palette: Sequence[tuple[int, int, int]],
            alpha: float = 0.5) -> np.ndarray:
    """The image blended with the coloured label map (mmseg's show_result opacity 0.5)."""
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"overlay: image {image.shape[:2]} and label {label.shape[:2]} differ in size")
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colorize(label, palette).astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def save_image(path: Path | str, array: np.ndarray) -> Path:
    """RGB uint8 array -> PNG (or JPEG by suffix), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path


def save_label_png(path: Path | str, label: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Path:
    """Class ids as an 8-bit palette PNG: the pixel values are the ids (what tools read back), the
    colours the dataset palette (what viewers show); 255 = ignore is black."""
    label = np.ascontiguousarray(label, dtype=np.uint8)
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    image.putpalette(palette_array(palette).reshape(-1).tolist())
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _save_figure(fig, path: Path | str, dpi: int = 100) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _pyplot():
    matplotlib.use("Agg")   # no display on servers and CI

    return plt


def save_panel(path: Path | str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
               palette: Sequence[tuple[int, int, int]], title: str = "") -> Path:
    """image | ground truth | prediction side by side (nearest-neighbour display: no blended class edges)."""
    plt = _pyplot()
    h, w = label.shape
    width = 15.0
    fig, axes = plt.subplots(1, 3, figsize=(width, width / 3 * h / w + 0.6))
    for ax, picture, name in zip(axes, (image, colorize(label, palette), colorize(pred, palette)),
                                 ("image", "ground truth", "prediction"), strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


def save_iou_chart(path: Path | str, class_names: Sequence[str], series: dict[str, Sequence[float]],
                   title: str = "") -> Path:
    """Horizontal bars of per-class IoU (percent) for each named series; NaN (class absent) drawn as n/a."""
    plt = _pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * n * max(1, len(series)) ** 0.5 + 1)))
    height = 0.8 / max(1, len(series))
    y = np.arange(n)
    for k, (name, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        ax.barh(y + k * height, np.nan_to_num(values, nan=0.0), height=height, label=name)
        for i in np.flatnonzero(np.isnan(values)):
            ax.text(1, y[i] + k * height, "n/a", va="center", fontsize=6)
    ax.set_yticks(y + height * (len(series) - 1) / 2, labels=list(class_names), fontsize=max(4, 9 - n // 40))
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save_figure(fig, path)


def save_confusion_chart(path: Path | str, normalized: np.ndarray, class_names: Sequence[str],
                         title: str = "") -> Path:
    """Row-normalized confusion matrix (rows: ground truth, columns: prediction)."""
    plt = _pyplot()
    n = len(class_names)
    side = min(30.0, max(5.0, 0.32 * n))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shown = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fontsize = max(3, min(8, int(200 / max(n, 1))))
    ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels=list(class_names), fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if n <= 30:   # numbers stay readable only for the small class sets
        for i in range(n):
            for j in range(n):
                if normalized[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * normalized[i, j]:.0f}", ha="center", va="center", fontsize=5,
                            color="white" if normalized[i, j] > 0.5 else "black")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the ground-truth class")
    if title:
        ax.set_title(title, fontsize=10)
    return _save_figure(fig, path, dpi=max(60, min(150, int(100 * 60 / max(n, 60) * 1.5))))


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a class absent from ground truth and prediction becomes null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
