"""Evaluation as Ray tasks against the in-process evaluation it replaced, on the sample (issue 22's proof).

    python bench/eval_before_after.py <base commit> <work folder> [experiment [iterations]]

1. `before/`: the repo at <base commit> (git archive), `dnlseg repro evaluate@<exp>` on the generated
   sample (the main job's sizes): sample, prepare, weights, train, evaluate with the old code.
2. `after/`: a copy of `before/` (outputs, DVC cache, runs, MLflow store) with this checkout's files laid
   over it, the train stage committed as it is (`dvc commit -f`: its model is the one evaluated before);
   `dnlseg repro evaluate@<exp>` reruns only the evaluate stage, now as Ray tasks on the local Ray that
   `dnlseg repro` starts.
3. `sharded/`: a copy of `after/` with `evaluate.profiles.sample.shards: 4`, `dnlseg evaluate <exp>`.
Then compares eval.json (every metric, per class) and the pictures (pixels) of the three, and prints
what differs. Nothing outside <work folder> is written (MLflow, Ray storage and DVC stay inside).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAME = ("single_scale", "ms_flip", "images", "iteration", "dtype", "test", "split", "checkpoint")


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONPATH=str(root), NO_ALBUMENTATIONS_UPDATE="1")
    return env


def _run(args: list[str], root: Path) -> float:
    tic = time.monotonic()
    done = subprocess.run(args, cwd=root, env=_env(root), capture_output=True, text=True)  # noqa: S603
    (root / f"{args[0]}-{args[1]}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"{' '.join(args)} in {root} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return time.monotonic() - tic


def _checkout(commit: str, dest: Path) -> None:
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout  # noqa: S607
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)  # noqa: S607


def _overlay_this_checkout(dest: Path) -> None:
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,  # noqa: S607
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def _local_outputs(root: Path, exp: str, iterations: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profiles"]["sample"]["iterations"] = {exp: iterations}   # the same training before and after
    params["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    params["downloads"]["cache_dir"] = str(root / ".cache")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _compare(a: Path, b: Path, exp: str) -> list[str]:
    """What differs between two evaluations of `exp`: eval.json's figures, then the pictures' pixels."""
    ja, jb = (json.loads((r / "metrics" / exp / "eval.json").read_text()) for r in (a, b))
    diffs = [f"eval.json {k}: {ja.get(k)} != {jb.get(k)}" for k in SAME if ja.get(k) != jb.get(k)]
    plots = Path("plots") / exp
    if (a / plots / "per_class_iou.csv").read_text() != (b / plots / "per_class_iou.csv").read_text():
        diffs.append("per_class_iou.csv differs")
    pictures = sorted(p.relative_to(a) for p in (a / plots).rglob("*.png"))
    if pictures != sorted(p.relative_to(b) for p in (b / plots).rglob("*.png")):
        diffs.append("not the same picture files")
    for picture in pictures:
        if not np.array_equal(np.array(Image.open(a / picture)), np.array(Image.open(b / picture))):
            diffs.append(f"{picture}: pixels differ")
    return diffs + [f"({len(pictures)} pictures compared)"]


def main(commit: str, work: str, exp: str = "dnl_r18-d8_512x1024_40k_cityscapes", iterations: str = "120") -> None:
    work = Path(work).resolve()
    before, after, sharded = work / "before", work / "after", work / "sharded"
    if not (before / "metrics" / exp / "eval.json").is_file():   # else: done by an earlier call
        _checkout(commit, before)
        _local_outputs(before, exp, int(iterations))
        print(f"before: dnlseg repro evaluate@{exp} {_run(['dnlseg', 'repro', f'evaluate@{exp}'], before):.0f} s",
              flush=True)
    shutil.copytree(before, after, symlinks=True)
    _overlay_this_checkout(after)
    _local_outputs(after, exp, int(iterations))
    # pipeline/config (a dep of the train stage too) gained evaluate.shards: the trained model is the same,
    # so the train stage is recorded as up to date rather than trained again.
    _run(["dvc", "commit", "-f", f"train@{exp}"], after)
    print(f"after: dnlseg repro evaluate@{exp} {_run(['dnlseg', 'repro', f'evaluate@{exp}'], after):.0f} s",
          flush=True)
    log = (after / "dnlseg-repro.log").read_text()
    print("after: stages run:", [line for line in log.splitlines() if line.startswith("[repro] start")])
    shutil.copytree(after, sharded, symlinks=True)
    params = yaml.safe_load((sharded / "params.yaml").read_text())
    params["evaluate"]["profiles"]["sample"]["shards"] = 4
    (sharded / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    print(f"sharded: dnlseg evaluate {exp} {_run(['dnlseg', 'evaluate', exp], sharded):.0f} s", flush=True)
    for name, (a, b) in {"before vs after": (before, after), "after vs sharded": (after, sharded)}.items():
        print(f"{name}: {_compare(a, b, exp) or 'identical'}")
    for root in (before, after, sharded):
        s = json.loads((root / "metrics" / exp / "eval.json").read_text())
        print(root.name, "mIoU", s["single_scale"]["mIoU"], "ms+flip", s["ms_flip"]["mIoU"], "images", s["images"],
              "tasks", (s.get("evaluation") or {}).get("ray_tasks"), "fps", (s.get("speed") or {}).get("fps"))


if __name__ == "__main__":
    main(*sys.argv[1:])
