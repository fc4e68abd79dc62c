"""DVC through the real stages, in ONE copy of the repo on tiny sample data (copying the repo and starting
the stages is most of the cost, so it is one scenario in three acts):

1. `dvc repro` runs sample → prepare → weights → train → evaluate, then is a no-op; a released checkpoint
   is imported and evaluated, and the report shows published, released and our numbers side by side;
2. `dvc exp run --temp` and two queued experiments (`dvc queue start -j 2`), run by the code installed
   from another clone, each read their own params and write their own metrics; the workspace is untouched;
3. a third dataset added through the registry only (one module + its params.yaml entries) is prepared,
   trained and evaluated by `dvc repro`.
Act 1 trains the table's R-50 row: its checkpoint's size and the report's comparison with the published
numbers are part of what is checked; act 2 reruns that row under DVC's experiments, its baseline the run
act 1 trained. Act 3 tests the registry, not the model: its new row trains the small R-18-D8 backbone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import repo_copy, run_dvc
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXP = "dnl_r50-d8_512x1024_40k_cityscapes"
pytestmark = pytest.mark.integration


def _released_checkpoint(folder: Path) -> Path:
    """An mmseg v0.5 release as the seed's download links serve it (DNLNet R-50-D8, 19 classes, random
    weights): {'meta': {CLASSES, PALETTE, config text, mmcv_version, ...}, 'state_dict', 'optimizer'},
    named `<config>_<date>-<first 8 hex of its sha256>.pth`."""
    import hashlib

    import torch

    from components.learning.data import get_dataset
    from components.learning.models import build_dnlnet

    spec = get_dataset("cityscapes")
    torch.manual_seed(1)
    model = build_dnlnet(depth=50, num_classes=19)
    meta = {"CLASSES": spec.classes, "PALETTE": [list(c) for c in spec.palette], "mmcv_version": "1.1.1",
            "config": "norm_cfg = dict(type='SyncBN', requires_grad=True)\nmodel = dict(type='EncoderDecoder')\n",
            "epoch": 1, "iter": 40000, "time": "Fri Sep  4 23:36:29 2020"}
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-4, "momentum": 0.9, "weight_decay": 5e-4, "params": [0]}]}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": model.state_dict(), "optimizer": optimizer}, folder / "tmp.pth")
    digest = hashlib.sha256((folder / "tmp.pth").read_bytes()).hexdigest()
    return (folder / "tmp.pth").rename(folder / f"{EXP}_20200904_233629-{digest[:8]}.pth")


def test_dvc_pipeline_scenario(tmp_path, file_server):
    work, env = repo_copy(tmp_path)
    repro_then_no_op_then_imported_and_report(work, env, tmp_path, file_server)
    experiments_temp_and_queue_in_their_own_workspace(work, env)
    dataset_added_through_the_registry(work, env)


def repro_then_no_op_then_imported_and_report(work: Path, env: dict, tmp_path: Path, file_server) -> None:
    first = run_dvc(["repro", f"evaluate@{EXP}"], work, env)
    for stage in ("sample", "prepare@cityscapes", "weights@R-50-D8", f"train@{EXP}", f"evaluate@{EXP}"):
        assert f"Running stage '{stage}'" in first
    assert "prepare@ade20k" not in first   # only what the target needs
    train = json.loads((work / "metrics" / EXP / "train.json").read_text())
    evaluation = json.loads((work / "metrics" / EXP / "eval.json").read_text())
    assert (work / "models" / EXP / "model.pt").stat().st_size > 100e6   # 50 M fp32 parameters
    assert train and evaluation
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert {"sample", "prepare@cityscapes", f"train@{EXP}", f"evaluate@{EXP}"} <= set(lock["stages"])

    second = run_dvc(["repro", f"evaluate@{EXP}"], work, env)
    assert "Running stage" not in second
    assert "didn't change" in second or "up to date" in second.lower()
    status = run_dvc(["status", f"evaluate@{EXP}"], work, env)
    assert "up to date" in status.lower()

    # A released checkpoint by its URL: fetched once (sha256 checked), evaluated, in the report's three columns.
    released = _released_checkpoint(tmp_path / "served")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["imported_checkpoints"] = {"released_r50": {"experiment": EXP, "source": file_server.add(released.name,
                                                                                                    released)}}
    params["downloads"] = {"cache_dir": str(tmp_path / "cache")}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_dvc(["repro", "evaluate_imported@released_r50"], work, env)
    assert "Running stage 'evaluate_imported@released_r50'" in third and f"train@{EXP}'" not in third
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [released.name]
    imported = json.loads((work / "metrics" / "released_r50" / "eval.json").read_text())
    assert imported["imported"] and imported["checkpoint"].endswith(released.name)
    run_dvc(["repro", "--single-item", "report"], work, env)
    from components.evaluation.table import parse_markdown_tables

    compare = next(t for t in parse_markdown_tables((work / "reports" / "results.md").read_text())
                   if "mIoU released" in t.header)
    row = next(r for r in compare.records() if r["experiment"] == EXP)
    assert row["mIoU published"] == "78.61"
    assert row["mIoU released"] == f"{imported['single_scale']['mIoU']:.2f}"
    assert row["mIoU ours"] == f"{evaluation['single_scale']['mIoU']:.2f}"
    text = (work / "reports" / "results.md").read_text()
    assert f"final model (iteration {train['final']['iteration']}" in text and "best val mIoU during training" in text
    assert file_server.requests == [f"/{released.name}"]   # downloaded once


# --- a dataset added through the registry only ------------------------------------------------------

TOY_MODULE = '''
"""Toy: 3 classes; <source>/<split>/<stem>.png images beside <stem>_label.png train ids (255 = ignore)."""

from pathlib import Path

import numpy as np
from PIL import Image

from components.learning.data.datasets.spec import DatasetSpec
from components.learning.data.io import DirTree, Item, Source
from components.learning.data.validate import DataError, check_same_size, read_label_png


def open_source(source: Path) -> Source:
    if not Path(source).is_dir():
        raise DataError(f"{source}: dataset source not found")
    tree = DirTree(Path(source))
    return Source(tree, tree)


def list_split(src: Source, split: str) -> list[Item]:
    images = [p for p in src.images.files(split) if p.endswith(".png") and not p.endswith("_label.png")]
    if not images:
        raise DataError(f"{src.images.where(split)}: split {split!r} is empty")
    return [Item(p, p[:-4] + "_label.png", f"images/{Path(p).name}", f"labels/{Path(p).name}") for p in images]


def make_label(src: Source, item: Item, image_size, out_path: Path, image_where: str) -> np.ndarray:
    where = src.labels.where(item.label)
    label = read_label_png(src.labels.read_bytes(item.label), where)
    check_same_size(image_size, (label.shape[1], label.shape[0]), image_where, where)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(out_path)
    return label


DATASET = DatasetSpec(name="toy", title="Toy", classes=("background", "square", "disc"),
                      palette=((0, 0, 0), (255, 0, 0), (0, 0, 255)), splits={"train": "train", "val": "val"},
                      open_source=open_source, list_split=list_split, make_label=make_label)
'''


def _write_toy_data(root: Path, seed: int = 0) -> None:
    """Squares (class 1) and discs (class 2) on a textured background (0), a thin ignored border."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 4), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            h, w = 64, 128
            label = np.zeros((h, w), np.uint8)
            y, x = np.mgrid[:h, :w]
            cy, cx, r = rng.integers(16, 48), rng.integers(16, 56), rng.integers(8, 14)
            label[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = 2
            y0, x0 = rng.integers(8, 40), rng.integers(70, 100)
            label[y0:y0 + 16, x0:x0 + 20] = 1
            label[:2] = 255
            colours = np.array([[90, 120, 60], [200, 40, 40], [40, 40, 200]], np.float64)
            image = colours[np.minimum(label, 2)] + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / split / f"toy_{i}.png")
            Image.fromarray(label).save(root / split / f"toy_{i}_label.png")


