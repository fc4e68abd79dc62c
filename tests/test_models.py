"""DNLNet structure (mmseg key layout), forward shapes, losses, memory formats and dtypes."""

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from components.learning.models import build_dnlnet
from components.learning.models.resnet import ResNetV1c
from components.learning.models.segmentor import DNLNet

# The state_dict of mmseg 1.2.2's
# dnlnet_r50-d8 Cityscapes model (name, shape, dtype per line).
KEY_FILE = Path(__file__).parent / "data" / "mmseg-dnl-r50-d8-keys.txt"


def _read_key_file():
    keys, total = {}, None
    for line in KEY_FILE.read_text().splitlines():
        if line.startswith("#"):
            total = int(re.search(r"(\d+) floating-point elements", line).group(1))
        elif line.strip():
            name, shape, dtype = line.split("\t")
            keys[name] = (shape, dtype)
    return keys, total


def _layout(model):
    return {k: (str(tuple(v.shape)), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return build_dnlnet(depth=50, num_classes=19)


def test_r50_state_dict_equals_mmseg_key_file(r50):
    expected, total = _read_key_file()
    layout = _layout(r50)
    assert sorted(layout) == sorted(expected)
    assert {k: v for k, v in layout.items() if expected[k] != v} == {}
    assert len(layout) == 372
    assert sum(v.numel() for v in r50.state_dict().values() if v.is_floating_point()) == total


def test_r101_has_678_keys_with_23_blocks_in_layer3():
    expected, _ = _read_key_file()
    # R-101 = R-50 plus layer3 blocks 6..22, each shaped like layer3.5.
    block5 = {k: v for k, v in expected.items() if k.startswith("backbone.layer3.5.")}
    for i in range(6, 23):
        expected.update({k.replace("layer3.5.", f"layer3.{i}."): v for k, v in block5.items()})
    layout = _layout(build_dnlnet(depth=101))
    assert len(layout) == 678
    assert layout == expected


def test_parameter_counts_match_the_spec(r50):
    n50 = sum(p.numel() for p in r50.parameters())
    n101 = sum(p.numel() for p in build_dnlnet(depth=101).parameters())
    assert abs(n50 / 1e6 - 50.0) < 0.1, n50
    assert abs(n101 / 1e6 - 69.0) < 0.1, n101


def test_backbone_d8_strides_dilations_and_stage_shapes(r50):
    bb = r50.backbone
    # pytorch style: stride on the 3x3 conv; D8: stage 2 strides, stages 3/4 dilate 2/4 with the
    # first block contracted to 1/2; padding = dilation.
    assert bb.layer2[0].conv2.stride == (2, 2) and bb.layer2[0].conv1.stride == (1, 1)
    assert [b.conv2.dilation[0] for b in bb.layer3] == [1, 2, 2, 2, 2, 2]
    assert [b.conv2.dilation[0] for b in bb.layer4] == [2, 4, 4]
    assert all(b.conv2.padding == b.conv2.dilation for layer in (bb.layer3, bb.layer4) for b in layer)
    assert all(b.conv2.stride == (1, 1) for layer in (bb.layer3, bb.layer4) for b in layer)
    assert bb.layer3[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        outs = bb.eval()(torch.randn(1, 3, 64, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 32), (1, 512, 8, 16), (1, 1024, 8, 16),
                                              (1, 2048, 8, 16)]


def test_r18_basic_blocks_and_heads_of_mmseg_r18_d8_configs():
    """R-18-D8 (the orchestration tests' backbone): mmseg's ResNetV1c-18 (BasicBlocks conv1 / conv2, the
    dilation on conv1, D8 strides as R-50's), the heads a quarter as wide as their 512 / 256 inputs (mmseg's
    `*_r18-d8` configs: decode 512 -> 128, aux 256 -> 64); its state dict names are R-50's but for the
    blocks (parity with mmseg itself: tests/test_parity_mmseg.py)."""
    torch.manual_seed(0)
    model = build_dnlnet(depth=18, num_classes=19)
    bb = model.backbone
    assert bb.out_channels == (64, 128, 256, 512) and [len(getattr(bb, f"layer{i}")) for i in range(1, 5)] == [2] * 4
    assert bb.layer2[0].conv1.stride == (2, 2) and bb.layer2[0].conv2.stride == (1, 1)
    assert [b.conv1.dilation[0] for b in (*bb.layer3, *bb.layer4)] == [1, 2, 2, 4]   # first block contracted
    assert all(b.conv2.dilation == (1, 1) for layer in (bb.layer3, bb.layer4) for b in layer)
    assert all(b.conv1.padding == b.conv1.dilation for layer in (bb.layer3, bb.layer4) for b in layer)
    layout = _layout(model)
    assert layout["decode_head.convs.0.conv.weight"][0] == "(128, 512, 3, 3)"
    assert layout["decode_head.conv_cat.conv.weight"][0] == "(128, 640, 3, 3)"
    assert layout["auxiliary_head.convs.0.conv.weight"][0] == "(64, 256, 3, 3)"
    expected, _ = _read_key_file()
    heads = {k for k in expected if not k.startswith("backbone.layer")}
    assert heads == {k for k in layout if not k.startswith("backbone.layer")}
    assert not any(".conv3." in k or ".bn3." in k for k in layout)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 12.86) < 0.01
    with torch.no_grad():
        outs = bb.eval()(torch.randn(1, 3, 64, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 32), (1, 128, 8, 16), (1, 256, 8, 16), (1, 512, 8, 16)]
    # Every residual block starts as the identity (its last BN zeroed), as the bottlenecks do.
    assert all(b.bn2.weight.abs().max() == 0 for layer in (bb.layer1, bb.layer4) for b in layer)


@pytest.fixture(scope="module")
def small():
    """R-50 with 5 classes and a conv_seg scaled up (the 0.01 init gives near-zero logits, which
    would make any closeness test trivially pass)."""
    torch.manual_seed(0)
    model = build_dnlnet(depth=50, num_classes=5).eval()
    with torch.no_grad():
        model.decode_head.conv_seg.weight.normal_(0, 1.0)
        model.decode_head.dnl_block.conv_out.bn.weight.fill_(1.0)  # make the DNL block non-identity
    return model


@pytest.mark.parametrize("size", [(32, 64), (29, 45)])
def test_encode_decode_returns_logits_at_the_input_size(small, size):
    with torch.no_grad():
        logits = small.encode_decode(torch.randn(1, 3, *size))
    assert logits.shape == (1, 5, *size) and logits.dtype == torch.float32


def test_fused_and_naive_models_agree(small):
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        fused = small.encode_decode(x)
        small.decode_head.dnl_block.attention = "naive"
        try:
            naive = small.encode_decode(x)
        finally:
            small.decode_head.dnl_block.attention = "fused"
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5 * naive.abs().max().item())


def test_channels_last_and_bf16_stay_close_to_fp32(small):
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        ref = small.encode_decode(x)
        model_cl = small.to(memory_format=torch.channels_last)
        try:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            cl = model_cl.encode_decode(x_cl)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model_cl.encode_decode(x_cl)
        finally:
            small.to(memory_format=torch.contiguous_format)
    scale = ref.abs().max().item()
    assert (cl - ref).abs().max().item() < 1e-4 * scale
    assert bf16.dtype == torch.float32
    assert (bf16 - ref).abs().max().item() < 0.05 * scale
    assert (bf16.argmax(1) == ref.argmax(1)).float().mean().item() > 0.95


def test_initial_training_loss_is_log_num_classes():
    # conv_seg ~ N(0, 0.01) gives near-uniform softmax: per-pixel CE ~ ln(C) on every valid pixel,
    # and mmseg's default reduction divides by all pixels (a quarter of them ignored here).
    torch.manual_seed(0)
    model = build_dnlnet(depth=50, num_classes=5).train()
    label = torch.randint(0, 5, (2, 32, 64))
    label[:, :8] = 255
    out = model(torch.randn(2, 3, 32, 64), label)
    assert set(out) == {"loss", "decode_loss", "aux_loss"}
    assert out["decode_loss"].item() == pytest.approx(math.log(5) * 0.75, rel=0.01)
    assert out["aux_loss"].item() == pytest.approx(math.log(5) * 0.75, rel=0.01)
    assert out["loss"].item() == pytest.approx(out["decode_loss"].item() + 0.4 * out["aux_loss"].item())
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []  # every parameter is used: DDP needs no find_unused_parameters


def test_avg_non_ignore_reaches_the_loss():
    model = DNLNet(_Features(), _FixedLogits(torch.zeros(1, 2, 2, 2)), None, avg_non_ignore=True)
    label = torch.ones(1, 2, 2, dtype=torch.long)
    label[0, 0] = 255
    out = model.forward_train(torch.zeros(1, 3, 2, 2), label)
    assert out["decode_loss"].item() == pytest.approx(math.log(2), rel=1e-6)  # not ln(2) / 2
    assert out["loss"].item() == out["decode_loss"].item() and out["aux_loss"].item() == 0.0


class _Features(nn.Module):
    def forward(self, x):
        return [x, x, x, x]


class _FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits


@pytest.mark.parametrize("align_corners", [True, False])
def test_logits_are_upsampled_to_the_label_before_the_loss(align_corners):
    # Class-0 logits (0, 3) along the width, class 1 zero; 2x2 -> 4x4, every label = 1, so a pixel
    # with class-0 logit v costs ln(1 + e^v). Bilinear 2 -> 4 gives v = 0, 1, 2, 3 with
    # align_corners, else sample points -0.25, 0.25, 0.75, 1.25 (clamped) -> 0, 0.75, 2.25, 3.
    decode = torch.zeros(1, 2, 2, 2)
    decode[0, 0, :, 1] = 3.0
    values = [0, 1, 2, 3] if align_corners else [0, 0.75, 2.25, 3]
    decode_loss = sum(math.log(1 + math.exp(v)) for v in values) / 4
    model = DNLNet(_Features(), _FixedLogits(decode), _FixedLogits(torch.zeros(1, 2, 2, 2)),
                   align_corners=align_corners, aux_weight=0.25)
    out = model.forward_train(torch.zeros(1, 3, 4, 4), torch.ones(1, 4, 4, dtype=torch.long))
    assert out["decode_loss"].item() == pytest.approx(decode_loss, rel=1e-6)
    assert out["aux_loss"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert out["loss"].item() == pytest.approx(decode_loss + 0.25 * math.log(2), rel=1e-6)


def test_sync_batchnorm_conversion_keeps_the_names(r50):
    import copy

    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(r50))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert _layout(converted) == _layout(r50)


def test_norm_layer_argument_is_used():
    model = ResNetV1c(depth=50, norm_layer=lambda c: nn.GroupNorm(1, c))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="attention"):
        build_dnlnet(attention="flash")
    with pytest.raises(ValueError, match="depth"):
        build_dnlnet(depth=34)
