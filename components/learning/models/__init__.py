"""DNLNet (ResNetV1c-D8 + DNLHead + FCN aux head) with mmseg 1.2.2's math and state-dict names."""

from __future__ import annotations

from torch import nn

from components.learning.models.conv_module import NormLayer
from components.learning.models.dnl import ATTENTION_MODES, DisentangledNonLocal2d, DNLHead
from components.learning.models.fcn import FCNHead
from components.learning.models.resnet import ResNetV1c
from components.learning.models.segmentor import DNLNet

__all__ = ["ATTENTION_MODES", "DNLHead", "DNLNet", "DisentangledNonLocal2d", "FCNHead", "ResNetV1c",
           "build_dnlnet"]


def build_dnlnet(depth: int = 50, num_classes: int = 19, align_corners: bool = False,
                 attention: str = "fused", avg_non_ignore: bool = False, aux_weight: float = 0.4,
                 dropout: float = 0.1, norm_layer: NormLayer = nn.BatchNorm2d) -> DNLNet:
    """The dnlnet_r{18,50,101}-d8 model of mmseg's configs. `attention`: "naive" (reference math,
    L×L map in memory) or "fused" (scaled_dot_product_attention, memory linear in L). The heads read the
    last two stages (2048 / 1024 channels for R-50 and R-101, 512 / 256 for R-18) and are a quarter as
    wide (512 / 256, or 128 / 64: mmseg's r18-d8 configs)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    backbone = ResNetV1c(depth=depth, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True,
                         norm_layer=norm_layer)
    aux_in, decode_in = backbone.out_channels[2:]
    decode_head = DNLHead(in_channels=decode_in, channels=decode_in // 4, num_classes=num_classes, dropout=dropout,
                          temperature=0.05, norm_layer=norm_layer, attention=attention)
    auxiliary_head = FCNHead(in_channels=aux_in, channels=aux_in // 4, num_classes=num_classes, num_convs=1,
                             dropout=dropout, norm_layer=norm_layer)
    return DNLNet(backbone, decode_head, auxiliary_head, align_corners=align_corners,
                  avg_non_ignore=avg_non_ignore, aux_weight=aux_weight)
