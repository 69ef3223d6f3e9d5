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
#   PYTHON                         interpreter with mlflow[auth] installed (default: python)
# Authentication (MLflow's basic-auth app; every API call then needs a user's password):
#   MLFLOW_AUTH_DATABASE_URI       the users and permissions database (postgresql://...)
#   MLFLOW_AUTH_ADMIN_PASSWORD     the admin user's password, used once: when the user store is empty
#   MLFLOW_AUTH_ADMIN_USERNAME     (default admin)
#   MLFLOW_FLASK_SERVER_SECRET_KEY the CSRF key, the same on every server of one store
#   MLFLOW_AUTH_DEFAULT_PERMISSION what a user may do with others' experiments (default READ)
#   PROVLAE_AUTH_COMMAND           a command that prints "export NAME=value" lines for the above (a
#                                  secret-manager read), so no password is on disk
#   PROVLAE_MLFLOW_NO_AUTH=1       run without authentication (a single trusted machine only)
set -euo pipefail

if [[ -z ${MLFLOW_BACKEND_STORE_URI:-} && -n ${PROVLAE_DB_URI_COMMAND:-} ]]; then
    MLFLOW_BACKEND_STORE_URI=$(bash -c "$PROVLAE_DB_URI_COMMAND")
    export MLFLOW_BACKEND_STORE_URI
fi
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI or PROVLAE_DB_URI_COMMAND}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://... or gs://...)}"
host=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}

app=()
if [[ ${PROVLAE_MLFLOW_NO_AUTH:-} != 1 ]]; then
    if [[ -n ${PROVLAE_AUTH_COMMAND:-} ]]; then
        eval "$(bash -c "$PROVLAE_AUTH_COMMAND")"
    fi
    : "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (or PROVLAE_MLFLOW_NO_AUTH=1)}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (openssl rand -hex 32)}"
    # The settings file holds no password (the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD); private anyway.
    umask 077
    ini=$(mktemp "${TMPDIR:-/tmp}/provlae-basic-auth.XXXXXX.ini")
    trap 'rm -f -- "$ini"' EXIT
    cat > "$ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $MLFLOW_AUTH_DATABASE_URI
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH=$ini MLFLOW_FLASK_SERVER_SECRET_KEY
    [[ -v MLFLOW_AUTH_ADMIN_PASSWORD ]] && export MLFLOW_AUTH_ADMIN_PASSWORD
    app=(--app-name basic-auth)
fi

# Clients upload and download artifacts through this server (--serve-artifacts), so only the head needs
# bucket credentials for them. MLflow's GenAI job runner is not needed for experiment tracking.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# Not exec: the settings file is removed when the server ends.
"${PYTHON:-python}" -m mlflow server "${app[@]}" \
    --host "$host" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
