"""The GPU nodes checked before a run starts: what a cluster's first reference run would otherwise stumble
on after Ray has placed its workers (and the nodes are billed).

On each GPU node: torch sees the GPUs; the wheel has kernels for their compute capability; the driver
runs the wheel's CUDA; a small CUDA kernel runs; /dev/shm holds the batches the DataLoader workers pass
through it. Each failure is one line naming the node, the GPU, what is missing and the fix:

    preflight: gpu: node ip-10-0-1-7 (10.0.1.7), GPUs 0-3 Tesla V100-SXM2-16GB (sm_70): torch 2.13.0+cu130 has
    no kernels for sm_70 (it has sm_75 sm_80 ...): install the CUDA 12.6 build there: pip install ...

`gather_facts()` reads a node's facts (torch, NVML, /dev/shm) and `node_problems()` judges them (tests fake
the facts); `check_gpu_nodes()` runs the check as a Ray task pinned to every alive GPU node
(components/preflight.py `preflight_hardware` calls it for profiles that use GPUs).
"""

from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pynvml
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# torch 2.13's CUDA 12.6 build: the newest with sm_70 (V100) kernels; PyPI's default build is CUDA 13.
CU126_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# The oldest Linux driver that runs any build of a CUDA major version (NVIDIA's minor version
# compatibility, CUDA Compatibility guide): a 12.x build on >= 525.60.13, a 13.x build on >= 580.65.06.
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

SHM = Path("/dev/shm")   # noqa: S108 - only its free space is read: where DataLoader workers put batches
# What a loader worker passes through /dev/shm per pixel: SegmentationDataset's float32 RGB image and
# int64 label (components/learning/data/dataset.py).
BYTES_PER_PIXEL = 3 * 4 + 8
# Batches each loader worker keeps in flight: DataLoader's default prefetch_factor (build_loader keeps it).
PREFETCH_FACTOR = 2
# Ray sets CUDA_VISIBLE_DEVICES="" in a task that asks for no GPU; the check asks for none (it must not
# wait behind the GPUs other runs hold) and looks at every GPU of the node instead.
SEE_ALL_GPUS = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
MB, GB = 1e6, 1e9


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    capability: tuple[int, int]
    kernel_error: str | None = None     # the smoke kernel's first error line; None: it ran (or was not run)


@dataclass(frozen=True)
class NodeFacts:
    node: str                           # host name and address
    torch_version: str
    wheel_cuda: str | None              # torch.version.cuda; None: a CPU build
    arch_list: tuple[str, ...]          # torch.cuda.get_arch_list(): sm_XY kernels, compute_XY PTX
    gpus: tuple[GpuFacts, ...]          # what torch sees
    driver: str | None = None           # the NVIDIA driver's version (NVML); None: NVML unavailable
    driver_cuda: tuple[int, int] | None = None   # the newest CUDA that driver runs
    nvml_gpus: tuple[str, ...] = ()     # the GPUs the driver sees
    shm_free: int | None = None         # bytes free in /dev/shm; None: there is none
    cuda_error: str | None = None       # why torch's CUDA failed to start, if it did


# --- the facts ----------------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def smoke_kernel(index: int) -> None:
    """A 256x256 matmul on GPU `index`, synchronized and checked against the CPU's (a kernel that cannot
    run raises here: "no kernel image is available for execution on the device")."""
    device = torch.device("cuda", index)
    a = torch.arange(256 * 256, dtype=torch.float32).reshape(256, 256) % 7 - 3   # small integers: exact
    result = (a.to(device) @ a.to(device)).cpu()
    torch.cuda.synchronize(device)
    if not torch.equal(result, a @ a):
        raise RuntimeError("a matmul of small integers gave wrong numbers")


def nvml_facts() -> tuple[str | None, tuple[int, int] | None, tuple[str, ...]]:
    """(driver version, newest CUDA it runs, GPU names) from NVML; Nones where NVML is not there."""
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: say so through the Nones
        return None, None, ()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())    # e.g. 12040 = CUDA 12.4
        names = tuple(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                      for i in range(pynvml.nvmlDeviceGetCount()))
        return _text(driver), (cuda // 1000, cuda % 1000 // 10), tuple(map(_text, names))
    except pynvml.NVMLError:   # a driver half there: what torch says is the fact then
        return None, None, ()
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)   # older bindings give bytes


def shm_free() -> int | None:
    return shutil.disk_usage(SHM).free if SHM.is_dir() else None


