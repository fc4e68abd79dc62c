"""`dnlseg predict`: images (files or folders) -> label PNGs and colour overlays.

The model is a registered one (`models:/<name>@champion`, `models:/<name>/<version>`), a run's
(`runs:/<run_id>`) or a checkpoint file. Each image is run through the model's test pipeline (keep-ratio
resize to its test scale, whole or slide, single scale) and the scores resized back to the image's size:
    <out_dir>/<name>.png          class ids as an 8-bit palette PNG in the dataset's colours
    <out_dir>/<name>_overlay.png  the image blended with those colours
Images found in a folder keep their path relative to it under out_dir.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import torch

from components.evaluation.loading import load_model
from components.evaluation.registry import ModelSpec, fetch_model
from components.evaluation.visualize import overlay, save_image, save_label_png
from components.learning.backbones import backbone_of_weights, get_backbone
from components.learning.data import get_dataset
from components.learning.data.transforms import build_test_transform
from components.learning.models.checkpoint import read_checkpoint
from components.learning.models.speedups import autocast, resolve_precision, use_precision
from components.learning.segment import InferenceSetting, predict_label
from pipeline.config import ConfigError, Params

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(image file, output name without suffix) for every input file and every image under input folders."""
    found = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            images = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"{entry}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found += [(p, p.relative_to(entry).with_suffix("")) for p in images]
        elif entry.is_file():
            found.append((entry, Path(entry.stem)))
        else:
            raise FileNotFoundError(f"{entry}: no such image file or folder")
    names = [str(name) for _, name in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"inputs give several images the output name {duplicates[0]!r}: pass them in "
                         f"separate calls or rename one")
    return found


def model_spec(params: Params, spec: ModelSpec | None, checkpoint: Path, experiment: str | None = None) -> ModelSpec:
    """How to build and test the model: an explicit `experiment` of params.yaml, else the config.json
    logged with it, else the experiment named in the checkpoint's meta, else the weights' backbone and
    class count with the first matching experiment's test settings."""

    if experiment:
        return ModelSpec.of(params.experiment(experiment))
    if spec:
        return spec
    state_dict, meta = read_checkpoint(checkpoint)   # read twice only when nothing else says how
    if meta.get("experiment") in params.experiments:
        return ModelSpec.of(params.experiment(meta["experiment"]))
    if "decode_head.conv_seg.weight" not in state_dict:
        raise ValueError(f"{checkpoint}: not a DNLNet state dict: 'decode_head.conv_seg.weight' is missing")
    backbone = backbone_of_weights(state_dict).name
    num_classes = int(state_dict["decode_head.conv_seg.weight"].shape[0])
    candidates = [name for name, exp in params.experiments.items()
                  if get_dataset(exp.dataset).num_classes == num_classes and exp.backbone == backbone]
    if not candidates:
        raise ConfigError(f"cannot tell how to test this checkpoint ({backbone}, {num_classes} classes): "
                          f"name an experiment of params.yaml")
    return ModelSpec.of(params.experiment(candidates[0]))


def _read_rgb(path: Path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def predict(params: Params, inputs: list[Path], out_dir: Path, model_ref: str,
            experiment: str | None = None) -> list[Path]:
    """Label PNG + overlay for every input image; returns the written paths (label, overlay per image)."""

    images = collect_images(inputs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    speed = params.eval_settings()   # the evaluate stage's precision and BN folding
    precision = resolve_precision(speed.precision, device)
    use_precision(precision)         # the fp32 math (tf32 / IEEE) as the evaluate stage runs it
    with tempfile.TemporaryDirectory(prefix="dnlseg-model-") as tmp:   # a registry model's download
        fetched = fetch_model(model_ref, params.tracking_uri, Path(tmp))
        s = model_spec(params, fetched.spec, fetched.checkpoint, experiment)
        model, _ = load_model(fetched.checkpoint, depth=get_backbone(s.backbone).depth, num_classes=s.num_classes,
                              align_corners=s.align_corners, attention=s.attention, device=device,
                              channels_last=True, fold_bn=speed.fold_bn)
    transform = build_test_transform(scale=s.scale)
    setting = InferenceSetting(s.test_mode, s.test_crop, s.test_stride)
    colours = get_dataset(s.dataset).palette

    out_dir = Path(out_dir)
    written = []
    for path, name in images:
        rgb = _read_rgb(path)
        img = torch.from_numpy(transform(image=rgb)["image"].transpose(2, 0, 1).copy())[None].to(device)
        img = img.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            label = predict_label(model, img, rgb.shape[:2], setting)[0].to(torch.uint8).cpu().numpy()
        target = out_dir / name
        written.append(save_label_png(target.with_name(target.name + ".png"), label, colours))
        written.append(save_image(target.with_name(target.name + "_overlay.png"),
                                  overlay(rgb, label, colours)))
    print(f"[predict] {len(images)} images with {fetched.source} ({s.dataset}, {s.backbone}, "
          f"{s.test_mode} at scale {list(s.scale)}, {device.type}, {precision}) -> {out_dir}", flush=True)
    return written
