"""Data loader throughput on full-resolution Cityscapes-sized images (2048×1024) with the 512×1024
training pipeline (RandomResize 0.5-2.0 of (2048, 1024), cat_max_ratio crop, flip, photometric
distortion, normalize, pad), for 0 / 1 / 2 DataLoader worker processes.

Generates a handful of Cityscapes-format sample images into a temp folder, prepares them with
`prepare_dataset` (so the loader reads exactly what training reads), then times batches. Also prints
the per-image cost of each step in this process, which explains the totals.

    nice python bench/bench_loader.py [--images 8] [--batches 12] [--batch-size 2] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.learning.data.dataset import SegmentationDataset, build_loader  # noqa: E402
from components.learning.data.transforms import build_train_transform, seed_transform  # noqa: E402
from components.sample import write_cityscapes  # noqa: E402
from pipeline.prepare import prepare_dataset  # noqa: E402

SCALE, CROP = (2048, 1024), (512, 1024)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores available, torch {torch.__version__}, {platform.python_version()}"


def time_loader(dataset, workers: int, batch_size: int, batches: int) -> dict:
    """Steady-state rate: the batches the workers prefetched while starting up are consumed before
    the clock starts (otherwise they inflate the rate), and one epoch covers the whole run."""
    skip = 1 + 2 * workers  # the warm-up batch + DataLoader's default prefetch (2 batches per worker)
    loader = build_loader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True, seed=0)
    assert len(loader) >= skip + batches, "dataset too small for one epoch"
    it = iter(loader)
    for _ in range(skip):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    del it, loader
    rate = batches * batch_size / seconds
    return {
        "workers": workers,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / max(workers, 1),
        "ms_per_image": 1000 / rate,
    }


def step_costs(dataset, repeats: int) -> dict:
    """Mean ms per image of each step, run in this process."""
    transform = dataset.transform
    seed_transform(transform, 0)
    costs = {"read (PNG decode x2)": 0.0}
    costs.update({type(t).__name__: 0.0 for t in transform.transforms})
    costs["to tensor"] = 0.0
    for i in range(repeats):
        t0 = time.perf_counter()
        image, label = dataset.read(i % len(dataset))
        costs["read (PNG decode x2)"] += time.perf_counter() - t0
        data = {"image": image, "mask": label}
        for t in transform.transforms:
            t0 = time.perf_counter()
            data = t(**data)
            costs[type(t).__name__] += time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.from_numpy(np.ascontiguousarray(data["image"].transpose(2, 0, 1)))
        torch.from_numpy(data["mask"].astype(np.int64))
        costs["to tensor"] += time.perf_counter() - t0
    return {k: 1000 * v / repeats for k, v in costs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="generated 2048x1024 training images")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker setting")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_cityscapes(tmp / "raw", seed=0, train=args.images, val=1, height=1024, width=2048)
        generated = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_dataset("cityscapes", tmp / "raw", tmp / "prepared", tmp / "stats.json", workers=1)
        prepared = time.perf_counter() - t0
        dataset = SegmentationDataset(tmp / "prepared" / "train", build_train_transform(SCALE, CROP))
        costs = step_costs(dataset, repeats=3 * args.images)
        # repeat the files so one epoch covers warm-up + timed batches (no epoch-boundary stalls)
        needed = (1 + 2 * max(args.workers) + args.batches) * args.batch_size
        dataset.rows = dataset.rows * -(-needed // len(dataset.rows))
        results = [time_loader(dataset, w, args.batch_size, args.batches) for w in args.workers]

    print(f"machine: {machine()}")
    print(
        f"{args.images} images 2048x1024, generated in {generated:.1f} s, prepared (1 process) in "
        f"{prepared:.1f} s; pipeline scale {SCALE} crop {CROP}; batch {args.batch_size}, "
        f"{args.batches} timed batches after the warm-up / prefetched ones\n"
    )
    print("| loader workers | images/s | images/s per worker | ms/image |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['workers']} | {r['images_per_s']:.2f} | {r['images_per_s_per_worker']:.2f} | "
            f"{r['ms_per_image']:.0f} |"
        )
    print("\n| step (in process, per image) | ms |")
    print("|---|---:|")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.1f} |")
    print(f"| total | {sum(costs.values()):.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": machine(), "loader": results, "steps_ms": costs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
