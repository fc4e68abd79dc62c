"""The switchable speed-ups of DNLNet, shared by training, evaluation and bench/.

- attention "fused" (chosen when the model is built): scaled_dot_product_attention, memory linear in L;
- channels-last: NHWC activations, oneDNN's fast convolution layout on CPU, tensor cores' on GPU;
- autocast (bf16 on CPU / GPU, fp16 on GPU): matmuls and convs in 16 bits, softmax and loss in fp32;
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

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """fp32 means fp32: TF32 off for cuDNN's convolutions (torch turns it on by default on Ampere and
    newer) and for matmuls, as on the seed's V100s, which had no TF32. Other precisions leave TF32 on."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"


def prepare_for_inference(model: nn.Module, *, channels_last: bool = True, fold_bn: bool = True,
                          inplace: bool = False) -> nn.Module:
    """`model` in eval mode with the inference speed-ups applied (a folded copy when fold_bn, unless inplace)."""
    model = fold_batchnorm(model, inplace=inplace) if fold_bn else model.eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model
