"""Run identity: a run's name is its experiment plus a hash of what changes its result, so rerunning
the same stage resumes its Ray run from storage and a changed setting, dataset or code starts afresh."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from components.experiment import LEARNED_PARTS, Execution, Location, RunConfig, flat_settings

# Code that runs the train and tune stages without changing what a run learns: the train driver, Ray
# start-up and checks, tracking, console lines, shipping data and weights to the nodes, file writing.
# It is in neither the run identity nor dvc.yaml's deps of train and tune (tests/test_config.py checks
# both ways): editing it resumes runs instead of restarting days of GPU time.
ORCHESTRATION = ("pipeline/cli.py", "pipeline/train.py", "components/tracking.py", "components/console.py",
                 "components/ray_cluster.py", "components/preflight.py", "components/hardware.py",
                 "components/storage.py",
                 "components/weights.py", "components/atomic.py", "components/training/trainer.py",
                 "components/training/progress.py", "components/training/data_sync.py",
                 "components/training/identity.py", "components/training/contract.py")

# Fields that say where and how fast a run executes, not what it learns: changing them resumes the run.
EXECUTION_FIELDS = frozenset(Execution.model_fields) | frozenset(Location.model_fields)


def code_hash(root: Path | str, deps: tuple[str, ...] | list[str]) -> str:
    """sha256 over the .py files of `deps` (files or folders under `root`; paths and contents)."""
    root = Path(root)
    digest = hashlib.sha256()
    files = []
    for entry in deps:
        path = root / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def learned_settings(cfg: RunConfig) -> dict:
    """The config minus its execution and location (EXECUTION_FIELDS)."""
    return flat_settings(cfg, LEARNED_PARTS)


def _digest(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(cfg: RunConfig, data_hash: str, code: str) -> str:
    """`<exp>-<8 hex>` over what the run learns: its settings, the data, the code."""
    return f"{cfg.name}-{_digest({'config': learned_settings(cfg), 'data': data_hash, 'code': code})}"


def sweep_name(cfg: RunConfig, tune_settings: dict, data_hash: str, code: str) -> str:
    """`<exp>-tune-<8 hex>` over what a sweep finds: the base config, the sweep's settings, data, code."""
    blob = {"config": learned_settings(cfg), "tune": tune_settings, "data": data_hash, "code": code}
    return f"{cfg.name}-tune-{_digest(blob)}"
