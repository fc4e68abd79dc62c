"""The runtime env of a submitted job: what `--working-dir .` must not upload, and what the job is told.

    python deploy/runtime_env.py <commit> <results uri>    # prints the JSON for --runtime-env-json

Excludes are gitignore patterns matched at any depth unless anchored with `/`: a bare `data` would also
drop `components/learning/data/` (the code), so the repo's top-level folders are anchored.
"""

from __future__ import annotations

import json
import sys

EXCLUDES = [".git", "/.venv*", "/data", "/runs", "/mlruns", "/mlartifacts", "/mlflow.db", "/.dvc/cache",
            "/.dvc/tmp", "/models", "/.dnlseg", "__pycache__"]


def runtime_env(commit: str, results_uri: str) -> dict:
    # The upload has no .git: the commit travels as a variable (components/tracking.git_commit reads it).
    return {"excludes": EXCLUDES, "env_vars": {"DNLSEG_GIT_COMMIT": commit, "DNLSEG_RESULTS_URI": results_uri}}


if __name__ == "__main__":
    print(json.dumps(runtime_env(*sys.argv[1:3])))
