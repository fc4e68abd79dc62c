"""Reference outputs of mmsegmentation 1.2.2's own DNLNet, for tests/test_parity_mmseg.py.

Runs INSIDE the mmseg venv (tests/parity/make_mmseg_venv.sh) and imports nothing from this project.
Builds `configs/_base_/models/dnl_r50-d8.py` (with plain BN, dropout 0 so train mode has no RNG),
fills every parameter and buffer with seeded random values (non-zero conv_out BN gamma/beta, random
running statistics), and writes one .pt file with

  state_dict                      the randomised weights (identical for both align_corners variants)
  cases[name]                     img N×3×H×W (already "normalized"), label N×H×W (255 = ignore)
  results[ac][name]               ac = "align_corners=False" / "align_corners=True":
      encode_decode               eval logits at the input size (EncoderDecoder.encode_decode)
      whole, slide                eval logits through EncoderDecoder.predict (test_cfg whole / slide)
      losses                      train-mode loss dict: decode.loss_ce, aux.loss_ce (already × 0.4),
                                  loss = parse_losses total (what mmseg back-propagates)
      grads                       gradient of every parameter after backward of the total loss
      buffers_after_train         BN running statistics after that one train forward
  meta                            versions, seed, slide crop/stride, aux loss weight

Usage: python mmseg_reference.py --out ref.pt [--depth 50|18|101] [--num-classes 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import types


def stub_mmcv_ext() -> None:
    """mmcv-lite ships no compiled ops; mmseg imports mmcv.ops at package import time. DNLNet uses none
    of them, so a stub whose every function raises if it is ever called is enough."""
    stub = types.ModuleType("mmcv._ext")

    def missing_op(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise RuntimeError(f"mmcv._ext.{name} is a stub (mmcv-lite has no compiled ops)")

        return op

    stub.__getattr__ = missing_op
    sys.modules["mmcv._ext"] = stub


stub_mmcv_ext()

import mmcv  # noqa: E402
import mmengine  # noqa: E402
import mmseg  # noqa: E402
import torch  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

AUX_LOSS_WEIGHT = 0.4
IGNORE_INDEX = 255


def dnlnet_config(depth: int, num_classes: int, align_corners: bool, slide: tuple | None) -> ConfigDict:
    """configs/_base_/models/dnl_r50-d8.py, with BN instead of SyncBN (single CPU process), no
    pretrained download, dropout 0 (so the train-mode comparison has no RNG). Depth 18: the heads' widths
    of mmseg's `*_r18-d8` configs (decode 512 -> 128, aux 256 -> 64)."""
    decode_in, decode_channels, aux_in, aux_channels = (512, 128, 256, 64) if depth == 18 else (2048, 512, 1024, 256)
    norm_cfg = dict(type="BN", requires_grad=True)
    test_cfg = dict(mode="whole")
    if slide is not None:
        test_cfg = dict(mode="slide", crop_size=slide[0], stride=slide[1])
    return ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0, seg_pad_val=255),
        pretrained=None,
        backbone=dict(type="ResNetV1c", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3),
                      dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), norm_cfg=norm_cfg, norm_eval=False,
                      style="pytorch", contract_dilation=True),
        decode_head=dict(type="DNLHead", in_channels=decode_in, in_index=3, channels=decode_channels, dropout_ratio=0.0,
                         reduction=2, use_scale=True, mode="embedded_gaussian", num_classes=num_classes,
                         norm_cfg=norm_cfg, align_corners=align_corners,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=aux_in, in_index=2, channels=aux_channels, num_convs=1,
                            concat_input=False, dropout_ratio=0.0, num_classes=num_classes,
                            norm_cfg=norm_cfg, align_corners=align_corners,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False,
                                             loss_weight=AUX_LOSS_WEIGHT)),
        train_cfg=dict(),
        test_cfg=test_cfg,
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter and buffer; the result depends only on the seed.

    Scales keep activations O(1) through 50/101 layers and the attention softmax neither uniform nor
    one-hot. BN running statistics: the batch statistics of a calibration batch (its own random image,
    not a test case), then randomly perturbed; so eval mode sees the same regime as train mode while
    every running_mean / running_var still differs from what the test batches would give.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("num_batches_tracked", "running_mean", "running_var"):
                continue  # set below
            if t.dim() == 4:  # conv weight: fan-in scaled
                fan_in = t.shape[1] * t.shape[2] * t.shape[3]
                t.copy_(normal(t.shape, math.sqrt(1.0 / fan_in)))
            elif leaf == "weight":  # BN gamma (conv_out's too: non-zero, so the block is no identity)
                t.copy_(uniform(t.shape, 0.5, 1.5))
            elif leaf == "bias":  # BN beta and conv biases
                t.copy_(normal(t.shape, 0.2))
            else:
                raise RuntimeError(f"randomize_: unexpected state_dict entry {name}")
        modules = dict(model.named_modules())
        # Residual stages: a smaller gamma on the last BN of each block keeps the stream from growing
        # as 2^blocks.
        for name, module in modules.items():
            if name.startswith("backbone.layer") and name.endswith(".bn3"):
                module.weight.mul_(0.3)
        # Attention logits std ~3-5 (softmax peaked but not one-hot at L = 128..221).
        for name in ("decode_head.dnl_block.theta.conv", "decode_head.dnl_block.phi.conv"):
            modules[name].weight.mul_(0.6)

        norms = [m for m in modules.values() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.momentum = 1.0  # running stats := this batch's statistics
        model.train()
        calib = torch.randn((2, 3, 64, 128), generator=gen)
        feats = model.extract_feat(calib)
        model.decode_head(feats)
        model.auxiliary_head(feats)
        for m in norms:
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean.add_(normal(std.shape, 0.2) * std)
            m.running_var.mul_(uniform(std.shape, 0.6, 1.6))
            m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=gen)))


