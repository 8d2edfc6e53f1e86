#!/usr/bin/env bash
# The team MLflow tracking server: runs, metrics and the model registry in PostgreSQL, artifacts (models,
# pictures) proxied by the server into S3 or a folder. The same script runs on a VM (systemd, tmux) and as
# the entrypoint of cluster/mlflow/Dockerfile (the Deployment in cluster/mlflow/mlflow.yaml).
#
# Configuration, all from the environment:
#   MLFLOW_DB_HOST                 PostgreSQL host (required)
#   MLFLOW_DB_PORT / _NAME / _USER  5432 / mlflow / mlflow
#   PGPASSWORD                     the role's password, read by libpq itself (or a ~/.pgpass / PGPASSFILE);
#                                  never put it in a URI: a URI shows up in `ps`, logs and error messages
#   PGSSLMODE                      e.g. require for RDS / Cloud SQL (libpq)
#   MLFLOW_ARTIFACTS_DESTINATION   s3://your-bucket/mlflow, or a folder (required)
#   MLFLOW_HOST / MLFLOW_PORT      127.0.0.1 / 5000: this machine only; reach it through an SSH tunnel
#   MLFLOW_WORKERS                 4
#   MLFLOW_ALLOWED_HOSTS           Host headers to accept (MLflow's DNS-rebinding guard), e.g.
#                                  "mlflow.vaedist.internal:5000,localhost:*"; MLflow's default accepts
#                                  localhost and private IPs only, so a DNS name must be listed here
#   MLFLOW_BASIC_AUTH=1            MLflow's basic-auth app (--app-name basic-auth): users, passwords and
#                                  per-experiment permissions, kept in the database MLFLOW_AUTH_DB_NAME
#                                  (mlflow_auth) on the same server. MLFLOW_AUTH_ADMIN_PASSWORD creates the
#                                  admin on the first start. Required whenever anything but a private
#                                  network can reach the port; put TLS in front (load balancer, ingress).
#   MLFLOW_PRIVATE_NETWORK=1       acknowledge that MLFLOW_HOST is reachable only from a private network
#                                  (a ClusterIP Service behind a NetworkPolicy, a VPC security group);
#                                  without it, binding anything but localhost without basic-auth is refused
#
# Example (VM inside the VPC, only the Ray nodes' security group may reach port 5000):
#   export MLFLOW_DB_HOST=mlflow-db.xxxxxxxx.us-west-2.rds.amazonaws.com PGSSLMODE=require
#   read -rsp 'DB password: ' PGPASSWORD && export PGPASSWORD
#   export MLFLOW_ARTIFACTS_DESTINATION=s3://your-bucket/mlflow MLFLOW_HOST=0.0.0.0 MLFLOW_PRIVATE_NETWORK=1
#   export MLFLOW_ALLOWED_HOSTS='mlflow.vaedist.internal:5000,localhost:*,127.0.0.1:*'
#   cluster/mlflow/mlflow-server.sh
# Workers then use MLFLOW_TRACKING_URI=http://mlflow.vaedist.internal:5000.
set -euo pipefail

die() {
    echo "mlflow-server: $*" >&2
    exit 2
}

[[ -n "${MLFLOW_DB_HOST:-}" ]] || die "set MLFLOW_DB_HOST to the PostgreSQL host"
[[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]] || die "set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix or a folder)"
if [[ -z "${PGPASSWORD:-}" && -z "${PGPASSFILE:-}" && ! -f "${HOME:-/nonexistent}/.pgpass" ]]; then
    die "no database password; set PGPASSWORD (from a secret) or provide a ~/.pgpass / PGPASSFILE"
fi

db_port=${MLFLOW_DB_PORT:-5432}
db_name=${MLFLOW_DB_NAME:-mlflow}
db_user=${MLFLOW_DB_USER:-mlflow}
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
workers=${MLFLOW_WORKERS:-4}

# No password in the URI: libpq takes it from PGPASSWORD / the passfile.
backend="postgresql://${db_user}@${MLFLOW_DB_HOST}:${db_port}/${db_name}"

args=(
    server
    --backend-store-uri "$backend"
    --serve-artifacts
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
    --host "$host"
    --port "$port"
    --workers "$workers"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

case "${MLFLOW_BASIC_AUTH:-0}" in
    1 | true | yes)
        # The auth app's own config, written fresh each start: its database URI carries no password either.
        auth_ini=$(mktemp "${TMPDIR:-/tmp}/mlflow-basic-auth.XXXXXX.ini")
        cat >"$auth_ini" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql://${db_user}@${MLFLOW_DB_HOST}:${db_port}/${MLFLOW_AUTH_DB_NAME:-mlflow_auth}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
        export MLFLOW_AUTH_CONFIG_PATH=$auth_ini
        args+=(--app-name basic-auth)
        ;;
    0 | false | no)
        case "$host" in
            127.0.0.1 | localhost | ::1) ;;
            *)
                [[ "${MLFLOW_PRIVATE_NETWORK:-0}" == 1 ]] ||
                    die "refusing to serve $host:$port without authentication; set MLFLOW_BASIC_AUTH=1 (and TLS in front), or MLFLOW_PRIVATE_NETWORK=1 if only a private network can reach it"
                ;;
        esac
        ;;
    *) die "MLFLOW_BASIC_AUTH must be 0 or 1" ;;
esac

echo "mlflow-server: $backend (password from libpq's environment), artifacts -> $MLFLOW_ARTIFACTS_DESTINATION, listening on $host:$port${MLFLOW_BASIC_AUTH:+ basic-auth=$MLFLOW_BASIC_AUTH}"
exec "${MLFLOW_BIN:-mlflow}" "${args[@]}"
