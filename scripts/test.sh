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
# Disk: a fresh clone's build takes about 4.5 GiB under target/ (the debug build, its test
# binaries and the `mpi` build), the Python tools about 3 GiB. With too little free, linking
# fails with "No space left on device" or a linker's Bus error: say so up front.
free_mib=$(df -Pm . | awk 'NR==2 {print $4}')
if [ "${free_mib:-0}" -lt 10240 ]; then
    echo "warning: only ${free_mib} MiB free where the build goes ($(pwd)): the build and the tools need about 8 GiB" >&2
fi
# A fresh clone (CI) builds once: incremental compilation data (1.5 GiB) would never be reused.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi
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
