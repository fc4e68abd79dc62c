"""params.yaml -> one frozen pydantic model (`Params`): the one place that knows the file's layout.

`load()` validates the WHOLE file before any stage does work: every section, every profile (not only
the active one), every experiment; an unknown key is an error naming the closest known one. Every error
is one line, `params.yaml: <dotted.key>: <what was expected, the bad value>`. Stages receive `Params`
and never read raw dicts. Paths resolve against the repo the stage runs in (the params file's folder;
DVC runs every stage from the repo root), never against where the package was installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import PrivateAttr, ValidationError, model_validator

from components.evaluation.table import parse_seed_table
from components.learning.experiment import (
    Execution,
    FieldError,
    Frozen,
    Location,
    NonNegativeInt,
    Recipe,
    RunConfig,
    Schedule,
)
from components.weights import default_cache_dir
from pipeline.config import settings as section
from pipeline.config.settings import ConfigError, EvalSettings, Tune

__all__ = ["ConfigError", "EvalSettings", "Params", "RunConfig", "Tune", "load", "parse"]

PARAMS_FILE = "params.yaml"
# Where this code lives (with its dvc.yaml): what a run's identity hashes is the code that runs.
CODE_ROOT = Path(__file__).resolve().parents[2]
# Set by `dnlseg repro --jobs`: its loopback MLflow server for the repo's default store, which the
# concurrent stages write through instead of opening the SQLite file each.
STORE_SERVER_ENV = "DNLSEG_MLFLOW_SERVER"
SAMPLE_DIR = "data/sample"   # where the `sample` stage writes the generated datasets (dvc.yaml, under the repo)


def fail(key: str, what: str) -> ConfigError:
    return ConfigError(f"params.yaml: {key}: {what}")


def _one_of(values) -> str:
    return f"expected one of {', '.join(values)}"


class Params(Frozen):
    profile: str
    profiles: dict[str, section.Profile]
    data: section.Data
    sample: section.Sample
    train: section.Train
    downloads: section.Downloads = section.Downloads()
    tracking: section.Tracking = section.Tracking()
    storage: section.Storage = section.Storage()
    schedules: dict[str, section.ScheduleLength]
    experiments: dict[str, section.Experiment]
    evaluate: section.Evaluate
    imported_checkpoints: dict[str, section.Imported] = {}
    report: section.Report = section.Report()
    tune: section.Tune
    # Seeds every experiment is trained with besides train.seed, each its own run `<exp>-s<seed>` (stages
    # train_seed / evaluate_seed / train_tuned_seed): `dvc exp run -S 'extra_seeds=[1,2]'` gives n = 3.
    extra_seeds: list[NonNegativeInt] = []
    _root: Path = PrivateAttr()

    @model_validator(mode="after")
    def _references(self):
        """What one section names must exist in another."""
        if self.profile not in self.profiles:
            raise FieldError("profile", f"{_one_of(sorted(self.profiles))}, got {self.profile!r}")
        for name, exp in self.experiments.items():
            for key, known in (("dataset", sorted(self.data.datasets)), ("schedule", list(self.schedules))):
                if getattr(exp, key) not in known:
                    raise FieldError(f"experiments.{name}.{key}", f"{_one_of(known)}, got {getattr(exp, key)!r}")
        for name, entry in self.imported_checkpoints.items():
            if entry.experiment not in self.experiments:
                raise FieldError(f"imported_checkpoints.{name}.experiment",
                                 f"{_one_of(list(self.experiments))}, got {entry.experiment!r}")
        for name in self.evaluate.profiles:
            if name not in self.profiles:
                raise FieldError(f"evaluate.profiles.{name}", f"not a profile (profiles: {', '.join(self.profiles)})")
        for profile_name, prof in self.profiles.items():
            for name in prof.iterations:
                if name not in self.experiments:
                    raise FieldError(f"profiles.{profile_name}.iterations.{name}",
                                     f"unknown experiment (known: {', '.join(sorted(self.experiments))})")
        if self.tune.experiment is not None and self.tune.experiment not in self.experiments:
            raise FieldError("tune.experiment", f"unknown experiment {self.tune.experiment!r}")
        self._distinct_seeds()
        return self

    def _distinct_seeds(self) -> None:
        """Each seed one run: none twice, none equal to train.seed (that run is `<exp>` itself), and no
        seeded run name taken by an experiment."""
        seen = [self.train.seed]
        for seed in self.extra_seeds:
            if seed in seen:
                raise FieldError("extra_seeds", f"seed {seed} is listed twice (train.seed is {self.train.seed}; "
                                                f"got {self.extra_seeds})")
            seen.append(seed)
        taken = {seeded_name(n, s, self.train.seed) for n in self.experiments for s in self.extra_seeds}
        if taken & set(self.experiments):
            raise FieldError("extra_seeds", f"the seeded run {sorted(taken & set(self.experiments))[0]!r} "
                                            f"is also an experiment's name")

    @model_validator(mode="after")
    def _batches_split(self):
        """An elastic profile's global batch splits over every worker count it may shrink to: known here,
        not after a node is lost mid-run."""
        from components.learning.distributed import plan_batches  # here: it imports torch, the config need not

        for profile_name, prof in self.profiles.items():
            if prof.min_workers is None:
                continue
            for name, exp in self.experiments.items():
                batch = prof.batch_size or exp.batch_size
                for workers in prof.worker_counts:
                    try:
                        plan_batches(batch, workers, prof.micro_batch_size)
                    except ValueError as e:
                        raise FieldError(f"profiles.{profile_name}.min_workers",
                                         f"experiment {name}: {e} (elastic runs may have any of "
                                         f"{prof.min_workers}..{prof.num_workers} workers)") from None
        return self

    # --- resolved views ---------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    @property
    def prepared_dir(self) -> Path:
        return Path(self.data.prepared_dir)

    @property
    def sources(self) -> dict[str, Path]:
        return {name: Path(d.source) for name, d in self.data.datasets.items()}

    @property
    def imported(self) -> dict[str, section.Imported]:
        return self.imported_checkpoints

    @property
    def cache_dir(self) -> Path:
        return Path(self.downloads.cache_dir) if self.downloads.cache_dir else default_cache_dir()

    @property
    def tracking_uri(self) -> str:
        """What stages connect to."""
        return self._configured_store() or os.environ.get(STORE_SERVER_ENV) or default_store(self.root)

    @property
    def tracking_ui(self) -> str:
        """An http(s) store serves its own UI; the repo's SQLite file (even through the repro's temporary
        server) is browsed with `mlflow ui` at report.mlflow_ui."""
        configured = self._configured_store()
        return configured if configured.startswith(("http://", "https://")) else self.report.mlflow_ui

    def _configured_store(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")

    @property
    def storage_endpoint_url(self) -> str | None:
        return self.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def storage_region(self) -> str | None:
        return self.storage.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None

    def profile_name(self, profile: str | None = None) -> str:
        profile = profile or self.profile
        if profile not in self.profiles:
            raise fail("profile", f"{_one_of(sorted(self.profiles))}, got {profile!r}")
        return profile

    def eval_settings(self, profile: str | None = None) -> EvalSettings:
        return self.evaluate.for_profile(self.profile_name(profile))

    def pretrained(self, backbone: str, profile: str | None = None) -> str:
        """The backbone's initial weights under `profile`: train.pretrained.<backbone> when the profile
        says imagenet, else none (random init)."""
        if self.profiles[self.profile_name(profile)].pretrained == "none":
            return "none"
        return self.train.pretrained.get(backbone) or "none"

    def published_log(self, name: str, profile: str | None = None) -> str:
        """The published training log of experiment `name` under `profile`: its URL or local path, or
        `none`. The row's `published_log` when it says, else the profile's (reference: released, sample:
        none); `released` is the seed table's log.json link, and none for a row the table does not have
        unless the row asked for it."""
        exp = self.experiments[name]
        spec = exp.published_log or self.profiles[self.profile_name(profile)].published_log
        if spec != "released":
            return spec
        link = next((row.log_url for row in parse_seed_table() if row.config == name), None)
        if link is None and exp.published_log == "released":
            raise fail(f"experiments.{name}.published_log", "released: the results table has no published "
                                                              f"log of {name!r} (give a URL, a path or none)")
        return link or "none"


    @property
    def seeds(self) -> list[int]:
        """Every experiment's seeds: train.seed (the run `<exp>`), then extra_seeds (`<exp>-s<seed>`)."""
        return [self.train.seed, *self.extra_seeds]

    def seeded_runs(self, name: str) -> list[str]:
        """The runs of experiment `name`, one per seed (their models/, metrics/ and plots/ folders)."""
        return [seeded_name(name, seed, self.train.seed) for seed in self.seeds]

    def evaluation_names(self) -> list[str]:
        return [run for name in self.experiments for run in self.seeded_runs(name)] + list(self.imported)

    def evaluation_target(self, name: str, out_root: Path | None = None,
                          seed: int | None = None) -> tuple[RunConfig, str, bool]:
        """(config, checkpoint, imported?) of a trained experiment (with `seed`, default train.seed) or an
        imported checkpoint (whose checkpoint is a URL or a local path: components.weights.fetch gets it)."""
        if name in self.experiments:
            cfg = self.experiment(name, seed=seed)
            return cfg, str(model_file(out_root or self.root, cfg.name)), False
        if seed is not None:
            raise fail("imported_checkpoints", f"{name!r} is a released checkpoint: it has no seeds")
        if name not in self.imported:
            raise ConfigError(f"params.yaml: no experiment or imported_checkpoints entry named {name!r} "
                              f"(known: {', '.join(sorted(self.evaluation_names()))})")
        entry = self.imported[name]
        return self.experiment(entry.experiment).updated(name=name), entry.source, True

    def experiment(self, name: str, profile: str | None = None, seed: int | None = None) -> RunConfig:
        """Experiment `name` under `profile` (default: the file's `profile`), trained with `seed` (default
        train.seed; another of `seeds` names the run `<name>-s<seed>`)."""
        if name not in self.experiments:
            raise fail("experiments", f"unknown experiment {name!r} (known: {', '.join(sorted(self.experiments))})")
        cfg = self._experiment(name, profile)
        if seed is None or seed == self.train.seed:
            return cfg
        if seed not in self.extra_seeds:
            raise fail("extra_seeds", f"seed {seed} is not one of the experiments' seeds {self.seeds} "
                                      f"(train.seed, then extra_seeds)")
        return cfg.updated(name=seeded_name(name, seed, self.train.seed), recipe={"seed": seed})

    def _experiment(self, name: str, profile: str | None) -> RunConfig:
        """The row under the profile, with train.seed."""
        exp, prof, train = self.experiments[name], self.profiles[self.profile_name(profile)], self.train

        def scaled(pair):
            return max(1, round(pair[0] * prof.size_scale)), max(1, round(pair[1] * prof.size_scale))

        iterations = (prof.max_iters or prof.iterations.get(name)
                      or max(1, round(self.schedules[exp.schedule].max_iters * prof.schedule_scale)))
        return RunConfig(
            name=name, profile=self.profile_name(profile), tracking_uri=self.tracking_uri,
            recipe=Recipe(
                **exp.model_dump(include={"dataset", "backbone", "align_corners", "test_mode"}),
                **train.model_dump(include=set(Recipe.model_fields) - {"pretrained"}),
                crop_size=scaled(exp.crop_size), scale=scaled(exp.scale), test_crop=scaled(exp.crop_size),
                test_stride=scaled(exp.test_stride or exp.crop_size), batch_size=prof.batch_size or exp.batch_size,
                evals_per_run=prof.evals_per_run, val_max_images=prof.val_max_images, precision=prof.precision,
                pretrained=self.pretrained(exp.backbone, profile)),
            schedule=Schedule(max_iters=iterations, **train.model_dump(include=set(Schedule.model_fields))),
            execution=Execution(
                **prof.model_dump(include=set(Execution.model_fields)), max_failures=train.max_failures,
                ray_address=train.ray_address or os.environ.get("RAY_ADDRESS") or None),
            location=Location(data_dir=str(self.prepared_dir / exp.dataset), storage_path=train.storage_path,
                              endpoint_url=self.storage_endpoint_url, region=self.storage_region))


