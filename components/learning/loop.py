"""The training loop every DDP rank runs (torchvision's references/segmentation train.py, iteration-based):
what a run learns, with no Ray, MLflow or file shipping in it. Where it runs is a `Session`
(components/training/worker.py gives Ray Train's): the rank and device, the DDP wrapper, the state to
resume from, the dataset folder, and where log rows, evaluations and checkpoints go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Subset

from components.learning.data.dataset import SegmentationDataset, build_loader
from components.learning.data.transforms import build_test_transform, build_train_transform
from components.learning.distributed import (
    InfiniteDistributedSampler,
    augmentation_seed,
    plan_batches,
    seed_everything,
    shard,
    stream_seed,
)
from components.learning.experiment import RunConfig
from components.learning.models import build_dnlnet
from components.learning.models.checkpoint import load_pretrained_backbone
from components.learning.models.speedups import use_precision
from components.learning.step import sgd, train_step
from components.learning.validation import evaluate


class LoopHooks:
    """A seam for the tests' fault injection (tests/loop_hooks.py): here every hook does nothing."""

    def on_start(self, rank: int, start: int) -> None:
        """The worker group (re)starts at iteration `start`."""

    def batches(self, batches, it: int):
        """The batch stream iteration `it` draws from."""
        return batches

    def after_iteration(self, rank: int, it: int) -> None:
        """Iteration `it` and its checkpoint are done."""

    def on_end(self, rank: int, model: nn.Module) -> None:
        """Training finished."""


class Session(Protocol):
    """Where the loop runs. `state` is the loop's resumable state: iteration, train_time_s, and whatever
    the session keeps there itself (its curve rows, the best evaluation); it is saved with checkpoints."""

    rank: int
    world: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train through (DDP when world > 1), already on the device."""

    def resume(self, model: nn.Module) -> dict | None:
        """Loads the newest intact checkpoint into `model` and returns its state (None: a fresh run)."""

    def dataset_dir(self) -> Path:
        """The prepared dataset (train/, val/) on this node."""

    def pretrained_weights(self) -> Path:
        """The run's ImageNet weights on this node."""

    def started(self, state: dict, per_step: int, accum: int) -> None: ...

    def stepped(self, state: dict, it: int, lr: float, losses: dict, seconds: float, is_eval: bool) -> None: ...

    def evaluated(self, state: dict, summary: dict, result: dict) -> None: ...

    def checkpoint(self, state: dict, model: nn.Module, optimizer, scaler, summary: dict) -> None: ...

    def stopped(self, message: str) -> None: ...

    def preempted(self, it: int) -> bool:
        """After iteration `it`: whether a node of the run is about to be taken away (a spot reclaim);
        the loop then checkpoints at once. Every rank asks at every iteration and gets the same answer."""


@dataclass(frozen=True)
class LoopOutcome:
    start_iteration: int        # where this attempt started (0: fresh; else resumed)
    iteration: int              # the last iteration trained
    train_time_s: float
    stopped: str | None = None  # a NaN/inf loss stopped the run: its message


