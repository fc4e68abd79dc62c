"""An estimate, without a GPU, of the peak GPU memory of one val image in the evaluate stage: Cityscapes'
whole-image test at 1024x2048, single scale then ms+flip (ratios 0.5-1.75, flip: 12 passes, the
single-scale pass reused), fp32 (the reference profile's evaluate.precision), BN folded, channels-last,
as each evaluation task runs it on its GPU (components/learning/segment.py evaluate_split).

    .venv/bin/python bench/eval_memory_estimate.py [--depth 50 101] [--size 1024 2048]

How: the real model and inference code (components/learning/models, components/learning/models/inference.py) run on
PyTorch's meta device: every tensor has its shape, dtype and memory format, and nothing is computed or
allocated. A TorchDispatchMode sees each tensor an op returns; a storage counts from the op that makes
it until the last tensor viewing it is garbage (weakref finalizers), so the running sum is what the
caching allocator would hold in live tensors, and its maximum, plus the weights, is the estimate of
torch.cuda.max_memory_allocated() for the image. The attention is the CUDA memory-efficient kernel's
(aten._scaled_dot_product_efficient_attention: its output and log-sum-exp, what torch 2.13 picks for
fp32 q/k/v of head dimension 256 on sm50+); the meta device would otherwise take the math kernel and
its L x L map.
Not counted (why the result is an estimate): cuDNN's convolution workspaces (bounded by its
workspace limit, typically well under 1 GiB), the allocator's rounding and fragmentation, the CUDA
context (~0.5 GiB, outside max_memory_allocated), and the label and prediction at full size (int64,
16 MiB at 1024x2048).
"""

from __future__ import annotations

import argparse
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from components.learning.models import build_dnlnet
from components.learning.models.inference import predict_logits
from components.learning.models.speedups import prepare_for_inference
from components.learning.segment import InferenceSetting, scores_at

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages alive now, and the most at any point (sampled after every op)."""

    def __init__(self):
        super().__init__()
        self.users: dict[int, int] = {}       # storage -> its live tensors
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0
        self.peak_op = ""

    def _gone(self, key: int) -> None:
        self.users[key] -= 1
        if not self.users[key]:
            self.live -= self.sizes.pop(key)
            del self.users[key]

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self.users:
            self.users[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
            self.live += self.sizes[key]
        self.users[key] += 1
        weakref.finalize(t, self._gone, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        if self.live > self.peak:
            self.peak, self.peak_op = self.live, str(func)
        return out


def efficient_attention(q, k, v, scale=None, **_):
    """The CUDA memory-efficient kernel's outputs (its meta implementation): memory linear in L."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, scale=scale)[0]


def one_image(model, size: tuple[int, int]) -> None:
    """evaluate_split's work for one image on the device: single scale (kept), ms+flip reusing it, each
    resized to the label size and argmax-ed."""
    img = torch.empty(1, 3, *size, device="meta").contiguous(memory_format=torch.channels_last)
    single = InferenceSetting("whole")
    plain = predict_logits(model, img)
    pred_single = scores_at(plain, size, model).argmax(dim=1)
    scores = predict_logits(model, img, ratios=MS_RATIOS, flip=True, plain=plain)
    pred_ms = scores_at(scores, size, model).argmax(dim=1)
    del pred_single, pred_ms, scores, plain, single


def estimate(depth: int, size: tuple[int, int]) -> dict:
    with torch.device("meta"):
        model = build_dnlnet(depth=depth, num_classes=19, align_corners=False, attention="fused")
    model = prepare_for_inference(model, channels_last=True, fold_bn=True)
    weights = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, efficient_attention
    try:
        with torch.no_grad(), LiveBytes() as live:
            one_image(model, size)
    finally:
        F.scaled_dot_product_attention = sdpa
    return {"depth": depth, "weights_gib": weights / GIB, "activations_gib": live.peak / GIB,
            "peak_gib": (weights + live.peak) / GIB, "peak_op": live.peak_op}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[50, 101])
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    args = parser.parse_args()
    print("| backbone | weights GiB | live tensors at the peak GiB | estimate GiB | the peak's op |")
    print("|---|---:|---:|---:|---|")
    for depth in args.depth:
        r = estimate(depth, tuple(args.size))
        print(f"| R-{depth}-D8 | {r['weights_gib']:.2f} | {r['activations_gib']:.2f} | {r['peak_gib']:.2f} "
              f"| {r['peak_op']} |")


if __name__ == "__main__":
    main()
