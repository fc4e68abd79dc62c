"""params.yaml -> typed, frozen settings: the one place that knows the file's layout.

`load()` reads and validates the WHOLE file before any stage does work: every section, every profile
(not only the active one), every experiment; an unknown key is an error naming the closest known one.
Stages receive the resulting `Params` and never read raw dicts. Paths resolve against the repo the
stage runs in (the params file's folder; DVC runs every stage from the repo root), never against where
the package was installed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from components.backbones import BACKBONES
from components.data.datasets import dataset_names
from components.experiment import TrainConfig
from components.schedules import Schedule
from components.weights import default_cache_dir
from pipeline.config.reader import ConfigError, Section, fail
from pipeline.config.settings import (
    PRECISIONS,
    EvalSettings,
    ReportSettings,
    TuneSettings,
    read_eval_settings,
    read_report,
    read_tune,
)

__all__ = ["ConfigError", "EvalSettings", "Params", "ReportSettings", "TrainConfig", "TuneSettings", "load",
           "parse"]

PARAMS_FILE = "params.yaml"
# Where this code lives (with its dvc.yaml): what a run's identity hashes is the code that runs.
CODE_ROOT = Path(__file__).resolve().parents[2]
# Set by `dnlseg repro --jobs`: its loopback MLflow server for the repo's default store, which the
# concurrent stages write through instead of opening the SQLite file each.
STORE_SERVER_ENV = "DNLSEG_MLFLOW_SERVER"
TEST_MODES = ("whole", "slide")
ATTENTIONS = ("fused", "naive")
# A key with one of these in its name is a credential: it belongs in the environment, not in params.yaml.
CREDENTIAL_WORDS = ("secret", "password", "token", "access_key", "credential", "session")
CREDENTIALS_HINT = ("params.yaml is committed: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) in the environment, and DVC's "
                    "with `dvc remote modify --local`")


# --- sections --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """How the table's experiments run: `sample` on a 2-core CPU, `reference` as the seed did."""

    name: str
    size_scale: float
    max_iters: int              # > 0: every experiment's iterations; 0 = its schedule x schedule_scale
    schedule_scale: float
    batch_size: int             # 0 = the experiment's global batch
    micro_batch_size: int
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict
    loader_workers: int
    pretrained: str             # imagenet (train.pretrained.<backbone>) | none (random init)
    precision: str
    evals_per_run: int
    val_max_images: int


@dataclass(frozen=True)
class Experiment:
    """One row of the results table (params.yaml `experiments.<name>`)."""

    name: str
    dataset: str
    backbone: str
    crop_size: tuple[int, int]          # (h, w)
    scale: tuple[int, int]              # (w, h)
    schedule: str                       # a key of `schedules`
    batch_size: int
    align_corners: bool
    test_mode: str
    test_stride: tuple[int, int]


@dataclass(frozen=True)
class TrainSettings:
    """params.yaml `train`: what every experiment shares (spec section 3), and where runs go."""

    schedule: dict                      # Schedule's fields except max_iters (lr, momentum, ...)
    aux_weight: float
    avg_non_ignore: bool
    cat_max_ratio: float
    seed: int
    attention: str
    channels_last: bool
    pretrained: dict                    # backbone -> weights spec (path, URL, open-mmlab://…) or "none"
    storage_path: str                   # absolute local folder or s3://…
    max_failures: int
    ray_address: str


@dataclass(frozen=True)
class SampleSize:
    """One generated sample dataset (components/sample)."""

    train: int
    val: int
    height: int
    width: int
    cities: object = None               # cityscapes only: a list, or {split: list}

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ImportedCheckpoint:
    """A released checkpoint evaluated next to our runs: `source` is a URL or an absolute local path."""

    name: str
    experiment: str
    source: str