# --- where the stages' outputs live (dvc.yaml names the same paths) ---------------------------------

def seeded_name(name: str, seed: int, base_seed: int) -> str:
    """The run of `name` with `seed`: `name` itself for train.seed (`base_seed`), else `<name>-s<seed>`
    (its Ray and MLflow run, and its models/, metrics/, plots/ folders)."""
    return name if seed == base_seed else f"{name}-s{seed}"


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


def published_record(root: Path, name: str) -> Path:
    """The published run of experiment `name`: source, sha256 and its parsed curve (stage published@<name>)."""
    return Path(root) / "published" / f"{name}.json"


def published_plot(root: Path, name: str) -> Path:
    return Path(root) / "plots" / name / "published.csv"


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
    try:
        params = Params.model_validate(raw, context={"root": root})
    except ValidationError as e:
        key, message = error_key(e)
        raise (e.errors()[0]["ctx"]["error"] if key is None else fail(key, message)) from None
    params._root = root
    return params


# pydantic's own errors, in this file's words (the value given is appended)
_WORDS = {"bool_type": "expected true or false", "string_type": "expected a string", "dict_type": "expected a mapping",
          "model_type": "expected a mapping", "list_type": "expected a list", "tuple_type": "expected a list",
          "int_type": "expected an integer", "float_type": "expected a number"}


def error_key(error: ValueError) -> tuple[str | None, str]:
    """(dotted key, message) of the first error of a ValidationError (key None: a ConfigError that says
    all itself)."""
    first = error.errors()[0]
    key = [str(part) for part in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return None, str(cause)
    if isinstance(cause, FieldError):
        key.append(cause.key)
    if isinstance(cause, ValueError):
        message = str(cause)
    elif first["type"] == "missing":
        message = "missing"
    elif first["type"] == "literal_error":
        expected = re.findall(r"'([^']*)'", first["ctx"]["expected"])
        message = f"{_one_of(expected)}, got {first['input']!r}"
    else:
        message = f"{_WORDS.get(first['type'], first['msg'])}, got {first['input']!r}"
    return ".".join(key) or "params", message
