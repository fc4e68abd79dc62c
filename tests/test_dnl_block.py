"""The disentangled non-local block against hand-computed numbers and its formula: out = x + conv_out(y + u),
y = softmax(θ̂ᵀφ̂ / √256 / 0.05) · g (θ̂, φ̂ whitened: their mean over positions subtracted),
u = softmax(conv_mask(x)) · g broadcast over positions, one shared conv_out."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from components.learning.models.dnl import (
    DisentangledNonLocal2d,
    pairwise_attention_fused,
    pairwise_attention_naive,
    whiten,
)


def test_whiten_subtracts_the_per_image_per_channel_mean():
    x = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]],
                      [[0.0, 0.0, 6.0], [-1.0, 1.0, 3.0]]])  # N=2, C=2, L=3
    expected = torch.tensor([[[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
                             [[-2.0, -2.0, 4.0], [-2.0, 0.0, 2.0]]])
    torch.testing.assert_close(whiten(x), expected)


def _set_1x1(conv: nn.Conv2d, weight, bias=None):
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight, dtype=torch.float32).reshape(conv.weight.shape))
        if conv.bias is not None:
            conv.bias.zero_()
            if bias is not None:
                conv.bias.copy_(torch.tensor(bias, dtype=torch.float32))


@pytest.mark.parametrize("attention", ["naive", "fused"])
def test_two_position_example_by_hand(attention):
    # 2 input channels (a, b), inter channels 1 (sqrt(1) = 1), 2 positions; temperature 0.05.
    block = DisentangledNonLocal2d(2, reduction=2, temperature=0.05, attention=attention).eval()
    _set_1x1(block.theta.conv, [1.0, 0.0])  # theta = a
    _set_1x1(block.phi.conv, [1.0, 0.0])  # phi = a
    _set_1x1(block.g.conv, [0.0, 1.0])  # g = b
    _set_1x1(block.conv_mask, [0.0, 1.0], [0.0])  # unary logits = b
    _set_1x1(block.conv_out.conv, [1.0, 0.0])  # channel 0 receives y + u, channel 1 nothing
    bn = block.conv_out.bn
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    bn.eps = 0.0  # running mean 0 / var 1: BN is exactly the identity in eval

    a, b = [1.0, 1.1], [2.0, 4.0]
    x = torch.tensor([[[a], [b]]]).reshape(1, 2, 1, 2)
    # whitened a = (-0.05, 0.05); pairwise logits = a_i * a_j / 1 / 0.05 = +-0.05
    # row 0: softmax(0.05, -0.05) = (p, 1 - p) with p = sigmoid(0.1); row 1 mirrored.
    p = 1.0 / (1.0 + math.exp(-0.1))
    y = [p * 2.0 + (1 - p) * 4.0, (1 - p) * 2.0 + p * 4.0]
    # unary: softmax over positions of b = (2, 4), dotted with g = b
    s1 = math.exp(2.0) / (1.0 + math.exp(2.0))
    u = (1 - s1) * 2.0 + s1 * 4.0
    expected = torch.tensor([[a[0] + y[0] + u, a[1] + y[1] + u], b]).reshape(1, 2, 1, 2)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def _reference_dnl(x, wg, bg, wt, bt, wp, bp, wm, bm, wo, temperature, divisor=None):
    """That formula in float64 numpy (conv_out BN in its init-free form: plain 1x1 conv)."""
    n, c, h, w = x.shape
    xs = x.reshape(n, c, h * w)
    g = np.einsum("oc,ncl->nol", wg, xs) + bg[None, :, None]
    th = np.einsum("oc,ncl->nol", wt, xs) + bt[None, :, None]
    ph = np.einsum("oc,ncl->nol", wp, xs) + bp[None, :, None]
    th = th - th.mean(axis=2, keepdims=True)
    ph = ph - ph.mean(axis=2, keepdims=True)
    inter = g.shape[1]
    divisor = math.sqrt(inter) * temperature if divisor is None else divisor
    logits = np.einsum("ncl,ncm->nlm", th, ph) / divisor
    attn = np.exp(logits - logits.max(axis=2, keepdims=True))
    attn /= attn.sum(axis=2, keepdims=True)
    y = np.einsum("nlm,ncm->ncl", attn, g)
    mask = np.einsum("c,ncl->nl", wm, xs) + bm
    mask = np.exp(mask - mask.max(axis=1, keepdims=True))
    mask /= mask.sum(axis=1, keepdims=True)
    unary = np.einsum("nl,ncl->nc", mask, g)[:, :, None]
    out = xs + np.einsum("oc,ncl->nol", wo, y + unary)
    return out.reshape(n, c, h, w)


def _random_block(attention, seed=0):
    torch.manual_seed(seed)
    block = DisentangledNonLocal2d(512, attention=attention).eval()
    with torch.no_grad():
        # Larger theta/phi weights than the 0.01 init so the attention is far from uniform and a
        # wrong scale or temperature changes the result.
        block.theta.conv.weight.normal_(0, 0.05)
        block.phi.conv.weight.normal_(0, 0.05)
        block.theta.conv.bias.normal_(0, 1.0)  # removed by whitening
        block.phi.conv.bias.normal_(0, 1.0)
        block.g.conv.bias.normal_(0, 0.1)
        block.conv_out.conv.weight.normal_(0, 0.05)
        block.conv_out.bn.weight.fill_(1.0)
        block.conv_out.bn.bias.zero_()
    block.conv_out.bn.eps = 0.0
    return block


def _params(block):
    def np64(t):
        return t.detach().double().numpy()
    return (np64(block.g.conv.weight[:, :, 0, 0]), np64(block.g.conv.bias),
            np64(block.theta.conv.weight[:, :, 0, 0]), np64(block.theta.conv.bias),
            np64(block.phi.conv.weight[:, :, 0, 0]), np64(block.phi.conv.bias),
            np64(block.conv_mask.weight[0, :, 0, 0]), np64(block.conv_mask.bias)[0],
            np64(block.conv_out.conv.weight[:, :, 0, 0]))


@pytest.mark.parametrize("attention", ["naive", "fused"])
def test_matches_spec_formula_with_sqrt256_and_temperature(attention):
    block = _random_block(attention)
    x = torch.randn(2, 512, 4, 6)
    with torch.no_grad():
        out = block(x).double().numpy()
    params = _params(block)
    expected = _reference_dnl(x.double().numpy(), *params, temperature=0.05)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # The test can tell the scale apart: dividing by sqrt(256) only (no temperature) is far off.
    wrong = _reference_dnl(x.double().numpy(), *params, temperature=0.05, divisor=16.0)
    assert np.abs(wrong - expected).max() > 1e-2


def test_block_is_identity_at_init():
    block = DisentangledNonLocal2d(512).eval()
    x = torch.randn(1, 512, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    assert block.inter_channels == 256
    assert block.g.conv.bias is not None and block.conv_out.conv.bias is None


def test_fused_equals_naive_functions():
    torch.manual_seed(0)
    n, length, c = 2, 1536, 256
    q, k, v = (torch.randn(n, length, c) for _ in range(3))
    q = q * 0.3  # logits of order 10: a peaked softmax, a stringent comparison
    naive = pairwise_attention_naive(q, k, v, 16.0, 0.05)
    fused = pairwise_attention_fused(q, k, v, 16.0, 0.05)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5 * naive.abs().max().item())


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_block_equals_naive_block(channels_last):
    naive, fused = _random_block("naive"), _random_block("fused")
    x = torch.randn(2, 512, 16, 24)
    if channels_last:
        naive = naive.to(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = naive(x) - x, fused(x) - x  # compare the block's contribution, not the residual input
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_block_uses_the_flash_kernel_not_the_math_fallback(channels_last):
    # On CPU the only memory-efficient SDPA kernel is flash; restricting to it raises if the inputs
    # would make torch fall back to the math kernel (which builds the L×L map).
    block = _random_block("fused").train()
    block.conv_out.bn.eps = 1e-5  # training-mode BN refuses eps 0
    x = torch.randn(1, 512, 8, 16, requires_grad=True)
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        block(x).sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block(x).float().sum().backward()
    assert x.grad is not None


def test_fused_attention_memory_is_linear_in_length():
    # L = 16,384: a materialised fp32 L×L map would be 1 GiB. Peak RSS in a fresh process.
    code = (
        "import resource, torch\n"
        "from components.learning.models.dnl import pairwise_attention_fused\n"
        # N×L×C views of N×C×L tensors, as the block makes them from NCHW features
        "q, k, v = (torch.randn(1, 256, 16384).transpose(1, 2) for _ in range(3))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with torch.no_grad():\n"
        "    pairwise_attention_fused(q, k, v, 16.0, 0.05)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    grown_mib = int(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 200, f"fused attention grew RSS by {grown_mib} MiB at L=16384"