@dataclass(frozen=True)
class Params:
    root: Path                          # the repo the stage runs in; relative paths resolve here
    profile: str
    profiles: dict[str, Profile]
    prepared_dir: Path
    prepare_workers: int
    sources: dict[str, Path]            # dataset -> its official files (data.datasets.<name>.source)
    sample_seed: int
    sample: dict[str, SampleSize]
    schedules: dict[str, int]           # name -> max_iters
    train: TrainSettings
    experiments: dict[str, Experiment]
    evaluate: dict[str, EvalSettings]   # per profile
    imported: dict[str, ImportedCheckpoint]
    report: ReportSettings
    tune: TuneSettings
    tracking_uri: str                   # what stages connect to
    tracking_ui: str                    # where the store's MLflow UI is (links in the report)
    storage_endpoint_url: str
    storage_region: str
    cache_dir: Path                     # downloads (pretrained weights, released checkpoints)

    def experiment(self, name: str, profile: str | None = None) -> TrainConfig:
        """Experiment `name` under `profile` (default: the file's `profile`)."""
        if name not in self.experiments:
            raise fail("experiments", f"unknown experiment {name!r} (known: {', '.join(sorted(self.experiments))})")
        return _resolve(self, self.experiments[name], self.profiles[self.profile_name(profile)])

    def pretrained(self, backbone: str, profile: str | None = None) -> str:
        """The backbone's initial weights under `profile`: train.pretrained.<backbone> when the profile
        says imagenet, else none (random init)."""
        if self.profiles[self.profile_name(profile)].pretrained == "none":
            return "none"
        return self.train.pretrained.get(backbone, "none")

    def profile_name(self, profile: str | None = None) -> str:
        profile = profile or self.profile
        if profile not in self.profiles:
            raise fail("profile", f"expected one of {', '.join(sorted(self.profiles))}, got {profile!r}")
        return profile

    def eval_settings(self, profile: str | None = None) -> EvalSettings:
        return self.evaluate[self.profile_name(profile)]

    def evaluation_names(self) -> list[str]:
        return list(self.experiments) + list(self.imported)

    def evaluation_target(self, name: str, out_root: Path | None = None) -> tuple[TrainConfig, str, bool]:
        """(config, checkpoint, imported?) of a trained experiment or an imported checkpoint (whose
        checkpoint is a URL or a local path: components.weights.fetch gets it)."""
        if name in self.experiments:
            return self.experiment(name), str(model_file(out_root or self.root, name)), False
        if name not in self.imported:
            raise ConfigError(f"params.yaml: no experiment or imported_checkpoints entry named {name!r} "
                              f"(known: {', '.join(sorted(self.evaluation_names()))})")
        entry = self.imported[name]
        return self.experiment(entry.experiment).with_overrides(name=name), entry.source, True


# --- where the stages' outputs live (dvc.yaml names the same paths) ---------------------------------

def model_file(root: Path, name: str) -> Path:
    return Path(root) / "models" / name / "model.pt"


def train_metrics_file(root: Path, name: str) -> Path:
    return Path(root) / "metrics" / name / "train.json"


def eval_metrics_file(root: Path, name: str) -> Path:
    return Path(root) / "metrics" / name / "eval.json"


def plots_dir(root: Path, name: str) -> Path:
    return Path(root) / "plots" / name


def tune_dir(root: Path, name: str) -> Path:
    return Path(root) / "tune" / name


def weights_record(root: Path, backbone: str) -> Path:
    return Path(root) / "weights" / f"{backbone}.json"


def default_store(root: Path) -> str:
    """The tracking store when neither tracking.uri nor $MLFLOW_TRACKING_URI names one: a file in the repo."""
    return f"sqlite:///{Path(root) / 'mlflow.db'}"


def code_deps(stage: str) -> tuple[str, ...]:
    """The code a DVC stage depends on (dvc.yaml's deps under components/ and pipeline/, relative to
    CODE_ROOT): what the run identity hashes, so what makes DVC rerun a stage also makes it start fresh."""
    dvc_yaml = CODE_ROOT / "dvc.yaml"
    try:
        definition = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise ConfigError(f"{dvc_yaml}: no stage {stage!r} ({type(e).__name__})") from None
    deps = (definition.get("do") or definition).get("deps") or []
    return tuple(d for d in deps if isinstance(d, str) and d.startswith(("components/", "pipeline/")))


