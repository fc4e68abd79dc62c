"""The model in MLflow: a state_dict artifact, not a pickled or torch.export'ed module.

A run's `model/` artifact folder holds `model.pt` (mmseg layout {"state_dict", "meta"}, read back with
torch.load(weights_only=True)) and `config.json` (how to build the network and run it at test time).
A registered model version points at that folder; the best version per dataset carries the alias
`champion` (MLflow 3 has aliases, not stages).

Model references understood by `fetch_model`:
  models:/<name>@<alias>   models:/<name>/<version>   runs:/<run_id>[/<path>]   a checkpoint file path
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_DIR = "model"                 # artifact folder of the model in a run
CHECKPOINT_FILE = "model.pt"
CONFIG_FILE = "config.json"
CHAMPION = "champion"

# What config.json holds: enough to rebuild the network and test it as it was evaluated.
CONFIG_KEYS = ("experiment", "dataset", "num_classes", "depth", "align_corners", "attention", "scale",
               "test_mode", "test_crop", "test_stride")


@dataclass
class FetchedModel:
    checkpoint: Path            # a local model.pt
    config: dict | None         # config.json when the source has one
    source: str                 # what it was resolved from, for messages and tags


def model_config(cfg) -> dict:
    """config.json of a resolved experiment (pipeline.config.TrainConfig or anything with those fields)."""
    values = {"experiment": cfg.name, **{k: getattr(cfg, k) for k in CONFIG_KEYS if k != "experiment"}}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def infer_build_args(state_dict: dict[str, torch.Tensor]) -> dict:
    """depth and num_classes from the weights themselves (layer3 has 23 blocks in R-101, 6 in R-50)."""
    if "decode_head.conv_seg.weight" not in state_dict:
        raise ValueError("not a DNLNet state dict: 'decode_head.conv_seg.weight' is missing")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    depth = {6: 50, 23: 101}.get(len(blocks))
    if depth is None:
        raise ValueError(f"backbone.layer3 has {len(blocks)} blocks; expected 6 (R-50) or 23 (R-101)")
    return {"depth": depth, "num_classes": int(state_dict["decode_head.conv_seg.weight"].shape[0])}


# --- logging and registering ------------------------------------------------------------------------

def ensure_model_artifacts(client, run_id: str, checkpoint: Path, config: dict) -> str:
    """Make sure the run has model/model.pt (the training stage logs it; imported checkpoints do not
    have it yet) and write model/config.json. Returns the artifact URI of the model folder."""
    present = {Path(f.path).name for f in client.list_artifacts(run_id, MODEL_DIR)}
    if CHECKPOINT_FILE not in present:
        if Path(checkpoint).name != CHECKPOINT_FILE:
            # The artifact must be called model.pt whatever the imported file's name: copy under that name.
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / CHECKPOINT_FILE
                shutil.copyfile(checkpoint, target)
                client.log_artifact(run_id, str(target), MODEL_DIR)
        else:
            client.log_artifact(run_id, str(checkpoint), MODEL_DIR)
    client.log_text(run_id, json.dumps(config, indent=2) + "\n", f"{MODEL_DIR}/{CONFIG_FILE}")
    return f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"


def register_champion(client, name: str, run_id: str, tags: dict | None = None,
                      description: str = "") -> tuple[str, bool]:
    """Register the run's model folder under `name` (reusing the version of that run if there is one)
    and point the `champion` alias at it. Returns (version, created)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description or None)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version, created = str(max(int(v.version) for v in existing)), False
    else:
        source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
        created_version = client.create_model_version(name, source, run_id=run_id,
                                                      tags={k: str(v) for k, v in (tags or {}).items()})
        version, created = str(created_version.version), True
    client.set_registered_model_alias(name, CHAMPION, version)
    return version, created


# --- resolving a model reference --------------------------------------------------------------------

def _download(uri: str, tracking_uri: str) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))


def _from_folder(folder: Path, source: str) -> FetchedModel:
    checkpoint = folder / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{source}: no {CHECKPOINT_FILE} in the model artifacts ({folder})")
    config_path = folder / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return FetchedModel(checkpoint, config, source)


def fetch_model(ref: str, tracking_uri: str) -> FetchedModel:
    """A local model.pt (+ config.json) for `ref`; clear one-line errors for refs that do not resolve."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

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
        return _from_folder(_download(version.source, tracking_uri), f"{ref} (version {version.version})")
    if ref.startswith("runs:/"):
        parts = ref[len("runs:/"):].strip("/").split("/", 1)
        uri = f"runs:/{parts[0]}/{parts[1] if len(parts) > 1 else MODEL_DIR}"
        try:
            return _from_folder(_download(uri, tracking_uri), ref)
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
    return FetchedModel(path, json.loads(config_path.read_text()) if config_path.is_file() else None, ref)
