"""`dnlseg predict`: images (files or folders) -> label PNGs and colour overlays.

The model is a registered one (`models:/<name>@champion`, `models:/<name>/<version>`), a run's
(`runs:/<run_id>`) or a checkpoint file. Each image is run through the model's test pipeline (keep-ratio
resize to its test scale, whole or slide, single scale) and the scores resized back to the image's size:
    <out_dir>/<name>.png          class ids as an 8-bit palette PNG in the dataset's colours
    <out_dir>/<name>_overlay.png  the image blended with those colours
Images found in a folder keep their path relative to it under out_dir.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DATASET_CLASSES, ConfigError, resolve_experiment, tracking_uri

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


def _settings_from_experiment(params: dict, experiment: str) -> dict:
    from components.evaluation.registry import model_config

    return model_config(resolve_experiment(params, experiment))


def model_settings(params: dict, config: dict | None, checkpoint: Path,
                   experiment: str | None = None) -> dict:
    """How to build and test the model: an explicit `experiment` of params.yaml, else the config.json
    logged with it, else the experiment named in the checkpoint's meta, else the weights' depth and
    class count with the first matching experiment's test settings."""
    from components.evaluation.registry import infer_build_args
    from components.models.checkpoint import _read_state_dict

    if experiment:
        return _settings_from_experiment(params, experiment)
    if config:
        return dict(config)
    state_dict, meta = _read_state_dict(checkpoint)   # read twice only when nothing else says how
    if meta.get("experiment") in (params.get("experiments") or {}):
        settings = _settings_from_experiment(params, meta["experiment"])
    else:
        inferred = infer_build_args(state_dict)
        datasets = [d for d, n in DATASET_CLASSES.items() if n == inferred["num_classes"]]
        backbone = f"R-{inferred['depth']}-D8"
        candidates = [name for name, exp in (params.get("experiments") or {}).items()
                      if exp.get("dataset") in datasets and exp.get("backbone") == backbone]
        if not candidates:
            raise ConfigError(f"cannot tell how to test this checkpoint (R-{inferred['depth']}, "
                              f"{inferred['num_classes']} classes): name an experiment of params.yaml")
        settings = _settings_from_experiment(params, candidates[0])
    return settings


def _read_rgb(path: Path):
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def predict(params: dict, inputs: list[Path], out_dir: Path, model_ref: str,
            experiment: str | None = None) -> list[Path]:
    """Label PNG + overlay for every input image; returns the written paths (label, overlay per image)."""
    import torch

    from components.data import palette
    from components.data.transforms import build_test_transform
    from components.evaluation.registry import fetch_model
    from components.evaluation.segment import InferenceSetting, predict_label
    from components.evaluation.visualize import overlay, save_image, save_label_png
    from components.models import build_dnlnet
    from components.models.checkpoint import load_mmseg_checkpoint
    from components.models.speedups import autocast, prepare_for_inference
    from pipeline.evaluate import eval_settings

    images = collect_images(inputs)
    fetched = fetch_model(model_ref, tracking_uri(params))
    s = model_settings(params, fetched.config, fetched.checkpoint, experiment)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_dnlnet(depth=s["depth"], num_classes=s["num_classes"], align_corners=s["align_corners"],
                         attention=s.get("attention", "fused"))
    load_mmseg_checkpoint(model, fetched.checkpoint)
    speed = eval_settings(params)   # the evaluate stage's precision and BN folding
    model = prepare_for_inference(model.to(device), channels_last=True, fold_bn=speed.fold_bn)
    transform = build_test_transform(scale=tuple(s["scale"]))
    setting = InferenceSetting(s["test_mode"], tuple(s["test_crop"]), tuple(s["test_stride"]))
    colours = palette(s["dataset"])

    out_dir = Path(out_dir)
    written = []
    for path, name in images:
        rgb = _read_rgb(path)
        img = torch.from_numpy(transform(image=rgb)["image"].transpose(2, 0, 1).copy())[None].to(device)
        img = img.contiguous(memory_format=torch.channels_last)
        with autocast(device, speed.precision_on(device)):
            label = predict_label(model, img, rgb.shape[:2], setting)[0].to(torch.uint8).cpu().numpy()
        target = out_dir / name
        written.append(save_label_png(target.with_name(target.name + ".png"), label, colours))
        written.append(save_image(target.with_name(target.name + "_overlay.png"),
                                  overlay(rgb, label, colours)))
    print(f"[predict] {len(images)} images with {fetched.source} ({s['dataset']}, R-{s['depth']}, "
          f"{s['test_mode']} at scale {list(s['scale'])}) -> {out_dir}", flush=True)
    return written
