"""The sections of params.yaml, each a frozen pydantic model whose fields are the file's keys.

Absent or null means "inherit / all / skip / from the environment"; a value given must be valid. Paths
resolve against the repo (the validation context's `root`). Checks that span sections are in Params.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, StrictBool, ValidationInfo, field_validator, model_validator

from components.learning.backbones import BACKBONES
from components.learning.data.datasets import dataset_names
from components.learning.experiment import (
    SGD,
    FieldError,
    Frozen,
    NonNegative,
    NonNegativeInt,
    Pair,
    Positive,
    PositiveInt,
    PositiveIntOrNull,
    Precision,
    Resources,
    number,
)
from components.learning.tuning import check_space


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names the key."""


# A key with one of these in its name is a credential: it belongs in the environment, not in params.yaml.
CREDENTIAL_WORDS = ("secret", "password", "token", "access_key", "credential", "session")
CREDENTIALS_HINT = ("params.yaml is committed: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) in the environment, and DVC's "
                    "with `dvc remote modify --local`")


def _no_credentials(value: str | None) -> str | None:
    if value and "://" in value and "@" in urlsplit(value).netloc:
        raise ValueError(f"the URL holds credentials (user:password@); {CREDENTIALS_HINT}")
    return value


def _in_repo(value: str | None, info: ValidationInfo) -> str | None:
    """A relative local path made absolute against the repo; URLs as they are."""
    if not value or "://" in value:
        return value
    return str(Path(info.context["root"]) / value) if info.context else value


Url = Annotated[str, AfterValidator(_no_credentials)]
RepoPath = Annotated[str, AfterValidator(_in_repo)]
PUBLISHED_LOG_WORDS = ("released", "none")   # the seed table's log.json link | no published curve


def _published_log(value: str, info: ValidationInfo) -> str:
    """released, none, an http(s) URL (no credentials) or a local path (made absolute against the repo)."""
    if value in PUBLISHED_LOG_WORDS:
        return value
    if "://" in value and urlsplit(value).scheme not in ("http", "https"):
        raise ValueError(f"expected released, none, an http(s) URL or a local path, got {value!r}")
    return _in_repo(_no_credentials(value), info)


PublishedLog = Annotated[str, AfterValidator(_published_log)]


