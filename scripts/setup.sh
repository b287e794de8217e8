#!/usr/bin/env bash
# Creates or updates .venv with bucketsnap and the given extras (default: dev). Idempotent: a stamp file
# records what was installed, so a second run costs a second. torch is pinned by constraints.txt to the
# local CPU build (2.13.0) and installed first, so that no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${BUCKETSNAP_VENV:-.venv}"
python="${PYTHON:-python3}"

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
"${pip[@]}" --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
"${pip[@]}" -c constraints.txt torch 2>&1 | grep -v "^WARNING: Location" >&2 || true
"${pip[@]}" -c constraints.txt -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$venv/bin/python" -c "import torch, bucketsnap; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
