#!/usr/bin/env bash
# The project's one test command (README, .ci/run): installs the tools the tests read outputs
# with (scripts/install-test-tools.sh: TensorBoard, pinned), then runs every test suite of the
# workspace. Extra arguments go to `cargo test` (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-tools.sh
EHMAM_REQUIRE_TENSORBOARD=1 cargo test --workspace --locked "$@"
