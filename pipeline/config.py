"""params.yaml → typed, validated config objects. The only place that knows the file's layout.

Every error names the params key and what was expected, e.g.
`params.yaml: experiments.foo.backbone: expected one of R-50-D8, R-101-D8, got 'R-18'`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"

BACKBONE_DEPTHS = {"R-50-D8": 50, "R-101-D8": 101}
DATASET_CLASSES = {"cityscapes": 19, "ade20k": 150}
TEST_MODES = ("whole", "slide")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("fused", "naive")


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names the key."""


def load_params(path: Path | str = DEFAULT_PARAMS) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


# --- small validated getters -----------------------------------------------------------------------

def _get(d: dict, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ConfigError(f"params.yaml: {where}.{key}: missing")
    return d[key]


def _positive(value: Any, where: str, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"params.yaml: {where}: expected {what}, got {value!r}")
    return value


def _non_negative(value: Any, where: str, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
        what = "an integer >= 0" if integer else "a number >= 0"
        raise ConfigError(f"params.yaml: {where}: expected {what}, got {value!r}")
    return value


def _choice(value: Any, choices, where: str) -> Any:
    if value not in choices:
        raise ConfigError(f"params.yaml: {where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"params.yaml: {where}: expected true or false, got {value!r}")
    return value


def _pair(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ConfigError(f"params.yaml: {where}: expected two positive integers like [512, 1024], got {value!r}")
    return int(value[0]), int(value[1])


# --- the resolved experiment -----------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs, resolved under a profile. Flat, so it logs as MLflow params."""

    name: str
    profile: str
    dataset: str
    num_classes: int
    backbone: str
    depth: int
    crop_size: tuple[int, int]          # (h, w)
    scale: tuple[int, int]              # (w, h) as in mmseg's Resize
    align_corners: bool
    test_mode: str
    test_crop: tuple[int, int]          # slide window (h, w); = crop_size
    test_stride: tuple[int, int]        # slide stride (h, w)
    max_iters: int
    batch_size: int                     # global
    micro_batch_size: int               # per forward per worker; 0 = batch_size / num_workers
    eval_interval: int
    lr: float
    momentum: float
    weight_decay: float
    poly_power: float
    min_lr: float
    warmup_iters: int
    warmup_ratio: float
    aux_weight: float
    avg_non_ignore: bool
    cat_max_ratio: float
    seed: int
    attention: str
    channels_last: bool
    precision: str
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict = field(default_factory=dict)
    loader_workers: int = 0
    val_max_images: int = 0
    pretrained: str = ""
    data_dir: str = ""                  # absolute: data/prepared/<dataset>
    storage_path: str = ""              # absolute local path or s3://…
    max_failures: int = 0
    ray_address: str = ""
    tracking_uri: str = ""              # may carry credentials from $MLFLOW_TRACKING_URI: log it redacted
    storage_endpoint_url: str = ""      # S3-compatible endpoint ('' = AWS); storage: section or env
    storage_region: str = ""

    def to_flat_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def with_overrides(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _scaled(pair: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(pair[0] * factor)), max(1, round(pair[1] * factor))


def _absolute(path: str) -> str:
    if not path or "://" in path:
        return path
    p = Path(path)
    return str(p if p.is_absolute() else REPO_ROOT / p)


# --- storage and tracking: where things go; credentials only ever come from the environment ---------

STORAGE_KEYS = ("endpoint_url", "region")
# A key with one of these in its name is a credential: it belongs in the environment, not in params.yaml.
CREDENTIAL_WORDS = ("secret", "password", "token", "access_key", "credential", "session")
CREDENTIALS_HINT = ("params.yaml is committed: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) in the environment, and DVC's "
                    "with `dvc remote modify --local`")


def _no_credentials_in_url(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"params.yaml: {where}: expected a string, got {value!r}")
    if "://" in value and "@" in urlsplit(value).netloc:
        raise ConfigError(f"params.yaml: {where}: the URL holds credentials (user:password@); "
                          f"{CREDENTIALS_HINT}")
    return value


def storage_settings(params: dict) -> dict[str, str]:
    """params' `storage:` section with environment fallbacks: endpoint_url ($AWS_ENDPOINT_URL) and
    region ($AWS_DEFAULT_REGION / $AWS_REGION). '' means AWS's own S3 and its default region."""
    section = params.get("storage") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"params.yaml: storage: expected a mapping, got {section!r}")
    for key in section:
        if any(word in str(key).lower() for word in CREDENTIAL_WORDS):
            raise ConfigError(f"params.yaml: storage.{key}: credentials do not belong here; "
                              f"{CREDENTIALS_HINT}")
        if key not in STORAGE_KEYS:
            raise ConfigError(f"params.yaml: storage.{key}: unknown key (known: {', '.join(STORAGE_KEYS)})")
    endpoint = _no_credentials_in_url(section.get("endpoint_url") or "", "storage.endpoint_url")
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"params.yaml: storage.endpoint_url: expected http://host:port or https://host, "
                          f"got {endpoint!r}")
    region = _no_credentials_in_url(section.get("region") or "", "storage.region")
    return {"endpoint_url": endpoint or os.environ.get("AWS_ENDPOINT_URL", ""),
            "region": region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or ""}


def _storage_path(value: Any, where: str) -> str:
    """A local folder or s3://bucket[/prefix] (any pyarrow URI), without credentials in it."""
    value = _no_credentials_in_url(value, where)
    if not value:
        raise ConfigError(f"params.yaml: {where}: missing (a local folder or s3://bucket/prefix)")
    if "://" in value and urlsplit(value).scheme == "s3" and not urlsplit(value).netloc:
        raise ConfigError(f"params.yaml: {where}: expected s3://bucket/prefix, got {value!r}")
    return _absolute(value)


def tracking_uri(params: dict) -> str:
    """params' tracking.uri (no credentials allowed there), else $MLFLOW_TRACKING_URI (may hold them),
    else the repo's SQLite store."""
    uri = _no_credentials_in_url((params.get("tracking") or {}).get("uri") or "", "tracking.uri")
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def resolve_experiment(params: dict, name: str, profile: str | None = None) -> TrainConfig:
    """The experiment `name` under `profile` (default: params' `profile`), validated."""
    experiments = _get(params, "experiments", "params")
    if name not in experiments:
        raise ConfigError(f"params.yaml: experiments: unknown experiment {name!r} "
                          f"(known: {', '.join(sorted(experiments))})")
    exp = experiments[name]
    where = f"experiments.{name}"
    profile = profile or _get(params, "profile", "params")
    profiles = _get(params, "profiles", "params")
    _choice(profile, sorted(profiles), "profile")
    prof = profiles[profile]
    pwhere = f"profiles.{profile}"
    train = _get(params, "train", "params")

    dataset = _choice(_get(exp, "dataset", where), sorted(DATASET_CLASSES), f"{where}.dataset")
    backbone = _choice(_get(exp, "backbone", where), list(BACKBONE_DEPTHS), f"{where}.backbone")
    crop = _pair(_get(exp, "crop_size", where), f"{where}.crop_size")
    scale = _pair(_get(exp, "scale", where), f"{where}.scale")
    # crop (h, w) must fit in the resize box (w, h) at ratio 1, or every crop would be mostly padding.
    if crop[0] > scale[1] or crop[1] > scale[0]:
        raise ConfigError(f"params.yaml: {where}.crop_size: {list(crop)} (h, w) is larger than "
                          f"scale {list(scale)} (w, h)")
    test_mode = _choice(exp.get("test_mode", "whole"), TEST_MODES, f"{where}.test_mode")
    stride = _pair(exp.get("test_stride", list(crop)), f"{where}.test_stride")

    size_scale = _positive(_get(prof, "size_scale", pwhere), f"{pwhere}.size_scale")
    max_iters = _non_negative(_get(prof, "max_iters", pwhere), f"{pwhere}.max_iters", integer=True) \
        or _positive(_get(exp, "max_iters", where), f"{where}.max_iters", integer=True)
    batch = _non_negative(_get(prof, "batch_size", pwhere), f"{pwhere}.batch_size", integer=True) \
        or _positive(_get(exp, "batch_size", where), f"{where}.batch_size", integer=True)
    evals = _positive(_get(prof, "evals_per_run", pwhere), f"{pwhere}.evals_per_run", integer=True)
    num_workers = _positive(_get(prof, "num_workers", pwhere), f"{pwhere}.num_workers", integer=True)
    precision = _choice(_get(prof, "precision", pwhere), PRECISIONS, f"{pwhere}.precision")
    use_gpu = _bool(_get(prof, "use_gpu", pwhere), f"{pwhere}.use_gpu")
    if precision == "fp16" and not use_gpu:
        raise ConfigError(f"params.yaml: {pwhere}.precision: fp16 needs use_gpu: true (use bf16 on CPU)")

    pretrained = (train.get("pretrained") or {}).get(backbone, "") or ""
    data = _get(params, "data", "params")
    storage = storage_settings(params)
    return TrainConfig(
        name=name,
        profile=profile,
        dataset=dataset,
        num_classes=DATASET_CLASSES[dataset],
        backbone=backbone,
        depth=BACKBONE_DEPTHS[backbone],
        crop_size=_scaled(crop, size_scale),
        scale=_scaled(scale, size_scale),
        align_corners=_bool(_get(exp, "align_corners", where), f"{where}.align_corners"),
        test_mode=test_mode,
        test_crop=_scaled(crop, size_scale),
        test_stride=_scaled(stride, size_scale),
        max_iters=max_iters,
        batch_size=batch,
        micro_batch_size=_non_negative(prof.get("micro_batch_size", 0), f"{pwhere}.micro_batch_size", integer=True),
        eval_interval=max(1, max_iters // evals),
        lr=_positive(_get(train, "lr", "train"), "train.lr"),
        momentum=_non_negative(_get(train, "momentum", "train"), "train.momentum"),
        weight_decay=_non_negative(_get(train, "weight_decay", "train"), "train.weight_decay"),
        poly_power=_non_negative(_get(train, "poly_power", "train"), "train.poly_power"),
        min_lr=_non_negative(_get(train, "min_lr", "train"), "train.min_lr"),
        warmup_iters=_non_negative(_get(train, "warmup_iters", "train"), "train.warmup_iters", integer=True),
        warmup_ratio=_positive(_get(train, "warmup_ratio", "train"), "train.warmup_ratio"),
        aux_weight=_non_negative(_get(train, "aux_weight", "train"), "train.aux_weight"),
        avg_non_ignore=_bool(_get(train, "avg_non_ignore", "train"), "train.avg_non_ignore"),
        cat_max_ratio=_positive(_get(train, "cat_max_ratio", "train"), "train.cat_max_ratio"),
        seed=_non_negative(_get(train, "seed", "train"), "train.seed", integer=True),
        attention=_choice(_get(train, "attention", "train"), ATTENTIONS, "train.attention"),
        channels_last=_bool(_get(train, "channels_last", "train"), "train.channels_last"),
        precision=precision,
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=dict(_get(prof, "resources_per_worker", pwhere) or {}),
        loader_workers=_non_negative(_get(prof, "loader_workers", pwhere), f"{pwhere}.loader_workers",
                                     integer=True),
        val_max_images=_non_negative(prof.get("val_max_images", 0), f"{pwhere}.val_max_images", integer=True),
        pretrained=pretrained,
        data_dir=_absolute(str(Path(_get(data, "prepared_dir", "data")) / dataset)),
        storage_path=_storage_path(_get(train, "storage_path", "train"), "train.storage_path"),
        max_failures=_non_negative(_get(train, "max_failures", "train"), "train.max_failures", integer=True),
        ray_address=train.get("ray_address") or os.environ.get("RAY_ADDRESS", ""),
        tracking_uri=tracking_uri(params),
        storage_endpoint_url=storage["endpoint_url"],
        storage_region=storage["region"],
    )


def experiment_names(params: dict) -> list[str]:
    return list(_get(params, "experiments", "params"))