class Profile(Frozen):
    """How the table's experiments run: `sample` on a 2-core CPU, `reference` as the seed did."""

    size_scale: Positive                    # crop size, resize scale and slide window x this
    max_iters: PositiveIntOrNull = None    # every experiment's (showcase too); None: iterations, else schedule x scale
    schedule_scale: Positive = 1.0
    batch_size: PositiveIntOrNull = None   # global; None: the experiment's
    micro_batch_size: PositiveIntOrNull = None
    num_workers: PositiveInt
    min_workers: PositiveIntOrNull = None  # elastic (Ray Train's (min, max) workers): shrinks to this on node loss
    use_gpu: StrictBool
    resources_per_worker: Resources = {}
    loader_workers: NonNegativeInt
    pretrained: Literal["imagenet", "none"]
    precision: Precision
    evals_per_run: PositiveInt
    val_max_images: PositiveIntOrNull = None
    iterations: dict[str, PositiveInt] = {}    # experiment -> its iterations under this profile (a showcase)
    published_log: Literal["released", "none"] = "none"   # rows that do not set experiments.<exp>.published_log

    @model_validator(mode="after")
    def _fp16_on_gpu(self):
        if self.precision == "fp16" and not self.use_gpu:
            raise FieldError("precision", "fp16 needs use_gpu: true (use bf16 on CPU)")
        return self

    @model_validator(mode="after")
    def _elastic_range(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise FieldError("min_workers",
                             f"expected at most num_workers ({self.num_workers}), got {self.min_workers}")
        return self

    @property
    def worker_counts(self) -> range:
        """Every number of workers a run of this profile may have (one, unless elastic)."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)


class Experiment(Frozen):
    """One row of the results table (params.yaml `experiments.<name>`)."""

    dataset: str
    backbone: str
    crop_size: Pair                         # (h, w)
    scale: Pair                             # (w, h)
    schedule: str                           # a key of `schedules`
    batch_size: PositiveInt
    align_corners: StrictBool
    test_mode: Literal["whole", "slide"] = "whole"
    test_stride: Pair | None = None         # None: the crop size
    published_log: PublishedLog | None = None   # the published run's training log; None: the profile's

    @field_validator("backbone")
    @classmethod
    def _registered(cls, value):
        if value not in BACKBONES:
            raise ValueError(f"expected one of {', '.join(BACKBONES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _crop_fits(self):
        # crop (h, w) must fit in the resize box (w, h) at ratio 1, or every crop would be mostly padding.
        (h, w), (sw, sh) = self.crop_size, self.scale
        if h > sh or w > sw:
            raise FieldError("crop_size", f"{[h, w]} (h, w) is larger than scale {[sw, sh]} (w, h)")
        return self


class Train(SGD):
    """params.yaml `train`: the SGD every experiment shares, its losses, and where runs go."""

    aux_weight: NonNegative
    avg_non_ignore: StrictBool
    cat_max_ratio: Positive
    seed: NonNegativeInt
    attention: Literal["fused", "naive"]
    channels_last: StrictBool
    pretrained: dict[str, str | None] = {}  # backbone -> weights (path, URL, open-mmlab://…); none/null: random
    storage_path: Annotated[Url, AfterValidator(_in_repo)]
    max_failures: NonNegativeInt
    ray_address: str | None = None          # None: $RAY_ADDRESS, else a local Ray

    @field_validator("pretrained")
    @classmethod
    def _backbones(cls, value):
        for backbone in value:
            if backbone not in BACKBONES:
                raise FieldError(backbone, f"not a registered backbone (registered: {', '.join(BACKBONES)})")
        return value

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, value):
        if not value:
            raise ValueError("missing (a local folder or s3://bucket/prefix)")
        if urlsplit(value).scheme == "s3" and not urlsplit(value).netloc:
            raise ValueError(f"expected s3://bucket/prefix, got {value!r}")
        return value


class DatasetSource(Frozen):
    source: RepoPath                        # the dataset's official files


class Data(Frozen):
    prepared_dir: RepoPath
    prepare_workers: PositiveIntOrNull = None   # None: all cores
    datasets: dict[str, DatasetSource]

    @field_validator("datasets")
    @classmethod
    def _registered(cls, value):
        for name in value:
            if name not in dataset_names():
                raise FieldError(name, f"not a registered dataset (registered: {', '.join(dataset_names())})")
        return value


class SampleSize(Frozen):
    train: PositiveInt
    val: PositiveInt
    height: number(integer=True, minimum=32)
    width: number(integer=True, minimum=32)


class CityscapesSample(SampleSize):
    cities: list | dict | None = None       # a list, or {split: list}


class Sample(Frozen):
    """The generated datasets (components/sample), in the official formats."""

    seed: NonNegativeInt
    cityscapes: CityscapesSample | None = None
    ade20k: SampleSize | None = None

    def sizes(self) -> dict[str, dict]:
        return {name: getattr(self, name).model_dump(exclude_none=True) for name in ("cityscapes", "ade20k")
                if getattr(self, name) is not None}


class ScheduleLength(Frozen):
    max_iters: PositiveInt


class EvalSettings(Frozen):
    """`evaluate:` with `evaluate.profiles.<profile>` laid over it."""

    ms_ratios: tuple[float, ...]              # of the test scale, each with and without flip
    flip: StrictBool
    max_images: PositiveIntOrNull = None   # None: the whole val split
    fps_images: PositiveIntOrNull = None   # the seed: 200 images, the first fps_warmup not timed; None: skip
    fps_warmup: NonNegativeInt = 0
    overlays: NonNegativeInt                # val images drawn as image | ground truth | prediction
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: the profile's (use_gpu: a GPU per Ray task)
    shards: PositiveIntOrNull = None       # Ray tasks the val split is split into; None: one per free GPU (CPU: 1)
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "tf32"   # PyTorch's (mmseg's) default;
                                            # auto: fp16 on CUDA, bf16 on a CPU with it in hardware, else fp32
    fold_bn: StrictBool = True              # BatchNorm folded into the convs (exact in fp32)
    cpu_threads: PositiveIntOrNull = None  # torch's CPU threads; None: every core

    @field_validator("ms_ratios", mode="before")
    @classmethod
    def _ratios(cls, value):
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in value)):
            raise ValueError(f"expected a list of positive numbers like [0.5, 0.75, 1.0], got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.precision == "fp16" and self.device == "cpu":
            raise FieldError("precision", "fp16 needs a GPU (use bf16 on CPU)")
        if self.fps_images is not None and self.fps_images <= self.fps_warmup:
            raise FieldError("fps_images", f"{self.fps_images} must be larger than fps_warmup {self.fps_warmup} "
                                           f"(or null to skip the speed measurement)")
        return self


class Evaluate(EvalSettings):
    profiles: dict[str, dict] = {}          # profile -> the settings it overrides

    @model_validator(mode="after")
    def _every_profile(self):
        for name in self.profiles:
            self.for_profile(name)
        return self

    def for_profile(self, profile: str) -> EvalSettings:
        layer = self.profiles.get(profile, {})
        try:
            return EvalSettings.model_validate(self.model_dump(exclude={"profiles"}) | layer)
        except ValueError as e:
            from pipeline.config import error_key

            key, message = error_key(e)
            raise FieldError(f"profiles.{profile}.{key}" if key.split(".")[0] in layer else key, message) from None


class Imported(Frozen):
    """A released checkpoint evaluated next to our runs: `source` a URL or a local path (or `released`:
    the seed table's download link of that experiment)."""

    experiment: str
    source: RepoPath

    @model_validator(mode="before")
    @classmethod
    def _released(cls, data):
        if isinstance(data, dict) and data.get("source") == "released":
            from components.evaluation.table import parse_seed_table

            links = {row.config: row.model_url for row in parse_seed_table()}
            if data.get("experiment") not in links:
                raise FieldError("source", f"the results table has no released checkpoint of "
                                           f"{data.get('experiment')!r}")
            data = {**data, "source": links[data["experiment"]]}
        return data


warnings.filterwarnings("ignore", 'Field name "register" in "Report" shadows')   # ABCMeta.register: harmless


class Report(Frozen):
    mlflow_ui: str = "http://127.0.0.1:5000"   # where `mlflow ui` serves the store (an http(s) tracking URI wins)
    register: StrictBool = True             # register the best run per dataset, alias `champion`
    model_name: str = "dnlnet-{dataset}"

    @field_validator("model_name")
    @classmethod
    def _per_dataset(cls, value):
        if "{dataset}" not in value:
            raise ValueError(f"expected a name containing {{dataset}}, got {value!r}")
        return value


class Asha(Frozen):
    type: Literal["asha"] = "asha"
    grace_period: number(integer=True, minimum=1) = 1    # evaluations before a stop
    reduction_factor: number(minimum=1, strict=True) = 2.0


class TrialResources(Frozen):
    driver_cpu: NonNegative = 0
    driver_memory_gb: NonNegative = 0
    num_workers: PositiveIntOrNull = None               # None: the profile's
    resources_per_worker: Resources | None = None        # None: the profile's
    max_concurrent_trials: PositiveIntOrNull = None     # None: as many as the cluster holds now

    @model_validator(mode="after")
    def _bundle(self):
        if not (self.driver_cpu or self.driver_memory_gb):
            raise ValueError("driver_cpu and driver_memory_gb must be numbers >= 0, not both 0 (Ray needs a "
                             "non-empty bundle)")
        return self

    @property
    def driver(self) -> dict:
        """The trial driver's Ray bundle."""
        return {k: v for k, v in (("CPU", self.driver_cpu), ("memory", round(self.driver_memory_gb * 2**30))) if v}


class Tune(Frozen):
    """params.yaml's `tune`: one experiment's schedule swept with ASHA."""

    experiment: str | None = None
    num_samples: number(integer=True, minimum=1)
    seed: NonNegativeInt = 0
    metric: Literal["mIoU", "mAcc", "aAcc"] = "mIoU"
    mode: Literal["max", "min"] = "max"
    space: dict
    eval_interval: PositiveIntOrNull = None    # iterations between evaluations in every trial; None: the profile's
    scheduler: Asha = Asha()
    resources_per_trial: TrialResources = TrialResources(driver_memory_gb=0.25)

    @field_validator("space", mode="before")
    @classmethod
    def _space(cls, value):
        try:
            return check_space(value)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def learned(self) -> dict:
        """The settings that change what a sweep finds (the others say where and how fast it runs)."""
        return {"num_samples": self.num_samples, "seed": self.seed, "metric": self.metric, "mode": self.mode,
                "space": json.dumps(self.space, sort_keys=True), "eval_interval": self.eval_interval,
                "grace_period": self.scheduler.grace_period, "reduction_factor": self.scheduler.reduction_factor}


class Downloads(Frozen):
    cache_dir: RepoPath | None = None       # None: $DNLSEG_CACHE, else ~/.cache/dnlseg


class Tracking(Frozen):
    uri: Url | None = None                  # None: $MLFLOW_TRACKING_URI, else the repo's mlflow.db


class Storage(Frozen):
    endpoint_url: Url | None = None         # None: $AWS_ENDPOINT_URL, else AWS
    region: Url | None = None               # None: $AWS_DEFAULT_REGION

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_here(cls, data):
        for key in data if isinstance(data, dict) else ():
            if any(word in str(key).lower() for word in CREDENTIAL_WORDS):
                raise FieldError(str(key), f"credentials do not belong here; {CREDENTIALS_HINT}")
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _http(cls, value):
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"expected http://host:port or https://host, got {value!r}")
        return value
