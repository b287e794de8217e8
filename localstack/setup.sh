#!/usr/bin/env bash
# Create the isolated LocalStack venv that the bucketsnap.testing plugin (src/bucketsnap/testing/_s3.py) starts LocalStack from.
#
#   localstack/setup.sh                # -> <repo>/.venv-localstack
#   BUCKETSNAP_LOCALSTACK_VENV=/path localstack/setup.sh
#
# Idempotent: does nothing when the venv is complete (marker file matches the pins).
# LocalStack gets its own venv because it pins an older botocore than s3fs needs.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BUCKETSNAP_LOCALSTACK_VENV:-$repo_root/.venv-localstack}"
packages=(
    "localstack-core[runtime]==4.13.1"
    "cbor2<6"
    "pyopenssl==25.3.0"
    "cryptography<47"
    "service_identity"
)
marker="$venv/.bucketsnap-localstack-complete"
catalog_dir="$venv/bucketsnap-service-catalog" # must match CATALOG_CACHE_DIR in src/bucketsnap/testing/_s3.py
wanted="$(printf '%s\n' "${packages[@]}")"

if [[ -f "$marker" && "$(cat "$marker")" == "$wanted" ]] && "$venv/bin/python" -c "import localstack" 2>/dev/null; then
    echo "LocalStack venv is ready: $venv"
    exit 0
fi

if ! command -v python3 >/dev/null; then
    echo "error: python3 (>= 3.10) not found on PATH" >&2
    exit 1
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "error: LocalStack 4.13 needs python3 >= 3.10, found $(python3 --version)" >&2
    exit 1
}

# A venv whose interpreter no longer runs (e.g. base python removed) is rebuilt.
if [[ -e "$venv" ]] && ! "$venv/bin/python" -c "" 2>/dev/null; then
    if [[ -f "$venv/pyvenv.cfg" ]]; then
        echo "Removing broken venv $venv"
        rm -rf "$venv"
    else
        echo "error: $venv exists and is not a python venv" >&2
        exit 1
    fi
fi
if [[ ! -x "$venv/bin/python" ]]; then
    echo "Creating $venv"
    python3 -m venv "$venv" || {
        echo "error: 'python3 -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    }
fi

rm -f "$marker"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "Installing ${packages[*]}"
# pip's output is shown only when it fails (less the index's "Location ... ignored" warnings).
pip_log="$(mktemp)"
if ! "$venv/bin/python" -m pip install -q "${packages[@]}" >"$pip_log" 2>&1; then
    grep -v "^WARNING: Location" "$pip_log" >&2 || true
    rm -f "$pip_log"
    echo "error: 'pip install ${packages[*]}' into $venv failed (pip's output is above)" >&2
    exit 1
fi
rm -f "$pip_log"

# Prebuild LocalStack's service-catalog index (else every start spends ~3 s on it).
rm -rf "$catalog_dir"
build_root="$(mktemp -d)"
trap 'rm -rf "$build_root"' EXIT
mkdir -p "$build_root/usr/lib/localstack"
(cd "$build_root" && OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$build_root" "$venv/bin/python" -m localstack.aws.spec)
mkdir -p "$catalog_dir"
cp "$build_root"/usr/lib/localstack/service-catalog-*.dill "$catalog_dir/"

"$venv/bin/python" -c "import localstack.runtime.main, localstack.services.s3.provider"
printf '%s\n' "${packages[@]}" >"$marker"
echo "LocalStack venv is ready: $venv"
