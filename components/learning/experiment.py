"""RunConfig: one experiment of the table resolved under a profile, in the parts a run reads.

pipeline/config builds it once from params.yaml (validated there); the stages hand it on as it is, and
it crosses Ray to every worker as this frozen model, so a value has one shape everywhere: sizes are
tuples, the schedule a Schedule. What the run learns (`recipe`, `schedule`) is apart from where and how
fast it runs (`execution`, `location`), which is outside its identity (components/training/identity.py).

The building blocks first (frozen models, no unknown keys, one-line messages that say what was expected
and the value given: `expected a positive integer, got 0`; pipeline/config puts the dotted params.yaml key
in front), then the parts.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from components.learning.backbones import get_backbone
from components.learning.data.datasets import get_dataset
from components.learning.schedules import poly_lr


class FieldError(ValueError):
    """A validator's complaint about `key` (dotted, relative to the model that raised it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def closest_key(key: str, known) -> str:
    """`did you mean lr?` for `lr_typo`, else the list of known keys."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    # A misspelt ending (lr_typo) is too far off for difflib: a known key it starts with is meant.
    close = close or sorted((k for k in known if key.startswith(k)), key=len)[-1:]
    return f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"


class Frozen(BaseModel):
    """A settings model: immutable, and an unknown key is refused naming the closest known one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise FieldError(str(key), f"unknown key ({closest_key(str(key), cls.model_fields)})")
        return data


def number(*, integer: bool = False, minimum: float = 0, strict: bool = False, nullable: bool = False):
    """A number >= minimum (> minimum when strict), an integer when `integer`; null too when `nullable`."""
    noun = "an integer" if integer else "a number"
    if minimum == 0:
        what = ("a positive integer" if integer else "a positive number") if strict else f"{noun} >= 0"
    else:
        what = f"{noun} {'>' if strict else '>='} {minimum:g}"
    kind = int if integer else (int, float)

    def check(value):
        if value is None and nullable:
            return value
        if (isinstance(value, bool) or not isinstance(value, kind) or value < minimum
                or (strict and value == minimum)):
            raise ValueError(f"expected {what}{' or null' if nullable else ''}, got {value!r}")
        return value

    base = int if integer else float
    return Annotated[base | None if nullable else base, BeforeValidator(check)]


def _pair(value):
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"expected two positive integers like [512, 1024], got {value!r}")
    return tuple(value)


def _resources(value):
    if (not isinstance(value, dict)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value.values())):
        raise ValueError(f"expected a mapping of Ray resources like {{CPU: 1}}, got {value!r}")
    return value


Positive = number(strict=True)
PositiveInt = number(integer=True, strict=True)
PositiveIntOrNull = number(integer=True, strict=True, nullable=True)   # null: inherit / all / skip
NonNegative = number()
NonNegativeInt = number(integer=True)
Pair = Annotated[tuple[int, int], BeforeValidator(_pair)]            # sizes: (h, w) or (w, h)
Resources = Annotated[dict[str, int | float], BeforeValidator(_resources)]  # Ray resources, e.g. {CPU: 4, GPU: 1}


class SGD(Frozen):
    """SGD with mmseg's poly decay, as params.yaml's `train:` sets it for every experiment."""

    lr: Positive
    momentum: NonNegative
    weight_decay: NonNegative
    poly_power: NonNegative
    min_lr: NonNegative
    warmup_iters: NonNegativeInt
    warmup_ratio: Positive


