#!/usr/bin/env bash
# The Python tools the tests read ehmam's outputs with: TensorBoard (its EventAccumulator is the
# independent reader of the `log.tensorboard` event files, stages/tests/tensorboard.rs).
# Idempotent and quiet: does nothing when `python3 -c "import tensorboard"` works already.
# Uses $EHMAM_PYTHON if set (the interpreter the tests run), else python3.
set -euo pipefail
py="${EHMAM_PYTHON:-python3}"
if "$py" -c "import tensorboard" >/dev/null 2>&1; then
    exit 0
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check --no-input --no-cache-dir)
# A Python whose packages the system manages (PEP 668) refuses plain installs; install for this
# user there instead.
if ! "${pip[@]}" "tensorboard==2.21.0" 2>/dev/null; then
    "${pip[@]}" --user --break-system-packages "tensorboard==2.21.0"
fi
"$py" -c "import tensorboard"
