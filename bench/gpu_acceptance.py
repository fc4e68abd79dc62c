"""GPU acceptance: what a developer with one lent NVIDIA GPU runs (<= 12 minutes) before the first reference
run on a cluster. Each step prints its lines, then one table sums them up:

1. hardware   the node check the train stage's preflight runs (components/hardware.py)
2. step       fp32 / tf32 / bf16 training step time and peak memory, R-50-D8 DNLNet, 512x1024, batch 2
3. ray        the train stage through Ray Train with 2 DataLoader worker processes: 1 worker (NCCL) stopped
              after its first checkpoint, resumed on 2 workers sharing the GPU (GPU 0.5 each, over gloo:
              NCCL refuses two ranks on one GPU); both ranks end with the same weights
4. evaluate   the evaluate stage on the GPU: whole 1024x2048 images, single scale + ms+flip, peak memory
5. mlflow     GPU keys in the run's MLflow system metrics

    python bench/gpu_acceptance.py [--work DIR] [--steps hardware,step,ray,evaluate,mlflow]
    python bench/gpu_acceptance.py --dry      # the same steps on the CPU at toy sizes (CI's smoke test)

Exit status 1 when a check fails. bench/gpu_acceptance.sh wraps it with the machine's facts and a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for _key, _value in {"NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2",
                     "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "GLOO_SOCKET_IFNAME": "lo"}.items():
    os.environ.setdefault(_key, _value)   # one machine: gloo on loopback; Ray's workers inherit these

import ray.cloudpickle  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch as ray_torch  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.train import TrainingFailedError  # noqa: E402
from ray.train.torch import TorchConfig  # noqa: E402
from torch import nn  # noqa: E402

from components.hardware import gather_facts, loader_shm_bytes, node_problems, sm  # noqa: E402
from components.learning.loop import LoopHooks  # noqa: E402
from components.learning.models import build_dnlnet  # noqa: E402
from components.learning.models.speedups import cpu_threads, fp32_math, use_precision  # noqa: E402
from components.learning.step import sgd, train_step  # noqa: E402
from components.ray_cluster import shutdown_ray, start_local_ray  # noqa: E402
from components.sample import write_cityscapes  # noqa: E402
from components.training import trainer as trainer_module  # noqa: E402
from components.training.worker import wait_until_committed  # noqa: E402
from pipeline.config import parse, read_raw  # noqa: E402
from pipeline.evaluate import evaluate_experiment  # noqa: E402
from pipeline.prepare import prepare_dataset  # noqa: E402
from pipeline.train import train_experiment  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the hooks travel to the Ray workers by value

STEPS = ("hardware", "step", "ray", "evaluate", "mlflow")
PRECISIONS = ("fp32", "tf32", "bf16")
GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """What the checks run at: the reference sizes on a GPU, toy ones on the CPU (--dry)."""

    gpu: bool
    experiment: str                # the row the Ray run and the evaluation train and test
    crop: tuple[int, int]          # (h, w) of the step benchmark
    depth: int                     # the step benchmark's backbone
    step_reps: int                 # timed steps per precision (after 3 untimed)
    image: tuple[int, int]         # (h, w) of the generated Cityscapes images
    size_scale: float              # profiles.reference.size_scale for the Ray run and evaluation
    iters: int                     # the Ray run's iterations (evaluation + checkpoint at half and at the end)
    fps_images: int


GPU = Sizes(True, "dnl_r50-d8_512x1024_40k_cityscapes", (512, 1024), 50, 20, (1024, 2048), 1.0, 12, 20)
# The small R-18-D8 row at 1/16 of the sizes: the code paths of the real run, in seconds on 2 CPU cores.
DRY = Sizes(False, "dnl_r18-d8_512x1024_40k_cityscapes", (32, 64), 18, 1, (64, 128), 0.0625, 4, 2)


@dataclass
class Report:
    rows: list = field(default_factory=list)     # (step, check, result, figures)

    def add(self, step: str, check: str, ok: bool | None, figures: str) -> None:
        """ok None: not applicable here (the dry mode's GPU-only checks)."""
        result = "PASS" if ok else "n/a" if ok is None else "FAIL"
        self.rows.append((step, check, result, figures))
        print(f"[{step}] {result:4}  {check}: {figures}", flush=True)

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r[2] == "FAIL"]

    def table(self) -> str:
        lines = ["| step | check | result | figures |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def device_of(sizes: Sizes) -> torch.device:
    return torch.device("cuda:0" if sizes.gpu else "cpu")


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB" if device.type == "cuda" else "-"


# --- 1. hardware ------------------------------------------------------------------------------------------

def check_hardware(sizes: Sizes, report: Report, work: Path) -> None:

    facts = gather_facts()
    # The Ray step's loaders: 2 ranks x 2 loader workers, batch 1 each, val images at the test scale.
    need, detail = loader_shm_bytes(2, 2, 1, (round(512 * sizes.size_scale), round(1024 * sizes.size_scale)),
                                    sizes.image)
    problems = node_problems(facts, need, detail)
    for line in problems:
        print(line, flush=True)
    gpus = ", ".join(f"{g.name} ({sm(g.capability)})" for g in facts.gpus) or "no GPU"
    shm = "-" if facts.shm_free is None else f"{facts.shm_free / 1e9:.1f} GB"
    figures = (f"{gpus}; torch {facts.torch_version}, CUDA {facts.wheel_cuda}, driver {facts.driver}; "
               f"shm {shm} free for {need / 1e9:.2f} GB")
    if sizes.gpu:
        report.add("hardware", "the train stage's node check", not problems, figures)
    else:   # the CPU wheel: the check must say so, in one line
        report.add("hardware", "the node check names this CPU build", len(problems) == 1 and "CPU build" in problems[0],
                   figures)


# --- 2. step time and memory ----------------------------------------------------------------------------

def time_steps(sizes: Sizes, device: torch.device, precision: str, img, label) -> tuple[list, list]:
    """(seconds, loss) of each step, from the same initial weights: 3 untimed (cuDNN's autotuning), then
    sizes.step_reps; the peak memory counted from the 4th."""
    use_precision(precision)
    torch.manual_seed(0)
    model = build_dnlnet(depth=sizes.depth, num_classes=19)
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # as the loop on GPUs (one rank: plain BN math)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    batches, times, losses = itertools.repeat((img, label)), [], []
    for it in range(1, 4 + sizes.step_reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        losses.append(train_step(model, optimizer, scaler, batches, 1, device, precision, True, it)["loss"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tic)
        if it == 3 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)   # after cuDNN's autotuning (the seed's Mem: steady)
    return times, losses


def check_steps(sizes: Sizes, report: Report, work: Path) -> None:
    """One reference training step as the loop runs it: channels-last, fused SGD, SyncBN modules (GPU),
    each precision from the same weights and batch."""
    device = device_of(sizes)
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, *sizes.crop, generator=g)
    label = torch.randint(0, 19, (2, *sizes.crop), generator=g)
    if device.type == "cuda":
        img, label = img.pin_memory(), label.pin_memory()
    medians = {}
    for precision in PRECISIONS:
        # CPU: one thread, as the sample profile's workers: on a CPU shared with other jobs OpenMP's
        # barriers wait for descheduled threads (seen here under load: 7 s a toy step with 2 threads).
        with cpu_threads(1 if device.type == "cpu" else 0):
            times, losses = time_steps(sizes, device, precision, img, label)
        medians[precision] = median = statistics.median(times[3:])
        math = fp32_math()
        report.add("step", f"{precision} step, R-{sizes.depth}-D8 {sizes.crop[0]}x{sizes.crop[1]} batch 2",
                   all(v == v for v in losses),
                   f"median {1000 * median:.0f} ms ({2 / median:.1f} img/s) over {sizes.step_reps}, first "
                   f"{times[0]:.1f} s, peak {peak_gib(device)}, conv {math['conv']} / matmul {math['matmul']}, "
                   f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"[step] fp32 / tf32 = {medians['fp32'] / medians['tf32']:.2f}x, tf32 / bf16 = "
          f"{medians['tf32'] / medians['bf16']:.2f}x", flush=True)


# --- 3. Ray Train: checkpoint on the GPU, resumed on another worker count --------------------------------

class StopOnceThenDigest(LoopHooks):
    """Rank 0 stops the run once after iteration `stop_at` (its first checkpoint committed); at the end
    every rank writes a digest of its parameters to `folder`."""

    def __init__(self, folder: str, stop_at: int | None = None):
        self.folder, self.stop_at = folder, stop_at

    def after_iteration(self, rank: int, it: int) -> None:
        marker = Path(self.folder) / "stopped"
        if rank == 0 and it == self.stop_at and not marker.exists():
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            marker.touch()
            wait_until_committed(1)
            raise RuntimeError(f"acceptance: rank 0 stops after iteration {it}")

    def on_end(self, rank: int, model) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.named_parameters()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"rank{rank}.sha256").write_text(digest.hexdigest())


