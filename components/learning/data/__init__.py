"""Datasets: the registered datasets' readers, transforms and loaders.

Modules (import what you need; this package import stays light, no torch / albumentations):
  datasets    the registry: one module per dataset (classes, palette, official layout, labels)
  classes     what all datasets share: ignore label, normalisation
  io          folder / zip-archive sources, links (atomic files and folders: components.atomic)
  validate    DataError and the file checks
  transforms  mmseg's train / test pipelines (albumentations)
  dataset     SegmentationDataset and build_loader (torch)

The sample generator is components.sample, outside this package (only the sample stage runs it).
"""

from components.learning.data.classes import IGNORE_INDEX
from components.learning.data.datasets import DatasetSpec, dataset_names, get_dataset
from components.learning.data.validate import DataError

__all__ = ["IGNORE_INDEX", "DataError", "DatasetSpec", "dataset_names", "get_dataset"]
