"""DNLNet R-50-D8 speed, side by side: each speed-up on and off, inference and training, CPU or CUDA.

Every row runs in a fresh subprocess (its own peak memory: ru_maxrss on CPU, max_memory_allocated after
the warm-up on CUDA) on the same weights and the same inputs:
  - weights: mmseg's init, with the DNL block switched on (conv_out BN gamma = 1; zero-initialised it is
    the identity) and BN running statistics calibrated on the scene, so activations look like a trained
    network's rather than zeros;
  - input: one 1024×2048 street scene in the Cityscapes format (the sample generator's, or any
    `--scene-dir` with image_<i>.png + label_<i>.png of train ids), resized for smaller rows; the
    other scenes are the training rows' crops;
  - or `--weights PATH`, or `--pretrain-steps N`: first train the weights on the other scenes, so the
    argmax agreement is measured on a network with real margins between its classes.
Sections:
  peak   the machine's measured matmul peak, fp32 and bf16 (the yardstick for GFLOP/s)
  infer  forward at 512×1024, batch 1: the plain fp32 NCHW model with mmseg's naive attention, then
         each speed-up added, then the fastest set with each one removed; argmax agreement with the plain
         model's prediction; on CPU also int8 post-training quantization (explored, not a pipeline option)
  whole  forward on the whole 1024×2048 image: time and peak memory
  train  a training step (the pipeline's own train_step: forward, backward, SGD) at the sample
         profile's size (64×128, batch 2) and at 512×1024, batch 2
  curve  loss curves of the plain and the fastest training settings from the same weights on the same
         batches, next to the plain settings on other batches (the run-to-run noise)
FLOPs are counted once per shape with torch.utils.flop_counter on the meta device (matmul, conv,
attention), so GFLOP/s = counted FLOPs / measured time for every row.

    python bench/bench_perf.py                          # everything on the CPU
    python bench/bench_perf.py --sections infer --reps 3
    python bench/bench_perf.py --device cuda            # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLAIN = {"attention": "naive", "channels_last": False, "fold_bn": False, "precision": "fp32", "compile": False}
# Inference ladder: each row adds one speed-up to the one above.
LADDER = [
    ("plain fp32 NCHW, naive attention (mmseg)", {}),
    ("+ fused attention", {"attention": "fused"}),
    ("+ channels-last", {"attention": "fused", "channels_last": True}),
    ("+ BN folded", {"attention": "fused", "channels_last": True, "fold_bn": True}),
    ("+ bf16 autocast", {"attention": "fused", "channels_last": True, "fold_bn": True, "precision": "bf16"}),
    ("+ torch.compile", {"attention": "fused", "channels_last": True, "fold_bn": True, "precision": "bf16",
                         "compile": True}),
]
SWITCHES = ("channels_last", "fold_bn", "precision", "compile")
TRAIN_ROWS = [
    ("plain fp32 NCHW, naive attention (mmseg)", {}),
    ("+ fused attention", {"attention": "fused"}),
    ("+ channels-last", {"attention": "fused", "channels_last": True}),
    ("+ bf16 autocast", {"attention": "fused", "channels_last": True, "precision": "bf16"}),
    ("+ torch.compile", {"attention": "fused", "channels_last": True, "precision": "bf16", "compile": True}),
]


def settings(**changes) -> dict:
    return {**PLAIN, **changes}


# --- what runs inside each row's process ------------------------------------------------------------

def _device(name: str):
    import torch

    if name == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _base_mib(device) -> float:
    """Memory before the timed work: the peak so far on CPU (model + input), what is allocated on CUDA."""
    import torch

    return _peak_mib(device) if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20


def _reset_peak(device) -> None:
    """CUDA: forget the warm-up's peak (cudnn.benchmark tries algorithms with large workspaces there);
    CPU: ru_maxrss cannot be reset, the peak includes the warm-up."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_scene(scene_dir: Path, index: int, height: int, width: int):
    """Scene `index` resized to height×width: normalized 1×3×H×W image, 1×H×W long label."""
    import cv2
    import numpy as np
    import torch

    from components.learning.data.classes import MEAN, STD

    image = cv2.cvtColor(cv2.imread(str(scene_dir / f"image_{index}.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    label = cv2.imread(str(scene_dir / f"label_{index}.png"), cv2.IMREAD_UNCHANGED)
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    image = (image - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return (torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(),
            torch.from_numpy(label.astype(np.int64))[None])


def build_model(s: dict, weights: Path, device):
    import torch

    from components.learning.models import build_dnlnet

    model = build_dnlnet(depth=50, num_classes=19, attention=s["attention"])
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.to(device)


def quantize_int8(model, scene: Path, size: tuple[int, int]):
    """int8 post-training quantization, FX graph mode for the x86 backend (per-channel int8 weights,
    activations calibrated on the four training scenes); the DNL block's attention stays fp32."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from components.learning.models.segmentor import resize_logits

    class Logits(torch.nn.Module):   # traceable: the resize to the input's size stays outside
        def __init__(self):
            super().__init__()
            self.backbone, self.decode_head = model.backbone, model.decode_head

        def forward(self, img):
            return self.decode_head(self.backbone(img)[3])

    calibration = [load_scene(scene, i, *size)[0] for i in range(1, 5)]
    prepared = prepare_fx(Logits().eval(), get_default_qconfig_mapping("x86"), (calibration[0],),
                          prepare_custom_config={"non_traceable_module_name": ["decode_head.dnl_block"]})
    with torch.no_grad():
        for img in calibration:
            prepared(img)
    quantized = convert_fx(prepared)
    return lambda img: resize_logits(quantized(img), tuple(img.shape[2:]), model.align_corners)


def infer_row(s: dict, size: tuple[int, int], reps: int, warmup: int, weights: Path, scene: Path,
              device_name: str, argmax_out: Path) -> dict:
    import numpy as np
    import torch

    from components.learning.models.speedups import autocast, prepare_for_inference

    device = _device(device_name)
    model = build_model(s, weights, device)
    if s["precision"] == "int8":
        model, s = quantize_int8(model, scene, size), {**s, "precision": "fp32"}
    else:
        model = prepare_for_inference(model, channels_last=s["channels_last"], fold_bn=s["fold_bn"])
    if s["compile"]:
        model.compile()   # compiles forward(img) = encode_decode(img)
    img, _ = load_scene(scene, 0, *size)
    img = img.to(device).contiguous(memory_format=torch.channels_last if s["channels_last"]
                                    else torch.contiguous_format)
    _sync(device)
    base_mib = _base_mib(device)
    times = []
    with torch.no_grad(), autocast(device, s["precision"]):
        for i in range(warmup + reps):
            if i == warmup:
                _reset_peak(device)
            _sync(device)
            tic = time.perf_counter()
            logits = model(img)
            _sync(device)
            times.append(time.perf_counter() - tic)
    first_s, times = times[0], times[warmup:]
    np.save(argmax_out, logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first_s,
            "peak_mib": _peak_mib(device), "base_mib": base_mib}


def crops(scene_dir: Path, size: tuple[int, int], batch: int, seed: int):
    """Endless batches of random `size` crops (with random horizontal flips) of the training scenes (all
    but scene 0, the inference input), each resized to twice the crop: a 512×1024 crop of a 1024×2048
    frame, as the Cityscapes pipeline at its mean resize ratio."""
    import torch

    h, w = size
    count = len(list(scene_dir.glob("label_*.png")))
    scenes = [load_scene(scene_dir, i, 2 * h, 2 * w) for i in range(1, count)]
    gen = torch.Generator().manual_seed(seed)
    while True:
        imgs, labels = [], []
        for _ in range(batch):
            img, label = scenes[int(torch.randint(0, len(scenes), (), generator=gen))]
            y = int(torch.randint(0, h + 1, (), generator=gen))
            x = int(torch.randint(0, w + 1, (), generator=gen))
            i, lab = img[0, :, y:y + h, x:x + w], label[0, y:y + h, x:x + w]
            if torch.rand((), generator=gen) < 0.5:
                i, lab = i.flip(-1), lab.flip(-1)
            imgs.append(i)
            labels.append(lab)
        yield torch.stack(imgs), torch.stack(labels)


def train_row(s: dict, size: tuple[int, int], batch: int, steps: int, warmup: int, weights: Path, scene: Path,
              device_name: str, seed: int, save_to: str | None = None) -> dict:
    """`warmup` + `steps` training steps (SGD lr 0.01, momentum 0.9, wd 5e-4; poly decay when saving the
    result, i.e. when pretraining the bench weights); times the last `steps`."""
    import torch

    from components.learning.schedules import poly_lr
    from components.learning.step import sgd, train_step

    device = _device(device_name)
    torch.manual_seed(seed)   # dropout
    model = build_model(s, weights, device).train()
    if s["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    scaler = torch.amp.GradScaler(device.type, enabled=s["precision"] == "fp16")
    step_model = torch.compile(model) if s["compile"] else model
    batches = crops(scene, size, batch, seed)
    _sync(device)
    base_mib = _base_mib(device)
    times, losses = [], []
    total = warmup + steps
    for i in range(total):
        if i == warmup:
            _reset_peak(device)
        if save_to:
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(i, total, 0.01, 0.9, 1e-4)
        _sync(device)
        tic = time.perf_counter()
        out = train_step(step_model, optimizer, scaler, batches, 1, device, s["precision"],
                         s["channels_last"], i + 1)
        _sync(device)
        times.append(time.perf_counter() - tic)
        losses.append(out["loss"])
    first_s, times = times[0], times[warmup:]
    if save_to:
        torch.save(model.state_dict(), save_to)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first_s,
            "peak_mib": _peak_mib(device), "base_mib": base_mib, "losses": losses}


def peak_row(device_name: str) -> dict:
    """Measured matmul rate, GFLOP/s, fp32 and bf16 (median of 5 after 2 warm-ups)."""
    import torch

    device = _device(device_name)
    n = 8192 if device.type == "cuda" else 2048
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        times = []
        for i in range(7):
            _sync(device)
            tic = time.perf_counter()
            a @ b
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - tic)
        out[name] = 2 * n**3 / statistics.median(times) / 1e9
    return out


# --- FLOPs ------------------------------------------------------------------------------------------

def count_flops(kind: str, size: tuple[int, int], batch: int) -> int:
    """FLOPs of one forward (infer) or forward + backward (train) of the plain model, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from components.learning.models import build_dnlnet

    with torch.device("meta"):
        model = build_dnlnet(depth=50, num_classes=19, attention="naive")
        img = torch.empty(batch, 3, *size)
        label = torch.zeros(batch, *size, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        if kind == "infer":
            with torch.no_grad():
                model.eval().encode_decode(img)
        else:
            model.train()(img, label)["loss"].backward()
    return counter.get_total_flops()


# --- the driver -------------------------------------------------------------------------------------

def run_row(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--row", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_weights(path: Path, scene: Path) -> None:
    """mmseg's init, DNL block on, BN statistics of two 256×512 crops of a training scene."""
    import torch

    from components.learning.models import build_dnlnet

    torch.manual_seed(0)
    model = build_dnlnet(depth=50, num_classes=19, attention="fused")
    torch.nn.init.ones_(model.decode_head.dnl_block.conv_out.bn.weight)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None   # cumulative average: running stats := this batch's statistics
    img, _ = load_scene(scene, 1, 512, 1024)
    with torch.no_grad():
        feats = model.train().extract_feat(torch.cat([img[..., :256, :512], img[..., 256:, 512:]]))
        model.decode_head(feats[3])
        model.auxiliary_head(feats[2])
    for m in norms:
        m.momentum = 0.1
    torch.save(model.state_dict(), path)


def make_scenes(scene_dir: Path, count: int) -> None:
    """`count` 1024×2048 Cityscapes-format frames from the sample generator: image_<i>.png and label_<i>.png
    (train ids). Scene 0 is the inference input, the others are the training crops' source."""
    import cv2

    from components.learning.data.datasets.cityscapes import label_ids_to_train_ids
    from components.sample import write_cityscapes

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        write_cityscapes(root, seed=0, train=count, val=0, height=1024, width=2048)
        scene_dir.mkdir(parents=True, exist_ok=True)
        images = sorted((root / "leftImg8bit").rglob("*_leftImg8bit.png"))
        for i, image in enumerate(images):
            ids_path = root / "gtFine" / image.parent.relative_to(root / "leftImg8bit") / image.name.replace(
                "_leftImg8bit.png", "_gtFine_labelIds.png")
            ids = cv2.imread(str(ids_path), cv2.IMREAD_UNCHANGED)
            (scene_dir / f"image_{i}.png").write_bytes(image.read_bytes())
            cv2.imwrite(str(scene_dir / f"label_{i}.png"), label_ids_to_train_ids(ids))


def of_peak(gflops: float, peak: dict, precision: str) -> str:
    """Achieved rate as a percentage of the measured matmul peak of the row's dtype (none for int8)."""
    p = peak.get({"fp32": "fp32", "bf16": "bf16", "fp16": "bf16"}.get(precision, ""))
    return f"{100 * gflops / p:.0f}" if p else "-"


def add_rates(r: dict, plain: dict, flops: int) -> None:
    """Speed-up over the plain row (the table's first) and achieved GFLOP/s."""
    r["speedup"] = plain["median_s"] / r["median_s"]
    r["gflops"] = flops / r["median_s"] / 1e9


def infer_table(common: dict, peak: dict, tmp: Path, title: str, size, rows, reps: int, warmup: int) -> list[dict]:
    import numpy as np

    flops = count_flops("infer", size, 1)
    print(f"## {title}: {flops / 1e9:.0f} GFLOP per forward\n")
    print("| settings | median s | img/s | speed-up | GFLOP/s | % of peak | peak MiB | over model MiB "
          "| argmax = plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    out, reference = [], None
    for name, s in rows:
        argmax = tmp / f"argmax{len(out)}.npy"
        r = run_row(["infer", json.dumps({**common, "s": s, "size": list(size), "reps": reps, "warmup": warmup,
                                          "argmax_out": str(argmax)})])
        r.update(name=name, settings=s)
        out.append(r)
        if "error" in r:
            print(f"| {name} | failed: {r['error']} ||||||||", flush=True)
            continue
        pred = np.load(argmax)
        reference = pred if reference is None else reference   # the first row is the plain model
        r["argmax_agreement"] = float((pred == reference).mean())
        add_rates(r, out[0], flops)
        print(f"| {name} | {r['median_s']:.3f} | {1 / r['median_s']:.2f} | {r['speedup']:.2f}× | {r['gflops']:.0f} "
              f"| {of_peak(r['gflops'], peak, s['precision'])} | {r['peak_mib']:.0f} "
              f"| {r['peak_mib'] - r['base_mib']:.0f} | {100 * r['argmax_agreement']:.2f}% |", flush=True)
    print()
    return out


def train_table(common: dict, peak: dict, size, rows, steps: int) -> list[dict]:
    flops = count_flops("train", size, 2)
    print(f"## Training step, {size[0]}×{size[1]}, batch 2: {flops / 1e9:.0f} GFLOP (forward + backward)\n")
    print("| settings | median s | speed-up | GFLOP/s | % of peak | peak MiB | over model MiB | first step s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    out = []
    for name, s in rows:
        r = run_row(["train", json.dumps({**common, "s": s, "size": list(size), "batch": 2, "steps": steps,
                                          "warmup": 3 if s["compile"] else 1, "seed": 0})])
        r.update(name=name, settings=s)
        out.append(r)
        if "error" in r:
            print(f"| {name} | failed: {r['error']} |||||||", flush=True)
            continue
        add_rates(r, out[0], flops)
        print(f"| {name} | {r['median_s']:.3f} | {r['speedup']:.2f}× | {r['gflops']:.0f} "
              f"| {of_peak(r['gflops'], peak, s['precision'])} | {r['peak_mib']:.0f} "
              f"| {r['peak_mib'] - r['base_mib']:.0f} | {r['first_s']:.1f} |", flush=True)
    print()
    return out


def hw(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sections", default="peak,infer,whole,train,curve")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards / steps per row")
    parser.add_argument("--curve-steps", type=int, default=60)
    parser.add_argument("--curve-size", default="64x128", help="HxW of the curve section's crops")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--infer-size", default="512x1024", help="HxW of the infer section")
    parser.add_argument("--whole-size", default="1024x2048", help="HxW of the whole section")
    parser.add_argument("--train-sizes", default="64x128,512x1024", help="HxW,... of the train section")
    parser.add_argument("--scene-dir", type=Path, default=REPO / "bench" / "results" / "scenes",
                        help="image_<i>.png + label_<i>.png (train ids); generated when missing")
    parser.add_argument("--scenes", type=int, default=5, help="scenes to generate (scene 0 = inference input)")
    parser.add_argument("--weights", type=Path, help="state_dict to benchmark (default: calibrated init)")
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="first train the weights this many steps (bf16, channels-last) on the scenes")
    parser.add_argument("--pretrain-batch", type=int, default=8)
    parser.add_argument("--pretrain-size", default="512x1024")
    parser.add_argument("--save-weights", type=Path, help="keep the benchmarked weights here")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--row", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        kind, payload = args.row[0], json.loads(args.row[1])
        if kind == "peak":
            print(json.dumps(peak_row(payload["device_name"])))
            return
        for key in ("weights", "scene", "argmax_out"):
            if key in payload:
                payload[key] = Path(payload[key])
        payload["size"] = tuple(payload["size"])
        print(json.dumps((infer_row if kind == "infer" else train_row)(**payload)))
        return

    sections = args.sections.split(",")
    if not (args.scene_dir / "label_1.png").is_file():
        make_scenes(args.scene_dir, args.scenes)
    report: dict = {"device": args.device, "machine": machine_info(args.device), "sections": {}}
    print(f"# {report['machine']}\n", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        weights = args.weights or tmp / "weights.pt"
        if not args.weights:
            make_weights(weights, args.scene_dir)
        common = {"weights": str(weights), "scene": str(args.scene_dir), "device_name": args.device}
        if args.pretrain_steps:
            trained = args.save_weights or tmp / "trained.pt"
            fast = settings(attention="fused", channels_last=True, precision="bf16")
            r = run_row(["train", json.dumps({**common, "s": fast, "size": list(hw(args.pretrain_size)),
                                              "batch": args.pretrain_batch, "steps": args.pretrain_steps - 1,
                                              "warmup": 1, "seed": 0, "save_to": str(trained)})])
            if "error" in r:
                sys.exit(f"pretraining failed: {r['error']}")
            losses = r["losses"]
            print(f"pretrained {args.pretrain_steps} steps, batch {args.pretrain_batch} at {args.pretrain_size}: "
                  f"loss {losses[0]:.3f} -> {statistics.mean(losses[-20:]):.3f} (mean of the last 20)\n", flush=True)
            report["pretrain"] = {"steps": args.pretrain_steps, "first_loss": losses[0], "losses": losses}
            common["weights"] = str(trained)
        elif args.save_weights:
            args.save_weights.write_bytes(weights.read_bytes())
        peak: dict = {}
        if "peak" in sections:
            peak = report["sections"]["peak"] = run_row(["peak", json.dumps({"device_name": args.device})])
            print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s\n", flush=True)
        fastest = LADDER[-1][1]
        # fp16 (with GradScaler in training) is a GPU-only option.
        fp16 = ([("fastest, fp16 instead of bf16", settings(**{**fastest, "precision": "fp16"}))]
                if args.device == "cuda" else [])
        # FX quantization runs on the CPU only (fbgemm/oneDNN int8 kernels).
        int8 = ([("int8 quantized (FX, x86 backend), fused attention", settings(attention="fused", precision="int8"))]
                if args.device == "cpu" else [])

        def keep(rows):
            return [(n, s) for n, s in rows if not (args.no_compile and s["compile"])]

        if "infer" in sections:
            rows = [(n, settings(**s)) for n, s in LADDER]
            rows += [(f"fastest without {k}", settings(**{**fastest, k: PLAIN[k]})) for k in SWITCHES] + fp16 + int8
            rows = keep(rows)
            h, w = hw(args.infer_size)
            report["sections"]["infer"] = infer_table(common, peak, tmp, f"Inference, {h}×{w}, batch 1", (h, w),
                                                      rows, args.reps, 2)
        if "whole" in sections:
            rows = [("plain fp32 NCHW, naive attention (mmseg)", settings()),
                    ("fused attention", settings(attention="fused")),
                    ("fastest without torch.compile", settings(**{**fastest, "compile": False})),
                    ("fastest", settings(**fastest))]
            rows = keep(rows)
            h, w = hw(args.whole_size)
            report["sections"]["whole"] = infer_table(common, peak, tmp, f"Inference, whole {h}×{w} image, batch 1",
                                                      (h, w), rows, max(1, args.reps - 1), 1)
        if "train" in sections:
            rows = keep([(n, settings(**s)) for n, s in TRAIN_ROWS] + fp16)
            report["sections"]["train"] = {
                f"{h}x{w}": train_table(common, peak, (h, w), rows, args.reps * (4 if h < 128 else 1))
                for h, w in map(hw, args.train_sizes.split(","))}
        if "curve" in sections:
            report["sections"]["curve"] = loss_curves(common, args.curve_steps, hw(args.curve_size))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


def loss_curves(common: dict, steps: int, size: tuple[int, int]) -> dict:
    """Plain vs fastest training settings, same weights and batches; plain on other batches = noise."""
    fastest = settings(**{**TRAIN_ROWS[-2][1]})   # without compile: its warm-up would dominate
    runs = {"plain, batches A": (settings(), 0), "fastest, batches A": (fastest, 0),
            "plain, batches B": (settings(), 1)}
    curves = {}
    for name, (s, seed) in runs.items():
        r = run_row(["train", json.dumps({**common, "s": s, "size": list(size), "batch": 2, "steps": steps - 1,
                                          "warmup": 1, "seed": seed})])
        curves[name] = r.get("losses") or []
        if "error" in r:
            print(f"curve {name}: failed: {r['error']}")

    def mean_abs(a, b) -> float:
        return statistics.mean(abs(x - y) for x, y in zip(a, b, strict=True))

    def tail_mean(a) -> float:
        return statistics.mean(a[-10:])

    a, f, b = (curves[k] for k in runs)
    print(f"## Loss curves, {size[0]}×{size[1]} batch 2, {steps} steps from the same weights\n")
    print("| run | first loss | mean of last 10 | mean abs difference to plain, batches A |")
    print("|---|---:|---:|---:|")
    for name, c in curves.items():
        if c:
            print(f"| {name} | {c[0]:.4f} | {tail_mean(c):.4f} | {mean_abs(c, a):.4f} |")
    print()
    return {"curves": curves, "fastest_vs_plain": mean_abs(f, a), "noise_plain_a_vs_b": mean_abs(b, a)}


def machine_info(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.2f} at the start")


if __name__ == "__main__":
    main()
