"""The GPU node check (components/hardware.py) on faked GPU facts: torch.cuda's functions, NVML and /dev/shm
monkeypatched to what a V100 node with the CUDA 13 wheel, an old driver, a container's 64 MB /dev/shm, a
node without GPUs and a good H100 node report; the /dev/shm estimate against a hand computation."""

from __future__ import annotations

import pytest
import torch

from components import hardware
from components.hardware import CU126_INSTALL, GpuFacts, NodeFacts, has_kernels, loader_shm_bytes, node_problems

# torch 2.13's CUDA 13.0 build (PyPI's default) and its CUDA 12.6 build, as get_arch_list() gives them.
CU130_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
CU126_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
GiB = 2**30


@pytest.fixture
def gpu_node(monkeypatch):
    """A node as torch and NVML see it; each test sets what differs. Returns the setter."""
    state = {"available": True, "names": ["NVIDIA H100 80GB HBM3"], "capability": (9, 0), "archs": CU130_ARCHS,
             "cuda": "13.0", "version": "2.13.0+cu130", "kernel_error": None, "init_error": None,
             "nvml": ("580.65.06", (13, 0), ("NVIDIA H100 80GB HBM3",)), "shm_free": 64 * GiB}
    ran = []

    def kernel(index):
        ran.append(index)
        if state["kernel_error"]:
            raise RuntimeError(state["kernel_error"])

    def init():
        raise RuntimeError(state["init_error"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["available"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(state["names"]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: state["names"][i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(state["archs"]))
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(hardware, "smoke_kernel", kernel)
    monkeypatch.setattr(hardware, "nvml_facts", lambda: state["nvml"])
    monkeypatch.setattr(hardware, "shm_free", lambda: state["shm_free"])

    def facts(**changes):
        state.update(changes)
        monkeypatch.setattr(torch.version, "cuda", state["cuda"])
        monkeypatch.setattr(torch, "__version__", state["version"])
        return hardware.gather_facts("gpu-7 (10.0.1.7)")

    facts.ran = ran
    return facts


def test_a_good_node_has_no_problems_and_every_gpu_ran_the_kernel(gpu_node):
    f = gpu_node(names=["NVIDIA H100 80GB HBM3"] * 4)
    assert [g.index for g in f.gpus] == [0, 1, 2, 3] and gpu_node.ran == [0, 1, 2, 3]
    assert (f.driver, f.driver_cuda, f.wheel_cuda) == ("580.65.06", (13, 0), "13.0")
    assert node_problems(f, shm_need=2 * GiB, shm_detail="x") == []


def test_a_v100_with_the_cuda13_wheel_is_missing_its_kernel_image(gpu_node):
    f = gpu_node(names=["Tesla V100-SXM2-16GB"] * 4, capability=(7, 0),
                 nvml=("580.65.06", (13, 0), ("Tesla V100-SXM2-16GB",) * 4))
    assert gpu_node.ran == []   # no kernels for it: not run (it would fail with "no kernel image")
    (line,) = node_problems(f)
    assert line == (f"preflight: gpu: node gpu-7 (10.0.1.7), GPUs 0-3 Tesla V100-SXM2-16GB (sm_70): torch "
                    f"2.13.0+cu130 has no kernels for sm_70 (it has {' '.join(CU130_ARCHS)}): install torch's "
                    f"CUDA 12.6 build there: {CU126_INSTALL}")
    assert CU126_INSTALL == "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
    # With the CUDA 12.6 build the same node is good.
    assert node_problems(gpu_node(archs=CU126_ARCHS, cuda="12.6", version="2.13.0+cu126")) == []


def test_a_kernel_that_fails_at_run_time_is_named():
    f = NodeFacts("n1", "2.13.0+cu130", "13.0", CU130_ARCHS,
                  (GpuFacts(0, "NVIDIA A10G", (8, 6)),
                   GpuFacts(1, "NVIDIA A10G", (8, 6), "RuntimeError: CUDA error: an illegal memory access")),
                  driver="580.65.06", driver_cuda=(13, 0))
    (line,) = node_problems(f)
    assert line.startswith("preflight: gpu: node n1, GPU 1 NVIDIA A10G (sm_86): a small CUDA matmul failed "
                           "(RuntimeError: CUDA error: an illegal memory access)")


def test_an_old_driver_names_the_driver_it_needs(gpu_node):
    # A CUDA 12.4 driver (550): torch's CUDA 13 build does not start; NVML still sees the GPUs.
    f = gpu_node(available=False, init_error="The NVIDIA driver on your system is too old (found version 12040).",
                 nvml=("550.54.15", (12, 4), ("NVIDIA A10G",) * 4))
    assert f.gpus == () and "too old" in f.cuda_error
    (line,) = node_problems(f)
    assert line == ("preflight: gpu: node gpu-7 (10.0.1.7), NVIDIA A10G: the NVIDIA driver 550.54.15 runs CUDA up "
                    "to 12.4, torch 2.13.0+cu130 is a CUDA 13.0 build: install driver >= 580.65.06 there; or keep "
                    f"the driver and install torch's CUDA 12.6 build: {CU126_INSTALL}")
    # The CUDA 12.6 build runs on that driver (minor version compatibility within CUDA 12).
    assert node_problems(gpu_node(available=True, archs=CU126_ARCHS, cuda="12.6", version="2.13.0+cu126")) == []


def test_a_container_with_dockers_64mb_shm_is_too_small_for_the_loader_workers(gpu_node):
    need, detail = loader_shm_bytes(ranks=4, loader_workers=4, per_rank_batch=2, crop_hw=(512, 1024),
                                    val_hw=(1024, 2048))
    (line,) = node_problems(gpu_node(shm_free=64 * 2**20), need, detail)
    assert line.startswith("preflight: gpu: node gpu-7 (10.0.1.7): /dev/shm has 67 MB free, the DataLoader "
                           "workers pass up to 2.01 GB of batches through it (4 ranks x 4 loader workers x 2 "
                           "batches in flight x (2 x 512x1024 training crops 21 MB + a 1024x2048 val image 42 MB))")
    assert "--shm-size" in line and "loader_workers" in line
    assert "no /dev/shm" in node_problems(gpu_node(shm_free=None), need, detail)[0]
    assert node_problems(gpu_node(shm_free=3 * 10**9), need, detail) == []
    assert node_problems(gpu_node(shm_free=0), 0, "") == []   # loader_workers 0: nothing goes through it


def test_the_shm_estimate_by_hand():
    """Cityscapes reference: 4 ranks on a node, 4 loader workers each, DataLoader's prefetch of 2 per worker,
    a training batch of 2 crops 512x1024 and a val batch of one 1024x2048 image; each pixel a float32 RGB
    (12 bytes) and an int64 label (8 bytes)."""
    train_batch = 2 * 512 * 1024 * (3 * 4 + 8)        # 20,971,520
    val_batch = 1024 * 2048 * (3 * 4 + 8)             # 41,943,040
    need, _ = loader_shm_bytes(4, 4, 2, (512, 1024), (1024, 2048))
    assert need == 4 * 4 * 2 * (train_batch + val_batch) == 2_013_265_920
    assert loader_shm_bytes(4, 0, 2, (512, 1024), (1024, 2048))[0] == 0


def test_no_gpu_seen(gpu_node):
    (line,) = node_problems(gpu_node(available=False, init_error="No CUDA GPUs are available", nvml=(None, None, ())))
    assert line == ("preflight: gpu: node gpu-7 (10.0.1.7): torch 2.13.0+cu130 sees no GPU (RuntimeError: No CUDA "
                    "GPUs are available; nor does NVML: no NVIDIA driver loaded): check `nvidia-smi` and "
                    "CUDA_VISIBLE_DEVICES on that node")
    (line,) = node_problems(gpu_node(available=False, cuda=None, version="2.13.0+cpu", nvml=(None, None, ())))
    assert "torch 2.13.0+cpu is a CPU build: install the CUDA build there" in line


@pytest.mark.parametrize(("archs", "capability", "runs"), [
    (CU130_ARCHS, (7, 0), False),            # V100
    (CU126_ARCHS, (7, 0), True),
    (CU130_ARCHS, (8, 9), True),             # L4 / RTX 4090: sm_86 cubins run on 8.9 (same major)
    (("sm_80",), (8, 6), True),
    (("sm_86",), (8, 0), False),             # a newer minor's cubin does not run on an older one
    (("sm_90a",), (9, 0), True),
    (("sm_90a", "sm_80"), (9, 1), False),    # arch-specific: 9.0 only
    (("sm_90", "compute_90"), (10, 0), True),   # PTX compiles for newer GPUs
    (("sm_90",), (10, 0), False),
    ((), (9, 0), False),
])
def test_has_kernels_follows_cudas_compatibility_rules(archs, capability, runs):
    assert has_kernels(archs, capability) is runs


def test_the_real_facts_of_this_cpu_machine():
    """No mocks: the CPU wheel on a machine without NVIDIA driver gives the CPU-build line."""
    f = hardware.gather_facts()
    assert f.wheel_cuda is None and f.gpus == () and f.driver is None
    (line,) = node_problems(f)
    assert f"torch {torch.__version__} is a CPU build" in line


@pytest.mark.integration
def test_preflight_runs_the_check_on_each_gpu_node_as_a_pinned_task(make_params, tmp_path, _shutdown_ray_at_end):
    """A two-node ray.cluster_utils.Cluster whose second node declares 2 (fake) GPUs: the train stage's
    preflight checks that node only (the head has none), there, with its /dev/shm need for the 2 ranks it
    holds; this machine's CPU torch is the failure it reports, in one line. A CPU profile checks nothing."""
    import ray
    from conftest import EXPERIMENT, as_params
    from ray.cluster_utils import Cluster

    from components.preflight import PreflightError, node_shm_need, preflight_hardware
    from components.ray_cluster import shutdown_ray

    params = as_params(make_params(tmp_path, use_gpu=True, num_workers=2, loader_workers=2,
                                   resources_per_worker={"CPU": 0.5, "GPU": 1}))
    cfg = params.experiment(EXPERIMENT)
    need, detail = node_shm_need(cfg, {"CPU": 1.0, "GPU": 2.0})
    assert detail.startswith("2 ranks x 2 loader workers x 2 batches in flight x (1 x ")   # batch 2 over 2 ranks
    shutdown_ray()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        gpu_node = next(n for n in ray.nodes() if n["Resources"].get("GPU"))
        with pytest.raises(PreflightError) as failed:
            preflight_hardware(cfg)
        (line,) = str(failed.value).splitlines()
        assert line.startswith(f"preflight: gpu: node {gpu_node['NodeManagerHostname']} "
                               f"({gpu_node['NodeManagerAddress']}): torch {torch.__version__} is a CPU build")
        preflight_hardware(cfg.updated(execution={"use_gpu": False}))   # nothing to check
    finally:
        ray.shutdown()
        cluster.shutdown()
