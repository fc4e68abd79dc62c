"""The backbones, declared once: name (as the table writes it) and ResNet depth. R-50-D8 and R-101-D8
are the results table's; R-18-D8 (BasicBlocks, 512/256 channels into the heads, as mmseg's `*_r18-d8`
configs) is ~4x cheaper to train and what the orchestration tests and the learning check use. Their
ImageNet weights are a setting, params.yaml's `train.pretrained.<name>`.

Every one is a ResNetV1c-D8 (deep stem, dilations 1, 1, 2, 4, contract_dilation), built by
`components.learning.models.build_dnlnet(depth=...)`, the heads' widths derived from the backbone's. Adding one
is an entry here (and in STAGE_BLOCKS) plus its tests. (Outside components/learning/models so that reading the
config does not import torch.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Blocks per stage of each ResNet depth (components/learning/models/resnet.py builds them): BasicBlocks (two 3x3
# convs) below depth 50, Bottlenecks (1x1, 3x3, 1x1 with 4x the width out) from 50 on, as torchvision / mmseg.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BOTTLENECK_FROM_DEPTH = 50


@dataclass(frozen=True)
class Backbone:
    name: str        # e.g. "R-50-D8", the table's Backbone column
    depth: int       # ResNet depth: STAGE_BLOCKS[depth] blocks per stage


BACKBONES = {b.name: b for b in (
    Backbone("R-50-D8", 50),
    Backbone("R-101-D8", 101),
    Backbone("R-18-D8", 18),
)}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"backbone: expected one of {', '.join(BACKBONES)}, got {name!r}")
    return BACKBONES[name]


def backbone_of_weights(state_dict: dict, prefix: str = "backbone.") -> Backbone:
    """The backbone whose block counts the weights have (layer3: 2 blocks in R-18, 6 in R-50, 23 in R-101)."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}layer3\.(\d+)\.", k))}
    for backbone in BACKBONES.values():
        if len(blocks) == STAGE_BLOCKS[backbone.depth][2]:
            return backbone
    known = ", ".join(f"{STAGE_BLOCKS[b.depth][2]} ({b.name})" for b in BACKBONES.values())
    raise ValueError(f"{prefix}layer3 has {len(blocks)} blocks; expected {known}")