def make_data(sizes: Sizes, work: Path) -> None:
    if (work / "prepared" / "cityscapes" / "val" / "manifest.csv").exists():
        return
    tic = time.perf_counter()
    write_cityscapes(work / "raw", seed=0, train=4, val=2, height=sizes.image[0], width=sizes.image[1])
    prepare_dataset("cityscapes", work / "raw", work / "prepared" / "cityscapes", work / "stats.json", workers=2)
    print(f"[data] 4 train + 2 val Cityscapes-format images {sizes.image[1]}x{sizes.image[0]} in "
          f"{time.perf_counter() - tic:.0f} s", flush=True)


def params_for(sizes: Sizes, work: Path, **profile):
    """The reference profile (SyncBN on GPU, tf32, loader workers, evaluation + checkpoint at half and at
    the end), on the generated data, 1 worker and batch 2 unless `profile` says otherwise."""
    raw = read_raw(REPO / "params.yaml")
    raw["profile"] = "reference"
    raw["profiles"]["reference"].update({
        "size_scale": sizes.size_scale, "max_iters": sizes.iters, "batch_size": 2, "micro_batch_size": None,
        "num_workers": 1, "use_gpu": sizes.gpu,
        "resources_per_worker": {"CPU": 2, "GPU": 1} if sizes.gpu else {"CPU": 1},
        "loader_workers": 2, "pretrained": "none", "precision": "tf32", "evals_per_run": 2, "val_max_images": None,
        **profile})
    raw["data"]["prepared_dir"] = str(work / "prepared")
    raw["train"].update({"storage_path": str(work / "runs"), "max_failures": 0, "ray_address": None})
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}"}
    raw["downloads"] = {"cache_dir": str(work / "cache")}
    raw["evaluate"].update({"max_images": None, "fps_images": sizes.fps_images, "fps_warmup": 1 if not sizes.gpu else 5,
                            "overlays": 1, "device": "cuda" if sizes.gpu else "cpu", "precision": "tf32"})
    return parse(raw, REPO)


