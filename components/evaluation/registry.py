"""The model in MLflow: a state_dict artifact, not a pickled or torch.export'ed module.

A run's `model/` artifact folder holds `model.pt` (mmseg layout {"state_dict", "meta"}, read back with
torch.load(weights_only=True)) and `config.json` (how to build the network and run it at test time).
A registered model version points at that folder; the best version per dataset carries the alias
`champion` (MLflow 3 has aliases, not stages).

Model references understood by `fetch_model`:
  models:/<name>@<alias>   models:/<name>/<version>   runs:/<run_id>[/<path>]   a checkpoint file path
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.learning.backbones import BACKBONES, get_backbone
from components.learning.data.datasets import get_dataset

MODEL_DIR = "model"                 # artifact folder of the model in a run
CHECKPOINT_FILE = "model.pt"
CONFIG_FILE = "config.json"
CHAMPION = "champion"

@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a stored network and test it as it was evaluated: what config.json holds."""

    experiment: str
    dataset: str
    backbone: str
    align_corners: bool
    attention: str
    scale: tuple[int, int]          # (w, h)
    test_mode: str
    test_crop: tuple[int, int]
    test_stride: tuple[int, int]

    @classmethod
    def of(cls, cfg) -> ModelSpec:
        """The spec of a resolved experiment (components.learning.experiment.RunConfig)."""
        return cls(experiment=cfg.name, **{f: getattr(cfg.recipe, f) for f in _FIELDS if f != "experiment"})

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        values = {f: data[f] for f in _FIELDS if f in data}
        if "backbone" not in values and "depth" in data:   # config.json written before the backbone registry
            values["backbone"] = next(b.name for b in BACKBONES.values() if b.depth == data["depth"])
        missing = [f for f in _FIELDS if f not in values]
        if missing:
            raise ValueError(f"{CONFIG_FILE}: missing {', '.join(missing)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_json(self) -> dict:
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return values | {"num_classes": self.num_classes, "depth": get_backbone(self.backbone).depth}

    @property
    def num_classes(self) -> int:
        return get_dataset(self.dataset).num_classes


_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec))


@dataclass
class FetchedModel:
    checkpoint: Path            # a local model.pt
    spec: ModelSpec | None      # its config.json, when the source has one
    source: str                 # what it was resolved from, for messages and tags


# --- logging and registering ------------------------------------------------------------------------

def log_model_config(client, run_id: str, spec: ModelSpec) -> None:
    """model/config.json: the test settings the run's model is used with."""
    client.log_text(run_id, json.dumps(spec.to_json(), indent=2) + "\n", f"{MODEL_DIR}/{CONFIG_FILE}")


def ensure_model_file(client, run_id: str, checkpoint: Path) -> None:
    """model/model.pt in the run, uploaded from `checkpoint` unless it is there. A trained run gets it only
    when registered (the DVC-tracked models/<exp>/model.pt is the model; no copy of every run in MLflow);
    an imported checkpoint when evaluated (the artifact is called model.pt whatever the file's name)."""
    if CHECKPOINT_FILE in {Path(f.path).name for f in client.list_artifacts(run_id, MODEL_DIR)}:
        return
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: the model to register is missing (run its train stage)")
    if Path(checkpoint).name == CHECKPOINT_FILE:
        client.log_artifact(run_id, str(checkpoint), MODEL_DIR)
        return

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / CHECKPOINT_FILE
        shutil.copyfile(checkpoint, target)
        client.log_artifact(run_id, str(target), MODEL_DIR)


def register_champion(client, name: str, run_id: str, checkpoint: Path, tags: dict | None = None,
                      description: str = "") -> tuple[str, bool]:
    """Register the run's model folder under `name` (reusing the version of that run if there is one; the
    run's model file uploaded from `checkpoint` first if it lacks one) and point the `champion` alias at
    it. Returns (version, created)."""

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description or None)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version, created = str(max(int(v.version) for v in existing)), False
    else:
        ensure_model_file(client, run_id, checkpoint)
        source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
        created_version = client.create_model_version(name, source, run_id=run_id,
                                                      tags={k: str(v) for k, v in (tags or {}).items()})
        version, created = str(created_version.version), True
    client.set_registered_model_alias(name, CHAMPION, version)
    return version, created


# --- resolving a model reference --------------------------------------------------------------------

def _download(uri: str, tracking_uri: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=str(dst)))


def _from_folder(folder: Path, source: str) -> FetchedModel:
    checkpoint = folder / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{source}: no {CHECKPOINT_FILE} in the model artifacts ({folder})")
    config_path = folder / CONFIG_FILE
    spec = ModelSpec.from_json(json.loads(config_path.read_text())) if config_path.is_file() else None
    return FetchedModel(checkpoint, spec, source)


def fetch_model(ref: str, tracking_uri: str, dst: Path) -> FetchedModel:
    """A local model.pt (+ config.json) for `ref`, registry and run artifacts downloaded under `dst` (the
    caller's temp folder: MLflow's own default is a temp folder nobody removes); clear one-line errors
    for refs that do not resolve."""

    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        client = MlflowClient(tracking_uri=tracking_uri)
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif "/" in body:
                name, number = body.rsplit("/", 1)
                version = client.get_model_version(name, number)
            else:
                raise ValueError(f"model reference {ref!r}: expected models:/<name>@<alias> or "
                                 f"models:/<name>/<version>")
        except MlflowException as e:
            raise ValueError(f"model reference {ref!r}: not found in the registry at {tracking_uri} "
                             f"({str(e).splitlines()[0]})") from None
        return _from_folder(_download(version.source, tracking_uri, dst), f"{ref} (version {version.version})")
    if ref.startswith("runs:/"):
        parts = ref[len("runs:/"):].strip("/").split("/", 1)
        uri = f"runs:/{parts[0]}/{parts[1] if len(parts) > 1 else MODEL_DIR}"
        try:
            return _from_folder(_download(uri, tracking_uri, dst), ref)
        except MlflowException as e:
            raise ValueError(f"model reference {ref!r}: cannot read {uri} at {tracking_uri} "
                             f"({str(e).splitlines()[0]})") from None
    path = Path(ref)
    if path.is_dir():
        return _from_folder(path, ref)
    if not path.is_file():
        raise FileNotFoundError(f"model reference {ref!r}: expected models:/<name>@<alias>, runs:/<run_id> "
                                f"or an existing checkpoint file")
    config_path = path.with_name(CONFIG_FILE)
    spec = ModelSpec.from_json(json.loads(config_path.read_text())) if config_path.is_file() else None
    return FetchedModel(path, spec, ref)
