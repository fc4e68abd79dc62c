"""Disentangled non-local block and DNLHead (Yin et al., ECCV 2020; mmseg's dnl_head.py).

The block splits the non-local attention into
  pairwise: softmax over keys of whitened(theta)^T whitened(phi) / sqrt(C) / temperature, times g(x)
  unary:    softmax over positions of conv_mask(x), times g(x) (one vector per image, broadcast)
and adds conv_out(pairwise + unary) to the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.learning.models.conv_module import ConvModule, NormLayer, normal_init_

ATTENTION_MODES = ("naive", "fused")


def whiten(x: torch.Tensor) -> torch.Tensor:
    """Subtract each image's per-channel mean over the positions: N×C×L -> N×C×L."""
    return x - x.mean(dim=-1, keepdim=True)


def pairwise_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_divisor: float,
                             temperature: float) -> torch.Tensor:
    """Reference math (as mmseg): materialises the N×L×L map. q, k, v: N×L×C -> N×L×C."""
    weight = torch.matmul(q, k.transpose(1, 2))
    # In place, as mmseg: at L = 32,768 each fp32 copy of the map is 4 GiB.
    weight /= scale_divisor
    weight /= temperature
    # Softmax in fp32 even under bf16 autocast.
    weight = weight.softmax(dim=-1, dtype=torch.float32)
    return torch.matmul(weight.to(v.dtype), v)


def pairwise_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_divisor: float,
                             temperature: float) -> torch.Tensor:
    """Same math through scaled_dot_product_attention: memory linear in L.

    On CPU the flash kernel is only chosen for contiguous 4-D inputs; a strided (transposed) view
    silently falls back to the math kernel, which builds the full L×L map (measured: +9 GiB at
    L=32,768). Hence the explicit .contiguous() and the head dimension of 1.
    """
    q, k, v = (t.unsqueeze(1).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / (scale_divisor * temperature))
    return out.squeeze(1)


class DisentangledNonLocal2d(nn.Module):
    def __init__(self, in_channels: int, reduction: int = 2, temperature: float = 0.05,
                 norm_layer: NormLayer = nn.BatchNorm2d, attention: str = "fused"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.in_channels = in_channels
        self.inter_channels = max(in_channels // reduction, 1)
        self.temperature = temperature
        self.attention = attention
        inter = self.inter_channels
        self.g = ConvModule(in_channels, inter, 1, activation=False)
        self.theta = ConvModule(in_channels, inter, 1, activation=False)
        self.phi = ConvModule(in_channels, inter, 1, activation=False)
        self.conv_out = ConvModule(inter, in_channels, 1, norm_layer=norm_layer, activation=False)
        # Plain conv with PyTorch's default init (mmseg does not re-initialise it).
        self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1)
        for m in (self.g, self.theta, self.phi):
            normal_init_(m.conv, std=0.01)
        # gamma = beta = 0: the block starts as the identity.
        nn.init.zeros_(self.conv_out.bn.weight)
        nn.init.zeros_(self.conv_out.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c = self.inter_channels
        # flatten (not view): works for channels_last too.
        g_x = self.g(x).flatten(2).transpose(1, 2)  # N×L×C
        theta_x = whiten(self.theta(x).flatten(2)).transpose(1, 2)  # N×L×C
        phi_x = whiten(self.phi(x).flatten(2)).transpose(1, 2)  # N×L×C
        attend = pairwise_attention_fused if self.attention == "fused" else pairwise_attention_naive
        y = attend(theta_x, phi_x, g_x, math.sqrt(c), self.temperature)  # N×L×C
        # Back to x's memory format (mmseg makes y contiguous NCHW); keeps every conv in one layout.
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        y = y.transpose(1, 2).reshape(n, c, h, w).contiguous(memory_format=layout)

        unary_mask = self.conv_mask(x).reshape(n, 1, h * w).softmax(dim=-1, dtype=torch.float32)
        unary = torch.matmul(unary_mask.to(g_x.dtype), g_x)  # N×1×C
        unary = unary.transpose(1, 2).reshape(n, c, 1, 1)

        # One shared conv_out over the sum (not conv_out(y) + conv_out(unary)).
        return x + self.conv_out(y + unary)


class DNLHead(nn.Module):
    """convs.0 -> dnl_block -> convs.1 -> conv_cat(concat[input, out]) -> dropout -> conv_seg."""

    def __init__(self, in_channels: int = 2048, channels: int = 512, num_classes: int = 19,
                 dropout: float = 0.1, temperature: float = 0.05, norm_layer: NormLayer = nn.BatchNorm2d,
                 attention: str = "fused"):
        super().__init__()
        self.convs = nn.Sequential(
            ConvModule(in_channels, channels, 3, padding=1, norm_layer=norm_layer),
            ConvModule(channels, channels, 3, padding=1, norm_layer=norm_layer),
        )
        self.dnl_block = DisentangledNonLocal2d(channels, reduction=2, temperature=temperature,
                                                norm_layer=norm_layer, attention=attention)
        # concat_input=True (inherited from FCNHead in mmseg): the head's input joins the output.
        self.conv_cat = ConvModule(in_channels + channels, channels, 3, padding=1, norm_layer=norm_layer)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        normal_init_(self.conv_seg, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        out = self.dnl_block(out)
        out = self.convs[1](out)
        out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))
