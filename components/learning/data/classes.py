"""What every dataset shares: the ignore label and mmseg's image normalisation. Class names and
palettes are declared with each dataset (components/learning/data/datasets/)."""

from __future__ import annotations

IGNORE_INDEX = 255
# mmseg's image normalisation (RGB, 0..255 scale) for both datasets.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
