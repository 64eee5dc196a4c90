#!/usr/bin/env bash
# PyTorch for the export tests (tests/export_hf.rs, issue 18): torch, torchaudio and transformers,
# pinned, in a virtual environment at .venv-torch/ (git-ignored), so the exported module is loaded
# with nothing else installed. Idempotent and quiet: does nothing when the environment imports
# them already. PyPI's torch wheel brings its CUDA libraries (they are not used here): the first
# install downloads about 3 GB and takes 2–3 minutes (measured 2026-12-07: 153 s, 4.9 GB on disk;
# no pip cache, which would keep another 3 GB of wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-torch
py="$venv/bin/python"
if [ -x "$py" ] && "$py" -c "import torch, torchaudio, transformers" >/dev/null 2>&1; then
    exit 0
fi
base="${EHMAM_PYTHON:-python3}"
"$base" -m venv "$venv"
"$py" -m pip install --quiet --disable-pip-version-check --no-input --no-cache-dir \
    "torch==2.11.0" "torchaudio==2.11.0" "transformers==5.25.0"
"$py" -c "import torch, torchaudio, transformers"