def training_run(work: Path):
    """(MlflowClient, the one run of the cityscapes experiment) of the acceptance's MLflow store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cityscapes")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return client, runs


@contextlib.contextmanager
def over_gloo():
    """The train stage's TorchTrainer on the gloo backend (NCCL refuses two ranks on one GPU; gloo
    all-reduces CUDA tensors too), wherever the stage's module finds the class."""
    original = ray_torch.TorchTrainer
    modules = [m for m in (ray_torch, trainer_module) if getattr(m, "TorchTrainer", None) is original]
    for module in modules:
        module.TorchTrainer = functools.partial(original, torch_config=TorchConfig(backend="gloo"))
    try:
        yield
    finally:
        for module in modules:
            module.TorchTrainer = original


def check_ray(sizes: Sizes, report: Report, work: Path) -> None:
    make_data(sizes, work)
    start_local_ray(**({} if sizes.gpu else {"num_cpus": 2}))
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        report.add("ray", "Ray sees the GPU", gpus >= 1 if sizes.gpu else None, f"{gpus:g} GPU")
        half = sizes.iters // 2
        tic = time.perf_counter()
        first = StopOnceThenDigest(str(work / "first"), stop_at=half + 1)
        try:   # 1 worker (NCCL on the GPU), 2 loader worker processes; stops after the checkpoint at `half`
            train_experiment(params_for(sizes, work), sizes.experiment, out_root=work / "out", hooks=first)
            stopped = False
        except TrainingFailedError:
            stopped = True
        report.add("ray", f"1 worker, 2 loader workers, tf32: stopped after iteration {half + 1}", stopped,
                   f"{time.perf_counter() - tic:.0f} s (Ray start, data, cuDNN autotuning included)")

        # The same run on 2 workers sharing the GPU over gloo: resumes from the GPU checkpoint.
        shared = {"num_workers": 2, "resources_per_worker": {"CPU": 2, "GPU": 0.5} if sizes.gpu else {"CPU": 1}}
        tic = time.perf_counter()
        digests = work / "resumed"
        with over_gloo():
            out = train_experiment(params_for(sizes, work, **shared), sizes.experiment, out_root=work / "out",
                                   hooks=StopOnceThenDigest(str(digests)))
        same = len({(digests / f"rank{r}.sha256").read_text() for r in (0, 1)}) == 1
        report.add("ray", f"resumed on 2 workers (gloo{', GPU 0.5 each' if sizes.gpu else ''}) from the checkpoint",
                   out["start_iteration"] == half and same,
                   f"start iteration {out['start_iteration']} (expected {half}), ranks' weights "
                   f"{'identical' if same else 'DIFFER'}, final mIoU {out['final']['mIoU']}, "
                   f"{time.perf_counter() - tic:.0f} s")
        client, runs = training_run(work)
        memory = max((m.value for m in client.get_metric_history(runs[0].info.run_id, "memory_gb")), default=0)
        report.add("ray", "one MLflow run, FINISHED", len(runs) == 1 and runs[0].info.status == "FINISHED",
                   f"{len(runs)} run(s), {runs[0].info.status if runs else '-'}; training memory_gb max {memory:.2f}")
    finally:
        shutdown_ray()


