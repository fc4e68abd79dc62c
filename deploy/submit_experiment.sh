#!/usr/bin/env bash
# Submit one experiment's train stage to a Ray cluster and bring its DVC outputs back.
#
#   deploy/submit_experiment.sh <experiment> [extra `dvc repro` args, e.g. --force]
#
# Environment:
#   RAY_ADDRESS          job server, default http://127.0.0.1:8265 (`ray dashboard deploy/cluster.yaml`)
#   DNLSEG_RESULTS_URI   where the job leaves dvc.lock / metrics / plots, e.g. s3://bucket/dnlseg/jobs
#   DNLSEG_DRIVER_RESOURCES  what the job's driver asks for, default {"dnlseg_head": 1}: the on-demand head
#                        of cluster.yaml; empty on a cluster without that resource
#
# The job runs `dvc repro train@<experiment>` on the head node in an uploaded copy of this checkout
# (deploy/job_entrypoint.sh); the training itself runs on the GPU nodes. Run from the repo root.
set -euo pipefail

experiment=${1:?usage: deploy/submit_experiment.sh <experiment> [extra dvc repro args]}
shift
cd "$(dirname "$0")/.."

address=${RAY_ADDRESS:-http://127.0.0.1:8265}
results=${DNLSEG_RESULTS_URI:?set DNLSEG_RESULTS_URI (e.g. s3://my-bucket/dnlseg/jobs): the job leaves its results there}
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
submission_id="dnlseg-${experiment//[^A-Za-z0-9-]/-}-$(date +%Y%m%d-%H%M%S)"

# Fail here, not on the cluster, on a misspelled experiment.
python -c "import sys; from pipeline.config import load; load().experiment(sys.argv[1])" "$experiment"

runtime_env=$(python deploy/runtime_env.py "$commit" "$results/$submission_id")

echo "submitting $submission_id to $address"
# The driver (and so Ray Train's controller) on the on-demand head, never on a spot GPU node.
driver_resources=${DNLSEG_DRIVER_RESOURCES-'{"dnlseg_head": 1}'}
ray job submit --address "$address" --submission-id "$submission_id" --working-dir . \
    --runtime-env-json "$runtime_env" ${driver_resources:+--entrypoint-resources "$driver_resources"} \
    -- bash deploy/job_entrypoint.sh "$experiment" "$@"

# The job finished (ray job submit waits and exits non-zero on failure): fetch the git-tracked results
# into this checkout; the model comes with `dvc pull` (the job pushed it to the DVC remote).
python deploy/results.py pull "$results/$submission_id"
dvc pull "train@${experiment}"
echo "done: commit dvc.lock, metrics/${experiment} and plots/${experiment}"
