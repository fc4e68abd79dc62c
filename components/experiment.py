"""TrainConfig: one experiment of the table resolved under a profile.

pipeline/config builds it once from params.yaml (validated there); the stages hand it on as it is, and
it crosses Ray to every worker as this dataclass, so a value has one shape everywhere: sizes are
tuples, the schedule a Schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from components.backbones import get_backbone
from components.data.datasets import get_dataset
from components.schedules import Schedule


@dataclass(frozen=True)
class TrainConfig:
    name: str
    profile: str
    dataset: str                        # a registered dataset (components/data/datasets)
    backbone: str                       # a registered backbone (components/models/backbones.py)
    crop_size: tuple[int, int]          # (h, w)
    scale: tuple[int, int]              # (w, h), as mmseg's Resize `scale`
    align_corners: bool
    test_mode: str                      # whole | slide
    test_crop: tuple[int, int]          # slide window (h, w); = crop_size
    test_stride: tuple[int, int]        # slide stride (h, w)
    schedule: Schedule
    batch_size: int                     # global
    micro_batch_size: int               # per forward per worker; 0 = batch_size / num_workers
    evals_per_run: int                  # evaluate + checkpoint this many times per run
    aux_weight: float
    avg_non_ignore: bool
    cat_max_ratio: float
    seed: int
    attention: str
    channels_last: bool
    precision: str                      # fp32 | bf16 | fp16 autocast
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict = field(default_factory=dict)
    loader_workers: int = 0
    val_max_images: int = 0
    eval_every: int = 0                 # iterations between evaluations; 0 = max_iters // evals_per_run
    pretrained: str = "none"            # the backbone's ImageNet weights (a path, URL or open-mmlab://…) or none
    pretrained_sha256: str = ""         # of that file, once the driver fetched it (part of the run identity)
    data_dir: str = ""                  # absolute: <prepared_dir>/<dataset>
    storage_path: str = ""              # absolute local path or s3://…
    max_failures: int = 0
    ray_address: str = ""
    tracking_uri: str = ""              # may carry credentials from $MLFLOW_TRACKING_URI: log it redacted
    storage_endpoint_url: str = ""      # S3-compatible endpoint ('' = AWS)
    storage_region: str = ""

    @property
    def max_iters(self) -> int:
        return self.schedule.max_iters

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.max_iters // self.evals_per_run)

    @property
    def num_classes(self) -> int:
        return get_dataset(self.dataset).num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return get_dataset(self.dataset).classes

    @property
    def depth(self) -> int:
        return get_backbone(self.backbone).depth

    def to_flat_dict(self) -> dict:
        """Every setting at the top level (the schedule's fields and the derived sizes included): the
        run's MLflow params and what its identity hashes. Not where it logs (tracking_uri: a temporary
        server under `dnlseg repro --jobs`, perhaps with credentials), which is no setting of the run."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("schedule", "tracking_uri")}
        flat |= dataclasses.asdict(self.schedule)
        flat |= {"num_classes": self.num_classes, "depth": self.depth, "eval_interval": self.eval_interval}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()}

    def with_overrides(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def with_schedule(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, schedule=dataclasses.replace(self.schedule, **changes))
