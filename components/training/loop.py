"""The per-worker training loop Ray Train runs on every DDP rank (torchvision's references/segmentation
train.py, iteration-based, with the Ray parts in plain sight: get_checkpoint, prepare_model, report).

TorchTrainer hands `run_worker` (through components.training.trainer.train_loop_per_worker, which imports
this module in the worker only) {"cfg": RunConfig, "run": RunInfo, "hooks": LoopHooks or None}; it returns
a WorkerResult (components/training/contract.py).
"""

from __future__ import annotations

import os
import time

import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import Subset

from components.console import warn
from components.data.dataset import SegmentationDataset, build_loader
from components.data.transforms import build_test_transform, build_train_transform
from components.experiment import RunConfig
from components.models import build_dnlnet
from components.models.checkpoint import load_pretrained_backbone
from components.models.speedups import use_precision
from components.tracking import FAIL_FAST_ENV, RunLogger, system_metrics, with_env_credentials
from components.training.checkpointing import load_chosen, resume_state, save_checkpoint_folder, staging_folder
from components.training.contract import RunInfo, WorkerResult
from components.training.data_sync import local_dataset
from components.training.distributed import (
    InfiniteDistributedSampler,
    augmentation_seed,
    gather_text,
    plan_batches,
    seed_everything,
    shard,
    stream_seed,
)
from components.training.evaluate import evaluate
from components.training.progress import Progress, peak_memory_gb
from components.training.step import sgd, train_step
from components.weights import on_this_node


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


def run_worker(config: dict) -> WorkerResult:
    c: RunConfig = config["cfg"]
    run: RunInfo = config.get("run") or RunInfo()
    ctx = ray.train.get_context()
    # Every MLflow call of this worker gives up quickly, the system-metrics thread's too: MLflow retries
    # for minutes by default, and stopping the monitor waits for its thread (seen: 4 min on a dead server).
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    # One system-metrics monitor per host (Ray Train's local rank 0), named by node on multi-host runs.
    monitored = ctx.get_local_rank() == 0 and run.mlflow_run_id
    node = f"node{ctx.get_node_rank()}" if ctx.get_world_size() > ctx.get_local_world_size() else None
    with system_metrics(with_env_credentials(c.tracking_uri), run.mlflow_run_id if monitored else None, node):
        return train(c, run, config.get("hooks") or LoopHooks(), ctx)