class Schedule(SGD):
    """SGD plus the number of iterations: the settings a Tune sweep may change.

    The table's schedules (40k / 80k / 160k) differ only in max_iters; they are declared once, in
    params.yaml's `schedules:`, and an experiment names one.
    """

    max_iters: PositiveInt

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration `it` (counted from 0)."""
        return poly_lr(it, self.max_iters, self.lr, self.poly_power, self.min_lr, self.warmup_iters,
                       self.warmup_ratio)


def schedule_field_types() -> dict[str, type]:
    """{field: int | float} of Schedule: what a sweep may set, and how its values are typed."""
    return {name: f.annotation for name, f in Schedule.model_fields.items()}


# fp32: IEEE fp32 everywhere; tf32: PyTorch's defaults (fp32, cuDNN convolutions in TF32); bf16 / fp16:
# autocast. components/learning/models/speedups.py applies them.
Precision = Literal["fp32", "tf32", "bf16", "fp16"]


class Recipe(Frozen):
    """What the run learns besides its schedule: the experiment's row with the profile's sizes."""

    dataset: str                        # a registered dataset (components/learning/data/datasets)
    backbone: str                       # a registered backbone (components/learning/backbones.py)
    crop_size: Pair                     # (h, w)
    scale: Pair                         # (w, h), as mmseg's Resize `scale`
    align_corners: bool
    test_mode: Literal["whole", "slide"]
    test_crop: Pair                     # slide window (h, w); = crop_size
    test_stride: Pair                   # slide stride (h, w)
    batch_size: PositiveInt             # global
    evals_per_run: PositiveInt          # evaluate + checkpoint this many times per run
    eval_every: PositiveIntOrNull = None      # iterations between evaluations; None: max_iters // evals_per_run
    val_max_images: PositiveIntOrNull = None  # None: the whole val split
    aux_weight: NonNegative
    avg_non_ignore: bool
    cat_max_ratio: Positive
    seed: NonNegativeInt
    attention: Literal["fused", "naive"]
    channels_last: bool
    precision: Precision                # fp32 math and autocast (components/learning/models/speedups.py)
    pretrained: str = "none"            # the backbone's ImageNet weights (a path, URL or open-mmlab://…) or none
    pretrained_sha256: str | None = None    # of that file, once the driver fetched it


class Execution(Frozen):
    """How the run executes: changing it resumes the run."""

    num_workers: PositiveInt                      # elastic: the most workers
    min_workers: PositiveIntOrNull = None         # elastic: the fewest (None: always num_workers)
    use_gpu: bool
    resources_per_worker: Resources = {}
    micro_batch_size: PositiveIntOrNull = None    # per forward per worker; None: batch_size / num_workers
    loader_workers: NonNegativeInt = 0
    max_failures: NonNegativeInt = 0
    ray_address: str | None = None                 # None: a local Ray

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers


class Location(Frozen):
    """Where the run reads its data and keeps its checkpoints: changing it resumes the run."""

    data_dir: str                       # absolute: <prepared_dir>/<dataset>
    storage_path: str                   # absolute local path or s3://…
    endpoint_url: str | None = None     # S3-compatible endpoint (None: AWS)
    region: str | None = None


class RunConfig(Frozen):
    name: str
    profile: str
    recipe: Recipe
    schedule: Schedule
    execution: Execution
    location: Location
    tracking_uri: str                   # may carry credentials from $MLFLOW_TRACKING_URI: log it redacted

    @property
    def max_iters(self) -> int:
        return self.schedule.max_iters

    @property
    def eval_interval(self) -> int:
        return self.recipe.eval_every or max(1, self.max_iters // self.recipe.evals_per_run)

    @property
    def num_classes(self) -> int:
        return get_dataset(self.recipe.dataset).num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return get_dataset(self.recipe.dataset).classes

    @property
    def depth(self) -> int:
        return get_backbone(self.recipe.backbone).depth

    def updated(self, **changes) -> RunConfig:
        """A validated copy: `name=...`, or a part with some of its fields changed (`schedule={"lr": 0.02}`)."""
        data = self.model_dump()
        for key, value in changes.items():
            data[key] = {**data[key], **value} if isinstance(data[key], dict) else value
        return RunConfig.model_validate(data)

    def with_schedule(self, **changes) -> RunConfig:
        return self.updated(schedule=changes)


LEARNED_PARTS = ("recipe", "schedule")    # the run identity hashes these (and name, profile, the derived sizes)


def flat_settings(cfg: RunConfig, parts=("recipe", "schedule", "execution", "location")) -> dict:
    """The settings of `parts` at the top level, with the derived ones: the run's MLflow params and (the
    learned parts) what its identity hashes. Not where it logs (tracking_uri: a temporary server under
    `dnlseg repro --jobs`, perhaps with credentials), which is no setting of the run."""
    flat = {"name": cfg.name, "profile": cfg.profile}
    for part in parts:
        flat |= getattr(cfg, part).model_dump(mode="json")
    return flat | {"num_classes": cfg.num_classes, "depth": cfg.depth, "eval_interval": cfg.eval_interval}
