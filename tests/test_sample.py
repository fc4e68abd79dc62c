"""The generated sample datasets: official layouts and formats, consistency with cityscapesscripts,
determinism, and scenes a model can learn from."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from conftest import REPO, as_params
from PIL import Image

from components.sample import generate_sample
from pipeline.config import ConfigError, read_raw

CS = {"train": 4, "val": 2, "height": 64, "width": 128}
ADE = {"train": 3, "val": 2, "height": 64, "width": 64}
CS_NAME = re.compile(r"^leftImg8bit/(train|val)/([a-z]+)/\2_\d{6}_\d{6}_leftImg8bit\.png$")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, seed=3, cityscapes=CS, ade20k=ADE, archives=True)
    return root


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_cityscapes_layout_and_formats(sample):
    root = sample / "cityscapes"
    images = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit").rglob("*.png"))
    assert len(images) == CS["train"] + CS["val"]
    assert all(CS_NAME.match(p) for p in images), images
    for rel in images:
        image = Image.open(root / rel)
        assert image.mode == "RGB" and image.size == (CS["width"], CS["height"])
        gt = root / rel.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "")
        polygons = json.loads(gt.with_name(gt.name + "_gtFine_polygons.json").read_text())
        assert (polygons["imgWidth"], polygons["imgHeight"]) == (CS["width"], CS["height"])
        assert all(obj["label"] in name2label and len(obj["polygon"]) >= 3 for obj in polygons["objects"])
        for suffix, mode in (("labelIds", "L"), ("color", "RGBA"), ("instanceIds", "I;16")):
            png = Image.open(gt.with_name(f"{gt.name}_gtFine_{suffix}.png"))
            assert png.format == "PNG" and png.mode == mode and png.size == image.size


def test_cityscapes_pngs_are_what_cityscapesscripts_renders(sample, tmp_path):
    root = sample / "cityscapes"
    for json_path in sorted((root / "gtFine").rglob("*_gtFine_polygons.json"))[:3]:
        for encoding, suffix in (("ids", "labelIds"), ("color", "color")):
            expected = tmp_path / f"{encoding}.png"
            json2labelImg(str(json_path), str(expected), encoding)
            written = json_path.with_name(json_path.name.replace("polygons.json", f"{suffix}.png"))
            assert np.array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(expected)))


def test_cityscapes_scene_structure(sample):
    """Sky at the top, road at the bottom-centre, several classes, the ego vehicle on the last row."""
    ids = np.stack(
        [
            np.asarray(Image.open(p))
            for p in sorted((sample / "cityscapes" / "gtFine").rglob("*_labelIds.png"))
        ]
    )
    sky, road, ego = name2label["sky"].id, name2label["road"].id, name2label["ego vehicle"].id
    assert (ids[:, 0, :] == sky).mean() > 0.5
    assert (
        ids[:, int(0.85 * CS["height"]), CS["width"] // 2 - 4 : CS["width"] // 2 + 4] == road
    ).mean() > 0.5
    assert (ids[:, -1, :] == ego).all()
    assert all(len(np.unique(frame)) >= 6 for frame in ids)


def test_pixels_predict_classes(sample):
    """Learnable: a nearest-mean-colour classifier fit on train pixels labels val pixels well above
    chance (there are ~15 classes present)."""
    root = sample / "cityscapes"

    def pixels(split):
        xs, ys = [], []
        for path in sorted((root / "leftImg8bit" / split).rglob("*.png")):
            gt = (
                str(path)
                .replace("leftImg8bit", "gtFine", 1)
                .replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            )
            xs.append(np.asarray(Image.open(path), np.float32).reshape(-1, 3))
            ys.append(np.asarray(Image.open(gt)).reshape(-1))
        return np.concatenate(xs), np.concatenate(ys)

    x, y = pixels("train")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    xv, yv = pixels("val")
    pred = classes[np.argmin(((xv[:, None, :] - means[None]) ** 2).sum(-1), axis=1)]
    assert (pred == yv).mean() > 0.5


def test_ade20k_layout_and_formats(sample):
    top = sample / "ade20k" / "ADEChallengeData2016"
    for folder, prefix, count in (
        ("training", "ADE_train_", ADE["train"]),
        ("validation", "ADE_val_", ADE["val"]),
    ):
        images = sorted((top / "images" / folder).iterdir())
        assert [p.name for p in images] == [f"{prefix}{i:08d}.jpg" for i in range(1, count + 1)]
        for path in images:
            image = Image.open(path)
            annotation = Image.open(top / "annotations" / folder / path.name.replace(".jpg", ".png"))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert annotation.format == "PNG" and annotation.mode == "L" and annotation.size == image.size
            values = np.unique(np.asarray(annotation))
            assert values.max() <= 150 and len(values) >= 4


def test_archives_have_the_official_top_folders(sample):
    with zipfile.ZipFile(sample / "archives" / "cityscapes" / "leftImg8bit_trainvaltest.zip") as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
        assert len(names) == CS["train"] + CS["val"] and all(CS_NAME.match(n) for n in names)
    with zipfile.ZipFile(sample / "archives" / "cityscapes" / "gtFine_trainvaltest.zip") as zf:
        assert sum(n.startswith("gtFine/train/") and n.endswith("_polygons.json") for n in zf.namelist()) == 4
    with zipfile.ZipFile(sample / "archives" / "ade20k" / "ADEChallengeData2016.zip") as zf:
        names = zf.namelist()
        assert "ADEChallengeData2016/images/training/ADE_train_00000001.jpg" in names
        assert "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png" in names


def test_same_seed_same_bytes_other_seed_other_scenes(sample, tmp_path):
    generate_sample(tmp_path / "again", seed=3, cityscapes=CS, ade20k=ADE, archives=True)
    for part in ("cityscapes", "ade20k", "archives"):
        assert _digest(tmp_path / "again" / part) == _digest(sample / part)
    generate_sample(tmp_path / "other", seed=4, cityscapes=CS, ade20k=ADE)
    ours, theirs = _digest(sample / "cityscapes"), _digest(tmp_path / "other" / "cityscapes")
    assert ours.keys() == theirs.keys() and all(ours[k] != theirs[k] for k in ours)


def test_rerun_replaces_the_output_and_leaves_no_temp_folders(tmp_path):
    small = {"train": 1, "val": 1, "height": 32, "width": 64}
    generate_sample(tmp_path, seed=0, cityscapes={**small, "train": 2}, ade20k=small)
    generate_sample(tmp_path, seed=0, cityscapes=small, ade20k=small)
    assert len(list((tmp_path / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ade20k", "cityscapes"]


def test_bad_sample_spec_names_the_key():
    # The sample specs are validated with the rest of params.yaml (pipeline.config), before any stage runs.
    raw = read_raw(REPO / "params.yaml")
    raw["sample"]["cityscapes"] = {"train": 0, "val": 1}
    raw["sample"]["ade20k"] = dict(ADE)
    with pytest.raises(ConfigError, match=r"sample\.cityscapes\.train: expected a positive integer, got 0"):
        as_params(raw)
    raw["sample"]["cityscapes"] = dict(CS)
    raw["sample"]["ade20k"] = {**ADE, "depth": 3}
    with pytest.raises(ConfigError, match=r"sample\.ade20k\.depth: unknown key"):
        as_params(raw)
