#!/usr/bin/env bash
# The demo, from a fresh clone: sets up .venv, then trains a small policy, kills itself mid-run with SIGKILL,
# resumes from the last snapshot, and restores only the policy as an inference host would.
# Arguments go to the demo, e.g. `./scripts/demo.sh --url s3://bucket/run --endpoint-url http://127.0.0.1:4566`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh demo
exec .venv/bin/python examples/preemption_demo.py "$@"
