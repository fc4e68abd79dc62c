"""Learning-rate schedules: mmseg's poly decay, lr = (base - min)(1 - t/T)^power + min, with an optional warmup."""

from __future__ import annotations


def poly_lr(it: int, max_iters: int, base_lr: float, power: float = 0.9, min_lr: float = 1e-4,
            warmup_iters: int = 0, warmup_ratio: float = 0.1) -> float:
    """mmseg's PolyLR: (base - min) * (1 - it/T)^power + min, optionally behind a linear warmup.

    Warmup (off in the reference schedules) scales the poly value linearly from `warmup_ratio` to 1
    over the first `warmup_iters` iterations, as mmengine's LinearLR does.
    """
    if max_iters <= 0:
        raise ValueError(f"max_iters must be > 0, got {max_iters}")
    it = min(max(it, 0), max_iters)
    lr = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    if warmup_iters > 0 and it < warmup_iters:
        lr *= warmup_ratio + (1 - warmup_ratio) * it / warmup_iters
    return lr
