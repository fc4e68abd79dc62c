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

from components.learning.data.classes import IGNORE_INDEX
from components.learning.data.datasets.spec import DatasetSpec
from components.learning.data.io import DirTree, Item, Source, open_zip
from components.learning.data.validate import DataError, check_same_size, read_label_png

# The 150 SceneParsing classes in mmseg's order (`mmseg/datasets/ade.py`, the order of
# `objectInfo150.csv`) with mmseg's palette; annotations store them as 1..150 (0 = "other"),
# prepared labels as 0..149.
# mmseg spells class 8 'bed ' (trailing space); the space is dropped here.
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)
PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
NAME = "ade20k"
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


DATASET = DatasetSpec(name=NAME, title="ADE20K", classes=CLASSES, palette=PALETTE, splits=SPLITS,
                      open_source=open_source, list_split=list_split, make_label=make_label)
