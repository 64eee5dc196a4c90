#!/usr/bin/env python3
"""Times the reference fbank implementations on the audio the Rust benchmark wrote.

Usage: python3 benches/fbank_reference.py DIR   (DIR holds audio.s16 and lengths.json)
Installs nothing: kaldi-native-fbank and torchaudio are timed when importable, else reported
missing. Prints one JSON object: {name: audio_seconds_per_second or null}, single-threaded.
"""
import json, os, sys, time

d = sys.argv[1]
lengths = json.load(open(os.path.join(d, "lengths.json")))
raw = open(os.path.join(d, "audio.s16"), "rb").read()
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
out = {}
try:
    import numpy as np
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float32)
    utts, o = [], 0
    for n in lengths:
        utts.append(audio[o:o + n]); o += n
    total_s = sum(lengths) / 16000.0
except Exception as e:  # numpy missing
    print(json.dumps({"error": f"numpy: {e}"})); sys.exit(0)

try:
    import kaldi_native_fbank as knf
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 80
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for u in utts:
            fb = knf.OnlineFbank(opts)
            fb.accept_waveform(16000, u)
            fb.input_finished()
            # Features are computed in accept_waveform; fetching them frame by frame from
            # Python would time the interpreter, so only the count is read.
            _ = fb.num_frames_ready
        best = min(best, time.perf_counter() - t)
    out["kaldi-native-fbank"] = total_s / best
except ImportError:
    out["kaldi-native-fbank"] = None

try:
    import torch, torchaudio
    torch.set_num_threads(1)
    best = float("inf")
    tu = [torch.from_numpy(u).unsqueeze(0) for u in utts]
    for _ in range(reps):
        t = time.perf_counter()
        for u in tu:
            torchaudio.compliance.kaldi.fbank(u, num_mel_bins=80, dither=0.0)
        best = min(best, time.perf_counter() - t)
    out["torchaudio"] = total_s / best
except ImportError:
    out["torchaudio"] = None
print(json.dumps(out))
