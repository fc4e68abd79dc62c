"""The switchable speed-ups of DNLNet, shared by training, evaluation and bench/.

- attention "fused" (chosen when the model is built): scaled_dot_product_attention, memory linear in L;
- channels-last: NHWC activations, oneDNN's fast convolution layout on CPU, tensor cores' on GPU;
- autocast (bf16 on CPU / GPU, fp16 on GPU): matmuls and convs in 16 bits, softmax and loss in fp32 (on a
  CPU only where it has bf16 in hardware: elsewhere oneDNN emulates it, far slower than fp32);
- fp32 math on NVIDIA tensor cores (`use_precision`): TF32 for cuDNN's convolutions (tf32) or IEEE (fp32);
- BN folding (inference only): BatchNorm merged into the preceding conv (components/learning/models/fold.py);
bench/bench_perf.py measures each one on and off, and torch.compile next to them; README.md has the
figures. The pipeline does not compile: it recompiles for every input shape (six ms+flip scales), which
costs more than it saves over a val split (see the README).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from components.learning.models.fold import fold_batchnorm

# Autocast dtype per precision: tf32 and fp32 keep fp32 weights and activations (no autocast).
AMP_DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# What fp32 ops (outside autocast) run in, per precision: (cuDNN convolutions, CUDA matmuls), as torch's
# `fp32_precision` values. tf32 is PyTorch's own default, so mmsegmentation's on the same GPU: convolutions
# in TF32 on GPUs that have it (Ampere and newer; on a V100 it is fp32), matmuls in IEEE fp32. fp32 is
# IEEE everywhere, as on the seed's V100s. bf16 / fp16 leave both in TF32 for the ops autocast keeps in fp32.
FP32_MATH = {"fp32": ("ieee", "ieee"), "tf32": ("tf32", "ieee"), "bf16": ("tf32", "tf32"), "fp16": ("tf32", "tf32")}


def autocast(device: torch.device | str, precision: str):
    """torch.autocast for `precision` on `device`; a no-op context for fp32."""
    if precision not in AMP_DTYPES:
        raise ValueError(f"precision must be one of {tuple(AMP_DTYPES)}, got {precision!r}")
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if dtype == torch.float16 and device_type != "cuda":
        raise ValueError("precision fp16 needs a GPU (use bf16 on CPU)")
    return torch.autocast(device_type, dtype=dtype)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it: a
    DNLNet R-18-D8 training step at 64x128 took 12.2 s in bf16 against 0.88 s in fp32 on an AVX2 AMD EPYC
    (one thread, 2026-12-03)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`precision` as it runs on `device`: auto is fp16 on CUDA, bf16 on a CPU with bf16 in hardware, else
    fp32; any other value is itself."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "fp16"
    return "bf16" if native_bf16_cpu() else "fp32"


def slow_precision_warning(precision: str, device: torch.device | str) -> str | None:
    """One line when `precision` is bf16 on a CPU that emulates it (many times slower than fp32), else None."""
    if precision != "bf16" or torch.device(device).type != "cpu" or native_bf16_cpu():
        return None
    return ("warning: precision bf16 on a CPU without bf16 in hardware (no AVX512-BF16 / AMX): oneDNN emulates "
            "it (a step ~14x slower than fp32 on an AVX2 EPYC); set precision: fp32 for this profile")


@contextlib.contextmanager
def cpu_threads(threads: int):
    """torch's CPU threads set to `threads` (0: left as they are) for the block, then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_precision(precision: str) -> None:
    """The fp32 math of `precision` (FP32_MATH) for this process, through torch's current API only: torch
    raises when its legacy `allow_tf32` flags and `fp32_precision` are mixed (ruff bans the legacy ones)."""
    if precision not in FP32_MATH:
        raise ValueError(f"precision must be one of {tuple(FP32_MATH)}, got {precision!r}")
    conv, matmul = FP32_MATH[precision]
    torch.backends.cudnn.conv.fp32_precision = conv
    torch.backends.cuda.matmul.fp32_precision = matmul


def fp32_math() -> dict[str, str]:
    """What fp32 convolutions and matmuls run in now (read back through the same API)."""
    return {"conv": torch.backends.cudnn.conv.fp32_precision, "matmul": torch.backends.cuda.matmul.fp32_precision}


def prepare_for_inference(model: nn.Module, *, channels_last: bool = True, fold_bn: bool = True,
                          inplace: bool = False) -> nn.Module:
    """`model` in eval mode with the inference speed-ups applied (a folded copy when fold_bn, unless inplace)."""
    model = fold_batchnorm(model, inplace=inplace) if fold_bn else model.eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model
