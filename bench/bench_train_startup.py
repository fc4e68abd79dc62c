"""The fixed cost of one Ray Train run: wall time of `fit()` and the CPU the whole machine spends on it,
for a loop that does nothing but report one checkpoint, with Ray Train's helper actors on and off.

Every variant runs `--runs` times, interleaved (A B C A B C ...) so that a drifting machine moves all of
them alike, on one local Ray started as the stages start theirs (components/ray_cluster.py). CPU is the
machine's (user + system from /proc/stat), so it counts Ray's own processes, not only this one.

    .venv/bin/python bench/bench_train_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray.train  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from components.ray_cluster import scoped_env, shutdown_ray, start_local_ray  # noqa: E402
from components.training.trainer import LeanTorchTrainer  # noqa: E402


def report_one_checkpoint(config: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "state.txt").write_text("0")
        ray.train.report({"iteration": 1}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def machine_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
VARIANTS = {   # label: (trainer class, its keyword arguments, the driver's environment for the run)
    "TorchTrainer, as Ray Train starts it": (TorchTrainer, {}, {}),
    "without the dataset manager (a tune trial)": (LeanTorchTrainer, {}, {}),
    "without it and the placement-group cleaner (the train stage)": (LeanTorchTrainer, {"pg_cleaner": False}, {}),
    "the train stage, its controller polling every 0.5 s (the tests' setting)":
        (LeanTorchTrainer, {"pg_cleaner": False}, {POLL: "0.5"}),
}


def one_run(variant: tuple, storage: str, name: str) -> tuple[float, float]:
    trainer_cls, kwargs, env = variant
    trainer = trainer_cls(report_one_checkpoint, scaling_config=ray.train.ScalingConfig(num_workers=1),
                          run_config=ray.train.RunConfig(name=name, storage_path=storage), **kwargs)
    cpu, wall = machine_cpu_seconds(), time.perf_counter()
    with scoped_env(env):   # what Ray Train hands its controller is read from here when fit() starts it
        trainer.fit()
    return time.perf_counter() - wall, machine_cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    os.environ[POLL] = "2"   # Ray Train's default for the cluster's processes; only the last variant's differs
    start_local_ray(num_cpus=2)
    try:
        with tempfile.TemporaryDirectory() as storage:
            one_run(VARIANTS[next(iter(VARIANTS))], storage, "warm-up")   # Ray's first workers: not counted
            for i in range(args.runs):
                for n, (label, variant) in enumerate(VARIANTS.items()):
                    time.sleep(2)   # let the previous run's actors exit
                    times[label].append(one_run(variant, storage, f"run{i}-variant{n}"))
    finally:
        shutdown_ray()
    print(f"{os.cpu_count()} cores, Ray {ray.__version__}, {args.runs} runs each (median, min-max)\n")
    print("| Ray Train run | fit() wall s | machine CPU s |\n|---|---:|---:|")
    for label, rows in times.items():
        walls, cpus = [r[0] for r in rows], [r[1] for r in rows]
        print(f"| {label} | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
              f"| {statistics.median(cpus):.1f} ({min(cpus):.1f}-{max(cpus):.1f}) |")


if __name__ == "__main__":
    main()
