"""`dnlseg show <experiment>`: what that run trains and evaluates with, its run identity, its DVC stages
and where its outputs go, without running anything (nor fetching weights)."""

from __future__ import annotations

import json

from components.console import redact
from components.training.data_sync import manifest_hash
from components.training.identity import code_hash, run_name
from pipeline.config import (
    CODE_ROOT,
    Params,
    code_deps,
    eval_metrics_file,
    model_file,
    plots_dir,
    published_record,
    train_metrics_file,
    tune_dir,
    weights_record,
)


def describe(params: Params, name: str, profile: str | None = None) -> dict:
    cfg = params.experiment(name, profile)
    cfg = cfg.updated(tracking_uri=redact(cfg.tracking_uri))   # $MLFLOW_TRACKING_URI may hold a password
    identity, why = None, None
    if cfg.recipe.pretrained != "none":   # the identity holds the weights' sha256, as the train stage fetches it
        record = weights_record(params.root, cfg.recipe.backbone)
        recorded = json.loads(record.read_text()) if record.is_file() else {}
        if recorded.get("pretrained") == cfg.recipe.pretrained and recorded.get("sha256"):
            cfg = cfg.updated(recipe={"pretrained_sha256": recorded["sha256"]})
        else:
            why = f"the pretrained weights are not fetched yet (`dnlseg weights {cfg.recipe.backbone}`)"
    if why is None:
        try:
            identity = run_name(cfg, manifest_hash(cfg.location.data_dir), code_hash(CODE_ROOT, code_deps("train")))
        except FileNotFoundError as e:
            why = str(e)
    stages = [f"train@{name}", f"evaluate@{name}", f"published@{name}"]
    stages += [f"{group}@{name}-{seed}" for seed in params.extra_seeds for group in ("train_seed", "evaluate_seed")]
    if name == params.tune.experiment:
        stages += ["tune", "train_tuned"] + [f"train_tuned_seed@{seed}" for seed in params.extra_seeds]
    root = params.root
    outputs = {"model": model_file(root, name), "train_metrics": train_metrics_file(root, name),
               "eval_metrics": eval_metrics_file(root, name), "plots": plots_dir(root, name),
               "checkpoints": f"{cfg.location.storage_path.rstrip('/')}/{identity or '<run name>'}",
               "published": published_record(root, name)}
    if name == params.tune.experiment:
        outputs["tune"] = tune_dir(root, name)
    return {"experiment": name, "profile": cfg.profile, "run_name": identity, "run_name_unknown": why,
            "stages": stages, "outputs": {k: str(v) for k, v in outputs.items()},
            "published_log": params.published_log(name, cfg.profile),
            "config": cfg.model_dump(mode="json"),
            "evaluate": params.eval_settings(cfg.profile).model_dump(mode="json")}


def _lines(value, indent: str = "  ") -> list[str]:
    if not isinstance(value, dict):
        return [f"{indent}{value}"]
    out = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            out += [f"{indent}{key}:", *_lines(item, indent + "  ")]
        else:
            out.append(f"{indent}{key}: {item if isinstance(item, str) else json.dumps(item)}")
    return out


def show(params: Params, name: str, profile: str | None = None, as_json: bool = False) -> str:
    info = describe(params, name, profile)
    if as_json:
        return json.dumps(info, indent=2)
    run = info["run_name"] or f"unknown: {info['run_name_unknown']}"
    text = [f"{name} under profile {info['profile']}", f"run name: {run}",
            f"DVC stages: {', '.join(info['stages'])}", f"published log: {info['published_log']}",
            "outputs:", *_lines(info["outputs"]),
            "trains with:", *_lines(info["config"]), "evaluates with:", *_lines(info["evaluate"])]
    return "\n".join(text)

