#!/usr/bin/env bash
# A CUDA 13.0 toolkit from PyPI wheels, for `cargo build --release --features cuda` on a machine
# without a GPU or a system CUDA (issue 13). No GPU and no driver are needed to build.
#
#   scripts/cuda-toolchain.sh [DIR]      (default: .cuda, ignored by git)
#   eval "$(scripts/cuda-toolchain.sh --env [DIR])"   (only print the exports, after installing)
#
# What it does:
#  - a virtual environment DIR/venv with the pinned wheels: nvcc, crt, nvvm, cudart, cccl, nvrtc,
#    cublas, curand (and nccl, for multi-GPU work). Pinned to 13.0: cudarc 0.19's build script
#    accepts CUDA 11.4–12.9 and 13.0–13.4 (the newest wheels, 13.5, are refused), and 13.0 is what
#    the GPU machines' driver and their PyTorch use;
#  - the unversioned .so links the linker wants (the wheels ship only libX.so.N);
#  - a link-time stand-in for the driver library, DIR/venv/.../cu13/lib/stubs/libcuda.so (soname
#    libcuda.so.1): one C function per driver entry point cudarc declares, each returning 100
#    (CUDA_ERROR_NO_DEVICE). No wheel ships libcuda; on a GPU machine the real one is loaded. Never
#    put the stubs folder on a GPU machine's library path;
#  - prints the environment to export: CUDA_HOME, PATH, CUDA_COMPUTE_CAP (90: Hopper, H100/H200;
#    candle-kernels' build reads it instead of asking nvidia-smi).
set -euo pipefail
cd "$(dirname "$0")/.."
env_only=0
if [ "${1:-}" = "--env" ]; then
    env_only=1
    shift
fi
dir=${1:-.cuda}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
venv="$dir/venv"
cap=${CUDA_COMPUTE_CAP:-90}

wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
    nvidia-nccl-cu13==2.28.9
)

cu_home() {
    "$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))'
}

if [ $env_only -eq 0 ]; then
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    echo "installing the CUDA 13.0 wheels into $venv ..." >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${wheels[@]}" >&2
    cu=$(cu_home)
    # Unversioned links beside the versioned libraries.
    for lib in cublas cublasLt curand nvrtc cudart nccl; do
        so=$(ls "$cu/lib/lib$lib.so."* 2>/dev/null | sort | head -1 || true)
        if [ -n "$so" ] && [ ! -e "$cu/lib/lib$lib.so" ]; then
            ln -s "$(basename "$so")" "$cu/lib/lib$lib.so"
        fi
    done
    # The NCCL wheel installs its own folder; link its library and header into cu13 as well.
    nccl=$("$venv/bin/python" -c 'import os, nvidia; p=os.path.join(list(nvidia.__path__)[0], "nccl"); print(p if os.path.isdir(p) else "")')
    if [ -n "$nccl" ]; then
        for f in "$nccl"/lib/libnccl.so*; do
            [ -e "$f" ] && [ ! -e "$cu/lib/$(basename "$f")" ] && ln -s "$f" "$cu/lib/$(basename "$f")"
        done
        [ -e "$cu/lib/libnccl.so" ] || { so=$(ls "$cu/lib/libnccl.so."* 2>/dev/null | head -1 || true); [ -n "$so" ] && ln -s "$(basename "$so")" "$cu/lib/libnccl.so"; }
        [ -e "$nccl/include/nccl.h" ] && [ ! -e "$cu/include/nccl.h" ] && ln -s "$nccl/include/nccl.h" "$cu/include/nccl.h"
    fi
    # The driver stand-in, from the entry points of the cudarc version in Cargo.lock.
    cargo fetch --locked >&2
    cudarc_ver=$(awk '/^name = "cudarc"$/ {getline; print $3}' Cargo.lock | tr -d '"' | head -1)
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_ver" 2>/dev/null | head -1)
    if [ -z "$src" ]; then
        echo "cudarc $cudarc_ver's source is not in the cargo registry (cargo fetch failed?)" >&2
        exit 1
    fi
    mkdir -p "$cu/lib/stubs"
    names=$(grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$src/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u)
    count=$(echo "$names" | wc -l)
    {
        echo "/* Link-time stand-in for libcuda.so.1 (scripts/cuda-toolchain.sh): every entry point"
        echo "   cudarc $cudarc_ver declares returns CUDA_ERROR_NO_DEVICE. Not for a GPU machine. */"
        for n in $names; do echo "int $n(void) { return 100; }"; done
    } >"$dir/libcuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$dir/libcuda-stub.c"
    ln -sf libcuda.so "$cu/lib/stubs/libcuda.so.1"
    echo "driver stand-in: $cu/lib/stubs/libcuda.so ($count entry points of cudarc $cudarc_ver)" >&2
    "$cu/bin/nvcc" --version | tail -2 >&2
fi

cu=$(cu_home)
cat <<EOF
export CUDA_HOME="$cu"
export CUDA_PATH="$cu"
export PATH="$cu/bin:\$PATH"
export CUDA_COMPUTE_CAP=$cap
export LIBRARY_PATH="$cu/lib:$cu/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
if [ $env_only -eq 0 ]; then
    cat >&2 <<EOF
# then: cargo build --release --features cuda
# (to start the binary here, where there is no GPU: LD_LIBRARY_PATH=$cu/lib:$cu/lib/stubs; it
#  then refuses cuda devices with CUDA_ERROR_NO_DEVICE)
EOF
fi