def train(c: RunConfig, session: Session, hooks: LoopHooks | None = None) -> LoopOutcome:
    hooks = hooks or LoopHooks()
    rank, world, device = session.rank, session.world, session.device
    per_step, accum = plan_batches(c.recipe.batch_size, world, c.execution.micro_batch_size)
    torch.set_num_threads(max(1, int(c.execution.resources_per_worker.get("CPU", 1))))
    torch.backends.cudnn.benchmark = True
    use_precision(c.recipe.precision)

    model, state = _model_and_state(c, session)
    # To the device, and DDP (gloo on CPU, NCCL on GPU) when world > 1. The training call goes through
    # ddp_model(img, label) -> model.forward_train: DDP syncs gradients only for calls through its forward.
    ddp_model = session.wrap(model)
    schedule = c.schedule
    optimizer = sgd(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                    weight_decay=schedule.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=c.recipe.precision == "fp16")
    if "optimizer" in state:
        optimizer.load_state_dict(state.pop("optimizer"))
        scaler.load_state_dict(state.pop("scaler"))
    start = state["iteration"]

    # Data: one endless seeded global order that a resumed run re-enters where it stopped, on any number
    # of workers (its position counts global samples: an elastic resize neither repeats nor skips one);
    # the augmentation seed moves with the iteration so a resumed run does not replay iteration 0's crops.
    aug_seed = augmentation_seed(c.recipe.seed, rank, start)
    seed_everything(aug_seed)
    data_dir = session.dataset_dir()
    train_set = SegmentationDataset(data_dir / "train", build_train_transform(
        scale=c.recipe.scale, crop_size=c.recipe.crop_size, cat_max_ratio=c.recipe.cat_max_ratio))
    sampler = InfiniteDistributedSampler(len(train_set), rank, world, seed=stream_seed(c.recipe.seed),
                                         start=start * c.recipe.batch_size)
    batches = iter(build_loader(train_set, per_step, c.execution.loader_workers, seed=aug_seed, sampler=sampler))
    val_set = SegmentationDataset(data_dir / "val", build_test_transform(scale=c.recipe.scale),
                                  max_images=c.recipe.val_max_images)
    val_loader = build_loader(Subset(val_set, shard(len(val_set), rank, world)), 1, c.execution.loader_workers,
                              shuffle=False, drop_last=False)

    hooks.on_start(rank, start)
    session.started(state, per_step, accum)
    saved_on_notice = False   # one just-in-time checkpoint per preemption notice (per worker group)
    model.train()
    for it in range(start + 1, c.max_iters + 1):   # `it` is the iteration being run, counted from 1
        tic = time.perf_counter()
        lr = schedule.lr_at(it - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            losses = train_step(ddp_model, optimizer, scaler, hooks.batches(batches, it), accum, device,
                                c.recipe.precision, c.recipe.channels_last, it)
        except FloatingPointError as e:
            # Not a transient failure: raised, Ray would restart the workers from the last checkpoint
            # and meet the same NaN again (max_failures times, forever with -1). Every rank sees the
            # same all-reduced loss, so all stop here together; the driver fails the stage with this.
            session.stopped(str(e))
            return LoopOutcome(start, it - 1, state["train_time_s"], stopped=str(e))
        seconds = time.perf_counter() - tic
        state["train_time_s"] += seconds
        is_eval = it % c.eval_interval == 0 or it == c.max_iters
        session.stepped(state, it, lr, losses, seconds, is_eval)
        if is_eval:   # every rank evaluates its shard; counts are all-reduced inside
            result = evaluate(model, val_loader, c.num_classes, device, mode=c.recipe.test_mode,
                              crop_size=c.recipe.test_crop, stride=c.recipe.test_stride,
                              align_corners=c.recipe.align_corners,
                              channels_last=c.recipe.channels_last, precision=c.recipe.precision)
            summary = {"iteration": it, **{k: round(100 * result[k], 2) for k in ("mIoU", "mAcc", "aAcc")}}
            session.evaluated(state, summary, result)
            state["iteration"] = it
            session.checkpoint(state, model, optimizer, scaler, summary)
        elif not saved_on_notice and session.preempted(it):
            # Just in time: the group restarts without the node from here, not from the last evaluation.
            # No evaluation (its figures NaN: the checkpoint is never the best, only the latest).
            state["iteration"] = it
            session.checkpoint(state, model, optimizer, scaler, not_evaluated(it))
            saved_on_notice = True
        hooks.after_iteration(rank, it)

    hooks.on_end(rank, model)
    return LoopOutcome(start, c.max_iters, state["train_time_s"])


def not_evaluated(it: int) -> dict:
    """The summary of a checkpoint taken between evaluations."""
    return {"iteration": it, "mIoU": float("nan"), "mAcc": float("nan"), "aAcc": float("nan")}


def _model_and_state(c: RunConfig, session: Session) -> tuple[nn.Module, dict]:
    """The network, its weights (resumed, else ImageNet's for a fresh run) and the state to start from."""
    seed_everything(c.recipe.seed)
    model = build_dnlnet(depth=c.depth, num_classes=c.num_classes, align_corners=c.recipe.align_corners,
                         attention=c.recipe.attention, avg_non_ignore=c.recipe.avg_non_ignore,
                         aux_weight=c.recipe.aux_weight)
    state = session.resume(model)
    if state is None:
        state = {"iteration": 0, "train_time_s": 0.0}
        if c.recipe.pretrained != "none":   # ImageNet weights, fresh runs only; every backbone key from the file
            load_pretrained_backbone(model.backbone, session.pretrained_weights())
    if c.execution.use_gpu:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # BN statistics over the global batch
    if c.recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, state