# --- reading the file ------------------------------------------------------------------------------

def load(path: Path | str | None = None, root: Path | str | None = None) -> Params:
    """Read and validate params.yaml (default: ./params.yaml); `root` defaults to the file's folder."""
    path = Path(path or PARAMS_FILE)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse(raw, Path(root) if root is not None else path.resolve().parent)


def read_raw(path: Path | str | None = None) -> dict:
    """params.yaml as a plain dict (tests and tools that write a changed copy)."""
    return yaml.safe_load(Path(path or PARAMS_FILE).read_text())


def parse(raw: dict, root: Path | str) -> Params:
    root = Path(root).resolve()
    top = Section(raw)
    profiles_section = top.section("profiles")
    profiles = {name: _read_profile(profiles_section.section(name), name) for name in profiles_section.keys()}
    profile = top.choice("profile", sorted(profiles))

    data = top.section("data")
    prepared_dir = _absolute(root, data.string("prepared_dir"))
    prepare_workers = data.non_negative("prepare_workers", 0, integer=True)
    datasets = data.section("datasets")
    sources = {}
    for name in datasets.keys():
        _check_dataset(name, datasets.at(name))
        entry = datasets.section(name)
        sources[name] = Path(_absolute(root, entry.string("source")))
        entry.done()
    data.done()

    sample = top.section("sample")
    sample_seed = sample.non_negative("seed", integer=True)
    sizes = {}
    for name in sample.keys():
        if name != "seed":
            _check_dataset(name, sample.at(name))
            sizes[name] = _read_sample_size(sample.section(name), name)

    schedules_section = top.section("schedules")
    schedules = {}
    for name in schedules_section.keys():
        entry = schedules_section.section(name)
        schedules[str(name)] = entry.positive("max_iters", integer=True)
        entry.done()

    train = _read_train(top.section("train"), root)
    experiments_section = top.section("experiments")
    experiments = {name: _read_experiment(experiments_section.section(name), name, schedules, sources)
                   for name in experiments_section.keys()}
    evaluate = read_eval_settings(top.section("evaluate"), list(profiles))
    imported_section = top.section("imported_checkpoints", {})
    imported = {name: _read_imported(imported_section.section(name), name, experiments, root)
                for name in imported_section.keys()}
    downloads = top.section("downloads", {})
    cache_dir = downloads.string("cache_dir", "")
    downloads.done()
    report = read_report(top.section("report", {}))
    tune = read_tune(top.section("tune"), list(experiments))
    tracking = top.section("tracking", {})
    uri = _no_credentials_in_url(tracking.string("uri", ""), tracking.at("uri"))
    configured = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    tracking.done()
    endpoint_url, region = _read_storage(top.section("storage", {}))
    top.done()
    return Params(
        root=root, profile=profile, profiles=profiles, prepared_dir=Path(prepared_dir),
        prepare_workers=prepare_workers, sources=sources, sample_seed=sample_seed, sample=sizes,
        schedules=schedules, train=train, experiments=experiments, evaluate=evaluate, imported=imported,
        report=report, tune=tune,
        tracking_uri=configured or os.environ.get(STORE_SERVER_ENV) or default_store(root),
        # An http(s) store serves its own UI; the repo's SQLite file (even through the repro's temporary
        # server) is browsed with `mlflow ui` at report.mlflow_ui.
        tracking_ui=configured if configured.startswith(("http://", "https://")) else report.mlflow_ui,
        storage_endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL", ""),
        storage_region=region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "",
        cache_dir=Path(_absolute(root, cache_dir)) if cache_dir else default_cache_dir())


def _check_dataset(name: str, where: str) -> None:
    if name not in dataset_names():
        raise fail(where, f"not a registered dataset (registered: {', '.join(dataset_names())})")


