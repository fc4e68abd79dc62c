"""Datasets: the sample generator, Cityscapes / ADE20K preparation, transforms and loaders.

Modules (import what you need; this package import stays light, no torch / albumentations):
  classes     class names and palettes (Cityscapes 19, ADE20K 150 in mmseg order)
  sample      procedural sample datasets in the official on-disk formats
  cityscapes  / ade20k   pairs and label conversion of each dataset
  io          folder / zip-archive sources, links, atomic writes
  validate    DataError and the file checks
  transforms  mmseg's train / test pipelines (albumentations)
  dataset     SegmentationDataset and build_loader (torch)
"""

from components.data.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    class_names,
    palette,
)
from components.data.validate import DataError

__all__ = [
    "ADE20K_CLASSES", "ADE20K_PALETTE", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "IGNORE_INDEX",
    "DataError", "class_names", "palette",
]
