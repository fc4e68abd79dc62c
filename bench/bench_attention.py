"""Pairwise attention alone at L = 32,768 (a whole 1024x2048 image), C = 256, on CPU: the naive L×L map,
SDPA on strided q/k/v (torch silently takes its math kernel) and SDPA on contiguous q/k/v (flash kernel,
what the model uses). Each variant in a fresh process so its peak RSS growth is its own.

    python bench/bench_attention.py [--length 32768]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


ATTENTION_VARIANTS = ("naive", "sdpa_strided", "sdpa_contiguous")


def attention_worker(variant: str, length: int, dtype: str) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from components.learning.models.dnl import pairwise_attention_naive

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
    parser.add_argument("--length", type=int, default=32768, help="L = H/8 × W/8")
    parser.add_argument("--attention-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attention_worker:
        variant, length, dtype = args.attention_worker
        print(json.dumps(attention_worker(variant, int(length), dtype)))
        return
    attention_table(args.length)


if __name__ == "__main__":
    main()