def _read_profile(s: Section, name: str) -> Profile:
    precision = s.choice("precision", PRECISIONS)
    use_gpu = s.boolean("use_gpu")
    if precision == "fp16" and not use_gpu:
        raise fail(s.at("precision"), "fp16 needs use_gpu: true (use bf16 on CPU)")
    profile = Profile(
        name=name, size_scale=s.positive("size_scale"), max_iters=s.non_negative("max_iters", integer=True),
        schedule_scale=s.positive("schedule_scale", 1.0),
        batch_size=s.non_negative("batch_size", integer=True),
        micro_batch_size=s.non_negative("micro_batch_size", 0, integer=True),
        num_workers=s.positive("num_workers", integer=True), use_gpu=use_gpu,
        resources_per_worker=s.resources("resources_per_worker"),
        loader_workers=s.non_negative("loader_workers", integer=True), precision=precision,
        pretrained=s.choice("pretrained", ("imagenet", "none")),
        evals_per_run=s.positive("evals_per_run", integer=True),
        val_max_images=s.non_negative("val_max_images", 0, integer=True))
    s.done()
    return profile


def _read_sample_size(s: Section, name: str) -> SampleSize:
    size = SampleSize(train=s.positive("train", integer=True), val=s.positive("val", integer=True),
                      height=s.number("height", integer=True, minimum=32),
                      width=s.number("width", integer=True, minimum=32),
                      cities=s.raw("cities", None) if name == "cityscapes" else None)
    s.done()
    return size


def _read_train(s: Section, root: Path) -> TrainSettings:
    schedule = {
        "lr": s.positive("lr"), "momentum": s.non_negative("momentum"),
        "weight_decay": s.non_negative("weight_decay"), "poly_power": s.non_negative("poly_power"),
        "min_lr": s.non_negative("min_lr"), "warmup_iters": s.non_negative("warmup_iters", integer=True),
        "warmup_ratio": s.positive("warmup_ratio")}
    pretrained = s.section("pretrained", {})
    weights = {}
    for backbone in pretrained.keys():
        if backbone not in BACKBONES:
            raise fail(pretrained.at(backbone), f"not a registered backbone (registered: {', '.join(BACKBONES)})")
        weights[backbone] = pretrained.string(backbone) or "none"
    settings = TrainSettings(
        schedule=schedule, aux_weight=s.non_negative("aux_weight"), avg_non_ignore=s.boolean("avg_non_ignore"),
        cat_max_ratio=s.positive("cat_max_ratio"), seed=s.non_negative("seed", integer=True),
        attention=s.choice("attention", ATTENTIONS), channels_last=s.boolean("channels_last"),
        pretrained=weights, storage_path=_storage_path(root, s.raw("storage_path"), s.at("storage_path")),
        max_failures=s.non_negative("max_failures", integer=True), ray_address=s.string("ray_address", ""))
    s.done()
    return settings


def _read_experiment(s: Section, name: str, schedules: dict, sources: dict) -> Experiment:
    dataset = s.choice("dataset", sorted(sources))
    crop, scale = s.pair("crop_size"), s.pair("scale")
    # crop (h, w) must fit in the resize box (w, h) at ratio 1, or every crop would be mostly padding.
    if crop[0] > scale[1] or crop[1] > scale[0]:
        raise fail(s.at("crop_size"), f"{list(crop)} (h, w) is larger than scale {list(scale)} (w, h)")
    experiment = Experiment(
        name=name, dataset=dataset, backbone=s.choice("backbone", list(BACKBONES)), crop_size=crop, scale=scale,
        schedule=s.choice("schedule", list(schedules)), batch_size=s.positive("batch_size", integer=True),
        align_corners=s.boolean("align_corners"), test_mode=s.choice("test_mode", TEST_MODES, "whole"),
        test_stride=s.pair("test_stride", list(crop)))
    s.done()
    return experiment


