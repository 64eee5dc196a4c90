#!/usr/bin/env bash
# Installs the reference tools the benchmarks compare against (none is needed to build or test):
# kaldi-native-fbank (benches/fbank.rs), duckdb and pyarrow (benches/logs.rs). ffmpeg (benches/prep.rs)
# comes from Debian: apt-get install ffmpeg.
set -euo pipefail
python3 -m pip install --quiet --upgrade "kaldi-native-fbank==1.23.*" "duckdb==2.0.*" "pyarrow>=20"
python3 -c "import duckdb, pyarrow, kaldi_native_fbank; print('duckdb', duckdb.__version__, 'pyarrow', pyarrow.__version__)"
