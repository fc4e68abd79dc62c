"""A training checkpoint is a folder: `model.pt` (mmseg layout, the weights alone, what DVC ships),
`train_state.pt` (optimizer, scaler, iteration, curve so far: what a resumed run needs), the small files
the driver reads (`summary.json`, `curve.csv`), and `checksums.json` (every file's sha256, written last).
This module is the only one that knows those names: the loop writes and resumes through it, the train
stage reads a finished run's outputs through it.

A damaged checkpoint (a partial upload, a bad disk: files truncated, bit-flipped or missing) never
blocks a run: on resume it is named in one warning line and the run continues from the newest intact
checkpoint of the run, or starts fresh, saying so, when there is none.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs
import torch
from ray.train import Checkpoint

from components.atomic import atomic_open, atomic_write_bytes
from components.learning.models.checkpoint import checkpoint_dict, load_mmseg_checkpoint
from components.storage import is_s3, pyarrow_filesystem
from components.weights import sha256_file

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
SUMMARY_FILE = "summary.json"   # iteration, mIoU / mAcc / aAcc, best so far, train time
CURVE_FILE = "curve.csv"
CHECKSUMS_FILE = "checksums.json"
STAGING_PREFIX = "dnlseg-checkpoint-"
CURVE_COLUMNS = ("iteration", "loss", "decode_loss", "aux_loss", "lr", "img_s", "mIoU")


def save_checkpoint(path: Path | str, model: torch.nn.Module, meta: dict | None = None, **extra) -> None:
    """A model file (checkpoint_dict: mmseg's layout), written atomically."""
    with atomic_open(path) as f:
        torch.save(checkpoint_dict(model, meta, **extra), f)


def save_train_checkpoint(folder: Path | str, model: torch.nn.Module, optimizer, scaler, state: dict,
                          meta: dict) -> None:
    """`state`: iteration, train_time_s, best, curve (list of rows); plain python values only."""
    folder = Path(folder)
    save_checkpoint(folder / MODEL_FILE, model, meta)
    buffer = io.BytesIO()
    torch.save({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, buffer)
    atomic_write_bytes(folder / STATE_FILE, buffer.getvalue())


def save_checkpoint_folder(folder: Path | str, model: torch.nn.Module, optimizer, scaler, state: dict,
                           summary: dict, meta: dict) -> None:
    """The whole checkpoint: weights, train state, the small files the driver reads without loading
    tensors, checksums last."""
    folder = Path(folder)
    save_train_checkpoint(folder, model, optimizer, scaler, state, meta)
    write_curve_csv(folder / CURVE_FILE, state["curve"])
    atomic_write_bytes(folder / SUMMARY_FILE, json.dumps(
        {**summary, "best": state["best"], "train_time_s": state["train_time_s"],
         "world_sizes": state.get("world_sizes", [])}, indent=1).encode())
    write_checksums(folder)


def load_train_checkpoint(folder: Path | str, model: torch.nn.Module) -> dict:
    """Loads the weights into `model` (strict) and returns the train state (optimizer/scaler dicts inside).
    The state is read first: a file that does not load leaves `model` as it was."""
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    load_mmseg_checkpoint(model, folder / MODEL_FILE)
    return state


def staging_folder(tmp_root: str | None = None) -> tempfile.TemporaryDirectory:
    """Where a rank writes a checkpoint for Ray to copy into storage: a temp folder named after this
    process. A worker killed while one is open (faults, restarts) cannot remove it, so the folders of
    processes that are gone (~2 x the model's size each) are removed first."""
    root = Path(tmp_root or tempfile.gettempdir())
    for folder in root.glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name[len(STAGING_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_curve_csv(path: Path | str, rows: list[dict]) -> None:
    """One row per logged iteration; mIoU only on evaluation rows (empty elsewhere)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in CURVE_COLUMNS})
    atomic_write_bytes(path, text.getvalue().encode())


# --- checksums, and resuming from the newest intact checkpoint --------------------------------------

def write_checksums(folder: Path | str) -> None:
    """checksums.json: the sha256 of every other file of the checkpoint (written last)."""
    folder = Path(folder)
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    atomic_write_bytes(folder / CHECKSUMS_FILE, json.dumps(sums, indent=1).encode())


def damage(folder: Path | str) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file matches checksums.json (a folder
    without one, written before checksums existed, is judged by loading it)."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS_FILE).read_text())
    except FileNotFoundError:
        return None if (folder / MODEL_FILE).is_file() and (folder / STATE_FILE).is_file() else \
            f"{MODEL_FILE} or {STATE_FILE} missing"
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS_FILE} unreadable ({type(e).__name__})"
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its sha256 (truncated or corrupted, {path.stat().st_size} bytes)"
    return None


def _iteration(checkpoint) -> int:
    try:
        return int(read_summary(checkpoint)["iteration"])
    except Exception:  # noqa: BLE001 - an unreadable summary: a damaged checkpoint, tried last
        return -1


def _checkpoints_in(fs, folder: str) -> list:
    """The checkpoint folders of the Ray run at `folder` on `fs`, as ray.train.Checkpoint objects."""

    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(folder))
    except (FileNotFoundError, OSError):
        return []
    return [Checkpoint(info.path, filesystem=fs) for info in found
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")]


def _others(checkpoint) -> list:
    """The run's other checkpoints in storage (Ray keeps the latest and the best), newest first."""
    parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    others = [c for c in _checkpoints_in(checkpoint.filesystem, parent)
              if c.path.rstrip("/") != checkpoint.path.rstrip("/")]
    return sorted(others, key=_iteration, reverse=True)


@contextlib.contextmanager
def _local_copy(checkpoint):
    """The checkpoint as a local folder: itself when local, else a download of this process's own.
    (Ray's `as_directory` shares one temp folder per checkpoint among a node's processes and deletes
    it when the last reader leaves; ranks arriving at different times raced on it.)"""

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="dnlseg-resume-") as tmp:
        checkpoint.to_directory(tmp)
        yield Path(tmp)


def _load_if_intact(checkpoint, model: torch.nn.Module) -> tuple[dict | None, str | None]:
    """(state, None) with the weights loaded into `model`, or (None, what is wrong)."""
    with _local_copy(checkpoint) as folder:
        problem = damage(folder)
        if problem is not None:
            return None, problem
        try:
            return load_train_checkpoint(folder, model), None
        except Exception as e:  # noqa: BLE001 - an unreadable file is a damaged checkpoint too
            return None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def resume_state(checkpoint, model: torch.nn.Module, warn: Callable[[str], None]) -> tuple[dict | None, str | None]:
    """The train state of the newest intact checkpoint of the run, `checkpoint` (the one Ray reports,
    local or s3://) first, and that checkpoint's path; its weights loaded into `model`. (None, None): no
    intact one, start fresh. Each damaged checkpoint costs one `warn` line saying what is wrong and what
    happens instead."""
    damaged = []
    for candidate in [checkpoint, *_others(checkpoint)]:
        state, problem = _load_if_intact(candidate, model)
        if problem is None:
            for path, what in damaged:
                warn(f"checkpoint {path} is damaged ({what}): resuming from {candidate.path} "
                     f"(iteration {state['iteration']})")
            return state, candidate.path
        damaged.append((candidate.path, problem))
    for path, what in damaged:
        warn(f"checkpoint {path} is damaged ({what}): no intact checkpoint left, starting fresh")
    return None, None


def load_chosen(checkpoint, path: str, model: torch.nn.Module) -> dict:
    """The state of the checkpoint at `path` (on `checkpoint`'s filesystem) that rank 0 chose to resume
    from, weights into `model`: every rank resumes from the same one. Damaged in this rank's copy
    (checked again after the download): raised, so that Ray restarts the worker group."""

    state, problem = _load_if_intact(Checkpoint(path, filesystem=checkpoint.filesystem), model)
    if problem is not None:
        raise RuntimeError(f"checkpoint {path} chosen by rank 0 is damaged on this rank ({problem})")
    return state


# --- a finished run, read by the train stage's driver -------------------------------------------------

class DamagedCheckpointError(RuntimeError):
    """A finished run's final weights are missing or do not match their recorded sha256."""


def read_text(checkpoint, filename: str) -> str:
    """A small file of a reported checkpoint (local or s3://), read without downloading the rest."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{filename}") as f:
        return f.read().decode()


def read_summary(checkpoint) -> dict:
    return json.loads(read_text(checkpoint, SUMMARY_FILE))


def read_curve(checkpoint) -> str:
    return read_text(checkpoint, CURVE_FILE)


def copy_from_checkpoint(checkpoint, filename: str, dest: Path) -> None:
    """Stream a file out of a checkpoint (local or s3://) into `dest`, atomically."""
    with atomic_open(dest) as out, checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{filename}") as src:
        shutil.copyfileobj(src, out, length=16 << 20)


def export_weights(checkpoint, dest: Path) -> None:
    """The checkpoint's model.pt at `dest`, checked against its checksums.json. On local storage, on the
    same filesystem, `dest` is a hard link to it: one copy on disk for the checkpoint, the stage's model
    file and DVC's cache (whose first link type, .dvc/config, adopts the same file). Elsewhere a copy."""

    try:
        expected = json.loads(read_text(checkpoint, CHECKSUMS_FILE))[MODEL_FILE]
    except (OSError, ValueError, KeyError) as e:
        raise DamagedCheckpointError(f"{checkpoint.path}: no readable sha256 of {MODEL_FILE} in {CHECKSUMS_FILE} "
                                     f"({type(e).__name__})") from None
    info = checkpoint.filesystem.get_file_info(f"{checkpoint.path}/{MODEL_FILE}")
    if info.type != pyarrow.fs.FileType.File:
        raise DamagedCheckpointError(f"{checkpoint.path}/{MODEL_FILE} missing")
    local = isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)
    if not (local and _link(Path(checkpoint.path) / MODEL_FILE, dest)):
        copy_from_checkpoint(checkpoint, MODEL_FILE, dest)
    if sha256_file(dest) != expected:
        dest.unlink()
        raise DamagedCheckpointError(f"{checkpoint.path}/{MODEL_FILE} does not match its sha256 in {CHECKSUMS_FILE}")


def _link(source: Path, dest: Path) -> bool:
    """Hard-link `source` at `dest`, atomically (a temp link renamed over it); False where the
    filesystem cannot (another filesystem, no hard links)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and os.path.samefile(source, dest):
        return True   # (os.replace of a file onto itself would leave the temp link behind)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(source, tmp)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):   # another fs, no links
            return False
        raise
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def finished_checkpoint(run_uri: str, max_iters: int):
    """The checkpoint at `max_iters` of the Ray run at `run_uri` (local or s3://; the run finished), or None."""

    fs, folder = pyarrow_filesystem(run_uri if is_s3(run_uri) else str(Path(run_uri).resolve()))
    return next((c for c in _checkpoints_in(fs, folder) if _iteration(c) == max_iters), None)


def prune_finished_run(final) -> None:
    """Once a finished run's outputs are written, it keeps its final checkpoint and nothing else: its
    other checkpoints and the final optimizer state served resuming only. The final weights stay: a
    rerun of the finished run (the stage forced, or only execution settings changed) writes its outputs
    from them, and on local storage they are the same file as the stage's model file (export_weights)."""
    for checkpoint in _others(final):
        final.filesystem.delete_dir(checkpoint.path)
    with contextlib.suppress(FileNotFoundError, OSError):
        final.filesystem.delete_file(f"{final.path}/{STATE_FILE}")