def _read_imported(s: Section, name: str, experiments: dict, root: Path) -> ImportedCheckpoint:
    experiment = s.choice("experiment", list(experiments))
    source = s.string("source")
    if source == "released":   # the seed table's download link of that experiment
        from components.evaluation.table import parse_seed_table

        links = {row.config: row.model_url for row in parse_seed_table()}
        if experiment not in links:
            raise fail(s.at("source"), f"the results table has no released checkpoint of {experiment!r}")
        source = links[experiment]
    elif not source.startswith(("http://", "https://")):
        source = _absolute(root, source)
    s.done()
    return ImportedCheckpoint(name, experiment, source)


def _resolve(params: Params, exp: Experiment, prof: Profile) -> TrainConfig:
    train = params.train
    scaled = lambda pair: (max(1, round(pair[0] * prof.size_scale)), max(1, round(pair[1] * prof.size_scale)))  # noqa: E731
    iterations = prof.max_iters or max(1, round(params.schedules[exp.schedule] * prof.schedule_scale))
    schedule = Schedule(max_iters=iterations, **train.schedule)
    return TrainConfig(
        name=exp.name, profile=prof.name, dataset=exp.dataset, backbone=exp.backbone,
        crop_size=scaled(exp.crop_size), scale=scaled(exp.scale), align_corners=exp.align_corners,
        test_mode=exp.test_mode, test_crop=scaled(exp.crop_size), test_stride=scaled(exp.test_stride),
        schedule=schedule, batch_size=prof.batch_size or exp.batch_size, micro_batch_size=prof.micro_batch_size,
        evals_per_run=prof.evals_per_run, aux_weight=train.aux_weight, avg_non_ignore=train.avg_non_ignore,
        cat_max_ratio=train.cat_max_ratio, seed=train.seed, attention=train.attention,
        channels_last=train.channels_last, precision=prof.precision, num_workers=prof.num_workers,
        use_gpu=prof.use_gpu, resources_per_worker=dict(prof.resources_per_worker),
        loader_workers=prof.loader_workers, val_max_images=prof.val_max_images,
        pretrained=params.pretrained(exp.backbone, prof.name), data_dir=str(params.prepared_dir / exp.dataset),
        storage_path=train.storage_path, max_failures=train.max_failures,
        ray_address=train.ray_address or os.environ.get("RAY_ADDRESS", ""), tracking_uri=params.tracking_uri,
        storage_endpoint_url=params.storage_endpoint_url, storage_region=params.storage_region)


# --- paths, storage and tracking: credentials only ever come from the environment -------------------

def _absolute(root: Path, path: str) -> str:
    if not path or "://" in path:
        return path
    p = Path(path)
    return str(p if p.is_absolute() else root / p)


def _no_credentials_in_url(value, where: str) -> str:
    if not isinstance(value, str):
        raise fail(where, f"expected a string, got {value!r}")
    if "://" in value and "@" in urlsplit(value).netloc:
        raise fail(where, f"the URL holds credentials (user:password@); {CREDENTIALS_HINT}")
    return value


def _storage_path(root: Path, value, where: str) -> str:
    """A local folder or s3://bucket[/prefix] (any pyarrow URI), without credentials in it."""
    value = _no_credentials_in_url(value, where)
    if not value:
        raise fail(where, "missing (a local folder or s3://bucket/prefix)")
    if "://" in value and urlsplit(value).scheme == "s3" and not urlsplit(value).netloc:
        raise fail(where, f"expected s3://bucket/prefix, got {value!r}")
    return _absolute(root, value)


def _read_storage(s: Section) -> tuple[str, str]:
    """`storage:` (endpoint_url, region); '' means AWS's own S3 and its default region."""
    for key in s.data:
        if any(word in str(key).lower() for word in CREDENTIAL_WORDS):
            raise fail(s.at(key), f"credentials do not belong here; {CREDENTIALS_HINT}")
    endpoint = _no_credentials_in_url(s.string("endpoint_url", ""), s.at("endpoint_url"))
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise fail(s.at("endpoint_url"), f"expected http://host:port or https://host, got {endpoint!r}")
    region = _no_credentials_in_url(s.string("region", ""), s.at("region"))
    s.done()
    return endpoint, region

