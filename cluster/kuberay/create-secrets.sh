#!/usr/bin/env bash
# Create the Secrets that vaedist's Kubernetes manifests reference, without a value ever landing in a file,
# on a command line (visible in `ps`), in shell history or on the terminal.
#
#   cluster/kuberay/create-secrets.sh [--mlflow] [namespace]     (namespace defaults to vaedist)
#
#   ray-auth-token  key auth_token  random 256-bit token (what `ray get-auth-token --generate` makes);
#                                   RayCluster/RayJob pods read it as RAY_AUTH_TOKEN, you read it to submit.
#   with --mlflow:
#   mlflow-db       key password    the PostgreSQL password of the MLflow role, typed at a silent prompt
#                                   (it must match the role's password in your database).
#   mlflow-admin    key password    random; MLflow's basic-auth admin, created on the first start with
#                                   MLFLOW_BASIC_AUTH=1 (unused otherwise).
#
# An existing Secret is kept as it is. To rotate one: kubectl -n vaedist delete secret NAME, rerun, then
# restart what reads it (kubectl -n vaedist delete pod -l app.kubernetes.io/part-of=vaedist).
set -euo pipefail

with_mlflow=0
if [[ "${1:-}" == "--mlflow" ]]; then
    with_mlflow=1
    shift
fi
ns=${1:-vaedist}

random_hex() {
    python3 -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))'
}

# create NAME KEY: the value comes on stdin and goes to kubectl on its stdin.
create() {
    local name=$1 key=$2
    if kubectl -n "$ns" get secret "$name" >/dev/null 2>&1; then
        cat >/dev/null
        echo "secret $ns/$name exists: kept"
        return
    fi
    kubectl -n "$ns" create secret generic "$name" --from-file="$key=/dev/stdin" >/dev/null
    kubectl -n "$ns" label secret "$name" app.kubernetes.io/part-of=vaedist >/dev/null
    echo "secret $ns/$name created"
}

random_hex | create ray-auth-token auth_token

if [[ $with_mlflow == 1 ]]; then
    read -rsp "PostgreSQL password of the MLflow role (not shown): " db_password
    echo
    if [[ -z "$db_password" ]]; then
        echo "error: empty password" >&2
        exit 2
    fi
    printf '%s' "$db_password" | create mlflow-db password
    unset db_password
    random_hex | create mlflow-admin password
fi
