"""Inference-only rewrites of a trained DNLNet: BatchNorm folded into the preceding convolution.

In eval mode BN is the affine map y = gamma * (x - mean) / sqrt(var + eps) + beta, so conv -> BN is
one conv with W' = W * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps). Folding removes
one full read and write of every feature map per conv (there are 70 conv+BN pairs in R-50-D8).
The folded copy has a different state_dict (no `bn.*` keys): use it for inference, never save it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from components.learning.models.conv_module import ConvModule
from components.learning.models.resnet import Bottleneck


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """A new conv equal to bn(conv(x)) in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm: a BatchNorm without running statistics cannot be folded")
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    folded = copy.deepcopy(conv)
    folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    folded.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
    return folded


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A copy of `model` (in eval mode) with every conv -> BN pair of the DNLNet modules folded; with
    inplace, `model` itself (for a model loaded only to run inference: no second copy of the weights).

    The pairs are the ones the forward passes really chain: ConvModule.conv/bn, Bottleneck.convK/bnK
    and adjacent Conv2d, BN in an nn.Sequential (the stem and the downsample branches).
    """
    folded = (model if inplace else copy.deepcopy(model)).eval()
    for module in folded.modules():
        if isinstance(module, ConvModule) and isinstance(module.bn, _BatchNorm):
            module.conv, module.bn = fold_conv_bn(module.conv, module.bn), None
        elif isinstance(module, Bottleneck):
            for k in (1, 2, 3):
                conv, bn = getattr(module, f"conv{k}"), getattr(module, f"bn{k}")
                if isinstance(bn, _BatchNorm):
                    setattr(module, f"conv{k}", fold_conv_bn(conv, bn))
                    setattr(module, f"bn{k}", nn.Identity())
        elif isinstance(module, nn.Sequential):
            children = list(module)
            for i in range(len(children) - 1):
                if isinstance(children[i], nn.Conv2d) and isinstance(children[i + 1], _BatchNorm):
                    module[i] = fold_conv_bn(children[i], children[i + 1])
                    module[i + 1] = nn.Identity()
    return folded
