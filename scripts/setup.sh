#!/usr/bin/env bash
# Creates or updates .venv with bucketsnap and the given extras (default: dev). Idempotent: a stamp file
# records what was installed, so a second run costs a second. torch is pinned by constraints.txt to the
# local CPU build (2.13.0) and installed first, so that no dependency can pull a multi-GB CUDA build.
# With the dev extras it also installs Azurite (the Azure Blob Storage emulator the tests start) with npm
# into .azurite/ (BUCKETSNAP_AZURITE_DIR), pinned, also behind a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${BUCKETSNAP_VENV:-.venv}"
python="${PYTHON:-python3}"

# Azurite 3.35.0 is the newest release whose package still declares Node.js 20 (3.36 wants >= 21, 3.37
# >= 22); the machines have Node.js 20. Its blob service is all the tests use (tests/servers.py).
azurite_version="3.35.0"
install_azurite() {
    local dir="${BUCKETSNAP_AZURITE_DIR:-.azurite}"
    local stamp="$dir/.bucketsnap-azurite.stamp"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$azurite_version" ] && [ -x "$dir/node_modules/.bin/azurite-blob" ]; then
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
        echo "error: the Azure tests need Azurite, installed with npm: install Node.js (>= 20) and npm" >&2
        return 1
    fi
    echo "==> installing Azurite $azurite_version into $dir (npm)" >&2
    rm -rf "$dir/node_modules" "$dir/package.json" "$dir/package-lock.json" "$stamp"
    mkdir -p "$dir"
    # --ignore-scripts: Azurite needs no install script (only a dependency's optional postinstall).
    npm install --prefix "$dir" --save-exact --no-audit --no-fund --ignore-scripts --loglevel=error \
        "azurite@$azurite_version" >&2
    "$dir/node_modules/.bin/azurite-blob" --version >/dev/null
    echo "$azurite_version" > "$stamp"
}
if [ "$extras" = "dev" ]; then
    install_azurite
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.bucketsnap-$extras.stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "==> installing bucketsnap[$extras] into $venv (torch pinned by constraints.txt)" >&2
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location)
# pip's output is kept and shown only when it fails (then whole, less the index's "Location ... ignored"
# warnings), so that a failed install stops here with pip's own error, not later at an import.
run_pip() {
    local log status=0
    log="$(mktemp)"
    "${pip[@]}" "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        grep -v "^WARNING: Location" "$log" >&2 || true
        echo "error: 'pip install $*' failed with exit status $status (pip's output is above)" >&2
    fi
    rm -f "$log"
    return "$status"
}
run_pip --upgrade pip
run_pip -c constraints.txt torch
run_pip -c constraints.txt -e ".[$extras]"
if [ "$extras" = "dev" ]; then
    # pytorchrl (tests/test_pytorchrl.py) pins ray and other heavy packages it does not need for its storages:
    # installed without its dependencies, plus the two its storages import (gym, PyYAML).
    run_pip -c constraints.txt "gym==0.26.2" "pyyaml>=6"
    run_pip --no-deps "pytorchrl==3.2.15"
fi
"$venv/bin/python" -c "import torch, bucketsnap; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
