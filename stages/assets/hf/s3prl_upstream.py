"""s3prl upstream for an EH-MAM encoder exported by ehmam (`ehmam export RUN_DIR --out DIR`).

s3prl's contract: `UpstreamExpert(ckpt, model_config=None, **kwargs)`, `get_downsample_rates(key)`
and `forward(wavs)` over a list of 1-D 16 kHz waveforms, returning `hidden_states` (the encoder's
input and every block's output, each `[B, T, D]`) and `last_hidden_state`. `ckpt` is the export
directory (this file's own directory when it is empty). Utterances of different lengths are padded
and masked: each gives the frames it gives alone.

In s3prl, copy this file to `s3prl/upstream/ehmam/expert.py` (and a `hubconf.py` there with
`def ehmam_local(ckpt, *args, **kwargs): return _UpstreamExpert(ckpt, *args, **kwargs)`), then
`python3 run_downstream.py -m train -u ehmam_local -k /path/to/export -d TASK -n NAME`.
"""

import os
import sys

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(ckpt):
    path = ckpt if ckpt and os.path.isdir(ckpt) else _HERE
    if path not in sys.path:
        sys.path.insert(0, path)
    from modeling_ehmam import EhmamModel  # the export's own module, beside its weights

    return EhmamModel.from_pretrained(path).eval()


class UpstreamExpert(nn.Module):
    def __init__(self, ckpt=None, model_config=None, **kwargs):
        super().__init__()
        self.model = _load(ckpt)
        c = self.model.config
        if c.frontend == "cnn":
            rate = 1
            for _, _, s in c.conv_layers:
                rate *= s
        else:
            fb = c.fbank or {}
            rate = int(round(c.sampling_rate * fb.get("frame_shift", 10.0) / 1000.0)) * fb.get("stack", 2)
        self.rate = rate

    def get_downsample_rates(self, key: str) -> int:
        return self.rate

    def forward(self, wavs):
        device = wavs[0].device
        lengths = torch.tensor([len(w) for w in wavs], device=device)
        padded = pad_sequence(wavs, batch_first=True)
        mask = torch.arange(padded.shape[1], device=device).view(1, -1) < lengths.view(-1, 1)
        out = self.model(padded, attention_mask=mask.long(), output_hidden_states=True)
        return {"hidden_states": list(out.hidden_states), "last_hidden_state": out.last_hidden_state}
