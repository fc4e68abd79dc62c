"""RunConfig: one experiment of the table resolved under a profile, in the parts a run reads.

pipeline/config builds it once from params.yaml (validated there); the stages hand it on as it is, and
it crosses Ray to every worker as this frozen model, so a value has one shape everywhere: sizes are
tuples, the schedule a Schedule. What the run learns (`recipe`, `schedule`) is apart from where and how
fast it runs (`execution`, `location`), which is outside its identity (components/training/identity.py).
"""

from __future__ import annotations

from typing import Literal

from components.backbones import get_backbone
from components.data.datasets import get_dataset
from components.schedules import Schedule
from components.validated import (
    Frozen,
    NonNegative,
    NonNegativeInt,
    Pair,
    Positive,
    PositiveInt,
    PositiveIntOrNull,
    Resources,
)

Precision = Literal["fp32", "bf16", "fp16"]


class Recipe(Frozen):
    """What the run learns besides its schedule: the experiment's row with the profile's sizes."""

    dataset: str                        # a registered dataset (components/data/datasets)
    backbone: str                       # a registered backbone (components/backbones.py)
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
    precision: Precision                # autocast
    pretrained: str = "none"            # the backbone's ImageNet weights (a path, URL or open-mmlab://…) or none
    pretrained_sha256: str | None = None    # of that file, once the driver fetched it


class Execution(Frozen):
    """How the run executes: changing it resumes the run."""

    num_workers: PositiveInt
    use_gpu: bool
    resources_per_worker: Resources = {}
    micro_batch_size: PositiveIntOrNull = None    # per forward per worker; None: batch_size / num_workers
    loader_workers: NonNegativeInt = 0
    max_failures: NonNegativeInt = 0
    ray_address: str | None = None                 # None: a local Ray


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
