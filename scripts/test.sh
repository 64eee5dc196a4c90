#!/usr/bin/env bash
# The project's one test command (README, .ci/run): installs the tools the tests read outputs
# with (scripts/install-test-tools.sh: TensorBoard, pinned; scripts/install-torch.sh: torch,
# torchaudio and transformers, pinned, in .venv-torch), Open MPI (scripts/install-mpi.sh) and an
# S3 server (scripts/install-s3.sh: moto, pinned, in .venv-s3),
# then runs every test suite of the workspace, then the data-parallel tests (tests/mpi.rs: the
# binary built with the `mpi` feature under mpirun) as a second invocation. Extra arguments go to
# both `cargo test`s (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-tools.sh
# torch, torchaudio and transformers for the export tests, in .venv-torch (2–3 minutes the first
# time; nothing after).
scripts/install-torch.sh
# Open MPI and libclang for the `mpi` feature (apt; ~15 s the first time).
scripts/install-mpi.sh
# moto's S3 server for the object-storage tests (tests/s3.rs starts it on loopback; ~45 s the
# first time).
scripts/install-s3.sh
EHMAM_REQUIRE_TENSORBOARD=1 EHMAM_REQUIRE_TORCH=1 EHMAM_REQUIRE_S3=1 EHMAM_TORCH_PYTHON="$(pwd)/.venv-torch/bin/python" \
    cargo test --workspace --locked "$@"
# Data parallel over MPI: the same dev profile, stages rebuilt with the feature (~2 minutes).
cargo test --locked --features mpi --test mpi "$@"
