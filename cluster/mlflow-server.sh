#!/usr/bin/env bash
# MLflow tracking server for a multi-node cluster (the head node of cluster/aws.yaml and cluster/gcp.yaml
# runs it as a systemd service). See cluster/mlflow-server.md.
#
# Environment:
#   MLFLOW_BACKEND_STORE_URI       the database (postgresql://...), or instead
#   PROVLAE_DB_URI_COMMAND         a command that prints it, e.g. a secret-manager read; the URI then lives
#                                  only in this process's environment, never on disk or in the repository
#   MLFLOW_ARTIFACTS_DESTINATION   the shared artifact store (s3://BUCKET/provlae/mlartifacts, gs://...)
#   MLFLOW_HOST                    address to bind (default: this node's private address, not 0.0.0.0)
#   MLFLOW_PORT                    (default 5000)
#   MLFLOW_WORKERS                 uvicorn workers (default 4)
#   PYTHON                         interpreter with mlflow installed (default: python)
set -euo pipefail

if [[ -z ${MLFLOW_BACKEND_STORE_URI:-} && -n ${PROVLAE_DB_URI_COMMAND:-} ]]; then
    MLFLOW_BACKEND_STORE_URI=$(bash -c "$PROVLAE_DB_URI_COMMAND")
    export MLFLOW_BACKEND_STORE_URI
fi
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI or PROVLAE_DB_URI_COMMAND}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://... or gs://...)}"
host=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}

# Clients upload and download artifacts through this server (--serve-artifacts), so only the head needs
# bucket credentials for them. MLflow's GenAI job runner is not needed for experiment tracking.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "${PYTHON:-python}" -m mlflow server \
    --host "$host" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
