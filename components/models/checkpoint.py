"""Checkpoints in mmseg's layout: {"state_dict": ..., "meta": ..., ...}.

mmseg's released DNLNet checkpoints load strictly into `build_dnlnet(...)`; our own checkpoints are
written in the same layout so mmseg can load them back.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_SHOW = 5  # keys listed per category in error messages


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model."""


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real model in `.module`.
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of an mmseg checkpoint or a bare state dict; clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / weights_only errors all mean "not a usable checkpoint"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (torch.load weights_only=True: "
                         f"{reason})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state_dict, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, meta = obj, {}
    else:
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry (mmseg) or a bare state dict "
                         f"of tensors, got {type(obj).__name__}")
    # Checkpoints saved from a DDP-wrapped model carry a 'module.' prefix (mmengine strips it too).
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict, meta


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (", ..." if len(keys) > _SHOW else "")


def load_mmseg_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict:
    """Strictly load an mmseg checkpoint (or bare state dict) into `model`; returns its meta.

    Any missing, unexpected or shape-mismatched key raises one CheckpointMismatchError listing the
    first few of each with the counts, and the file.
    """
    model = _unwrap(model)
    state_dict, meta = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch (checkpoint vs model): {_first(mismatched)}")
        raise CheckpointMismatchError(f"{path}: checkpoint does not match the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    return meta


@dataclass
class BackboneLoadResult:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone keys the file did not have
    unexpected: list[str] = field(default_factory=list)  # file keys the backbone lacks (fc.* dropped)


def load_pretrained_backbone(backbone: nn.Module, path: str | os.PathLike) -> BackboneLoadResult:
    """Non-strict load of ImageNet weights (`resnet50_v1c`: `stem.*`, `layer*.*`, `fc.*`) or of the
    `backbone.*` part of a full segmentation checkpoint. `fc.*` is ignored; a shape mismatch on a
    shared key or a file with no matching key at all is an error."""
    backbone = _unwrap(backbone)
    state_dict, _ = _read_state_dict(path)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items()
                      if k.startswith("backbone.")}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    loaded = [k for k in state_dict if k in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs backbone {tuple(expected[k].shape)}"
                  for k in loaded if state_dict[k].shape != expected[k].shape]
    if mismatched:
        raise CheckpointMismatchError(f"{path}: {len(mismatched)} backbone weight(s) with the wrong shape: "
                                      f"{_first(mismatched)}")
    if not loaded:
        raise CheckpointMismatchError(f"{path}: no key matches the backbone (expected e.g. 'stem.0.weight' "
                                      f"or 'backbone.stem.0.weight'; file has {_first(list(state_dict))})")
    backbone.load_state_dict({k: state_dict[k] for k in loaded}, strict=False)
    return BackboneLoadResult(loaded=loaded, missing=[k for k in expected if k not in state_dict],
                              unexpected=[k for k in state_dict if k not in expected])


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict | None = None, **extra) -> None:
    """Write {"state_dict", "meta", **extra} atomically (temp file in the same folder + os.replace).

    Tensors go to CPU so the file loads anywhere; keep `meta` / `extra` to plain types and tensors so
    it also loads with weights_only=True.
    """
    clash = {"state_dict", "meta"} & set(extra)
    if clash:
        raise ValueError(f"save_checkpoint: extra entries may not be named {sorted(clash)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    checkpoint = {"state_dict": state_dict, "meta": dict(meta or {}), **extra}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
