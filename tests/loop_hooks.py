"""Fault injection for the training loop's test seam (components.learning.loop.LoopHooks).

`FaultHooks(...)` takes the faults as keyword arguments:
    fixed_batch=True                every step draws the same first batch (overfit it: the loss must fall)
    nan_at=k                        iteration k's images become NaN, as a diverged run's activations would
    attempts_file=path              rank 0 appends the start iteration of every (re)start of the group
    hold={iteration, rank, marker, release, timeout_s, committed_reports}
                                    rank r writes `marker` after iteration k (once Ray committed that many
                                    reports, if given), then waits for `release` (the test kills a server
                                    or the driver, or removes or adds a node, meanwhile); a list: several
    fault={iteration, rank, marker, how: raise|exit, committed_reports}
                                    rank r stops once after iteration k (the marker makes it once), by
                                    raising or by its process exiting, after Ray committed that many reports
    dump_dir=path                   each rank writes a digest of its parameters and its node at the end
    weights_file=path               (with dump_dir) and how far its backbone parameters are from this file's
Ray workers unpickle it by value (this module is not importable there).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import ray
import ray.cloudpickle
import torch

from components.learning.loop import LoopHooks
from components.training.worker import wait_until_committed

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FaultHooks(LoopHooks):
    def __init__(self, fixed_batch: bool = False, nan_at: int | None = None, attempts_file: str | None = None,
                 hold: dict | list[dict] | None = None, fault: dict | None = None, dump_dir: str | None = None,
                 weights_file: str | None = None):
        self.fixed_batch, self.nan_at, self.attempts_file = fixed_batch, nan_at, attempts_file
        self.hold, self.fault, self.dump_dir, self.weights_file = hold, fault, dump_dir, weights_file
        self._fixed = None

    def on_start(self, rank: int, start: int) -> None:
        if rank == 0 and self.attempts_file:
            with open(self.attempts_file, "a") as f:   # one line per (re)start of the worker group
                f.write(f"{start}\n")

    def batches(self, batches, it: int):
        if self.fixed_batch:
            if self._fixed is None:
                self._fixed = itertools.repeat(next(batches))
            batches = self._fixed
        return poisoned(batches) if it == self.nan_at else batches

    def after_iteration(self, rank: int, it: int) -> None:
        holds = self.hold if isinstance(self.hold, list) else [self.hold] if self.hold else []
        for hold in holds:
            if it == hold["iteration"] and rank == hold["rank"] and not os.path.exists(hold["marker"]):
                wait_until_committed(hold.get("committed_reports", 0))
                Path(hold["marker"]).touch()
                deadline = time.monotonic() + hold.get("timeout_s", 300)
                while not os.path.exists(hold.get("release", "")) and time.monotonic() < deadline:
                    time.sleep(0.2)
        fault = self.fault
        if not fault or it != fault["iteration"] or rank != fault["rank"] or os.path.exists(fault["marker"]):
            return
        Path(fault["marker"]).touch()
        wait_until_committed(fault.get("committed_reports", 0))
        if fault.get("how") == "exit":
            os._exit(1)   # a worker process dying, as a crashed or preempted node would
        raise RuntimeError(f"test hook: rank {rank} stops after iteration {it}")

    def on_end(self, rank: int, model) -> None:
        if self.dump_dir:
            dump_worker_facts(self.dump_dir, rank, model, self.weights_file)


def poisoned(batches):
    for img, label in batches:
        yield torch.full_like(img, float("nan")), label


def dump_worker_facts(folder: str, rank: int, model, weights_file: str | None = None) -> None:
    """A digest of this rank's parameters and the node it ran on (BN running stats are left out: each
    rank updates them from its own batch; DDP re-broadcasts rank 0's at the next forward); with
    `weights_file`, the largest difference of a backbone parameter from that file's."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    facts = {"rank": rank, "params_sha256": digest.hexdigest(), "node_id": ray.get_runtime_context().get_node_id()}
    if weights_file:
        loaded = torch.load(weights_file, map_location="cpu", weights_only=True)["state_dict"]
        facts["backbone_max_abs_diff"] = max(
            (tensor.detach().float().cpu() - loaded[name].float()).abs().max().item()
            for name, tensor in model.backbone.named_parameters())
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(facts))
