#!/usr/bin/env python3
"""The other half of tests/export_hf.rs: loads an `ehmam export --format hf` directory with nothing
but torch, torchaudio and transformers, runs it on the utterances in INPUTS (a safetensors file the
Rust test wrote: `wav.N` 16 kHz waveforms, `ref.N.K` ehmam's own hidden state K of utterance N
computed alone, `feat.N` ehmam's fbank features of utterance N for fbank models) and prints one
JSON line of maximum absolute differences against ehmam's:

  batch       all utterances in one padded batch (attention_mask), waveform input, every hidden state
  alone       each utterance alone, waveform input
  padding     the padded batch against each utterance alone (the module against itself)
  features    fbank models: ehmam's own fbank features fed as input_features (padded batch)
  s3prl       s3prl_upstream.UpstreamExpert over the list of waveforms
  auto        AutoModel.from_pretrained(DIR, trust_remote_code=True) was used (bool)

  python3 tests/export_hf_check.py EXPORT_DIR INPUTS
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel


def main():
    export, inputs = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    data = load_file(inputs)
    n = len([k for k in data if k.startswith("wav.")])
    wavs = [data[f"wav.{i}"].float() for i in range(n)]
    refs = [[data[f"ref.{i}.{k}"] for k in range(len([x for x in data if x.startswith(f"ref.{i}.")]))] for i in range(n)]
    cfg = AutoConfig.from_pretrained(export, trust_remote_code=True)
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    out = {"auto": type(model).__name__ == "EhmamModel", "model_type": cfg.model_type, "parameters": sum(p.numel() for p in model.parameters())}

    def gap(hidden, i, t=None):
        """Max |module - ehmam| over every hidden state of utterance i (its own frames)."""
        g = 0.0
        assert len(hidden) == len(refs[i]), (len(hidden), len(refs[i]))
        for h, r in zip(hidden, refs[i]):
            tt = r.shape[0]
            g = max(g, (h[:tt] - r).abs().max().item())
            # Frames past the utterance's own are zeros.
            if h.shape[0] > tt:
                g = max(g, h[tt:].abs().max().item())
        return g

    lengths = torch.tensor([len(w) for w in wavs])
    padded = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    mask = (torch.arange(padded.shape[1]).view(1, -1) < lengths.view(-1, 1)).long()
    with torch.no_grad():
        batch = model(padded, attention_mask=mask, output_hidden_states=True)
        alone = [model(w.unsqueeze(0), output_hidden_states=True) for w in wavs]
    out["batch"] = max(gap([h[i] for h in batch.hidden_states], i) for i in range(n))
    # Per hidden state (where a difference starts, when there is one).
    out["per_state"] = [
        max((batch.hidden_states[k][i, : refs[i][k].shape[0]] - refs[i][k]).abs().max().item() for i in range(n))
        for k in range(len(batch.hidden_states))
    ]
    out["alone"] = max(gap([h[0] for h in alone[i].hidden_states], i) for i in range(n))
    out["padding"] = max(
        max((hb[i, : ha.shape[1]] - ha[0]).abs().max().item() for hb, ha in zip(batch.hidden_states, alone[i].hidden_states))
        for i in range(n)
    )
    out["last_is_hidden"] = bool(torch.equal(batch.last_hidden_state, batch.hidden_states[-1]))
    out["frames"] = [r[0].shape[0] for r in refs]
    out["module_frames"] = [int(model.frames_for(len(w))) for w in wavs]
    if cfg.frontend == "fbank":
        feats = [data[f"feat.{i}"] for i in range(n)]
        t = torch.tensor([f.shape[0] for f in feats])
        fp = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
        fmask = (torch.arange(fp.shape[1]).view(1, -1) < t.view(-1, 1)).long()
        with torch.no_grad():
            fo = model(input_features=fp, attention_mask=fmask, output_hidden_states=True)
        out["features"] = max(gap([h[i] for h in fo.hidden_states], i) for i in range(n))
    sys.path.insert(0, export)
    import s3prl_upstream

    up = s3prl_upstream.UpstreamExpert(export)
    with torch.no_grad():
        so = up(wavs)
    out["s3prl"] = max(gap([h[i] for h in so["hidden_states"]], i) for i in range(n))
    out["s3prl_rate"] = up.get_downsample_rates("hidden_states")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
