"""What each DDP rank trains on: batch split, data order, seeds. Pure functions, testable without Ray."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Sampler


class BatchSplitError(ValueError):
    """The global batch cannot be split over the workers: every worker must take the same share."""


def plan_batches(global_batch: int, num_workers: int, micro_batch: int | None = None) -> tuple[int, int]:
    """(images per forward per worker, accumulation steps) with per_step * workers * accum == global.

    `micro_batch` caps the images one worker puts through one forward (memory); None (or 0) = no cap, so the
    worker's whole share goes in one step. Raises ValueError when the global batch cannot be split.
    """
    if global_batch <= 0 or num_workers <= 0 or (micro_batch or 0) < 0:
        raise ValueError(f"batch_size ({global_batch}) and num_workers ({num_workers}) must be positive, "
                         f"micro_batch_size ({micro_batch}) >= 0")
    if global_batch % num_workers:
        raise BatchSplitError(f"batch_size: global batch {global_batch} is not divisible by num_workers "
                         f"{num_workers}: every worker must take the same share")
    share = global_batch // num_workers
    if not micro_batch or micro_batch >= share:
        return share, 1
    if share % micro_batch:
        raise BatchSplitError(f"micro_batch_size: {micro_batch} does not divide the per-worker share {share} "
                         f"(batch_size {global_batch} / num_workers {num_workers})")
    return micro_batch, share // micro_batch


def seed_everything(seed: int) -> None:
    """torch, numpy and python's random: the model init and every augmentation draw derive from these."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Seeds' streams lie this far apart, more than any run's epochs or iterations: with `seed + epoch` (torch's
# DistributedSampler) seed s + 1 would replay seed s's shuffles one epoch later, and its crops one
# iteration later. Seed 0's streams are what they always were.
SEED_STRIDE = 1_000_000_007


def stream_seed(seed: int) -> int:
    """The first of seed `seed`'s data-order and augmentation seeds."""
    return seed * SEED_STRIDE


def augmentation_seed(seed: int, rank: int, iteration: int) -> int:
    """Different crops on every rank, and a resumed run does not replay the crops of iteration 0."""
    return stream_seed(seed) + 1_000_003 * rank + iteration


class InfiniteDistributedSampler(Sampler[int]):
    """This rank's share of one endless global order, the same on every worker count: seeded shuffles
    of the dataset one after another (epoch e shuffled with seed + e), rank r taking the global positions
    start + r, start + r + world, ... An iteration of global batch B draws B consecutive global positions
    over all ranks together (each rank B / world of them), so the stream never re-creates its DataLoader,
    and a run resumed at iteration i, on any number of workers, passes start = i * B and draws exactly
    the samples the uninterrupted run would have drawn next (an elastic resize neither repeats nor skips
    one). With one worker it is torch's DistributedSampler with set_epoch(0), (1), ... concatenated.

    `start` is a GLOBAL sample position: the samples all ranks together drew before this stream.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int = 0, start: int = 0):
        if size <= 0:
            raise ValueError("dataset is empty")
        self.size, self.rank, self.world, self.seed, self.start = size, rank, world, seed, start

    def order(self, epoch: int) -> list[int]:
        """The global order's epoch `epoch`: one seeded shuffle of the whole dataset."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self):
        position, epoch, order = self.start + self.rank, -1, []
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.order(epoch)
            yield order[position % self.size]
            position += self.world

    def __len__(self) -> int:  # the DataLoader asks; the stream has no end
        return 2**62


def shard(size: int, rank: int, world: int) -> list[int]:
    """Validation indices of one rank: disjoint, no padding, so no image is counted twice."""
    return list(range(rank, size, world))


def gather_text(text: str, world: int, device: torch.device, size: int = 64) -> list[str]:
    """Every rank's `text` (ASCII, at most `size` bytes), in rank order; a tensor all-gather on `device`
    (NCCL's object collectives need the CUDA device set, this does not)."""
    if world == 1:
        return [text]
    data = text.encode("ascii")
    if len(data) > size:
        raise ValueError(f"gather_text: {len(data)} bytes, more than {size}")
    mine = torch.zeros(size, dtype=torch.uint8, device=device)
    mine[: len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine)
    return [bytes(t.cpu().tolist()).rstrip(b"\0").decode("ascii") for t in gathered]
