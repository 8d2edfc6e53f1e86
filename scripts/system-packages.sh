#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real, when they are missing:
#   chromium    the MLflow UI test (tests/test_ui.py; Playwright drives Debian's browser, never `playwright install`)
#   postgresql  MLflow's backend store of the cluster recipe (tests/test_postgres_mlflow.py)
# Called by `make test`; needs root (or sudo) only when something is missing.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "error: the tests need Debian's ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} (Debian packages the tests use) ..."
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