def gather_facts(node: str | None = None) -> NodeFacts:
    """This node's facts; each visible GPU runs the smoke kernel when the wheel has kernels for it."""
    arch = tuple(torch.cuda.get_arch_list())
    gpus, cuda_error = [], None
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            capability = tuple(torch.cuda.get_device_capability(index))
            error = None
            if has_kernels(arch, capability):
                try:
                    smoke_kernel(index)
                except Exception as e:  # noqa: BLE001 - the failure is the fact
                    error = _first_line(e)
            gpus.append(GpuFacts(index, torch.cuda.get_device_name(index), capability, error))
    elif torch.version.cuda:
        try:
            torch.cuda.init()   # raises with torch's reason (e.g. "The NVIDIA driver on your system is too old")
        except Exception as e:  # noqa: BLE001
            cuda_error = _first_line(e)
    driver, driver_cuda, nvml_gpus = nvml_facts()
    return NodeFacts(node=node or socket.gethostname(), torch_version=torch.__version__,
                     wheel_cuda=torch.version.cuda, arch_list=arch, gpus=tuple(gpus), driver=driver,
                     driver_cuda=driver_cuda, nvml_gpus=nvml_gpus, shm_free=shm_free(), cuda_error=cuda_error)


# --- the judgement ------------------------------------------------------------------------------------

def has_kernels(arch_list, capability: tuple[int, int]) -> bool:
    """Whether a GPU of `capability` runs this wheel: a cubin sm_XY runs on X.Z for Z >= Y (same major;
    the arch-specific sm_XYa only on X.Y itself), PTX compute_XY is compiled for any X.Y and newer."""
    major, minor = capability
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", arch)
        if not match:
            continue
        kind, number, suffix = match.group(1), int(match.group(2)), match.group(3)
        a_major, a_minor = divmod(number, 10)
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
        if kind == "sm" and a_major == major and (a_minor == minor or (a_minor < minor and suffix != "a")):
            return True
    return False


def sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def _kernel_fix(capability: tuple[int, int]) -> str:
    if capability < (7, 5):   # V100 (sm_70) and older: the CUDA 12.6 build still has their kernels
        return f"install torch's CUDA 12.6 build there: {CU126_INSTALL}"
    return f"install a torch 2.13.0 build with {sm(capability)} kernels there (https://pytorch.org/get-started/locally/)"


def _gpu_names(gpus) -> str:
    indices = [g.index for g in gpus]
    span = (f"{indices[0]}-{indices[-1]}" if indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 1
            else ",".join(map(str, indices)))
    return f"GPU{'s' if len(indices) > 1 else ''} {span} {gpus[0].name} ({sm(gpus[0].capability)})"


def _driver_problem(f: NodeFacts, where: str) -> str | None:
    if not (f.wheel_cuda and f.driver_cuda):
        return None
    wheel = tuple(int(p) for p in f.wheel_cuda.split(".")[:2])
    if f.driver_cuda[0] >= wheel[0]:   # minor version compatibility: any 12.x driver runs a 12.y build
        return None
    gpu = f.nvml_gpus[0] if f.nvml_gpus else "GPU"
    need = MIN_DRIVER.get(wheel[0], f"one for CUDA {wheel[0]}")
    alternative = (f"; or keep the driver and install torch's CUDA 12.6 build: {CU126_INSTALL}"
                   if f.driver_cuda[0] == 12 else "")
    return (f"{where}, {gpu}: the NVIDIA driver {f.driver} runs CUDA up to {f.driver_cuda[0]}.{f.driver_cuda[1]}, "
            f"torch {f.torch_version} is a CUDA {f.wheel_cuda} build: install driver >= {need} there{alternative}")


