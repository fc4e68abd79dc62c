"""Stage `prepare@<dataset>`: turn a registered dataset's official files into prepared splits.

`prepare_dataset` reads an extracted official folder or the official zip archives (never writing
into them) and writes, per split (train, val):

    <out_dir>/<split>/manifest.csv    image,label,height,width,sha256 (paths relative to the split dir)
    <out_dir>/<split>/images/...      hardlinked (same filesystem) / copied / extracted from the archive
    <out_dir>/<split>/labels/...      train ids 0..C-1, 255 = ignore (uint8 PNG)

plus a stats json (images per split, class pixel counts and frequencies with class names).
Cityscapes labels come from the polygon JSON via cityscapesscripts' json2labelImg('trainIds');
ADE20K's reduce_zero_label is applied here, once (see components/learning/data/datasets/ade20k.py).
Every file is checked first (missing label, unreadable image, size mismatch, label values, empty split,
wrong archive) and a problem stops the stage with a one-line DataError naming the file. Splits are
built in temp folders next to the destination and swapped in with os.replace only when all splits
succeeded, so a failure leaves the previous output (or none) untouched and a rerun starts clean.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from components.atomic import atomic_write_bytes, make_temp_dir, replace_dir
from components.learning.data.classes import IGNORE_INDEX
from components.learning.data.datasets import get_dataset
from components.learning.data.io import MANIFEST_COLUMNS, link_or_copy, sha256_bytes
from components.learning.data.validate import DataError, check_label_values, check_rgb_image


def prepare_dataset(name: str, source: Path, out_dir: Path, stats_path: Path, workers: int = 0) -> dict:
    """Prepare the registered dataset `name` from `source` into `out_dir/{train,val}` and write the stats
    json to `stats_path`; returns the stats. workers: processes, 0 = all cores."""
    module = get_dataset(name)
    source, out_dir, stats_path = Path(source), Path(out_dir), Path(stats_path)
    if not source.exists():
        raise DataError(f"{source}: dataset source not found")
    _check_separate(source, out_dir)
    src = module.open_source(source)
    items = {split: module.list_split(src, split) for split in module.splits}  # listing errors come first

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    staged: dict[str, Path] = {}
    split_stats = {}
    try:
        for split, split_items in items.items():
            staged[split] = make_temp_dir(out_dir, f".{split}.tmp-")
            rows, hist = _convert_split(name, src, split_items, staged[split], workers, f"{name} {split}")
            _write_manifest(staged[split] / "manifest.csv", rows)
            split_stats[split] = _split_stats(len(rows), hist, module.classes)
        for split, staging in list(staged.items()):
            replace_dir(staging, out_dir / split)
            del staged[split]
    finally:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)

    stats = {
        "dataset": name,
        "num_classes": len(module.classes),
        "ignore_index": IGNORE_INDEX,
        "splits": split_stats,
    }
    atomic_write_bytes(stats_path, (json.dumps(stats, indent=2) + "\n").encode())
    return stats


# --- conversion ------------------------------------------------------------------------------------


def _convert_split(name, src, items, staging: Path, workers: int, desc: str):
    """Convert every item into `staging`; returns manifest rows (sorted) and the label histogram."""
    workers = min(_cpu_count() if workers <= 0 else workers, len(items))
    hist = np.zeros(256, dtype=np.int64)
    rows = []
    pool = None
    if workers <= 1:
        _start_worker(name, src, staging)
        results = map(_convert_one, items)
    else:
        # The source (with an archive's whole name list) goes to each worker once, not with every item.
        # spawn: safe whatever the parent process holds (threads, torch); the workers import little.
        pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (name, src, staging))
        results = pool.imap_unordered(_convert_one, items, chunksize=max(1, len(items) // (workers * 16)))
    try:
        for row, item_hist in tqdm(
            results, total=len(items), desc=f"prepare {desc}", unit="img", mininterval=1
        ):
            rows.append(row)
            hist += item_hist
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _start_worker(None, None, None)
    return sorted(rows), hist


_job: dict = {}  # what _convert_one works on, set once per process by _start_worker


def _start_worker(name, src, staging) -> None:
    _job.update(name=name, src=src, staging=staging)


def _convert_one(item):
    """One image: place it, check it, make its label, check that."""
    module, src, staging = get_dataset(_job["name"]), _job["src"], _job["staging"]
    where = src.images.where(item.image)
    data = src.images.read_bytes(item.image)
    width, height = check_rgb_image(data, where)
    dest = staging / item.out_image
    local = src.images.local_path(item.image)
    if local is not None:
        link_or_copy(local, dest)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    label = module.make_label(src, item, (width, height), staging / item.out_label, where)
    check_label_values(label, len(module.classes), src.labels.where(item.label))
    row = [item.out_image, item.out_label, height, width, sha256_bytes(data)]
    return row, np.bincount(label.ravel(), minlength=256)


def _write_manifest(path: Path, rows: list) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _split_stats(images: int, hist: np.ndarray, classes) -> dict:
    total, ignored = int(hist.sum()), int(hist[IGNORE_INDEX])
    labelled = max(total - ignored, 1)
    return {
        "images": images,
        "pixels": total,
        "ignored_pixels": ignored,
        "class_pixels": {c: int(hist[i]) for i, c in enumerate(classes)},
        "class_frequency": {c: round(int(hist[i]) / labelled, 6) for i, c in enumerate(classes)},
    }


# --- helpers ---------------------------------------------------------------------------------------


def _check_separate(source: Path, out_dir: Path) -> None:
    """Outputs must never land inside the raw data (nor the raw data inside an output split)."""
    src, out = source.resolve(), out_dir.resolve()
    if src.is_dir() and out.is_relative_to(src):
        raise DataError(
            f"{out_dir}: the output folder is inside the dataset source {source}; "
            f"raw data is never written to"
        )
    if src.is_relative_to(out):
        raise DataError(f"{source}: the dataset source is inside the output folder {out_dir}")


def _remove_leftovers(out_dir: Path) -> None:
    """Temp folders of an interrupted run (killed before its cleanup could run)."""
    for path in out_dir.glob(".*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in out_dir.glob(".*.old-*"):
        shutil.rmtree(path, ignore_errors=True)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
