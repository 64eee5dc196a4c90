#!/usr/bin/env bash
# The S3-compatible server the object-storage tests run on loopback: moto's server (pinned), in
# .venv-s3 (about 45 s the first time; nothing after). The tests start it themselves
# (tests/s3.rs) on a free port and stop it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv-s3/bin/python -c "import moto, flask" >/dev/null 2>&1; then
    exit 0
fi
python3 -m venv .venv-s3
.venv-s3/bin/pip install --quiet --disable-pip-version-check --no-input --no-cache-dir "moto[server]==5.2.6"
.venv-s3/bin/python -c "import moto, flask"
