"""One optimizer step of DNLNet training, with no Ray in it (the Ray Train loop and bench/ share it)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from components.learning.models.speedups import autocast

LOSS_KEYS = ("loss", "decode_loss", "aux_loss")


def sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """mmseg's optimizer, with torch's fused kernel: one pass over the 50M parameters instead of one per
    tensor, the same update rule. Measured on 2 CPU cores: 19 ms a step instead of 63 ms with NCHW
    weights; with channels-last weights it copies the 23 non-contiguous 3×3 weights first and takes
    58-65 ms, no slower than the foreach kernel (54-60 ms)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)


def train_step(ddp_model, optimizer, scaler, batches, accum: int, device, precision: str, channels_last: bool,
               it: int) -> dict[str, float]:
    """One optimizer step over `accum` micro-batches; the losses averaged over micro-steps and ranks."""
    totals = torch.zeros(len(LOSS_KEYS), device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for micro in range(accum):
        img, label = next(batches)
        img = img.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        label = label.to(device, non_blocking=True)
        # DDP all-reduces gradients on the last micro-step only.
        last = micro == accum - 1
        sync = contextlib.nullcontext() if last else getattr(ddp_model, "no_sync", contextlib.nullcontext)()
        with sync:
            with autocast(device, precision):
                out = ddp_model(img, label)
            scaler.scale(out["loss"] / accum).backward()
        zero = out["loss"].new_zeros(())
        totals += torch.stack([out.get(k, zero) for k in LOSS_KEYS]).detach().float() / accum
    # Mean over ranks (as mmseg logs it); a NaN on any rank reaches every rank, so all stop together.
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
        totals /= dist.get_world_size()
    if not torch.isfinite(totals).all():
        raise FloatingPointError(f"loss is {totals.tolist()} (loss, decode, aux) at iteration {it}: "
                                 f"stopping; the last good checkpoint is kept (lower train.lr or use "
                                 f"precision fp32)")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(LOSS_KEYS, totals.tolist(), strict=True))
