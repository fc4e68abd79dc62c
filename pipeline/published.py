"""Stage `published@<experiment>`: the published run's training log, fetched once, read and recorded.

The log (params.yaml `experiments.<exp>.published_log`, else the profile's: reference `released` = the
seed table's log.json link, sample `none`) is fetched once into the download cache as the ImageNet
weights are (components/weights.py: progress bar, temp file renamed when complete). Its name carries no
checksum, so its sha256 is recorded: published/<exp>.json holds the source, the sha256 and the parsed
curve (components/published_log.py), plots/<exp>/published.csv the curve for `dvc plots`, and MLflow a
run `<exp> (published)` in the dataset's experiment (components/published_run.py).

A log whose sha256 differs from the one recorded before (the server changed the file since the last
fetch) is one warning line and is RE-RECORDED, the old sha256 kept as `previous_sha256`: a published log
is a reference curve, not an input of any result, and the record is committed, so the change shows in
`git diff`. `dnlseg published <exp> --refresh` asks the server again instead of using the cached copy.
An unreachable server or a missing file is one line and exit 2; a malformed or truncated line of the log
is one warning line (file and line number) and never fails the stage.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from components.atomic import atomic_write_text
from components.console import redact, warn
from components.published_log import TRAIN_COLUMNS, VAL_COLUMNS, PublishedCurve, ended_early, parse_log
from components.weights import WeightsError, fetch, sha256_file
from pipeline.config import Params, published_plot, published_record

PLOT_COLUMNS = TRAIN_COLUMNS + VAL_COLUMNS[1:]


class PublishedLogError(ValueError):
    """A published log that cannot be fetched; one line naming the experiment and the source."""


def fetch_published(params: Params, name: str, *, out_root: Path | str | None = None,
                    refresh: bool = False) -> dict:
    """Fetch, read and record experiment `name`'s published log; the record (also written to
    published/<name>.json)."""
    out_root = Path(out_root or params.root)
    source = params.published_log(name)
    record = {"experiment": name, "dataset": params.experiments[name].dataset, "source": source}
    curve = PublishedCurve()
    if source != "none":
        path = _fetch(name, source, params, refresh)
        record["sha256"] = sha256_file(path)
        record |= _compare(name, source, record["sha256"], published_record(out_root, name))
        curve = parse_log(path.read_bytes().decode("utf-8", errors="replace"), source)
        for line in curve.warnings:
            warn(line)
        record["ended_early"] = ended_early(curve)
    record["curve"] = curve.to_json()
    atomic_write_text(published_record(out_root, name), json.dumps(record, indent=1) + "\n")
    atomic_write_text(published_plot(out_root, name), plot_csv(curve))
    if source == "none":
        print(f"[published] {name}: none (profile {params.profile}: no published curve; "
              f"experiments.{name}.published_log sets one)", flush=True)
        return record
    _track(params, name, curve, record)
    note = f", {record['ended_early']}" if record["ended_early"] else ""
    print(f"[published] {name}: {source} (sha256 {record['sha256'][:12]}, {len(curve.train)} train and "
          f"{len(curve.val)} val points, {len(curve.warnings)} lines skipped{note})", flush=True)
    return record


def _fetch(name: str, source: str, params: Params, refresh: bool) -> Path:
    """The log, through the weights' download cache; failures as one PublishedLogError line."""
    try:
        path = fetch(source, root=params.root, cache_dir=params.cache_dir)
        if refresh and source.startswith(("http://", "https://")):
            path.unlink()   # the cached copy: ask the server again
            path = fetch(source, root=params.root, cache_dir=params.cache_dir)
    except WeightsError as e:   # "weights: <source>: <what>"
        raise PublishedLogError(f"published log of {name}: {str(e).removeprefix('weights: ')} "
                                f"(experiments.{name}.published_log: a URL, a local path or none)") from None
    return path


def _compare(name: str, source: str, sha256: str, previous_path: Path) -> dict:
    """{previous_sha256} when the record from the last fetch of the same source has another sha256
    (one warning line), else nothing."""
    try:
        previous = json.loads(previous_path.read_text())
    except (OSError, ValueError):
        return {}
    old = previous.get("sha256") if previous.get("source") == source else None
    if not old or old == sha256:
        return {}
    warn(f"[published] warning: {name}: {source} changed since the last fetch (sha256 {old[:12]} -> "
         f"{sha256[:12]}): re-recorded in {previous_path.name}, previous_sha256 kept")
    return {"previous_sha256": old}


def _track(params: Params, name: str, curve: PublishedCurve, record: dict) -> None:
    """The MLflow run; a tracking store that fails is a warning (the record and plot are written)."""
    # Imported here: MLflow costs a stage ~2.7 s to import, and under profile sample every row is `none` and
    # logs nothing (tests/test_published.py: the stage starts without it).
    from components.published_run import log_published_run
    from components.tracking import FAIL_FAST_ENV, environment_defaults

    try:   # fail fast: MLflow's HTTP client otherwise retries an unreachable server for minutes
        with environment_defaults(FAIL_FAST_ENV):
            run_id, created = log_published_run(params.tracking_uri, record["dataset"], name, curve,
                                                sha256=record["sha256"], source=record["source"])
    except Exception as e:  # noqa: BLE001 - tracking is optional, as for training
        warn(f"[published] warning: {name}: MLflow at {redact(params.tracking_uri)} failed "
             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the record is written")
        return
    print(f"[published] {name}: MLflow run {run_id} ({'logged' if created else 'already there'})", flush=True)


def plot_csv(curve: PublishedCurve) -> str:
    """One row per iteration: the train columns, and mIoU / mAcc / aAcc where an evaluation ran."""
    rows: dict[int, dict] = {}
    for row in curve.train + curve.val:
        rows.setdefault(row["iteration"], {}).update(row)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=PLOT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for iteration in sorted(rows):
        writer.writerow({k: "" if rows[iteration].get(k) is None else rows[iteration][k] for k in PLOT_COLUMNS})
    return text.getvalue()