def train(c: RunConfig, run: RunInfo, hooks: LoopHooks, ctx) -> WorkerResult:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_step, accum = plan_batches(c.recipe.batch_size, world, c.execution.micro_batch_size)
    torch.set_num_threads(max(1, int(c.execution.resources_per_worker.get("CPU", 1))))
    torch.backends.cudnn.benchmark = True
    use_precision(c.recipe.precision)
    device = ray.train.torch.get_device()

    # Model, then the state to resume from (Ray hands every rank the latest reported checkpoint).
    seed_everything(c.recipe.seed)
    model = build_dnlnet(depth=c.depth, num_classes=c.num_classes, align_corners=c.recipe.align_corners,
                         attention=c.recipe.attention, avg_non_ignore=c.recipe.avg_non_ignore,
                         aux_weight=c.recipe.aux_weight)
    checkpoint = ray.train.get_checkpoint()
    state = resume(checkpoint, model, rank, world, device) if checkpoint else None
    resumed = state is not None
    if not resumed:
        state = {"iteration": 0, "train_time_s": 0.0, "best": None, "curve": []}
        if c.recipe.pretrained != "none":   # ImageNet weights, fresh runs only; every backbone key from the file
            load_pretrained_backbone(model.backbone, on_this_node(run.pretrained_path, run.pretrained_uri,
                                                                  c.recipe.pretrained_sha256))
    if c.execution.use_gpu:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # BN statistics over the global batch
    if c.recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # To the device, and DDP (gloo on CPU, NCCL on GPU) when world > 1. The training call goes through
    # ddp_model(img, label) -> model.forward_train: DDP syncs gradients only for calls through its forward.
    ddp_model = ray.train.torch.prepare_model(model)
    schedule = c.schedule
    optimizer = sgd(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                    weight_decay=schedule.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=c.recipe.precision == "fp16")
    if resumed:
        optimizer.load_state_dict(state.pop("optimizer"))
        scaler.load_state_dict(state.pop("scaler"))
    start = state["iteration"]

    # Data: an endless seeded stream per rank that a resumed run re-enters where it stopped; the
    # augmentation seed moves with the iteration so a resumed run does not replay iteration 0's crops.
    aug_seed = augmentation_seed(c.recipe.seed, rank, start)
    seed_everything(aug_seed)
    data_dir = local_dataset(c.location.data_dir, run.data_uri, run.manifest_sha256)   # fetched on a node lacking it
    train_set = SegmentationDataset(data_dir / "train", build_train_transform(
        scale=c.recipe.scale, crop_size=c.recipe.crop_size, cat_max_ratio=c.recipe.cat_max_ratio))
    sampler = InfiniteDistributedSampler(len(train_set), rank, world, seed=stream_seed(c.recipe.seed),
                                         start=start * accum * per_step)
    batches = iter(build_loader(train_set, per_step, c.execution.loader_workers, seed=aug_seed, sampler=sampler))
    val_set = SegmentationDataset(data_dir / "val", build_test_transform(scale=c.recipe.scale),
                                  max_images=c.recipe.val_max_images)
    val_loader = build_loader(Subset(val_set, shard(len(val_set), rank, world)), 1, c.execution.loader_workers,
                              shuffle=False, drop_last=False)

    progress = Progress(c.max_iters, c.recipe.batch_size, c.name)
    tracker = RunLogger(with_env_credentials(c.tracking_uri), run.mlflow_run_id if rank == 0 else None,
                        who=f"{c.name} rank 0", fail_fast=True)
    hooks.on_start(rank, start)
    # Which Ray nodes the run's workers are on, in the MLflow run (a cluster user's first question).
    nodes = gather_text(ray.get_runtime_context().get_node_id(), world, device)
    if rank == 0:
        tracker.set_tags({"ray_nodes": ",".join(sorted(set(nodes)))})
        progress.say(f"[{c.name}] {'resuming at' if start else 'starting at'} iteration "
                     f"{start}/{c.max_iters}: {world} workers x {per_step} images x {accum} accumulation "
                     f"steps = batch {c.recipe.batch_size}, {c.recipe.precision}, device {device}")
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
            if rank == 0:
                progress.say(f"[{c.name}] {e}")
            return WorkerResult(start_iteration=start, iteration=it - 1, train_time_s=state["train_time_s"],
                                mlflow_failures=tracker.failures, stopped=str(e))
        seconds = time.perf_counter() - tic
        state["train_time_s"] += seconds
        progress.add(losses, seconds)
        is_eval = it % c.eval_interval == 0 or it == c.max_iters
        if rank == 0 and (it % run.log_interval == 0 or is_eval):
            row, memory = progress.row(it, lr), peak_memory_gb(device)
            state["curve"].append(row)
            progress.say(progress.line(row, memory))
            tracker.log_metrics({**without(row, "iteration"), "memory_gb": memory}, step=it)
        if it == start + 1 and device.type == "cuda":
            # cudnn.benchmark tries algorithms with large workspaces in the first step only: the
            # memory figure is the steady state from here on (as the seed's Mem column).
            torch.cuda.reset_peak_memory_stats(device)

        if is_eval:   # every rank evaluates its shard; counts are all-reduced inside
            result = evaluate(model, val_loader, c.num_classes, device, mode=c.recipe.test_mode,
                              crop_size=c.recipe.test_crop, stride=c.recipe.test_stride,
                              align_corners=c.recipe.align_corners,
                              channels_last=c.recipe.channels_last, precision=c.recipe.precision)
            summary = {"iteration": it, **{k: round(100 * result[k], 2) for k in ("mIoU", "mAcc", "aAcc")}}
            if rank == 0:
                log_evaluation(c, state, summary, result, tracker, progress)
            state["iteration"] = it
            with staging_folder() as folder:   # rank 0 writes, Ray copies it to storage_path
                ckpt = None
                if rank == 0:
                    meta = {"experiment": c.name, "iteration": it, "mIoU": summary["mIoU"],
                            "CLASSES": list(c.class_names)}
                    save_checkpoint_folder(folder, model, optimizer, scaler, state, summary, meta)
                    ckpt = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(summary, checkpoint=ckpt)
        hooks.after_iteration(rank, it)

    hooks.on_end(rank, model)
    steps = sorted(progress.step_seconds)
    return WorkerResult(start_iteration=start, iteration=c.max_iters, train_time_s=state["train_time_s"],
                        median_step_s=steps[len(steps) // 2] if steps else None, mlflow_failures=tracker.failures)


def log_evaluation(c: RunConfig, state: dict, summary: dict, result: dict, tracker: RunLogger,
                   progress: Progress) -> None:
    """Rank 0: mIoU into the curve row, best so far, MLflow (with per-class IoU), one console line."""
    state["curve"][-1]["mIoU"] = summary["mIoU"]
    # >=: on a tie the later checkpoint is the best, as Ray's CheckpointConfig ranks them (so it keeps it).
    if state["best"] is None or summary["mIoU"] >= state["best"]["mIoU"]:
        state["best"] = dict(summary)
    per_class = {f"IoU.{name}": 100 * iou for name, iou in zip(c.class_names, result["IoU"], strict=True)}
    tracker.log_metrics(without(summary, "iteration") | per_class, step=summary["iteration"])
    progress.say(f"[{c.name}] eval at iter {summary['iteration']}: mIoU {summary['mIoU']:.2f}  "
                 f"mAcc {summary['mAcc']:.2f}  aAcc {summary['aAcc']:.2f}  (best {state['best']['mIoU']:.2f} "
                 f"at {state['best']['iteration']})")


def resume(checkpoint, model: nn.Module, rank: int, world: int, device: torch.device) -> dict | None:
    """The state to resume from, the same on every rank: rank 0 picks the newest intact checkpoint of the
    run (a damaged one is named in one line, skipped) and the others load its choice (None: fresh)."""
    state, chosen = resume_state(checkpoint, model, warn) if rank == 0 else (None, None)
    if world > 1:
        choice = [chosen]
        torch.distributed.broadcast_object_list(choice, src=0, device=device)
        if rank != 0 and choice[0] is not None:
            state = load_chosen(checkpoint, choice[0], model)
    return state


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}
