"""FCNHead used as the auxiliary head on stage 3 (training only)."""

from __future__ import annotations

import torch
from torch import nn

from components.learning.models.conv_module import ConvModule, NormLayer, normal_init_


class FCNHead(nn.Module):
    """`num_convs` 3x3 ConvModules -> Dropout2d -> conv_seg (no input concat, as the aux config)."""

    def __init__(self, in_channels: int = 1024, channels: int = 256, num_classes: int = 19,
                 num_convs: int = 1, dropout: float = 0.1, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        convs = [ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1,
                            norm_layer=norm_layer) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        normal_init_(self.conv_seg, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))
