"""ResNetV1c with dilated (D8) stages, as mmseg's ResNetV1c.

V1c = deep stem (three 3x3 convs instead of one 7x7) + stride on the 3x3 conv of the bottleneck.
Depth 18 uses mmseg's BasicBlock (two 3x3 convs, the first strided and dilated), 50 and 101 Bottlenecks.
D8 = stages 3 and 4 keep stride 8 and grow their receptive field by dilation instead (strides 1, 2, 1, 1,
dilations 1, 1, 2, 4; contract_dilation: the first block of a dilated stage uses half its dilation).
State-dict names follow mmseg (`stem.N`, `layerK.B.convI` / `bnI`, `downsample.0/1`) so the
ImageNet `resnet50_v1c` / `resnet101_v1c` weights and mmseg checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from components.learning.backbones import BOTTLENECK_FROM_DEPTH, STAGE_BLOCKS
from components.learning.models.conv_module import NormLayer, kaiming_init_


class BasicBlock(nn.Module):
    """mmseg's BasicBlock: the dilation sits on the first 3x3 conv only (mmseg ResNet, as its weights)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        # "pytorch" style: the stride sits on the 3x3 conv, not the first 1x1.
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        return self.bn3


def make_res_layer(block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, num_blocks: int, stride: int,
                   dilation: int, norm_layer: NormLayer, contract_dilation: bool = True) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            norm_layer(planes * block.expansion),
        )
    # contract_dilation: the first block of a dilated stage uses half the dilation (mmseg ResLayer).
    first_dilation = dilation // 2 if (dilation > 1 and contract_dilation) else dilation
    blocks = [block(inplanes, planes, stride, first_dilation, downsample, norm_layer)]
    inplanes = planes * block.expansion
    blocks += [block(inplanes, planes, 1, dilation, None, norm_layer) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class ResNetV1c(nn.Module):
    """Returns the outputs of the four stages (`out_channels`: 256/512/1024/2048 with Bottlenecks, 64/128/256/512
    with BasicBlocks; 1/4, 1/8, 1/8, 1/8 of the input for D8)."""

    def __init__(self, depth: int = 50, strides: tuple[int, ...] = (1, 2, 1, 1),
                 dilations: tuple[int, ...] = (1, 1, 2, 4), contract_dilation: bool = True,
                 norm_layer: NormLayer = nn.BatchNorm2d, zero_init_residual: bool = True):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        stem_channels = 64
        half = stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), norm_layer(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, bias=False), norm_layer(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, stem_channels, 3, padding=1, bias=False), norm_layer(stem_channels),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block = Bottleneck if depth >= BOTTLENECK_FROM_DEPTH else BasicBlock
        inplanes = stem_channels
        for i, num_blocks in enumerate(STAGE_BLOCKS[depth]):
            planes = 64 * 2**i
            layer = make_res_layer(block, inplanes, planes, num_blocks, strides[i], dilations[i], norm_layer,
                                   contract_dilation)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * block.expansion
        self.out_channels = tuple(64 * 2**i * block.expansion for i in range(4))
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # mmseg's init when no pretrained weights are given: Kaiming convs, BN weight 1 / bias 0,
        # and the last BN of each residual block zeroed so every one starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                kaiming_init_(m)   # no conv here has a bias
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_(m.last_norm().weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outs.append(x)
        return outs
