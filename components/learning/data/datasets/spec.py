"""What declaring a dataset means: its classes, palette, official splits and how to read them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.learning.data.io import Item, Source


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the table, declared once in its module of components/learning/data/datasets/.

    `prepare` turns its official files into the prepared layout every stage reads:
    `<prepared_dir>/<name>/<split>/{manifest.csv, images/, labels/}`, labels as train ids 0..C-1 and
    255 = ignore (components/learning/data/io.py MANIFEST_COLUMNS).
    """

    name: str
    title: str                                   # as the results table writes it
    classes: tuple[str, ...]                     # in the order of the train ids the model predicts
    palette: tuple[tuple[int, int, int], ...]    # one RGB colour per class
    splits: dict[str, str]                       # prepared split (train, val) -> the official one
    open_source: Callable[[Path], Source]        # a folder or the official archives -> Source
    list_split: Callable[[Source, str], list[Item]]
    # (source, item, (width, height) of the image, output path, where) -> train-id label, written
    make_label: Callable[[Source, Item, tuple[int, int], Path, str], np.ndarray]

    @property
    def num_classes(self) -> int:
        return len(self.classes)
