"""Learning-rate schedules: mmseg's poly decay of SGD's learning rate, with an optional linear warmup."""

from __future__ import annotations

from components.validated import Frozen, NonNegative, NonNegativeInt, Positive, PositiveInt


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


class SGD(Frozen):
    """SGD with mmseg's poly decay, as params.yaml's `train:` sets it for every experiment."""

    lr: Positive
    momentum: NonNegative
    weight_decay: NonNegative
    poly_power: NonNegative
    min_lr: NonNegative
    warmup_iters: NonNegativeInt
    warmup_ratio: Positive


class Schedule(SGD):
    """SGD plus the number of iterations: the settings a Tune sweep may change.

    The table's schedules (40k / 80k / 160k) differ only in max_iters; they are declared once, in
    params.yaml's `schedules:`, and an experiment names one.
    """

    max_iters: PositiveInt

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration `it` (counted from 0)."""
        return poly_lr(it, self.max_iters, self.lr, self.poly_power, self.min_lr, self.warmup_iters,
                       self.warmup_ratio)


def schedule_field_types() -> dict[str, type]:
    """{field: int | float} of Schedule: what a sweep may set, and how its values are typed."""
    return {name: f.annotation for name, f in Schedule.model_fields.items()}
