#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv, Azurite (npm) and LocalStack's own venv, then runs
# ruff, mypy, the docs build and pytest (memory, local disk, LocalStack S3, fake-gcs-server GCS and Azurite
# Azure Blob Storage, all on 127.0.0.1).
# Extra arguments go to pytest, e.g. `./scripts/test.sh -k s3 -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
./localstack/setup.sh

# tests/test_gc_fencing.py skews clocks with Debian's libfaketime (package faketime, which pulls it in).
install_faketime() {
    command -v faketime >/dev/null 2>&1 && return 0
    echo "==> installing Debian's faketime package (the gc fencing tests skew clocks with libfaketime)" >&2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: faketime is missing and there is no apt-get here: install libfaketime and faketime" >&2
        return 1
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "error: faketime is missing, this is not root and there is no sudo: as root, run" \
                "'apt-get install -y faketime'" >&2
            return 1
        fi
        sudo=(sudo)
    fi
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
    # A stale package index fails the first try; refresh it once and retry.
    if "${apt[@]}" install -y --no-install-recommends faketime ||
        { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends faketime; }; then
        command -v faketime >/dev/null 2>&1 && return 0
    fi
    echo "error: could not install faketime with apt-get (see above); install it by hand:" \
        "apt-get install -y faketime" >&2
    return 1
}
install_faketime || exit 1
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
echo "==> ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check src
echo "==> mypy" >&2
.venv/bin/mypy
echo "==> mkdocs build" >&2
.venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
echo "==> pytest" >&2
exec .venv/bin/python -m pytest --durations=15 "$@"
