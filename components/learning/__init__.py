"""What changes a run's result, and nothing else: the model, data, losses, metrics, schedules, the run
config, the sweep's search space and the training loop (which runs in a Session: Ray Train's is
components/training/worker.py). It imports nothing of the repo outside this folder, which is therefore
the train / tune stages' one code dep in dvc.yaml and what their run identity hashes (docs/structure.md).

Import the modules directly; this package import stays light (no torch).
"""
