"""Cityscapes (gtFine): find image/label pairs and make the training labels.

Training labels (`<name>_gtFine_labelTrainIds.png`, train ids 0..18, 255 = ignore) are rendered from
the polygon JSON files by the official `cityscapesscripts.preparation.json2labelImg(..., "trainIds")`.
Where a polygon file is missing but `<name>_gtFine_labelIds.png` exists, the label ids are mapped to
train ids with the official table instead (`label_ids_to_train_ids`).
Input: a folder with `leftImg8bit/` and `gtFine/`, or one holding `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` (each part is taken from its folder if present, else from its archive).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image

from components.learning.data.classes import IGNORE_INDEX
from components.learning.data.datasets.spec import DatasetSpec
from components.learning.data.io import DirTree, Item, Source, open_zip
from components.learning.data.validate import DataError, check_same_size, read_label_png

# The 19 evaluated classes of `cityscapesscripts.helpers.labels` (train ids 0..18), official colours.
CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
NAME = "cityscapes"
SPLITS = {"train": "train", "val": "val"}  # prepared split -> official folder (test has no labels)
IMAGE_SUFFIX = "_leftImg8bit.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
ARCHIVES = {"leftImg8bit": "leftImg8bit_trainvaltest.zip", "gtFine": "gtFine_trainvaltest.zip"}


def open_source(source: Path) -> Source:
    source = Path(source)
    if not source.is_dir():
        raise DataError(
            f"{source}: expected a folder holding leftImg8bit/ and gtFine/ or "
            f"{ARCHIVES['leftImg8bit']} and {ARCHIVES['gtFine']}"
        )
    trees = []
    for part, archive in ARCHIVES.items():
        if (source / part).is_dir():
            trees.append(DirTree(source))
        elif (source / archive).is_file():
            trees.append(open_zip(source / archive, part, keep_top=True))
        else:
            raise DataError(f"{source}: found neither a {part}/ folder nor {archive}")
    return Source(*trees)


def list_split(src: Source, split: str) -> list[Item]:
    folder = f"leftImg8bit/{SPLITS[split]}"
    images = [p for p in src.images.files(folder) if p.endswith(IMAGE_SUFFIX) and p.count("/") == 3]
    if not images:
        raise DataError(
            f"{src.images.where(folder)}: split '{split}' is empty (expected <city>/*{IMAGE_SUFFIX})"
        )
    items = []
    for image in images:
        _, split_dir, city, filename = image.split("/")
        stem = filename[: -len(IMAGE_SUFFIX)]
        polygons = f"gtFine/{split_dir}/{city}/{stem}{POLYGONS_SUFFIX}"
        label_ids = f"gtFine/{split_dir}/{city}/{stem}{LABEL_IDS_SUFFIX}"
        if src.labels.exists(polygons):
            label = polygons
        elif src.labels.exists(label_ids):
            label = label_ids
        else:
            raise DataError(
                f"{src.images.where(image)}: missing label (expected {src.labels.where(polygons)})"
            )
        out_label = f"labels/{city}/{stem}{TRAIN_IDS_SUFFIX}"
        items.append(Item(image, label, f"images/{city}/{filename}", out_label))
    return items


def make_label(
    src: Source, item: Item, image_size: tuple[int, int], out_path: Path, image_where: str
) -> np.ndarray:
    """Write the train-id label PNG for one image; returns it as a uint8 array."""
    where = src.labels.where(item.label)
    data = src.labels.read_bytes(item.label)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if item.label.endswith(LABEL_IDS_SUFFIX):
        ids = read_label_png(data, where)
        check_same_size(image_size, (ids.shape[1], ids.shape[0]), image_where, where)
        Image.fromarray(label_ids_to_train_ids(ids, where)).save(out_path)
    else:
        size = check_polygons(data, where)
        check_same_size(image_size, size, image_where, where)
        json_path = src.labels.local_path(item.label)
        if json_path is None:  # inside an archive: json2labelImg wants a file
            json_path = out_path.with_name(out_path.name + ".json")
            json_path.write_bytes(data)
        try:
            json2labelImg(str(json_path), str(out_path), "trainIds")
        except Exception as e:
            raise DataError(f"{where}: cannot render the polygons ({type(e).__name__}: {e})") from None
        finally:
            if json_path.parent == out_path.parent:
                json_path.unlink(missing_ok=True)
    return np.asarray(Image.open(out_path), dtype=np.uint8)


def check_polygons(data: bytes, where: str) -> tuple[int, int]:
    """An official polygon file: returns (imgWidth, imgHeight). Unknown labels would make
    cityscapesscripts call sys.exit, so they are caught here first."""
    try:
        ann = json.loads(data)
        size = (int(ann["imgWidth"]), int(ann["imgHeight"]))
        objects = ann["objects"]
        names = [str(obj["label"]) for obj in objects]
        for obj in objects:
            if len(obj["polygon"]) < 1:
                raise ValueError("an empty polygon")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: not a Cityscapes polygon file ({type(e).__name__}: {e})") from None
    for name in names:
        if name not in name2label and name.removesuffix("group") not in name2label:
            raise DataError(f"{where}: unknown label {name!r} (not in cityscapesscripts.helpers.labels)")
    return size


def _train_id_table() -> tuple[np.ndarray, np.ndarray]:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    for label in CS_LABELS:
        if 0 <= label.id < 256:
            known[label.id] = True
            lut[label.id] = label.trainId if 0 <= label.trainId < IGNORE_INDEX else IGNORE_INDEX
    return lut, known


_LUT, _KNOWN_IDS = _train_id_table()


def label_ids_to_train_ids(ids: np.ndarray, where: str = "labelIds") -> np.ndarray:
    """Official labelId -> trainId mapping (7,8,11,12,13,17,19..28,31,32,33 -> 0..18, others -> 255)."""
    values = np.unique(ids)
    unknown = values[~_KNOWN_IDS[values]]
    if unknown.size:
        raise DataError(f"{where}: values {', '.join(map(str, unknown[:8]))} are not Cityscapes label ids")
    return _LUT[ids]


DATASET = DatasetSpec(name=NAME, title="Cityscapes", classes=CLASSES, palette=PALETTE, splits=SPLITS,
                      open_source=open_source, list_split=list_split, make_label=make_label)
