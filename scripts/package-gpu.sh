#!/usr/bin/env bash
# Packs the CUDA build (`cargo build --release --features cuda`, see scripts/cuda-toolchain.sh) to
# carry to a GPU machine, which has no Rust toolchain and no network (issue 13): the binary
# stripped and xz-compressed (27 MB against gzip's 56: what travels is limited to 64 MiB), and the libraries it needs at load time (`ldd`, read where the toolkit's
# libraries are on the path; the driver, libcuda.so.1, is the GPU machine's own).
#
#   scripts/package-gpu.sh [OUT]      (default: target/gpu-package)
#
# On the GPU machine: `xz -d` the binary (or python3's lzma module) and run it with LD_LIBRARY_PATH set to the CUDA 13
# libraries of its PyTorch install (site-packages/nvidia/cu13/lib); benches/gpu.sh does that.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/ehmam
out=${1:-target/gpu-package}
if [ ! -x "$bin" ]; then
    echo "no $bin: build it first (scripts/cuda-toolchain.sh, then cargo build --release --features cuda)" >&2
    exit 1
fi
mkdir -p "$out"
strip -o "$out/ehmam" "$bin"
size=$(stat -c %s "$out/ehmam")
rm -f "$out/ehmam.xz" "$out/ehmam.gz"  # a stale copy beside it would not fit what travels
xz -T2 -9 "$out/ehmam"
gz=$(stat -c %s "$out/ehmam.xz")
cu=""
if [ -d .cuda/venv ]; then
    cu=$(.cuda/venv/bin/python -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
fi
LD_LIBRARY_PATH="${cu:+$cu/lib:$cu/lib/stubs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$bin" >"$out/ldd.txt" || true
echo "$out/ehmam.xz: $gz bytes ($size stripped); needs at load time:"
grep -E 'cuda|cublas|curand|cudart|nvrtc|nccl|not found' "$out/ldd.txt" || true
if [ "$gz" -gt $((48 * 1024 * 1024)) ]; then
    echo "warning: over 48 MiB: with the repository's files it may not fit the 64 MiB that travel" >&2
fi
