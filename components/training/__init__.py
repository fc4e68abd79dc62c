"""Distributed training with Ray Train: the per-worker loop (loop.py), one optimizer step (step.py, no
Ray: bench/ runs it too), distributed validation (evaluate.py), checkpoint folders (checkpointing.py),
batch split / data order / seeds (distributed.py), progress lines (progress.py) and shipping the dataset
to worker nodes (data_sync.py).

Import the modules directly; this package import stays light (no ray, no torch).
"""
