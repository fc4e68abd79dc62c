"""Bad input at the train stage's command line: `dnlseg train <exp>` exits 2 with ONE line naming the key
(or the file), and nothing is half-written: no run storage, no outputs, the MLflow store untouched.

The data cases at prepare time (corrupt / truncated images, wrong label values, mismatched sizes,
missing files, wrong archives) are tests/test_prepare.py's `test_bad_input_names_the_file_and_writes_
nothing`; their config-level counterparts of the params below are tests/test_config.py's. Here: the
same params through the CLI, credentials refused in params.yaml, and a prepared image that went bad
after `dnlseg prepare` meeting the training workers.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import EXPERIMENT, REPO, VENV_BIN, as_params

from pipeline.cli import main

SECRET = "hunter2-do-not-echo"  # noqa: S105 - a fake secret the test checks is never echoed
EXP = ["experiments", EXPERIMENT]
CASES = {
    "unknown_backbone": (EXP + ["backbone"], "R-18", f"experiments.{EXPERIMENT}.backbone: expected one of"),
    "crop_larger_than_scale": (EXP + ["crop_size"], [1025, 1024],
                               f"experiments.{EXPERIMENT}.crop_size: [1025, 1024] (h, w) is larger than"),
    "negative_lr": (["train", "lr"], -0.01, "train.lr: expected a positive number, got -0.01"),
    "zero_lr": (["train", "lr"], 0, "train.lr: expected a positive number, got 0"),
    "zero_iterations": (["schedules", "40k", "max_iters"], 0, "schedules.40k.max_iters: expected a positive"),
    "negative_iterations": (["profiles", "sample", "max_iters"], -4, "profiles.sample.max_iters: expected"),
    "unknown_dataset": (EXP + ["dataset"], "voc", f"experiments.{EXPERIMENT}.dataset: expected one of"),
    "batch_not_divisible": (["profiles", "sample", "batch_size"], 3, "batch_size: global batch 3 is not "
                                                                     "divisible by num_workers 2"),
    "secret_in_storage": (["storage", "aws_secret_access_key"], SECRET,
                          "storage.aws_secret_access_key: credentials do not belong here"),
    "secret_in_tracking_url": (["tracking", "uri"], f"http://alice:{SECRET}@mlflow.internal:5000",
                               "tracking.uri: the URL holds credentials"),
    "secret_in_storage_path": (["train", "storage_path"], f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs",
                               "train.storage_path: the URL holds credentials"),
    "endpoint_not_http": (["storage", "endpoint_url"], "ftp://127.0.0.1:9000",
                          "storage.endpoint_url: expected"),
    "unknown_key": (["train", "lr_typo"], 0.1, "train.lr_typo: unknown key (did you mean lr?)"),
    "wrong_type": (["profiles", "sample", "use_gpu"], "no", "profiles.sample.use_gpu: expected true or false, "
                                                            "got 'no'"),
    "other_profile": (["profiles", "reference", "num_workers"], 0, "profiles.reference.num_workers: expected a "
                                                                   "positive integer, got 0"),
    "empty_list": (["evaluate", "ms_ratios"], [], "evaluate.ms_ratios: expected a list of positive numbers"),
    "zero_now_null": (["profiles", "sample", "micro_batch_size"], 0,
                      "profiles.sample.micro_batch_size: expected a positive integer or null, got 0"),
}


def _set(params: dict, path: list[str], value) -> dict:
    node = params
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return params


def _repo_outputs() -> dict:
    """The repo's own outputs of this experiment (a bad run must not touch them)."""
    state = {}
    for folder in ("models", "metrics", "plots"):
        for path in sorted((REPO / folder / EXPERIMENT).rglob("*")):
            state[path] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return state


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Should validation ever let a bad config through, fail instead of training into the repo."""
    import pipeline.train

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input passed validation and training started")

    monkeypatch.setattr(pipeline.train, "_train", refuse)


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_params_exit_2_with_one_line_naming_the_key(case, make_params, tmp_path, capsys, no_training):
    path, value, expected = CASES[case]
    work = tmp_path / "work"
    params = _set(make_params(work), path, value)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    before, repo_before = _tree(work), _repo_outputs()

    assert main(["--params", str(params_file), "train", EXPERIMENT]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dnlseg train: error: ") and expected in lines[0]
    assert SECRET not in captured.err + captured.out           # a refused secret is never echoed
    assert _tree(work) == before                               # no runs/, MLflow store unchanged
    assert _repo_outputs() == repo_before


def test_unknown_experiment(make_params, tmp_path, capsys, no_training):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_params(tmp_path / "work")))
    assert main(["--params", str(tmp_path / "params.yaml"), "train", "dnl_r18_nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "experiments: unknown experiment 'dnl_r18_nope'" in lines[0]


def test_the_installed_command_exits_2(make_params, tmp_path):
    """The real `dnlseg` console script, in its own process: status 2, one line on stderr."""
    params = _set(make_params(tmp_path / "work"), ["train", "lr"], -1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([str(VENV_BIN / "dnlseg"), "--params", str(tmp_path / "params.yaml"), "train",
                           EXPERIMENT], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["dnlseg train: error: params.yaml: train.lr: expected a "
                                                "positive number, got -1"]


@pytest.mark.integration
def test_prepared_image_corrupted_after_prepare_is_one_line_naming_it(ray_local, make_params, tiny_data,
                                                                       tmp_path):
    """Every train image of a prepared copy overwritten with garbage after `dnlseg prepare` (the files
    exist, so the preflight passes): the workers fail on the first batch and the stage raises a DataError
    (`dnlseg` exits 2 on it) in one line naming the file and the fix, instead of Ray's multi-page report;
    no output written."""
    import shutil

    from components.learning.data.validate import DataError
    from pipeline.train import train_experiment

    data = tmp_path / "prepared"
    shutil.copytree(tiny_data, data)
    images = sorted((data / "cityscapes" / "train").rglob("*leftImg8bit*"))
    assert images
    for path in images:
        path.write_bytes(b"not an image any more")
    params = make_params(tmp_path / "work", data_root=data)     # max_failures 0: one attempt

    with pytest.raises(DataError) as error:
        train_experiment(as_params(params), EXPERIMENT, out_root=tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message and any(message.startswith(f"{path}: unreadable image") for path in images)
    assert "rerun it, or `dvc pull`" in message
    assert not (tmp_path / "out").exists()


# --- pretrained weights: every failure before Ray starts, one line, the cache clean -----------------

def _weights_case(case: str, tmp_path, file_server, imagenet_v1c50) -> tuple[str, str, str]:
    """(experiment, train.pretrained value, expected text) of one bad-weights case."""
    import torch

    path, state_dict = imagenet_v1c50
    served = tmp_path / "served"
    served.mkdir()

    def hashed(stem: str, payload: dict) -> Path:
        torch.save(payload, served / "tmp.pth")
        digest = hashlib.sha256((served / "tmp.pth").read_bytes()).hexdigest()
        return (served / "tmp.pth").rename(served / f"{stem}-{digest[:8]}.pth")

    r101 = EXPERIMENT.replace("r50", "r101")
    if case == "unreachable":
        from components.ray_cluster import free_port

        return EXPERIMENT, f"http://127.0.0.1:{free_port()}/{path.name}", "unreachable (ConnectionRefusedError"
    if case == "checksum":
        return EXPERIMENT, file_server.add("resnet50_v1c-deadbeef.pth", path), "does not start with deadbeef"
    if case == "truncated":
        return EXPERIMENT, file_server.add(path.name, path, send=1000), "truncated (got 1000 of"
    if case == "partial":   # the deep stem's first conv missing
        partial = hashed("resnet50_v1c", {"state_dict": {k: v for k, v in state_dict.items()
                                                         if not k.startswith("stem.0.")}})
        return EXPERIMENT, file_server.add(partial.name, partial), "backbone weights missing from the file: stem.0"
    if case == "torchvision":
        v1b = hashed("resnet50", {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64)})
        return EXPERIMENT, file_server.add(v1b.name, v1b), "ResNet-V1b"
    assert case == "r50_for_r101"
    return r101, file_server.add(f"resnet101_v1c-{path.name.split('-')[1]}", path), "layer3"


@pytest.mark.parametrize("case", ["unreachable", "checksum", "truncated", "partial", "torchvision",
                                  "r50_for_r101"])
def test_bad_pretrained_weights_exit_2_before_ray_with_a_clean_cache(case, make_params, tmp_path, capsys,
                                                                      no_training, file_server,
                                                                      imagenet_v1c50, monkeypatch):
    import components.ray_cluster

    monkeypatch.setattr(components.ray_cluster, "connect_ray",
                        lambda *a: pytest.fail("Ray started before the weights were checked"))
    experiment, spec, expected = _weights_case(case, tmp_path, file_server, imagenet_v1c50)
    params = make_params(tmp_path / "work", pretrained="imagenet")
    params["train"]["pretrained"][params["experiments"][experiment]["backbone"]] = spec
    params["downloads"] = {"cache_dir": str(tmp_path / "cache")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    assert main(["--params", str(tmp_path / "params.yaml"), "train", experiment]) == 2
    lines = capsys.readouterr().err.strip().splitlines()   # a download's progress bar, then the one error line
    errors = [line for line in lines if "error" in line]
    assert errors == lines[-1:] and errors[0].startswith("dnlseg train: error: ") and expected in errors[0], lines
    from components.weights import expected_sha256_prefix, sha256_file

    cached = list((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []
    # Nothing partial: only complete files whose sha256 matches their name (the layout cases' files are).
    assert all(sha256_file(p).startswith(expected_sha256_prefix(p.name)) for p in cached), cached
    assert case in ("partial", "torchvision", "r50_for_r101") or not cached