def dataset_added_through_the_registry(work: Path, env: dict) -> None:
    (work / "components" / "learning" / "data" / "datasets" / "toy.py").write_text(textwrap.dedent(TOY_MODULE))
    _write_toy_data(work / "data" / "toy")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["datasets"]["toy"] = {"source": "data/toy"}
    name = "dnl_r18-d8_64x128_40k_toy"
    params["experiments"][name] = {"dataset": "toy", "backbone": "R-18-D8", "crop_size": [512, 1024],
                                   "scale": [1024, 512], "schedule": "40k", "batch_size": 8,
                                   "align_corners": False, "test_mode": "whole"}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = run_dvc(["repro", f"evaluate@{name}"], work, env)
    for stage in ("prepare@toy", f"train@{name}", f"evaluate@{name}"):
        assert f"Running stage '{stage}'" in out
    assert "prepare@cityscapes" not in out and "Running stage 'sample'" not in out
    stats = json.loads((work / "metrics" / "data" / "toy.json").read_text())
    assert stats["num_classes"] == 3 and stats["splits"]["train"]["images"] == 4
    assert list(stats["splits"]["train"]["class_pixels"]) == ["background", "square", "disc"]
    evaluation = json.loads((work / "metrics" / name / "eval.json").read_text())
    assert evaluation["dataset"] == "toy" and evaluation["images"] == 2
    assert list(evaluation["single_scale"]["IoU"]) == ["background", "square", "disc"]
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert {"prepare@toy", f"train@{name}", f"evaluate@{name}"} <= set(lock["stages"])


