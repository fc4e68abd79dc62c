"""`prepare_dataset`: labels equal the official tools' output, spec facts of the label mappings,
archive input == folder input, every validation error names its file and leaves nothing behind,
reruns after a fix work, and raw data is never modified."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image

from components.learning.data.datasets.ade20k import CLASSES as ADE20K_CLASSES
from components.learning.data.datasets.ade20k import reduce_zero_label
from components.learning.data.datasets.cityscapes import CLASSES as CITYSCAPES_CLASSES
from components.learning.data.datasets.cityscapes import label_ids_to_train_ids
from components.learning.data.validate import DataError
from components.sample import generate_sample
from pipeline.prepare import prepare_dataset

CS = {"train": 3, "val": 2, "height": 64, "width": 128}
ADE = {"train": 3, "val": 2, "height": 64, "width": 64}
# Cityscapes' labelId -> trainId (cityscapesscripts' labels.py): these 19 ids -> 0..18, every other -> 255
SPEC_TRAIN_IDS = {
    lid: tid
    for tid, lid in enumerate([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generate_sample(root, seed=1, cityscapes=CS, ade20k=ADE, archives=True)
    return root


@pytest.fixture
def raw(sample, tmp_path):
    """A private copy of the sample to break."""
    shutil.copytree(sample, tmp_path / "raw")
    return tmp_path / "raw"


def _prepare(name, source, root, workers=1):
    return prepare_dataset(name, source, root / "prepared" / name, root / "metrics" / f"{name}.json", workers)


def _manifest(split_dir):
    with open(split_dir / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tree_state(folder):
    return {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _assert_nothing_written(root, name):
    out = root / "prepared" / name
    assert not out.exists() or list(out.iterdir()) == []
    assert not (root / "metrics" / f"{name}.json").exists()


# --- label facts ----------------------------------------------------------------------------------


def test_label_ids_to_train_ids_matches_the_spec():
    ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    expected = np.array([SPEC_TRAIN_IDS.get(i, 255) for i in range(34)], dtype=np.uint8).reshape(2, 17)
    assert np.array_equal(label_ids_to_train_ids(ids), expected)
    with pytest.raises(DataError, match="crafted.png: values 34, 200 are not Cityscapes label ids"):
        label_ids_to_train_ids(np.array([[7, 34], [200, 0]], np.uint8), "crafted.png")


def test_reduce_zero_label_by_hand():
    raw = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert np.array_equal(reduce_zero_label(raw), np.array([[255, 0, 1], [149, 255, 6]], np.uint8))


def test_cityscapes_labels_equal_json2labelImg_train_ids(sample, tmp_path):
    stats = _prepare("cityscapes", sample / "cityscapes", tmp_path)
    for split, count in (("train", CS["train"]), ("val", CS["val"])):
        split_dir = tmp_path / "prepared" / "cityscapes" / split
        rows = _manifest(split_dir)
        assert len(rows) == count == stats["splits"][split]["images"]
        for row in rows:
            city, image_name = row["image"].split("/")[1:]
            stem = image_name.removesuffix("_leftImg8bit.png")
            source_image = sample / "cityscapes" / "leftImg8bit" / split / city / image_name
            official = tmp_path / "official.png"
            json2labelImg(
                str(sample / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_polygons.json"),
                str(official),
                "trainIds",
            )
            ours = np.asarray(Image.open(split_dir / row["label"]))
            assert row["label"] == f"labels/{city}/{stem}_gtFine_labelTrainIds.png"
            assert np.array_equal(ours, np.asarray(Image.open(official)))
            assert row["sha256"] == hashlib.sha256(source_image.read_bytes()).hexdigest()
            assert (int(row["height"]), int(row["width"])) == (CS["height"], CS["width"])
            # hardlinked: same filesystem, no copy
            assert os.stat(split_dir / row["image"]).st_ino == os.stat(source_image).st_ino
    # the same train ids, independently, from the labelIds PNGs through that table
    train_ids = [
        np.asarray(Image.open(p))
        for p in sorted((tmp_path / "prepared" / "cityscapes" / "train" / "labels").rglob("*.png"))
    ]
    label_ids = [
        np.asarray(Image.open(p))
        for p in sorted((sample / "cityscapes" / "gtFine" / "train").rglob("*_labelIds.png"))
    ]
    for ours, ids in zip(train_ids, label_ids, strict=True):
        assert np.array_equal(ours, np.vectorize(lambda i: SPEC_TRAIN_IDS.get(i, 255))(ids))


def test_stats_count_every_pixel_with_class_names(sample, tmp_path):
    stats = _prepare("cityscapes", sample / "cityscapes", tmp_path)
    on_disk = json.loads((tmp_path / "metrics" / "cityscapes.json").read_text())
    assert on_disk == stats
    train = stats["splits"]["train"]
    assert list(train["class_pixels"]) == list(CITYSCAPES_CLASSES)
    assert train["pixels"] == CS["train"] * CS["height"] * CS["width"]
    assert sum(train["class_pixels"].values()) + train["ignored_pixels"] == train["pixels"]
    assert abs(sum(train["class_frequency"].values()) - 1) < 1e-4
    assert train["class_pixels"]["road"] > 0 and train["class_pixels"]["sky"] > 0


def test_ade20k_labels_are_reduced_once(sample, tmp_path):
    stats = _prepare("ade20k", sample / "ade20k", tmp_path)
    assert list(stats["splits"]["val"]["class_pixels"]) == list(ADE20K_CLASSES)
    split_dir = tmp_path / "prepared" / "ade20k" / "train"
    for row in _manifest(split_dir):
        name = row["image"].removeprefix("images/").removesuffix(".jpg")
        raw = np.asarray(
            Image.open(
                sample / "ade20k" / "ADEChallengeData2016" / "annotations" / "training" / f"{name}.png"
            )
        ).astype(int)
        expected = np.where(raw == 0, 255, raw - 1)
        assert np.array_equal(np.asarray(Image.open(split_dir / row["label"])), expected)
        assert row["label"] == f"labels/{name}.png"


# --- archives and workers -------------------------------------------------------------------------


def _prepared_state(root, name):
    out = {}
    for split in ("train", "val"):
        split_dir = root / "prepared" / name / split
        out[split] = [
            (
                row,
                hashlib.sha256((split_dir / row["image"]).read_bytes()).hexdigest(),
                np.asarray(Image.open(split_dir / row["label"])).tobytes(),
            )
            for row in _manifest(split_dir)
        ]
    return out


def test_archives_give_the_same_result_as_folders(sample, tmp_path):
    _prepare("cityscapes", sample / "cityscapes", tmp_path / "folder")
    _prepare("cityscapes", sample / "archives" / "cityscapes", tmp_path / "zip")
    assert _prepared_state(tmp_path / "folder", "cityscapes") == _prepared_state(
        tmp_path / "zip", "cityscapes"
    )
    _prepare("ade20k", sample / "ade20k", tmp_path / "folder")
    _prepare("ade20k", sample / "archives" / "ade20k", tmp_path / "zipdir")
    _prepare("ade20k", sample / "archives" / "ade20k" / "ADEChallengeData2016.zip", tmp_path / "zipfile")
    folder = _prepared_state(tmp_path / "folder", "ade20k")
    assert (
        folder
        == _prepared_state(tmp_path / "zipdir", "ade20k")
        == _prepared_state(tmp_path / "zipfile", "ade20k")
    )


def test_worker_processes_give_the_same_result(sample, tmp_path):
    _prepare("cityscapes", sample / "archives" / "cityscapes", tmp_path / "one", workers=1)
    _prepare("cityscapes", sample / "archives" / "cityscapes", tmp_path / "two", workers=2)
    assert _prepared_state(tmp_path / "one", "cityscapes") == _prepared_state(tmp_path / "two", "cityscapes")


def test_raw_data_is_never_modified(sample, tmp_path):
    before = _tree_state(sample)
    _prepare("cityscapes", sample / "cityscapes", tmp_path)
    _prepare("ade20k", sample / "ade20k", tmp_path)
    _prepare("cityscapes", sample / "archives" / "cityscapes", tmp_path / "z")
    assert _tree_state(sample) == before
    with pytest.raises(DataError, match="output folder is inside the dataset source"):
        prepare_dataset("ade20k", sample / "ade20k", sample / "ade20k" / "prepared", tmp_path / "s.json", 1)


# --- validation: each error names the file, nothing half-written remains --------------------------

CS_TRAIN = "cityscapes/gtFine/train"


def _first(folder, pattern):
    return sorted(folder.rglob(pattern))[0]


def _break_missing_label(raw):
    json_path = _first(raw / CS_TRAIN, "*_polygons.json")
    json_path.unlink()
    _first(raw / CS_TRAIN, "*_labelIds.png").unlink()
    return (
        "cityscapes",
        raw / "cityscapes",
        json_path.name.replace("_gtFine_polygons.json", "_leftImg8bit.png"),
    )


def _break_unreadable_image(raw):
    path = _first(raw / "cityscapes" / "leftImg8bit" / "val", "*.png")
    path.write_bytes(b"this is not a png")
    return "cityscapes", raw / "cityscapes", path.name


def _break_truncated_image(raw):
    path = _first(raw / "ade20k" / "ADEChallengeData2016" / "images" / "validation", "*.jpg")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return "ade20k", raw / "ade20k", path.name


def _break_size_mismatch_json(raw):
    path = _first(raw / CS_TRAIN, "*_polygons.json")
    polygons = json.loads(path.read_text())
    polygons["imgWidth"] += 2
    path.write_text(json.dumps(polygons))
    return "cityscapes", raw / "cityscapes", path.name


def _break_size_mismatch_png(raw):
    path = _first(raw / "ade20k" / "ADEChallengeData2016" / "annotations" / "training", "*.png")
    Image.open(path).resize((10, 10), Image.NEAREST).save(path)
    return "ade20k", raw / "ade20k", path.name


def _break_label_values(raw):
    path = _first(raw / "ade20k" / "ADEChallengeData2016" / "annotations" / "validation", "*.png")
    label = np.array(Image.open(path))
    label[0, 0] = 200  # 199 after reduce_zero_label: no such class
    Image.fromarray(label).save(path)
    return "ade20k", raw / "ade20k", path.name


def _break_unknown_polygon_label(raw):
    path = _first(raw / CS_TRAIN, "*_polygons.json")
    polygons = json.loads(path.read_text())
    polygons["objects"][1]["label"] = "spaceship"
    path.write_text(json.dumps(polygons))
    return "cityscapes", raw / "cityscapes", path.name


def _break_empty_split(raw):
    val = raw / "cityscapes" / "leftImg8bit" / "val"
    shutil.rmtree(val)
    val.mkdir()
    return "cityscapes", raw / "cityscapes", "leftImg8bit/val"


def _break_wrong_archive(raw):
    path = raw / "archives" / "ade20k" / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/training/ADE_train_00000001.jpg", b"x")
    return "ade20k", path, "ADEChallengeData2016.zip"


def _break_swapped_archives(raw):
    folder = raw / "archives" / "cityscapes"
    shutil.copy(folder / "gtFine_trainvaltest.zip", folder / "leftImg8bit_trainvaltest.zip")
    return "cityscapes", folder, "leftImg8bit_trainvaltest.zip"


def _break_not_a_zip(raw):
    path = raw / "archives" / "cityscapes" / "gtFine_trainvaltest.zip"
    path.write_bytes(b"PK but not really")
    return "cityscapes", path.parent, "gtFine_trainvaltest.zip"


def _break_member_in_archive(raw):
    path = raw / "archives" / "ade20k" / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    target = "ADEChallengeData2016/images/training/ADE_train_00000002.jpg"
    members[target] = members[target][:200]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return (
        "ade20k",
        path,
        "ADEChallengeData2016.zip:ADEChallengeData2016/images/training/ADE_train_00000002.jpg",
    )


BREAKS = [
    _break_missing_label,
    _break_unreadable_image,
    _break_truncated_image,
    _break_size_mismatch_json,
    _break_size_mismatch_png,
    _break_label_values,
    _break_unknown_polygon_label,
    _break_empty_split,
    _break_wrong_archive,
    _break_swapped_archives,
    _break_not_a_zip,
    _break_member_in_archive,
]


@pytest.mark.parametrize("break_it", BREAKS, ids=[b.__name__.removeprefix("_break_") for b in BREAKS])
def test_bad_input_names_the_file_and_writes_nothing(raw, tmp_path, break_it):
    name, source, culprit = break_it(raw)
    before = _tree_state(raw)
    with pytest.raises(DataError) as error:
        _prepare(name, source, tmp_path)
    message = str(error.value)
    assert culprit in message and "\n" not in message
    _assert_nothing_written(tmp_path, name)
    assert _tree_state(raw) == before


def test_failed_rerun_keeps_the_previous_output_and_a_fixed_rerun_works(raw, tmp_path):
    _prepare("ade20k", raw / "ade20k", tmp_path)
    out = tmp_path / "prepared" / "ade20k"
    previous = _prepared_state(tmp_path, "ade20k")
    path = _first(raw / "ade20k" / "ADEChallengeData2016" / "annotations" / "validation", "*.png")
    good = path.read_bytes()
    bad = np.array(Image.open(io.BytesIO(good)))
    bad[0, 0] = 222
    Image.fromarray(bad).save(path)
    with pytest.raises(DataError, match=path.name):
        _prepare("ade20k", raw / "ade20k", tmp_path)
    assert _prepared_state(tmp_path, "ade20k") == previous
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]  # no temp folders left
    path.write_bytes(good)
    stats = _prepare("ade20k", raw / "ade20k", tmp_path)
    assert stats["splits"]["val"]["images"] == ADE["val"]
    assert _prepared_state(tmp_path, "ade20k") == previous


def test_unknown_dataset_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="dataset: expected one of ade20k, cityscapes, got 'voc'"):
        _prepare("voc", tmp_path, tmp_path)
    with pytest.raises(DataError, match="nowhere: dataset source not found"):
        _prepare("cityscapes", tmp_path / "nowhere", tmp_path)