def node_problems(f: NodeFacts, shm_need: int = 0, shm_detail: str = "") -> list[str]:
    """One line per failure on the node `f` describes (none: good to train); `shm_need` bytes of loader
    batches must fit in /dev/shm (`shm_detail` says how they add up)."""
    where = f"preflight: gpu: node {f.node}"
    problems = []
    driver = _driver_problem(f, where)
    if f.wheel_cuda is None:
        problems.append(f"{where}: torch {f.torch_version} is a CPU build: install the CUDA build there "
                        f"(pip install torch==2.13.0; for a V100: {CU126_INSTALL})")
    elif driver:
        problems.append(driver)
    elif not f.gpus:
        seen = (f"the driver {f.driver} sees {len(f.nvml_gpus)}: {', '.join(sorted(set(f.nvml_gpus)))}"
                if f.nvml_gpus else "nor does NVML: no NVIDIA driver loaded")
        problems.append(f"{where}: torch {f.torch_version} sees no GPU ({f.cuda_error or 'no CUDA device'}; {seen}): "
                        f"check `nvidia-smi` and CUDA_VISIBLE_DEVICES on that node")
    missing = [g for g in f.gpus if not has_kernels(f.arch_list, g.capability)]
    failed = [g for g in f.gpus if g not in missing and g.kernel_error]
    for capability in sorted({g.capability for g in missing}):
        group = [g for g in missing if g.capability == capability]
        problems.append(f"{where}, {_gpu_names(group)}: torch {f.torch_version} has no kernels for "
                        f"{sm(capability)} (it has {' '.join(f.arch_list) or 'none'}): {_kernel_fix(capability)}")
    for g in failed:
        problems.append(f"{where}, {_gpu_names([g])}: a small CUDA matmul failed ({g.kernel_error}): check the "
                        f"GPU there (`nvidia-smi`, Xid errors in `dmesg`) or leave the node out")
    if shm_need and (f.shm_free is None or f.shm_free < shm_need):
        have = f"no {SHM}" if f.shm_free is None else f"{SHM} has {f.shm_free / MB:.0f} MB free"
        problems.append(f"{where}: {have}, the DataLoader workers pass up to {shm_need / GB:.2f} GB of batches "
                        f"through it ({shm_detail}): give it more (docker run --shm-size=16g; Kubernetes: an "
                        f"emptyDir with medium: Memory at /dev/shm) or lower loader_workers")
    return problems


def loader_shm_bytes(ranks: int, loader_workers: int, per_rank_batch: int, crop_hw, val_hw) -> tuple[int, str]:
    """Bytes of batches in /dev/shm at once on a node, and how they add up: each of the node's `ranks` has a
    training and a validation loader, each with `loader_workers` processes keeping PREFETCH_FACTOR batches
    in flight: training batches of `per_rank_batch` crops (h, w), validation batches of one image at
    the test scale `val_hw` (h, w) with its label. No loader workers: nothing goes through /dev/shm."""
    train = per_rank_batch * crop_hw[0] * crop_hw[1] * BYTES_PER_PIXEL
    val = val_hw[0] * val_hw[1] * BYTES_PER_PIXEL
    in_flight = ranks * loader_workers * PREFETCH_FACTOR
    detail = (f"{ranks} ranks x {loader_workers} loader workers x {PREFETCH_FACTOR} batches in flight x "
              f"({per_rank_batch} x {crop_hw[0]}x{crop_hw[1]} training crops {train / MB:.0f} MB + a "
              f"{val_hw[0]}x{val_hw[1]} val image {val / MB:.0f} MB)")
    return in_flight * (train + val), detail


# --- on every GPU node of a Ray cluster -----------------------------------------------------------------

def _node_check(node: str, shm_need: int, shm_detail: str) -> list[str]:
    return node_problems(gather_facts(node), shm_need, shm_detail)


def check_gpu_nodes(shm_need_of, timeout_s: float = 180.0) -> list[str]:
    """`node_problems` on every alive Ray node with GPUs, each by a task pinned there (NodeAffinity);
    `shm_need_of(node resources)` gives that node's (bytes, detail). A node that does not answer within
    `timeout_s` is a failure line too."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    task = ray.remote(_node_check)
    pending = {}
    for n in nodes:
        name = f"{n.get('NodeManagerHostname', '?')} ({n.get('NodeManagerAddress', '?')})"
        need, detail = shm_need_of(n["Resources"])
        ref = task.options(num_cpus=0, max_retries=0, runtime_env={"env_vars": SEE_ALL_GPUS},
                           scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                           ).remote(name, need, detail)
        pending[ref] = name
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
    problems = []
    for ref in ready:
        try:
            problems += ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the node could not run the check: that is its failure line
            problems.append(f"preflight: gpu: node {pending[ref]}: the hardware check failed there "
                            f"({_first_line(e)}): check the node's Python environment (torch, ray)")
    for ref in late:
        ray.cancel(ref, force=True)
        problems.append(f"preflight: gpu: node {pending[ref]}: the hardware check did not answer in "
                        f"{timeout_s:.0f} s: check the node (`ray status`, its raylet log)")
    return problems