# --- 4. the evaluate stage --------------------------------------------------------------------------------

def check_evaluate(sizes: Sizes, report: Report, work: Path) -> None:
    device = device_of(sizes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    summary = evaluate_experiment(params_for(sizes, work), sizes.experiment, out_root=work / "out")
    within = torch.cuda.max_memory_allocated(device) < 16 * GiB if device.type == "cuda" else None
    h, w = sizes.image
    report.add("evaluate", f"whole {h}x{w}, single scale + ms+flip {summary['ms_flip']['ratios']}",
               summary["device"].startswith(device.type) and summary["dtype"] == "tf32" and within is not False,
               f"{summary['images']} images on {summary['device']}, {summary['dtype']}, peak {peak_gib(device)} "
               f"(seed's GPUs: 16 GB), fps {summary['speed']['fps']:.2f}, {time.perf_counter() - tic:.0f} s")


# --- 5. MLflow system metrics -----------------------------------------------------------------------------

def check_mlflow(sizes: Sizes, report: Report, work: Path) -> None:
    client, runs = training_run(work)
    if not runs:
        report.add("mlflow", "GPU keys in the system metrics", False, "no training run (run the ray step first)")
        return
    keys = sorted(k for k in runs[0].data.metrics if k.startswith("system/"))
    gpu = [k for k in keys if k.startswith("system/gpu")]
    used = max((m.value for m in client.get_metric_history(runs[0].info.run_id, "system/gpu_0_memory_usage_megabytes")),
               default=0.0) if gpu else 0.0
    report.add("mlflow", "GPU keys in the system metrics", bool(gpu) and used > 0 if sizes.gpu else None,
               f"{len(gpu)} GPU keys ({', '.join(gpu[:3]) or 'none'}), GPU 0 memory used max {used:.0f} MB; "
               f"{len(keys)} system keys in all")


CHECKS = {"hardware": check_hardware, "step": check_steps, "ray": check_ray, "evaluate": check_evaluate,
          "mlflow": check_mlflow}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU at toy sizes (a smoke test of the script)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated, in this order: {','.join(STEPS)} (evaluate and mlflow use ray's run)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder, removed at the end)")
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)} (expected some of {', '.join(STEPS)})")
    if not args.dry and not torch.cuda.is_available():
        parser.error(f"torch {torch.__version__} sees no GPU: run on a GPU machine, or --dry on the CPU")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = DRY if args.dry else GPU
    work = args.work or Path(tempfile.mkdtemp(prefix="dnlseg-accept-"))
    work.mkdir(parents=True, exist_ok=True)
    report, started = Report(), time.perf_counter()
    try:
        for step in (s for s in STEPS if s in args.steps):
            tic = time.perf_counter()
            try:
                CHECKS[step](sizes, report, work)
            except Exception as e:  # noqa: BLE001 - a step that breaks is a failed row; the others still run
                report.add(step, "ran", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            print(f"[{step}] {time.perf_counter() - tic:.0f} s", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    machine = (torch.cuda.get_device_name(0) if sizes.gpu else "CPU (dry mode, toy sizes)")
    print(f"\nGPU acceptance on {machine}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s, "
          f"{time.strftime('%Y-%m-%d')}\n\n{report.table()}\n", flush=True)
    print(f"{len(report.failed)} check(s) failed" if report.failed else "all checks passed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
