#!/usr/bin/env bash
# Installs the reference tools the benchmarks compare against (none is needed to build or test):
# kaldi-native-fbank (benches/fbank.rs), duckdb and pyarrow (benches/logs.rs), torch
# (benches/train.rs runs benches/train_reference.py). ffmpeg (benches/prep.rs) comes from Debian:
# apt-get install ffmpeg.
# torch: PyPI's Linux wheel of 2.15 is the CUDA build and pulls the nvidia-* CUDA 13 libraries and
# triton with it (the benchmark uses the CPU only). Measured here: several GB to download and
# 5.3 GB installed (torch 1.2 GB, nvidia-* 3.0 GB, triton 1.0 GB); the install took a few
# minutes.
set -euo pipefail
python3 -m pip install --quiet --upgrade "kaldi-native-fbank==1.23.*" "duckdb==2.0.*" "pyarrow>=20" "torch==2.15.*"
python3 -c "import duckdb, pyarrow, kaldi_native_fbank, torch; print('duckdb', duckdb.__version__, 'pyarrow', pyarrow.__version__, 'torch', torch.__version__)"
