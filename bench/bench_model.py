"""Forward time and peak memory of DNLNet R-50-D8 on CPU: memory format, dtype and attention kernel.

Each configuration runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own:
1 warm-up + `--reps` timed forwards (`encode_decode`, batch 1, eval, no_grad); by default 2 timed
reps at 512x1024 and 1 at the whole-image 1024x2048 to stay near 10 minutes on 2 cores.
`--attention-only` times the pairwise attention alone at L = 32,768 (a whole 1024x2048 image):
the naive L×L map, SDPA on strided q/k/v (torch silently takes its math kernel) and SDPA on
contiguous q/k/v (flash kernel, what the model uses).

    python bench/bench_model.py                 # the model table
    python bench/bench_model.py --sizes 512x1024 --reps 1
    python bench/bench_model.py --attention-only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (memory format, dtype, attention); naive fp32 at 1024x2048 needs two 4 GiB L×L maps.
CONFIGS = [
    ("nchw", "fp32", "naive"),
    ("nchw", "fp32", "fused"),
    ("channels_last", "fp32", "fused"),
    ("nchw", "bf16", "fused"),
    ("channels_last", "bf16", "fused"),
]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(height: int, width: int, fmt: str, dtype: str, attention: str, reps: int) -> dict:
    import contextlib

    import torch

    sys.path.insert(0, str(REPO))
    from components.models import build_dnlnet

    torch.manual_seed(0)
    model = build_dnlnet(depth=50, num_classes=19, attention=attention).eval()
    img = torch.randn(1, 3, height, width)
    if fmt == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        img = img.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    model_rss = _rss_mib()
    times = []
    with torch.no_grad(), autocast:
        for i in range(reps + 1):
            start = time.perf_counter()
            out = model.encode_decode(img)
            elapsed = time.perf_counter() - start
            if i > 0:  # the first pass is the warm-up
                times.append(elapsed)
    assert out.shape == (1, 19, height, width)
    return {"mean_s": statistics.mean(times), "min_s": min(times), "model_rss_mib": model_rss,
            "peak_rss_mib": _rss_mib(), "threads": torch.get_num_threads(), "torch": torch.__version__}


ATTENTION_VARIANTS = ("naive", "sdpa_strided", "sdpa_contiguous")


def attention_worker(variant: str, length: int, dtype: str) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from components.models.dnl import pairwise_attention_naive

    torch.manual_seed(0)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    # N×L×C views of N×C×L tensors: the layout the block gets from NCHW features.
    q, k, v = (torch.randn(1, 256, length, dtype=torch_dtype).transpose(1, 2) for _ in range(3))
    base_rss = _rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        if variant == "naive":
            pairwise_attention_naive(q, k, v, 16.0, 0.05)
        else:
            if variant == "sdpa_contiguous":
                q, k, v = (t.contiguous() for t in (q, k, v))
            F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.25)
    return {"s": time.perf_counter() - start, "grown_mib": _rss_mib() - base_rss, "torch": torch.__version__}


def attention_table(length: int) -> None:
    print(f"\nPairwise attention alone, L = {length}, C = 256, batch 1 (one pass, fresh process each):\n")
    print("| variant | dtype | time s | peak RSS growth MiB |")
    print("|---|---|---:|---:|")
    for variant in ATTENTION_VARIANTS:
        for dtype in ("fp32", "bf16"):
            if variant != "sdpa_contiguous" and dtype == "bf16":
                continue
            cmd = [sys.executable, __file__, "--attention-worker", variant, str(length), dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {variant} | {dtype} | failed: {tail} | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {variant} | {dtype} | {r['s']:.2f} | {r['grown_mib']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x1024,1024x2048", help="comma-separated HxW")
    parser.add_argument("--reps", default="2,1",
                        help="timed forwards per configuration, one number or one per size")
    parser.add_argument("--attention-only", action="store_true", help="only the attention table")
    parser.add_argument("--length", type=int, default=32768, help="L for --attention-only")
    parser.add_argument("--worker", nargs=5, metavar=("H", "W", "FORMAT", "DTYPE", "ATTENTION"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--attention-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attention_worker:
        variant, length, dtype = args.attention_worker
        print(json.dumps(attention_worker(variant, int(length), dtype)))
        return
    if args.attention_only:
        attention_table(args.length)
        return
    if args.worker:
        h, w, fmt, dtype, attention = args.worker
        print(json.dumps(worker(int(h), int(w), fmt, dtype, attention, int(args.reps))))
        return

    sizes = args.sizes.split(",")
    reps = [int(r) for r in args.reps.split(",")]
    reps = reps * len(sizes) if len(reps) == 1 else reps
    if len(reps) != len(sizes):
        parser.error(f"--reps: give one number or one per size ({len(sizes)}), got {args.reps!r}")
    rows = []
    for size, size_reps in zip(sizes, reps, strict=True):
        h, w = (int(v) for v in size.lower().split("x"))
        for fmt, dtype, attention in CONFIGS:
            cmd = [sys.executable, __file__, "--reps", str(size_reps), "--worker", str(h), str(w), fmt, dtype,
                   attention]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{size} {fmt} {dtype} {attention}: FAILED ({tail})", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((f"{h}×{w}", fmt, dtype, attention, size_reps, r))
            print(f"done {size} {fmt} {dtype} {attention}: {r['mean_s']:.2f} s, {r['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)

    info = rows[0][-1] if rows else {}
    print(f"\nDNLNet R-50-D8, 19 classes, batch 1, encode_decode forward; torch {info.get('torch')}, "
          f"{info.get('threads')} threads, {platform.processor() or platform.machine()}; "
          f"1 warm-up + timed reps per row, each row a fresh process.\n")
    print("| input | memory format | dtype | attention | reps | forward s (mean) | forward s (min) "
          "| peak RSS MiB | peak − model MiB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for size, fmt, dtype, attention, size_reps, r in rows:
        grown = r["peak_rss_mib"] - r["model_rss_mib"]
        print(f"| {size} | {fmt} | {dtype} | {attention} | {size_reps} | {r['mean_s']:.2f} "
              f"| {r['min_s']:.2f} | {r['peak_rss_mib']:.0f} | {grown:.0f} |")


if __name__ == "__main__":
    main()
