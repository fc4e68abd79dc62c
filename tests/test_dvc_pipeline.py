"""`dvc repro` through the real stages (sample → prepare → train → evaluate) in a copy of the repo, on
tiny sample data; then a second `dvc repro` must be a no-op."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXP = "dnl_r50-d8_512x1024_40k_cityscapes"
pytestmark = pytest.mark.integration


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _shrink_params(path: Path, tmp: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["sample"]["cityscapes"] = {"train": 2, "val": 1, "height": 128, "width": 256}
    params["sample"]["ade20k"] = {"train": 2, "val": 1, "height": 64, "width": 64}
    params["profiles"]["sample"].update(max_iters=2, evals_per_run=1, batch_size=1)
    params["evaluate"]["profiles"]["sample"].update(fps_images=2, fps_warmup=1, overlays=1, ms_ratios=[1.0])
    params["train"]["storage_path"] = str(tmp / "runs")
    params["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _dvc(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def test_dvc_repro_runs_the_stages_then_is_a_no_op(tmp_path):
    work = tmp_path / "repo"
    _copy_repo(work)
    _shrink_params(work / "params.yaml", tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The copy's code, not the editable install's: the stages and the Ray workers import from here.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(work),
               NO_ALBUMENTATIONS_UPDATE="1")

    first = _dvc(["repro", f"evaluate@{EXP}"], work, env)
    for stage in ("sample", "prepare_cityscapes", f"train@{EXP}", f"evaluate@{EXP}"):
        assert f"Running stage '{stage}'" in first
    assert "prepare_ade20k" not in first   # only what the target needs
    train = json.loads((work / "metrics" / EXP / "train.json").read_text())
    evaluation = json.loads((work / "metrics" / EXP / "eval.json").read_text())
    assert (work / "models" / EXP / "model.pt").stat().st_size > 100e6   # 50 M fp32 parameters
    assert train and evaluation
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert {"sample", "prepare_cityscapes", f"train@{EXP}", f"evaluate@{EXP}"} <= set(lock["stages"])

    second = _dvc(["repro", f"evaluate@{EXP}"], work, env)
    assert "Running stage" not in second
    assert "didn't change" in second or "up to date" in second.lower()
    status = _dvc(["status", f"evaluate@{EXP}"], work, env)
    assert "up to date" in status.lower()
