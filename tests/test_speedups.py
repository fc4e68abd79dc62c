"""BN folding against the BN formula by hand and against the unfolded network; the autocast switch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from components.learning.models import build_dnlnet
from components.learning.models.fold import fold_batchnorm, fold_conv_bn
from components.learning.models.speedups import (
    autocast,
    fp32_math,
    native_bf16_cpu,
    prepare_for_inference,
    slow_precision_warning,
    use_precision,
)


def test_fold_conv_bn_matches_the_bn_formula_by_hand():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    bn = nn.BatchNorm2d(1, eps=1e-5).eval()
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.weight.fill_(3.0)
        bn.bias.fill_(1.0)
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(3.0)
    folded = fold_conv_bn(conv, bn)
    # y = 3 * (2x - 0.5) / sqrt(3 + 1e-5) + 1
    s = 3.0 / math.sqrt(3.0 + 1e-5)
    assert folded.weight.item() == pytest.approx(2.0 * s, rel=1e-6)
    assert folded.bias.item() == pytest.approx(-0.5 * s + 1.0, rel=1e-6)
    x = torch.tensor([[[[-1.0, 0.0], [2.0, 7.5]]]])
    expected = s * (2 * x - 0.5) + 1
    assert torch.allclose(folded(x), expected, rtol=1e-6)
    assert conv.bias is None and conv.weight.item() == 2.0   # the original conv is untouched


def test_fold_conv_bn_keeps_an_existing_conv_bias():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 2, 5, 6)
    assert torch.allclose(fold_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-6)


def randomized_dnlnet(seed: int = 0) -> nn.Module:
    """Non-trivial BN: random gamma / beta / running statistics everywhere, conv_out's gamma non-zero."""
    torch.manual_seed(seed)
    model = build_dnlnet(depth=50, num_classes=5).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        for block in model.backbone.modules():   # keep the residual stream O(1) over 16 blocks
            if hasattr(block, "bn3"):
                block.bn3.weight.mul_(0.3)
    return model


def test_folded_network_equals_the_original_and_has_no_bn_left():
    model = randomized_dnlnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    # R-50-D8: 3 stem + 4 downsample + 16 blocks x 3 in the backbone, 4 in the DNL head, 1 in the FCN head.
    assert sum(isinstance(m, _BatchNorm) for m in model.modules()) == 3 + 4 + 48 + 4 + 1
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, out = model.encode_decode(x), folded.encode_decode(x)
        aux_ref = model.auxiliary_head(model.extract_feat(x)[2])
        aux_out = folded.auxiliary_head(folded.extract_feat(x)[2])
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert (aux_out - aux_ref).norm() / aux_ref.norm() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # original untouched


def test_prepare_for_inference_is_eval_mode_and_channels_last():
    model = randomized_dnlnet().train()
    ready = prepare_for_inference(model, channels_last=True, fold_bn=True)
    assert not ready.training and model.training
    assert ready.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    unfolded = prepare_for_inference(model, channels_last=False, fold_bn=False)
    assert unfolded is model and not model.training


@pytest.fixture
def restore_fp32_math():
    """use_precision sets process-wide flags: put torch's own defaults back after the test."""
    before = fp32_math()
    yield
    torch.backends.cudnn.conv.fp32_precision = before["conv"]
    torch.backends.cuda.matmul.fp32_precision = before["matmul"]


@pytest.mark.parametrize(("precision", "conv", "matmul"), [
    ("fp32", "ieee", "ieee"),    # IEEE fp32 everywhere, as on the seed's V100s
    ("tf32", "tf32", "ieee"),    # PyTorch's defaults: cuDNN convolutions TF32, matmuls IEEE
    ("bf16", "tf32", "tf32"),    # autocast; what stays fp32 may use TF32
    ("fp16", "tf32", "tf32"),
])
def test_each_precision_sets_the_fp32_math_read_back_through_the_same_api(restore_fp32_math, precision, conv,
                                                                          matmul):
    use_precision("bf16" if precision == "fp32" else "fp32")   # start from the other setting
    use_precision(precision)
    assert torch.backends.cudnn.conv.fp32_precision == conv
    assert torch.backends.cuda.matmul.fp32_precision == matmul
    assert fp32_math() == {"conv": conv, "matmul": matmul}


