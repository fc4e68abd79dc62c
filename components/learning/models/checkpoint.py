"""Checkpoints in mmseg's layout: {"state_dict": ..., "meta": ..., ...}.

mmseg's released DNLNet checkpoints load strictly into `build_dnlnet(...)`; our own checkpoints are
written in the same layout so mmseg can load them back.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from components.learning.backbones import STAGE_BLOCKS
from components.learning.models import build_dnlnet

_SHOW = 5  # keys listed per category in error messages


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model."""


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real model in `.module`.
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
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


def load_mmseg_checkpoint(model: nn.Module, path: str | os.PathLike, *, assign: bool = False) -> dict:
    """Strictly load an mmseg checkpoint (or bare state dict) into `model`; returns its meta. With
    assign, the model takes the file's tensors instead of copying into its own (a model built on the
    meta device: no random init to overwrite).

    Any missing, unexpected or shape-mismatched key raises one CheckpointMismatchError listing the
    first few of each with the counts, and the file.
    """
    model = _unwrap(model)
    state_dict, meta = read_checkpoint(path)
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
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return meta


@dataclass
class BackboneLoadResult:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone keys the file did not have
    unexpected: list[str] = field(default_factory=list)  # file keys the backbone lacks (fc.* dropped)


def _blocks(keys) -> dict[str, int]:
    """Blocks per ResNet stage named in `keys`: {"layer3": 23, ...}."""
    last: dict[str, int] = {}
    for k in keys:
        m = re.match(r"(layer\d+)\.(\d+)\.", k)
        if m:
            last[m[1]] = max(last.get(m[1], -1), int(m[2]))
    return {layer: n + 1 for layer, n in sorted(last.items())}


def _depth_hint(file_keys, backbone_keys) -> str:
    """' (layer3 has blocks 0..5 in the file, 0..22 in the backbone: ResNet-50 weights for a ResNet-101
    backbone)' when the stages' block counts differ, else ''."""
    in_file, in_model = _blocks(file_keys), _blocks(backbone_keys)
    differ = [f"{layer} has blocks 0..{in_file.get(layer, 0) - 1} in the file, 0..{n - 1} in the backbone"
              for layer, n in in_model.items() if in_file.get(layer, 0) not in (0, n)]
    if not differ:
        return ""
    depth = {blocks: d for d, blocks in STAGE_BLOCKS.items()}
    stages = [f"layer{i}" for i in range(1, 5)]
    file_depth = depth.get(tuple(in_file.get(s, 0) for s in stages))
    model_depth = depth.get(tuple(in_model.get(s, 0) for s in stages))
    which = (f": ResNet-{file_depth} weights for a ResNet-{model_depth} backbone"
             if file_depth and model_depth else "")
    return f" ({'; '.join(differ)}{which})"


def load_pretrained_backbone(backbone: nn.Module, path: str | os.PathLike) -> BackboneLoadResult:
    """Load ImageNet weights (`resnet50_v1c`: `stem.*`, `layer*.*`, `fc.*`) or the `backbone.*` part of a
    full segmentation checkpoint into the backbone.

    Strict about the backbone: every parameter and buffer except BN's `num_batches_tracked` must come
    from the file, with the same shape, and no `stem.*` / `layer*.*` key of the file may be left over
    (weights of a deeper ResNet). `fc.*` (the ImageNet classifier) is ignored; other extra keys are
    reported in the result. A torchvision-layout (ResNet-V1b: `conv1.weight`, `bn1.*`) file is named
    as such. Each failure is one CheckpointMismatchError line naming the file.
    """
    backbone = _unwrap(backbone)
    state_dict, _ = read_checkpoint(path)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items()
                      if k.startswith("backbone.")}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in state_dict]
    loaded = [k for k in state_dict if k in expected]
    count = f"{len(missing)} of {len(required)} backbone weights missing from the file"
    if missing and "conv1.weight" in state_dict and "stem.0.weight" not in state_dict:
        raise CheckpointMismatchError(
            f"{path}: ResNet-V1b weights (torchvision layout: a 7x7 conv1.weight "
            f"{tuple(state_dict['conv1.weight'].shape)}, bn1.*), not the ResNet-V1c deep stem (stem.*: three "
            f"3x3 convs) that mmseg's DNLNet table was trained with (open-mmlab://resnet50_v1c, "
            f"open-mmlab://resnet101_v1c); {count}: {_first(missing)}")
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs backbone {tuple(expected[k].shape)}"
                  for k in loaded if state_dict[k].shape != expected[k].shape]
    if mismatched:
        raise CheckpointMismatchError(f"{path}: {len(mismatched)} backbone weight(s) with the wrong shape: "
                                      f"{_first(mismatched)}")
    if not loaded:
        raise CheckpointMismatchError(f"{path}: no key matches the backbone (expected e.g. 'stem.0.weight' "
                                      f"or 'backbone.stem.0.weight'; file has {_first(list(state_dict))})")
    if missing:
        raise CheckpointMismatchError(f"{path}: {count}{_depth_hint(state_dict, expected)}: {_first(missing)}")
    unexpected = [k for k in state_dict if k not in expected]
    leftover = [k for k in unexpected if k.startswith(("stem.", "layer")) and not k.endswith("num_batches_tracked")]
    if leftover:
        raise CheckpointMismatchError(f"{path}: {len(leftover)} backbone weights of the file have no place in "
                                      f"the backbone{_depth_hint(state_dict, expected)}: {_first(leftover)}")
    backbone.load_state_dict({k: state_dict[k] for k in loaded}, strict=False)
    return BackboneLoadResult(loaded=loaded, missing=[k for k in expected if k not in state_dict],
                              unexpected=unexpected)


def checkpoint_dict(model: nn.Module, meta: dict | None = None, **extra) -> dict:
    """{"state_dict", "meta", **extra}: the checkpoint file's content, mmseg's layout.

    Tensors go to CPU so the file loads anywhere; keep `meta` / `extra` to plain types and tensors so
    it also loads with weights_only=True.
    """
    clash = {"state_dict", "meta"} & set(extra)
    if clash:
        raise ValueError(f"checkpoint_dict: extra entries may not be named {sorted(clash)}")
    state_dict = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    return {"state_dict": state_dict, "meta": dict(meta or {}), **extra}


def check_pretrained_backbone(path: str | os.PathLike, depth: int) -> BackboneLoadResult:
    """load_pretrained_backbone into a throwaway ResNetV1c-D8 of `depth`: the driver's check, before Ray
    starts, that the file has every backbone tensor (else one CheckpointMismatchError line)."""

    return load_pretrained_backbone(build_dnlnet(depth=depth, num_classes=1).backbone, path)
