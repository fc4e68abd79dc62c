"""The CUDA path of training and validation as train_loop_per_worker sets it up, without Ray: an NCCL
process group, SyncBatchNorm, DDP, channels-last, fp16 with GradScaler and bf16, IoU counts all-reduced
over NCCL. Skipped without CUDA (CI has none). On a GPU machine that lacks the project's other packages:
`python -m pytest --noconftest tests/test_gpu.py`."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_training import HAND_LABEL, HAND_PRED, PredictsChannelZero, assert_hand_computed_metrics, image_of
from torch import nn

from components.learning.models import build_dnlnet
from components.learning.models.speedups import use_precision
from components.learning.step import sgd, train_step
from components.learning.validation import evaluate
from components.ray_cluster import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda:0")


@pytest.fixture(scope="module")
def nccl():
    """A one-rank NCCL group on loopback, as Ray Train's TorchConfig makes on a GPU worker."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    yield
    dist.destroy_process_group()


def street_batch(n: int, h: int, w: int, num_classes: int, seed: int):
    """Images whose label is a function of the pixels (horizontal bands of classes, each band its own
    colour plus noise): a network can fit them, so the loss must fall."""
    g = torch.Generator().manual_seed(seed)
    label = (torch.arange(h)[:, None] * num_classes // h).expand(h, w).repeat(n, 1, 1)
    colours = torch.rand(num_classes, 3, generator=g)
    img = colours[label].permute(0, 3, 1, 2) + 0.1 * torch.randn(n, 3, h, w, generator=g)
    return (img - 0.5) / 0.25, label.clone()


def test_cuda_fp32_forward_matches_the_cpu():
    """The same weights and input give the same logits on the GPU (TF32 off) as on the CPU, with the
    fused attention (scaled_dot_product_attention picks CUDA kernels) and the naive one."""
    use_precision("fp32")   # IEEE fp32 convolutions and matmuls (TF32 off)
    img, _ = street_batch(1, 128, 256, 19, seed=0)
    for attention in ("fused", "naive"):
        torch.manual_seed(0)
        model = build_dnlnet(num_classes=19, attention=attention).eval()
        with torch.no_grad():
            cpu = model.encode_decode(img)
            gpu = model.to(CUDA).encode_decode(img.to(CUDA)).cpu()
        scale = cpu.abs().max()
        assert (gpu - cpu).abs().max() / scale < 1e-4, attention


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_syncbn_ddp_training_fits_a_batch(nccl, precision):
    """train_loop_per_worker's GPU set-up: SyncBN, channels-last, DDP over NCCL, GradScaler for fp16;
    two accumulation steps of one image. 15 steps on one batch take the loss well down."""
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_dnlnet(num_classes=5))
    model = model.to(CUDA, memory_format=torch.channels_last)
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[0])
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    img, label = street_batch(2, 128, 256, 5, seed=1)
    micro_batches = [(img[:1], label[:1]), (img[1:], label[1:])]
    model.train()
    losses = []
    for it in range(1, 16):
        losses.append(train_step(ddp_model, optimizer, scaler, iter(micro_batches), 2, CUDA, precision,
                                 True, it)["loss"])
    print(precision, [round(x, 3) for x in losses])
    assert losses[-1] < 0.5 * losses[0]
    bn = next(m for m in model.modules() if isinstance(m, nn.SyncBatchNorm))
    assert bn.num_batches_tracked.item() == 2 * 15   # one update per micro-batch forward
    if precision == "fp16":
        assert 0 < scaler.get_scale() < float("inf")


def test_distributed_validation_counts_over_nccl(nccl):
    """test_training's hand-computed case, with the counts on the GPU and all-reduced by NCCL."""
    result = evaluate(PredictsChannelZero(3), [(image_of(HAND_PRED), HAND_LABEL[None])], 3, CUDA)
    assert_hand_computed_metrics(result)
