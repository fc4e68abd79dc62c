"""Training under Ray Train, around the loop of components/learning: the trainer and its driver-side
pieces (trainer.py), what every worker runs (worker.py: the loop's Ray session with MLflow and console
lines), checkpoint folders (checkpointing.py), the driver <-> worker contract (contract.py), progress
lines (progress.py), shipping the dataset to worker nodes (data_sync.py) and the run identity
(identity.py). None of it changes what a run learns: editing it resumes runs.

Import the modules directly; this package import stays light (no ray, no torch).
"""
