#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv and LocalStack's own venv, then runs ruff, mypy,
# the docs build and pytest (memory, local disk, LocalStack S3 and fake-gcs-server GCS, all on 127.0.0.1).
# Extra arguments go to pytest, e.g. `./scripts/test.sh -k s3 -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
./localstack/setup.sh
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
echo "==> ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check src
echo "==> mypy" >&2
.venv/bin/mypy
echo "==> mkdocs build" >&2
.venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
echo "==> pytest" >&2
exec .venv/bin/python -m pytest "$@"
