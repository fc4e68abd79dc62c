"""Checks on raw and converted dataset files. Every failure is a `DataError` whose one-line message
starts with the file it is about (a path, or `archive.zip:member` for a file inside an archive)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.learning.data.classes import IGNORE_INDEX


class DataError(ValueError):
    """Bad input data; the message names the file and says what was expected."""


def open_image(data: bytes, where: str) -> Image.Image:
    """Decode an image completely (a truncated file fails here, not later in a loader worker)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise DataError(f"{where}: unreadable image (not a format PIL recognises)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"{where}: unreadable or truncated image ({type(e).__name__}: {e})") from None
    return image


def check_rgb_image(data: bytes, where: str) -> tuple[int, int]:
    """A readable colour image; returns (width, height)."""
    image = open_image(data, where)
    if image.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "YCbCr"):
        raise DataError(f"{where}: expected an 8-bit RGB image, got PIL mode {image.mode}")
    return image.size


def read_label_png(data: bytes, where: str) -> np.ndarray:
    """A single-channel 8-bit label image as a uint8 H×W array."""
    image = open_image(data, where)
    if image.mode not in ("L", "P"):
        raise DataError(f"{where}: expected a single-channel 8-bit label PNG, got PIL mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def check_same_size(
    image_size: tuple[int, int], label_size: tuple[int, int], image_where: str, label_where: str
) -> None:
    """Sizes are (width, height)."""
    if tuple(image_size) != tuple(label_size):
        raise DataError(
            f"{label_where}: label size {label_size[0]}x{label_size[1]} differs from image size "
            f"{image_size[0]}x{image_size[1]} of {image_where}"
        )


def check_label_values(label: np.ndarray, num_classes: int, where: str) -> None:
    """Converted labels hold train ids 0..num_classes-1 or 255 (ignore)."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
        raise DataError(
            f"{where}: label values {shown} outside the classes 0..{num_classes - 1} and "
            f"{IGNORE_INDEX} (ignore)"
        )
