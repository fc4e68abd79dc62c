"""conv -> norm -> ReLU block with mmcv ConvModule's submodule names and init.

Names matter: mmseg checkpoints store `<name>.conv.weight` and `<name>.bn.*`, so the submodules are
called `conv` and `bn` (mmcv names a BatchNorm / SyncBatchNorm layer `bn`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


def kaiming_init_(conv: nn.Conv2d) -> None:
    """mmcv's kaiming_init defaults: normal, fan_out, relu gain, bias 0."""
    # A model built on the meta device (the preflight's size check) has no values to draw; torch would
    # route normal_ there through a decomposition that imports torch._dynamo (1.6 s of each driver).
    if conv.weight.is_meta:
        return
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def normal_init_(conv: nn.Conv2d, std: float = 0.01) -> None:
    if conv.weight.is_meta:   # as in kaiming_init_
        return
    nn.init.normal_(conv.weight, mean=0.0, std=std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvModule(nn.Module):
    """Conv2d, optional norm, optional ReLU.

    As mmcv's bias='auto': the conv has a bias only when there is no norm (a norm's shift makes it
    redundant). Without a norm there is no `bn` submodule at all, so no `bn.*` keys.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, norm_layer: NormLayer | None = None,
                 activation: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=norm_layer is None)
        self.bn = norm_layer(out_channels) if norm_layer is not None else None
        self.activate = nn.ReLU(inplace=True) if activation else None
        kaiming_init_(self.conv)
        if self.bn is not None:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
