"""The backbones of the results table, declared once: name (as the table writes it) and ResNet depth.
Their ImageNet weights are a setting, params.yaml's `train.pretrained.<name>`.

Every one is a ResNetV1c-D8 (deep stem, dilations 1, 1, 2, 4, contract_dilation), built by
`components.models.build_dnlnet(depth=...)`. Adding one is an entry here plus its tests. (Outside
components/models so that reading the config does not import torch.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Bottleneck blocks per stage of each ResNet depth (components/models/resnet.py builds them).
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class Backbone:
    name: str        # e.g. "R-50-D8", the table's Backbone column
    depth: int       # ResNet depth: STAGE_BLOCKS[depth] blocks per stage


BACKBONES = {b.name: b for b in (
    Backbone("R-50-D8", 50),
    Backbone("R-101-D8", 101),
)}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"backbone: expected one of {', '.join(BACKBONES)}, got {name!r}")
    return BACKBONES[name]


def backbone_of_weights(state_dict: dict, prefix: str = "backbone.") -> Backbone:
    """The backbone whose block counts the weights have (layer3: 6 blocks in R-50, 23 in R-101)."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}layer3\.(\d+)\.", k))}
    for backbone in BACKBONES.values():
        if len(blocks) == STAGE_BLOCKS[backbone.depth][2]:
            return backbone
    known = ", ".join(f"{STAGE_BLOCKS[b.depth][2]} ({b.name})" for b in BACKBONES.values())
    raise ValueError(f"{prefix}layer3 has {len(blocks)} blocks; expected {known}")
