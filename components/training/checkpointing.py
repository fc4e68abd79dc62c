"""A training checkpoint is a folder: `model.pt` (mmseg layout, the weights alone, what DVC ships)
and `train_state.pt` (optimizer, scaler, iteration, curve so far: what a resumed run needs).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch

from components.atomic import atomic_write_bytes
from components.models.checkpoint import load_mmseg_checkpoint, save_checkpoint

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
STAGING_PREFIX = "dnlseg-checkpoint-"
CURVE_COLUMNS = ("iteration", "loss", "decode_loss", "aux_loss", "lr", "img_s", "mIoU")


def save_train_checkpoint(folder: Path | str, model: torch.nn.Module, optimizer, scaler, state: dict,
                          meta: dict) -> None:
    """`state`: iteration, train_time_s, best, curve (list of rows); plain python values only."""
    folder = Path(folder)
    save_checkpoint(folder / MODEL_FILE, model, meta)
    buffer = io.BytesIO()
    torch.save({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, buffer)
    atomic_write_bytes(folder / STATE_FILE, buffer.getvalue())


def load_train_checkpoint(folder: Path | str, model: torch.nn.Module) -> dict:
    """Loads the weights into `model` (strict) and returns the train state (optimizer/scaler dicts inside)."""
    folder = Path(folder)
    load_mmseg_checkpoint(model, folder / MODEL_FILE)
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


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
