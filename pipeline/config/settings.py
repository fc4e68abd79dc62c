"""params.yaml's `evaluate`, `report` and `tune` sections, validated (the training side is in
__init__.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from components import tuning
from pipeline.config.reader import ConfigError, Section, fail

PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_PRECISIONS = ("auto", *PRECISIONS)


@dataclass(frozen=True)
class EvalSettings:
    """`evaluate:` with `evaluate.profiles.<profile>` laid over it (spec sections 2 and 4)."""

    ms_ratios: tuple[float, ...]
    flip: bool
    max_images: int              # 0 = the whole val split
    fps_images: int              # the seed: 200 images, the first 5 not timed; 0 = skip
    fps_warmup: int
    overlays: int                # val images drawn as image | ground truth | prediction
    device: str                  # auto | cpu | cuda
    precision: str               # fp32 (the seed's) | auto (fp16 on CUDA, bf16 on CPU) | bf16 | fp16: autocast
    fold_bn: bool                # BatchNorm folded into the convs (exact in fp32; bench/README.md)
    cpu_threads: int             # torch's CPU threads; 0 = torch's default (every core)

    def precision_on(self, device) -> str:
        """The autocast precision this evaluation runs with on `device`."""
        if self.precision != "auto":
            return self.precision
        return "fp16" if str(device).startswith("cuda") else "bf16"


def read_eval_settings(s: Section, profiles: list[str]) -> dict[str, EvalSettings]:
    """One EvalSettings per profile, each validated whatever profile is active."""
    overrides = s.section("profiles", {})
    for name in overrides.keys():
        if name not in profiles:
            raise fail(overrides.at(name), f"not a profile (profiles: {', '.join(profiles)})")
    base = _eval_settings(s)
    out = {}
    for profile in profiles:
        if profile not in overrides:
            out[profile] = base
            continue
        layer = overrides.section(profile)
        merged = {k: v for k, v in s.data.items() if k != "profiles"} | layer.data
        out[profile] = _eval_settings(Section(merged, s.where, places={k: layer.at(k) for k in layer.keys()}))
    return out


def _eval_settings(s: Section) -> EvalSettings:
    ratios = s.raw("ms_ratios")
    if (not isinstance(ratios, list) or not ratios
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios)):
        raise fail(s.at("ms_ratios"), f"expected a list of positive numbers like [0.5, 0.75, 1.0], got {ratios!r}")
    device = s.choice("device", ("auto", "cpu", "cuda"), "auto")
    precision = s.choice("precision", EVAL_PRECISIONS, "fp32")   # the seed's
    if precision == "fp16" and device == "cpu":
        raise fail(s.at("precision"), "fp16 needs a GPU (use bf16 on CPU)")
    settings = EvalSettings(
        ms_ratios=tuple(float(r) for r in ratios), flip=s.boolean("flip"),
        max_images=s.non_negative("max_images", 0, integer=True),
        fps_images=s.non_negative("fps_images", integer=True), fps_warmup=s.non_negative("fps_warmup", integer=True),
        overlays=s.non_negative("overlays", integer=True), device=device, precision=precision,
        fold_bn=s.boolean("fold_bn", True), cpu_threads=s.non_negative("cpu_threads", 0, integer=True))
    if settings.fps_images and settings.fps_images <= settings.fps_warmup:
        raise fail(s.at("fps_images"), f"{settings.fps_images} must be larger than fps_warmup "
                                        f"{settings.fps_warmup} (or 0 to skip the speed measurement)")
    s.done()
    return settings


@dataclass(frozen=True)
class ReportSettings:
    mlflow_ui: str               # where `mlflow ui` serves the store (an http(s) tracking URI wins)
    register: bool               # register the best run per dataset, alias `champion`
    model_name: str              # with {dataset}


def read_report(s: Section) -> ReportSettings:
    settings = ReportSettings(mlflow_ui=s.string("mlflow_ui", "http://127.0.0.1:5000"),
                              register=s.boolean("register", True),
                              model_name=s.string("model_name", "dnlnet-{dataset}"))
    if "{dataset}" not in settings.model_name:
        raise fail(s.at("model_name"), f"expected a name containing {{dataset}}, got {settings.model_name!r}")
    s.done()
    return settings


@dataclass(frozen=True)
class TuneSettings:
    """params.yaml's `tune` section: one experiment's schedule swept with ASHA."""

    experiment: str
    num_samples: int
    seed: int
    metric: str
    mode: str
    space: dict
    eval_interval: int                  # iterations between evaluations in every trial; 0 = the profile's
    grace_period: int                   # evaluations before ASHA may stop a trial
    reduction_factor: float
    driver: dict = field(default_factory=dict)             # the trial driver's Ray resources
    num_workers: int = 0                                   # 0 = the profile's
    resources_per_worker: dict = field(default_factory=dict)   # empty = the profile's
    max_concurrent_trials: int = 0                         # 0 = as many as the cluster holds now

    def learned(self) -> dict:
        """The settings that change what a sweep finds (the others say where and how fast it runs)."""
        return {"num_samples": self.num_samples, "seed": self.seed, "metric": self.metric, "mode": self.mode,
                "space": json.dumps(self.space, sort_keys=True), "eval_interval": self.eval_interval,
                "grace_period": self.grace_period, "reduction_factor": self.reduction_factor}


def read_tune(s: Section, experiments: list[str]) -> TuneSettings:
    scheduler = s.section("scheduler", {})
    scheduler.choice("type", ("asha",), "asha")
    reduction_factor = scheduler.number("reduction_factor", 2, minimum=1, strict=True)
    grace = scheduler.number("grace_period", 1, integer=True, minimum=1)
    scheduler.done()
    res = s.section("resources_per_trial", {})
    cpu, memory_gb = res.non_negative("driver_cpu", 0), res.non_negative("driver_memory_gb", 0)
    if not (cpu or memory_gb):
        raise fail(res.where, "driver_cpu and driver_memory_gb must be numbers >= 0, not both 0 (Ray needs a "
                              "non-empty bundle)")
    try:
        space = tuning.check_space(s.raw("space"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    experiment = s.string("experiment", "")
    if experiment and experiment not in experiments:
        raise fail(s.at("experiment"), f"unknown experiment {experiment!r}")
    settings = TuneSettings(
        experiment=experiment, num_samples=s.number("num_samples", integer=True, minimum=1),
        seed=s.non_negative("seed", 0, integer=True), metric=s.choice("metric", ("mIoU", "mAcc", "aAcc"), "mIoU"),
        mode=s.choice("mode", ("max", "min"), "max"), space=space,
        eval_interval=s.non_negative("eval_interval", 0, integer=True), grace_period=grace,
        reduction_factor=float(reduction_factor),
        driver={k: v for k, v in (("CPU", cpu), ("memory", round(memory_gb * 2**30))) if v},
        num_workers=res.non_negative("num_workers", 0, integer=True),
        resources_per_worker=res.resources("resources_per_worker", {}),
        max_concurrent_trials=res.non_negative("max_concurrent_trials", 0, integer=True))
    res.done()
    s.done()
    return settings