def make_cases(num_classes: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    cases = {}
    for name, shape in (("batch2_64x128", (2, 3, 64, 128)), ("odd_97x131", (1, 3, 97, 131))):
        n, _, h, w = shape
        img = torch.randn(shape, generator=gen)
        label = torch.randint(0, num_classes, (n, h, w), generator=gen)
        ignore = torch.rand((n, h, w), generator=gen) < 0.2
        label[ignore] = IGNORE_INDEX
        cases[name] = {"img": img, "label": label}
    return cases


def data_samples(img: torch.Tensor, label: torch.Tensor | None = None) -> list:
    h, w = img.shape[2:]
    samples = []
    for i in range(img.shape[0]):
        s = SegDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w), ori_shape=(h, w),
                                        padding_size=[0, 0, 0, 0], flip=False))
        if label is not None:
            s.gt_sem_seg = PixelData(data=label[i][None])
        samples.append(s)
    return samples


def reference_outputs(model, model_slide, case: dict, state_dict: dict) -> dict:
    img, label = case["img"], case["label"]
    h, w = img.shape[2:]
    out = {}

    model.load_state_dict(state_dict, strict=True)
    model_slide.load_state_dict(state_dict, strict=True)
    model.eval()
    model_slide.eval()
    with torch.no_grad():
        metas = [dict(img_shape=(h, w), pad_shape=(h, w), ori_shape=(h, w))] * img.shape[0]
        out["encode_decode"] = model.encode_decode(img, metas)
        out["whole"] = torch.stack([s.seg_logits.data for s in model.predict(img, data_samples(img))])
        out["slide"] = torch.stack([s.seg_logits.data for s in model_slide.predict(img, data_samples(img))])

    model.train()
    model.zero_grad(set_to_none=True)
    losses = model.loss(img, data_samples(img, label))
    total, _ = model.parse_losses(losses)
    total.backward()
    out["losses"] = {"decode.loss_ce": losses["decode.loss_ce"].detach(),
                     "aux.loss_ce": losses["aux.loss_ce"].detach(), "loss": total.detach()}
    out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    out["buffers_after_train"] = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state_dict, strict=True)  # undo the running-stat update
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .pt file")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 50, 101))
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--align-corners", choices=("both", "false", "true"), default="both")
    args = parser.parse_args()

    t0 = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    register_all_modules()
    # Windows overlap and the last row/column is clamped to the border on both test images.
    slide = ((48, 64), (32, 40))
    variants = {"both": (False, True), "false": (False,), "true": (True,)}[args.align_corners]

    state_dict = None
    cases = make_cases(args.num_classes, args.seed)
    results = {}
    for align_corners in variants:
        model = MODELS.build(dnlnet_config(args.depth, args.num_classes, align_corners, None))
        model_slide = MODELS.build(dnlnet_config(args.depth, args.num_classes, align_corners, slide))
        if state_dict is None:
            randomize_(model, args.seed)
            state_dict = copy.deepcopy(model.state_dict())
        results[f"align_corners={align_corners}"] = {
            name: reference_outputs(model, model_slide, case, state_dict) for name, case in cases.items()}

    payload = {
        "state_dict": state_dict,
        "cases": cases,
        "results": results,
        "meta": {"mmseg": str(mmseg.__version__), "mmcv": str(mmcv.__version__),
                 "mmengine": str(mmengine.__version__), "torch": str(torch.__version__),
                 "depth": args.depth, "num_classes": args.num_classes,
                 "seed": args.seed, "slide_crop_size": slide[0], "slide_stride": slide[1],
                 "aux_loss_weight": AUX_LOSS_WEIGHT, "seconds": time.perf_counter() - t0},
    }
    tmp = f"{args.out}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
