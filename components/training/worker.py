"""What every Ray Train worker runs: the training loop (components/learning/loop.py) in a Ray Train
session, with MLflow tracking, console lines, checkpoint folders and the files shipped to this node.

TorchTrainer hands `run_worker` (through components.training.trainer.train_loop_per_worker, which imports
this module in the worker only) {"cfg": RunConfig, "run": RunInfo, "hooks": LoopHooks or None}; it returns
a WorkerResult (components/training/contract.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch import nn

from components.behind_published import behind_published, tag, warning_line
from components.console import warn
from components.learning.distributed import gather_text
from components.learning.experiment import RunConfig
from components.learning.loop import train
from components.learning.models.speedups import slow_precision_warning
from components.tracking import FAIL_FAST_ENV, RunLogger, system_metrics, with_env_credentials
from components.training.checkpointing import load_chosen, resume_state, save_checkpoint_folder, staging_folder
from components.training.contract import RunInfo, WorkerResult
from components.training.data_sync import local_dataset
from components.training.progress import Progress, peak_memory_gb
from components.weights import on_this_node


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
        session = RaySession(c, run, ctx)
        outcome = train(c, session, config.get("hooks"))
    steps = sorted(session.progress.step_seconds)
    return WorkerResult(start_iteration=outcome.start_iteration, iteration=outcome.iteration,
                        train_time_s=outcome.train_time_s,
                        median_step_s=steps[len(steps) // 2] if steps and not outcome.stopped else None,
                        mlflow_failures=session.tracker.failures, stopped=outcome.stopped)


class RaySession:
    """The loop's Session under Ray Train: rank 0 logs to MLflow and the console and writes checkpoint
    folders, which Ray copies to the run's storage; every rank resumes from Ray's latest checkpoint."""

    def __init__(self, c: RunConfig, run: RunInfo, ctx):
        self.c, self.run = c, run
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.progress = Progress(c.max_iters, c.recipe.batch_size, c.name)
        self.tracker = RunLogger(with_env_credentials(c.tracking_uri), run.mlflow_run_id if self.rank == 0 else None,
                                 who=f"{c.name} rank 0", fail_fast=True)
        self.start = 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    def resume(self, model: nn.Module) -> dict | None:
        """Rank 0 picks the newest intact checkpoint of the run (a damaged one is named in one line,
        skipped) and the others load its choice; the same state on every rank (None: fresh)."""
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return None
        state, chosen = resume_state(checkpoint, model, warn) if self.rank == 0 else (None, None)
        if self.world > 1:
            choice = [chosen]
            torch.distributed.broadcast_object_list(choice, src=0, device=self.device)
            if self.rank != 0 and choice[0] is not None:
                state = load_chosen(checkpoint, choice[0], model)
        return state

    def dataset_dir(self) -> Path:   # fetched on a node lacking it
        return local_dataset(self.c.location.data_dir, self.run.data_uri, self.run.manifest_sha256)

    def pretrained_weights(self) -> Path:
        return on_this_node(self.run.pretrained_path, self.run.pretrained_uri, self.c.recipe.pretrained_sha256)

    def started(self, state: dict, per_step: int, accum: int) -> None:
        state.setdefault("best", None)
        state.setdefault("curve", [])
        self.start = state["iteration"]
        # The worker count over time, [[iteration, workers], ...]: an elastic run's group restarts at its
        # latest checkpoint with the workers Ray found, and a row says where it changed.
        sizes = state.setdefault("world_sizes", [])
        resized = not sizes or sizes[-1][1] != self.world
        if resized:
            sizes.append([self.start, self.world])
        # Which Ray nodes the run's workers are on, in the MLflow run (a cluster user's first question).
        nodes = gather_text(ray.get_runtime_context().get_node_id(), self.world, self.device)
        if self.rank == 0:
            c = self.c
            self.tracker.set_tags({"ray_nodes": ",".join(sorted(set(nodes)))})
            if resized:
                self.tracker.log_metrics({"world_size": self.world}, step=self.start)
            self.progress.say(f"[{c.name}] {'resuming at' if self.start else 'starting at'} iteration "
                              f"{self.start}/{c.max_iters}: {self.world} workers x {per_step} images x {accum} "
                              f"accumulation steps = batch {c.recipe.batch_size}, {c.recipe.precision}, "
                              f"device {self.device}")
            if slow := slow_precision_warning(c.recipe.precision, self.device):
                warn(f"[{c.name}] {slow}")

    def stepped(self, state: dict, it: int, lr: float, losses: dict, seconds: float, is_eval: bool) -> None:
        self.progress.add(losses, seconds)
        if self.rank == 0 and (it % self.run.log_interval == 0 or is_eval):
            row, memory = self.progress.row(it, lr), peak_memory_gb(self.device)
            state["curve"].append(row)
            self.progress.say(self.progress.line(row, memory))
            self.tracker.log_metrics({**without(row, "iteration"), "memory_gb": memory}, step=it)
        if it == self.start + 1 and self.device.type == "cuda":
            # cudnn.benchmark tries algorithms with large workspaces in the first step only: the
            # memory figure is the steady state from here on (as the seed's Mem column).
            torch.cuda.reset_peak_memory_stats(self.device)

    def evaluated(self, state: dict, summary: dict, result: dict) -> None:
        """Rank 0: mIoU into the curve row, best so far, MLflow (with per-class IoU), one console line."""
        if self.rank != 0:
            return
        c = self.c
        state["curve"][-1]["mIoU"] = summary["mIoU"]
        # >=: on a tie the later checkpoint is the best, as Ray's CheckpointConfig ranks them (so it keeps it).
        if state["best"] is None or summary["mIoU"] >= state["best"]["mIoU"]:
            state["best"] = dict(summary)
        per_class = {f"IoU.{name}": 100 * iou for name, iou in zip(c.class_names, result["IoU"], strict=True)}
        self.tracker.log_metrics(without(summary, "iteration") | per_class, step=summary["iteration"])
        best = state["best"]
        self.progress.say(f"[{c.name}] eval at iter {summary['iteration']}: mIoU {summary['mIoU']:.2f}  "
                          f"mAcc {summary['mAcc']:.2f}  aAcc {summary['aAcc']:.2f}  (best {best['mIoU']:.2f} "
                          f"at {best['iteration']})")
        if self.run.published_val:   # further behind the published run than the noise: say so, tag it
            behind = behind_published(summary["mIoU"], summary["iteration"], list(self.run.published_val),
                                      self.run.noise_band)
            if behind:
                self.progress.say(warning_line(c.name, behind))
                self.tracker.set_tags(tag(behind))

    def checkpoint(self, state: dict, model: nn.Module, optimizer, scaler, summary: dict) -> None:
        with staging_folder() as folder:   # rank 0 writes, Ray copies it to storage_path
            ckpt = None
            if self.rank == 0:
                meta = {"experiment": self.c.name, "iteration": state["iteration"], "mIoU": summary["mIoU"],
                        "CLASSES": list(self.c.class_names)}
                save_checkpoint_folder(folder, model, optimizer, scaler, state, summary, meta)
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(summary, checkpoint=ckpt)

    def stopped(self, message: str) -> None:
        if self.rank == 0:
            self.progress.say(f"[{self.c.name}] {message}")

    def preempted(self, it: int) -> bool:
        """Ray Train's preemption notice (a node of the run being drained), asked every log interval:
        ray.train.get_preemption_info() is a barrier across the workers, too dear for every step."""
        if not self.run.checkpoint_on_preemption or it % self.run.log_interval:
            return False
        info = ray.train.get_preemption_info()
        if info is not None and self.rank == 0:
            self.progress.say(f"[{self.c.name}] Ray's preemption notice for rank(s) {info.preempted_ranks}: "
                              f"checkpoint at iteration {it}, then the group restarts without that node")
        return info is not None


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def wait_until_committed(reports: int, timeout_s: float = 120) -> None:
    """Ray commits a report (and its checkpoint) when its controller has collected it from every rank,
    at the next poll (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s); a rank that dies before then takes
    its queued report with it and the run restarts from the checkpoint before. The controller's
    snapshot in storage counts the committed reports. For the tests' and bench's loop hooks, which stop
    a rank right after a checkpoint."""
    storage = ray.train.get_context().get_storage()
    deadline = time.monotonic() + timeout_s
    while reports and time.monotonic() < deadline:
        try:
            with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
                if json.loads(f.read())["current_report_index"] >= reports:
                    return
        except (OSError, ValueError, KeyError):   # not written yet, or caught mid-write
            pass
        time.sleep(0.2)
