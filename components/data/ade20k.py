"""ADE20K SceneParsing (ADEChallengeData2016): find image/annotation pairs and make the labels.

The annotation PNGs store 0 = "other" and 1..150 = the classes. reduce_zero_label is applied ONCE,
here at prepare time, exactly as mmseg does at load time: 0 -> 255 (ignore), k -> k-1 (so 1..150 ->
0..149); a raw 255 stays 255. Prepared labels are therefore 0..149 / 255 and need no further mapping.
Input: the archive `ADEChallengeData2016.zip`, a folder holding it or `ADEChallengeData2016/`, or the
extracted `ADEChallengeData2016/` folder itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.data.classes import ADE20K_CLASSES, IGNORE_INDEX
from components.data.io import DirTree, Item, Source, open_zip
from components.data.validate import DataError, check_same_size, read_label_png

NAME = "ade20k"
CLASSES = ADE20K_CLASSES
SPLITS = {"train": "training", "val": "validation"}
TOP = "ADEChallengeData2016"
ARCHIVE = "ADEChallengeData2016.zip"


def open_source(source: Path) -> Source:
    source = Path(source)
    if source.is_file():
        tree = open_zip(source, TOP)
    elif (source / TOP).is_dir():
        tree = DirTree(source / TOP)
    elif (source / "images").is_dir() and (source / "annotations").is_dir():
        tree = DirTree(source)
    elif (source / ARCHIVE).is_file():
        tree = open_zip(source / ARCHIVE, TOP)
    elif not source.exists():
        raise DataError(f"{source}: dataset source not found")
    else:
        raise DataError(f"{source}: found neither {TOP}/ (with images/ and annotations/) nor {ARCHIVE}")
    return Source(tree, tree)


def list_split(src: Source, split: str) -> list[Item]:
    folder = f"images/{SPLITS[split]}"
    images = [p for p in src.images.files(folder) if p.lower().endswith(".jpg") and p.count("/") == 2]
    if not images:
        raise DataError(f"{src.images.where(folder)}: split '{split}' is empty (expected *.jpg)")
    items = []
    for image in images:
        filename = image.rsplit("/", 1)[1]
        stem = filename.rsplit(".", 1)[0]
        label = f"annotations/{SPLITS[split]}/{stem}.png"
        if not src.labels.exists(label):
            raise DataError(f"{src.images.where(image)}: missing label (expected {src.labels.where(label)})")
        items.append(Item(image, label, f"images/{filename}", f"labels/{stem}.png"))
    return items


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label on a uint8 map: 0 -> 255, k -> k-1, 255 stays 255."""
    out = label.astype(np.uint8, copy=True)
    out[out == 0] = IGNORE_INDEX
    out = out - 1
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX
    return out


def make_label(
    src: Source, item: Item, image_size: tuple[int, int], out_path: Path, image_where: str
) -> np.ndarray:
    where = src.labels.where(item.label)
    raw = read_label_png(src.labels.read_bytes(item.label), where)
    check_same_size(image_size, (raw.shape[1], raw.shape[0]), image_where, where)
    label = reduce_zero_label(raw)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(out_path)
    return label
