#!/usr/bin/env bash
# The project's one test command (README, .ci/run): installs the tools the tests read outputs
# with (scripts/install-test-tools.sh: TensorBoard, pinned; scripts/install-torch.sh: torch,
# torchaudio and transformers, pinned, in .venv-torch), then runs every test suite of the
# workspace. Extra arguments go to `cargo test` (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-tools.sh
# torch, torchaudio and transformers for the export tests, in .venv-torch (2–3 minutes the first
# time; nothing after).
scripts/install-torch.sh
EHMAM_REQUIRE_TENSORBOARD=1 EHMAM_REQUIRE_TORCH=1 EHMAM_TORCH_PYTHON="$(pwd)/.venv-torch/bin/python" \
    cargo test --workspace --locked "$@"