def test_tf32_is_torchs_own_default_for_convolutions_and_matmuls():
    """What `tf32` promises (mmseg's numerics): the flags a fresh torch process starts with."""
    import subprocess
    import sys

    code = ("import torch; b = torch.backends; "
            "print(b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision)")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: S603
    conv, matmul = fresh.stdout.split()
    assert conv == "tf32" and matmul in ("ieee", "none")   # "none": not set, i.e. torch's IEEE default


def test_use_precision_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="precision must be one of"):
        use_precision("tf16")


def test_no_code_uses_the_legacy_allow_tf32_flags():
    """torch raises when `allow_tf32` and `fp32_precision` are mixed in one process; ruff's TID251 bans
    the legacy names (pyproject.toml), and this checks ruff really reports them."""
    import subprocess
    import tomllib

    from conftest import REPO, VENV_BIN

    banned = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"][
        "flake8-tidy-imports"]["banned-api"]
    assert {"torch.backends.cudnn.allow_tf32", "torch.backends.cuda.matmul.allow_tf32"} <= set(banned)
    probe = "import torch\n\ntorch.backends.cudnn.allow_tf32 = True\ntorch.backends.cuda.matmul.allow_tf32 = False\n"
    ruff = subprocess.run([str(VENV_BIN / "ruff"), "check", "--select", "TID251", "--stdin-filename",  # noqa: S603
                           "components/probe.py", "-"], input=probe, capture_output=True, text=True, cwd=REPO)
    assert ruff.returncode == 1 and ruff.stdout.count("TID251") == 2, ruff.stdout
    tree = subprocess.run([str(VENV_BIN / "ruff"), "check", "--select", "TID251", "components", "pipeline",  # noqa: S603
                           "tests", "bench"], capture_output=True, text=True, cwd=REPO)
    assert tree.returncode == 0, tree.stdout


def test_autocast_switch():
    for precision in ("fp32", "tf32"):   # fp32 weights and activations: no autocast
        with autocast("cpu", precision):
            assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        autocast("cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("cpu", "half")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_flags_say_and_only_emulated_bf16_warns():
    """oneDNN's answer against the kernel's CPU flags (AVX512-BF16 or AMX-BF16); the warning names the fix."""
    flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    assert native_bf16_cpu() == bool(flags & {"avx512_bf16", "amx_bf16"}), sorted(flags)
    assert slow_precision_warning("fp32", "cpu") is None and slow_precision_warning("bf16", "cuda:0") is None
    warning = slow_precision_warning("bf16", "cpu")
    assert (warning is None) == native_bf16_cpu()
    if warning:
        assert warning.startswith("warning: precision bf16 on a CPU without bf16 in hardware") and "fp32" in warning


def test_load_model_on_the_meta_device_equals_building_and_loading(tmp_path):
    """load_model builds on the meta device, takes the file's tensors and folds in place: the same network
    as a random init overwritten by load_state_dict and folded in a copy; fp16 in the file runs as fp32."""
    from components.evaluation.loading import load_model
    from components.training.checkpointing import save_checkpoint

    trained = randomized_dnlnet().eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, trained, meta={"iteration": 7})
    kwargs = {"depth": 50, "num_classes": 5, "align_corners": False, "attention": "fused"}
    model, meta = load_model(path, device=torch.device("cpu"), fold_bn=True, **kwargs)
    assert meta["iteration"] == 7
    assert not any(p.is_meta for p in [*model.parameters(), *model.buffers()])
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = prepare_for_inference(trained, fold_bn=True).encode_decode(x)
        assert torch.equal(model.encode_decode(x), ref)
    half = tmp_path / "half.pt"
    save_checkpoint(half, trained.half(), meta={})
    model16, _ = load_model(half, device=torch.device("cpu"), fold_bn=False, **kwargs)
    assert {p.dtype for p in model16.parameters()} == {torch.float32}
