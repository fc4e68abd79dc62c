"""Procedural sample datasets in the exact official on-disk formats (Cityscapes gtFine, ADE20K), and
their official zip archives. Deterministic for a given seed.

Only the `sample` stage uses this package: it lives outside components/learning/data (a dependency of every
training stage), and nothing in components/learning/data, components/training or components/learning/models imports it.

Modules:
  draw        Canvas, textures, polygons: one scene painted into an image, pixel-exact with its labels
  cityscapes  street scenes, written as leftImg8bit/ + gtFine/ (labels made by cityscapesscripts)
  ade20k      rooms and outdoor views, written as ADEChallengeData2016/
  archives    the official zip archives of both
"""

from pathlib import Path

from components.sample.ade20k import write_ade20k
from components.sample.archives import write_ade20k_archive, write_cityscapes_archives, write_zip
from components.sample.cityscapes import write_cityscapes

# The datasets this package can generate (params.yaml `sample:` has one entry each).
SAMPLE_DATASETS = ("cityscapes", "ade20k")

__all__ = ["SAMPLE_DATASETS", "generate_sample", "write_ade20k", "write_ade20k_archive", "write_cityscapes",
           "write_cityscapes_archives", "write_zip"]


def generate_sample(out_root: Path, seed: int, cityscapes: dict, ade20k: dict, archives: bool = False) -> None:
    """Write the generated sample datasets in their official layouts:
    `out_root/cityscapes/{leftImg8bit,gtFine}/...` and `out_root/ade20k/ADEChallengeData2016/...`.
    cityscapes: {train, val, height, width, cities (optional: a list, or {split: list})};
    ade20k: {train, val, height, width}. archives=True also writes the official zip archives under
    `out_root/archives/{cityscapes,ade20k}/`."""
    out_root = Path(out_root)
    write_cityscapes(out_root / "cityscapes", seed, train=cityscapes["train"], val=cityscapes["val"],
                     height=cityscapes.get("height", 256), width=cityscapes.get("width", 512),
                     cities=cityscapes.get("cities"))
    write_ade20k(out_root / "ade20k", seed, train=ade20k["train"], val=ade20k["val"],
                 height=ade20k.get("height", 256), width=ade20k.get("width", 256))
    if archives:
        write_cityscapes_archives(out_root / "cityscapes", out_root / "archives" / "cityscapes")
        write_ade20k_archive(out_root / "ade20k", out_root / "archives" / "ade20k")