# --- DVC's own ways of running experiments, from a clone that is not the installed one ---------------

def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def experiments_temp_and_queue_in_their_own_workspace(work: Path, env: dict) -> None:
    """In a clone whose `dnlseg` was installed from another clone (this repo), `dvc exp run --temp -S
    train.lr=…` and two queued experiments run by `dvc queue start -j 2` each read their own params and
    write their own metrics, listed by `dvc exp show`; the workspace is untouched."""
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}   # the installed package: another clone's code
    run_dvc(["repro", f"train@{EXP}"], work, env)   # the baseline (trained in act 1; weights@ reruns: downloads)
    _git(["add", "-A"], work)
    _git(["commit", "-qm", "baseline"], work)
    before = {p: p.read_bytes() for p in (work / "params.yaml", work / "dvc.lock",
                                          work / "metrics" / EXP / "train.json")}

    run_dvc(["exp", "run", "--temp", "-n", "lr02", "-S", "train.lr=0.02", f"train@{EXP}"], work, env)
    for name, lr in (("lr03", "0.03"), ("lr04", "0.04")):
        run_dvc(["exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", f"train@{EXP}"], work, env)
    # Output to a file, not a pipe: the queue's workers outlive `dvc queue start` and inherit its output,
    # and a worker that lingers after the queue is empty held a captured pipe open (the test then hung).
    with open(work.parent / "dvc-queue-start.log", "wb") as log:
        started = subprocess.run([str(Path(sys.executable).parent / "dvc"), "queue", "start", "-j", "2"], cwd=work,
                                 env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert started.returncode == 0, (work.parent / "dvc-queue-start.log").read_text()[-4000:]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:   # the queue's workers run in the background
        status = run_dvc(["queue", "status"], work, env)
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(5)
    run_dvc(["queue", "stop"], work, env)
    assert "Failed" not in status, status

    assert _exp_show(work, env) == {"lr02": 0.02, "lr03": 0.03, "lr04": 0.04}
    assert all(p.read_bytes() == data for p, data in before.items())   # the workspace is as it was


def _exp_show(work: Path, env: dict) -> dict:
    """{experiment name: its train.lr} of the experiments that finished with their own train.json."""
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    found = {}
    for commit in json.loads(done.stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = (data.get("metrics") or {}).get(f"metrics/{EXP}/train.json", {}).get("data")
                if rev.get("name") and metrics and metrics["final"]["iteration"] == 2:
                    found[rev["name"]] = params["train"]["lr"]
    return found
