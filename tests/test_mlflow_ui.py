"""The MLflow UI comparison, for real: `mlflow server` over a store the project's code filled (training-style
runs, evaluation metrics logged by the evaluate stage's helpers), opened in headless Chromium.

The UI is a React app: `--dump-dom` after a virtual-time budget gives the DOM once the app has fetched
and rendered the runs (virtual time does not advance while requests are pending). Checked: the
experiment's run list shows both runs, ordered by eval.mIoU when sorted by it, and the comparison page
the report links to shows each run's mIoU under that run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import MlflowServer

from pipeline.report import compare_url

pytestmark = pytest.mark.integration

RUNS = {"dnl_r50-d8_512x1024_40k_cityscapes": 71.23, "dnl_r101-d8_512x1024_40k_cityscapes": 65.43}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,2000"]


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """A headless Chromium on this machine (e.g. Debian's `chromium` package), else the test is skipped:
    the suite does not install system packages."""
    found = find_chromium()
    if not found:
        pytest.skip("no Chromium on this machine (/usr/bin/chromium, chromium or chromium-browser on PATH): "
                    "install one (Debian: `apt-get install chromium`) to check the MLflow UI in a browser")
    return found


def fill_store(tracking_uri: str) -> dict[str, str]:
    """Runs as the train stage creates them (components.tracking.open_run), evaluated as the evaluate stage
    logs (eval_metrics / mark_training_experiment). Returns {experiment name: run_id}."""
    from mlflow.tracking import MlflowClient

    from components.tracking import RunLogger, mark_training_experiment, open_run
    from pipeline.evaluate import eval_metrics

    run_ids = {}
    for name, miou in RUNS.items():
        logger = open_run(tracking_uri, "cityscapes", run_name=f"{name}-0123abcd", resume=False,
                          tags={"experiment": name, "dvc_stage": f"train@{name}"},
                          params={"backbone": name.split("_")[1]})
        assert logger.run_id, "the store could not be opened"
        summary = {"single_scale": {"mIoU": miou, "mAcc": miou + 5, "aAcc": 90.0, "IoU": {"road": 95.0}},
                   "ms_flip": {"mIoU": miou + 1, "mAcc": miou + 6, "aAcc": 91.0, "IoU": {"road": 96.0}},
                   "speed": {"fps": 2.5}, "train_memory": {"peak_gb": 7.5}}
        RunLogger(tracking_uri, logger.run_id).log_metrics(eval_metrics(summary), step=16)
        logger.set_status("FINISHED")
        run_ids[name] = logger.run_id
    mark_training_experiment(MlflowClient(tracking_uri=tracking_uri), "cityscapes")
    return run_ids


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_db_template):
    work = tmp_path_factory.mktemp("mlflow_ui")
    server = MlflowServer(work, mlflow_db_template, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    run_ids = fill_store(f"sqlite:///{server.db}")
    server.start()
    try:
        yield {"base": server.uri, "run_ids": run_ids, "work": work}
    finally:
        server.stop()


def dump_dom(chromium: str, url: str, profile: Path, budget_ms: int = 30000) -> str:
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-1500:]
    return result.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)).strip()


def dom_until(chromium: str, url: str, profile: Path, wanted: list[str]) -> str:
    """The DOM once every `wanted` string shows (a second, longer budget if the first render was early)."""
    dom = ""
    for budget in (30000, 90000):
        dom = dump_dom(chromium, url, profile, budget)
        if all(w in visible_text(dom) for w in wanted):
            break
    return dom


class GridCells(HTMLParser):
    """Text of the absolutely positioned cells of the UI's virtualized grids, with their top / left."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self._open: list[dict | None] = []

    def handle_starttag(self, tag, attrs):
        style = dict(attrs).get("style") or ""
        top, left = re.search(r"top:\s*([\d.]+)px", style), re.search(r"left:\s*([\d.]+)px", style)
        cell = None
        if "position: absolute" in style and top and left:
            cell = {"top": float(top.group(1)), "left": float(left.group(1)), "text": ""}
            self.cells.append(cell)
        if tag not in ("br", "img", "input", "meta", "link", "hr"):
            self._open.append(cell)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for cell in self._open:
            if cell is not None:
                cell["text"] += data


def metric_rows(dom: str) -> dict[str, list[str]]:
    """Metric name -> the values shown in that row, left to right, in the compare page's Metrics table."""
    start = dom.find(">Metrics<")
    end = dom.find(">Artifacts<", start)
    assert start >= 0 and end > start, "the comparison page has no Metrics section"
    parser = GridCells()
    parser.feed(dom[start:end])
    names = [c for c in parser.cells if re.fullmatch(r"[A-Za-z][\w.]*", c["text"].strip())]
    values = [c for c in parser.cells if re.fullmatch(r"-?[\d.]+", c["text"].strip())]
    return {c["text"].strip(): [v["text"].strip() for v in sorted(values, key=lambda v: v["left"])
                                if v["top"] == c["top"]] for c in names}


def test_experiment_page_lists_the_runs_ordered_by_miou(chromium, mlflow_server, tmp_path):
    names = {run_id: f"{name}-0123abcd" for name, run_id in mlflow_server["run_ids"].items()}
    url = f"{mlflow_server['base']}/#/experiments/1/runs?orderByKey=metrics.%60eval.mIoU%60&orderByAsc=false"
    text = visible_text(dom_until(chromium, url, tmp_path / "profile", list(names.values())))
    positions = {name: text.find(name) for name in names.values()}
    assert all(p >= 0 for p in positions.values()), f"runs missing from the page: {text[:1500]}"
    assert "Sort: eval.mIoU" in text
    best, other = (f"{n}-0123abcd" for n in sorted(RUNS, key=RUNS.get, reverse=True))
    assert positions[best] < positions[other], "runs are not in descending eval.mIoU order"


def test_compare_page_shows_each_runs_miou(chromium, mlflow_server, tmp_path):
    run_ids = mlflow_server["run_ids"]
    ordered = list(RUNS)
    url = compare_url(mlflow_server["base"], [("1", run_ids[name]) for name in ordered])   # the report's link
    dom = dom_until(chromium, url, tmp_path / "profile", [f"{n}-0123abcd" for n in ordered] + ["eval.mIoU"])
    text = visible_text(dom)
    run_names = re.search(r"Run Name:\s*(\S+)\s+(\S+)", text)
    assert run_names, f"no run names on the comparison page: {text[:1500]}"
    columns = [name.removesuffix("-0123abcd") for name in run_names.groups()]
    assert sorted(columns) == sorted(ordered)
    rows = metric_rows(dom)
    assert rows.get("eval.mIoU") == [f"{RUNS[name]:.2f}" for name in columns], rows
    assert rows.get("eval.ms_flip.mIoU") == [f"{RUNS[name] + 1:.2f}" for name in columns], rows
