#!/usr/bin/env bash
# The Ray job's command: runs on the cluster's head node, in the uploaded copy of the repo.
#   bash deploy/job_entrypoint.sh <experiment> [extra dvc repro args]
# Submitted by deploy/submit_experiment.sh; not meant to be run on your machine.
set -euo pipefail
experiment=$1
shift

dvc config --local core.no_scm true   # the upload has no .git

# The cluster adds GPU nodes when the workers ask for them: the preflight's Ray resource check reports
# instead of failing (components/preflight.py).
export DNLSEG_RAY_AUTOSCALING=1

# Workers on other nodes log to the MLflow server on the head (deploy/cluster.yaml starts it).
head_ip=$(hostname -I | awk '{print $1}')
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://${head_ip}:5000}

# Everything train@<experiment> depends on (prepared data), from the DVC remote; what is missing
# there, dvc repro rebuilds from params' data sources.
dvc pull --with-deps "train@${experiment}" || echo "dvc pull incomplete: missing inputs will be rebuilt"

dvc repro "train@${experiment}" "$@"
dvc push "train@${experiment}"

# The git-tracked outputs (no DVC cache) go back to the submitter (deploy/submit_experiment.sh pulls them).
python deploy/results.py push "$DNLSEG_RESULTS_URI" dvc.lock "metrics/${experiment}" "plots/${experiment}"
