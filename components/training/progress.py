"""Rank 0's progress: averages over the logging window, one line a person can follow, memory."""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_gb(device: torch.device) -> float:
    """GPU: max_memory_allocated (the seed table's Mem); CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Accumulates losses and step times between log lines; `row()` closes the window."""

    def __init__(self, max_iters: int, images_per_iter: int, name: str):
        self.max_iters, self.images_per_iter, self.name = max_iters, images_per_iter, name
        self.sums: dict[str, float] = {}
        self.steps, self.seconds = 0, 0.0
        self.step_seconds: list[float] = []   # every step of this attempt, for the ETA and the summary
        self.started = time.perf_counter()

    def add(self, losses: dict[str, float], seconds: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.seconds += seconds
        self.step_seconds.append(seconds)

    def row(self, iteration: int, lr: float) -> dict:
        row = {"iteration": iteration, **{k: v / self.steps for k, v in self.sums.items()},
               "lr": lr, "img_s": self.images_per_iter * self.steps / self.seconds}
        self.sums, self.steps, self.seconds = {}, 0, 0.0
        return row

    def line(self, row: dict, memory_gb: float) -> str:
        recent = self.step_seconds[-20:]
        eta = (self.max_iters - row["iteration"]) * sum(recent) / len(recent)
        return (f"[{self.name}] iter {row['iteration']}/{self.max_iters}  loss {row['loss']:.4f} "
                f"(decode {row['decode_loss']:.4f}, aux {row['aux_loss']:.4f})  lr {row['lr']:.3e}  "
                f"{row['img_s']:.2f} img/s  mem {memory_gb:.2f} GB  eta {format_duration(eta)}")

    @staticmethod
    def say(text: str) -> None:
        # Not print(): Ray Train patches print in workers and the line would reach the driver twice.
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
