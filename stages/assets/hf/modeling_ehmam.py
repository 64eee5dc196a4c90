"""The EH-MAM encoder (a data2vec 2.0 encoder) in PyTorch, for models exported by ehmam.

`transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads it from an
`ehmam export` directory. It is ehmam's own forward pass written again in PyTorch, and tested
against it (ehmam's `stages/tests/export_hf.rs`):

- front-end: the CNN feature encoder over 16 kHz waveforms (each normalised to zero mean and unit
  variance over its own samples, eps 1e-5; Conv1d without bias -> LayerNorm over channels -> GELU
  per layer), or Kaldi fbank computed here from the waveform with the run's options
  (torchaudio.compliance.kaldi.fbank), normalised per utterance and stacked; then LayerNorm and a
  linear projection (`feature_projection`);
- positional convolution: `pos_conv_depth` grouped Conv1d layers (same length), each followed by
  a LayerNorm without affine and GELU, added to the frames; then LayerNorm (`encoder.layer_norm`);
- post-LN transformer blocks with ALiBi: the attention bias is `-|i - j| * slope_h *
  relu(alibi_scale_h)` with the usual slopes and the learned per-head scales; exact GELU.

Padding is exact: with `attention_mask` (1 for real samples), each utterance of a padded batch gives
the frames it gives alone (padded frames are masked out of the attention as keys, zeroed before
every positional convolution, and returned as zeros).

`forward(input_values, attention_mask=None, output_hidden_states=False)` returns
`last_hidden_state` `[B, T, D]` and, when asked, `hidden_states`: the encoder's input (after the
positional convolution and its LayerNorm) followed by every block's output, `num_hidden_layers + 1`
tensors as wav2vec 2.0 gives them (SUPERB's weighted sum reads these). `input_features` (`[B, T, F]`
precomputed fbank features, with a frame-level `attention_mask`) skips the fbank computation.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

try:
    from .configuration_ehmam import EhmamConfig
except ImportError:  # loaded as a plain module (s3prl_upstream.py)
    from configuration_ehmam import EhmamConfig


def alibi_slopes(h):
    """ALiBi slopes for h heads (the usual rule for head counts that are not powers of two)."""

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if h & (h - 1) == 0:
        return pow2(h)
    p = 1 << (h.bit_length() - 1)
    return pow2(p) + pow2(2 * p)[0::2][: h - p]


class ConvLayer(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride, eps):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False)
        self.layer_norm = nn.LayerNorm(c_out, eps=eps)

    def forward(self, x):  # [B, C, N]
        x = self.conv(x)
        x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    """The CNN over waveforms: [B, N] -> [B, T, C]."""

    def __init__(self, config):
        super().__init__()
        layers, c_in = [], 1
        for c, k, s in config.conv_layers:
            layers.append(ConvLayer(c_in, c, k, s, config.layer_norm_eps))
            c_in = c
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, x):
        h = x.unsqueeze(1)
        for layer in self.conv_layers:
            h = layer(h)
        return h.transpose(1, 2)


class FeatureProjection(nn.Module):
    def __init__(self, c_in, d, eps):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_in, eps=eps)
        self.projection = nn.Linear(c_in, d)

    def forward(self, x):
        return self.projection(self.layer_norm(x))


class PosConvLayer(nn.Module):
    def __init__(self, d, kernel, groups):
        super().__init__()
        self.conv = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=groups)


class PosConv(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.layers = nn.ModuleList(
            PosConvLayer(d, config.pos_conv_kernel, config.pos_conv_groups) for _ in range(config.pos_conv_depth)
        )
        self.eps = config.layer_norm_eps

    def forward(self, x, keep):  # x [B, T, D], keep [B, T, 1]
        t = x.shape[1]
        h = x
        for layer in self.layers:
            h = layer.conv((h * keep).transpose(1, 2)).transpose(1, 2)[:, :t]  # even kernels: drop the extra frame
            h = F.gelu(F.layer_norm(h, (h.shape[-1],), eps=self.eps))
        return h


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, bias):
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        q = self.q_proj(x).view(b, t, h, dh).transpose(1, 2)
        k = self.k_proj(x).view(b, t, h, dh).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, dh).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh)) + bias
        att = torch.softmax(scores, dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.intermediate_dense = nn.Linear(d, ffn)
        self.output_dense = nn.Linear(ffn, d)

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class Layer(nn.Module):
    """Post-LN block: LN(x + attn(x)), then LN(h + ffn(h))."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.attention = Attention(d, config.num_attention_heads)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(d, config.intermediate_size)
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x, bias):
        h = self.layer_norm(x + self.attention(x, bias))
        return self.final_layer_norm(h + self.feed_forward(h))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pos_conv_embed = PosConv(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.alibi_scale = nn.Parameter(torch.ones(config.num_attention_heads))
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        # Not a buffer: transformers builds the module on the meta device and loads only what the
        # checkpoint holds, so the slopes are made where they are used.
        self.heads = config.num_attention_heads

    def forward(self, z, frame_mask, output_hidden_states):
        b, t, _ = z.shape
        keep = frame_mask.unsqueeze(-1).to(z.dtype)
        x = self.layer_norm(z + self.pos_conv_embed(z, keep))
        pos = torch.arange(t, device=z.device, dtype=torch.float32)
        dist = (pos.view(t, 1) - pos.view(1, t)).abs()
        slopes = torch.tensor(alibi_slopes(self.heads), dtype=torch.float32, device=z.device)
        m = (slopes * F.relu(self.alibi_scale.float())).view(1, -1, 1, 1)
        bias = -(dist.view(1, 1, t, t) * m)
        # Padded frames are no key of any query.
        bias = bias.masked_fill(~frame_mask.view(b, 1, 1, t), torch.finfo(torch.float32).min).to(z.dtype)
        hidden = [x * keep]
        for layer in self.layers:
            x = layer(x, bias)
            hidden.append(x * keep)
        return hidden


class EhmamPreTrainedModel(PreTrainedModel):
    config_class = EhmamConfig
    base_model_prefix = "ehmam"
    main_input_name = "input_values"

    def _init_weights(self, module):
        pass  # weights come from the export


class EhmamModel(EhmamPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        d = config.hidden_size
        if config.frontend == "cnn":
            self.feature_extractor = FeatureExtractor(config)
            c_in = config.conv_layers[-1][0]
        else:
            c_in = config.input_dim
        self.feature_projection = FeatureProjection(c_in, d, config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_init()

    # -- lengths ---------------------------------------------------------------------------------
    def frames_for(self, n):
        """Model frames for n input samples (an int or a LongTensor)."""
        c = self.config
        if c.frontend == "cnn":
            for _, k, s in c.conv_layers:
                n = torch.clamp(torch.div(n - k, s, rounding_mode="floor") + 1, min=0) if torch.is_tensor(n) else max(0, (n - k) // s + 1)
            return n
        fb = c.fbank or {}
        shift = int(round(c.sampling_rate * fb.get("frame_shift", 10.0) / 1000.0))
        length = int(round(c.sampling_rate * fb.get("frame_length", 25.0) / 1000.0))
        stack = fb.get("stack", 2)
        if torch.is_tensor(n):
            f = torch.clamp(torch.div(n - length, shift, rounding_mode="floor") + 1, min=0)
            return torch.div(f, stack, rounding_mode="floor")
        return max(0, (n - length) // shift + 1) // stack

    # -- front-ends ------------------------------------------------------------------------------
    def _normalise(self, wav, lengths):
        """Zero mean, unit variance over each utterance's own samples (population variance)."""
        out = torch.zeros_like(wav)
        for i, n in enumerate(lengths.tolist()):
            x = wav[i, :n].double()
            mean = x.mean()
            var = ((x - mean) ** 2).mean()
            out[i, :n] = ((x - mean) / torch.sqrt(var + self.config.waveform_norm_eps)).to(wav.dtype)
        return out

    def _fbank(self, wav, lengths):
        """Kaldi fbank of each utterance (torchaudio), normalised per utterance, stacked: [B, T, F]."""
        import torchaudio

        fb = dict(self.config.fbank or {})
        normalize = fb.pop("normalize", "utterance")
        stack = fb.pop("stack", 2)
        scale = fb.pop("input_scale", 32768.0)
        feats = []
        for i, n in enumerate(lengths.tolist()):
            x = wav[i, :n].float().unsqueeze(0) * scale
            f = torchaudio.compliance.kaldi.fbank(x, sample_frequency=float(self.config.sampling_rate), **fb)
            if normalize == "utterance" and f.shape[0] > 0:
                d = f.double()
                mean = d.mean(dim=0, keepdim=True)
                var = ((d * d).mean(dim=0, keepdim=True) - mean * mean).clamp(min=0.0)
                f = ((d - mean) / torch.sqrt(var + 1e-10)).float()
            t = f.shape[0] // stack
            feats.append(f[: t * stack].reshape(t, -1))
        t_max = max([f.shape[0] for f in feats] + [0])
        out = wav.new_zeros(len(feats), t_max, self.config.input_dim)
        for i, f in enumerate(feats):
            out[i, : f.shape[0]] = f.to(out.dtype)
        return out, torch.tensor([f.shape[0] for f in feats], device=wav.device)

    def forward(
        self,
        input_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        input_features: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        output_hidden_states = bool(output_hidden_states)
        return_dict = True if return_dict is None else return_dict
        if input_features is not None:
            x = input_features
            b, t = x.shape[:2]
            frames = attention_mask.sum(-1).long() if attention_mask is not None else torch.full((b,), t, device=x.device)
        else:
            wav = input_values
            if wav.dim() == 3:
                wav = wav.squeeze(-1)
            b, n = wav.shape
            lengths = attention_mask.sum(-1).long() if attention_mask is not None else torch.full((b,), n, device=wav.device)
            if self.config.frontend == "cnn":
                x = self.feature_extractor(self._normalise(wav, lengths))
                frames = self.frames_for(lengths)
            else:
                x, frames = self._fbank(wav, lengths)
        t = x.shape[1]
        frame_mask = torch.arange(t, device=x.device).view(1, t) < frames.view(-1, 1)
        z = self.feature_projection(x)
        hidden = self.encoder(z, frame_mask, output_hidden_states)
        if not return_dict:
            return (hidden[-1], tuple(hidden) if output_hidden_states else None)
        return BaseModelOutput(last_hidden_state=hidden[-1], hidden_states=tuple(hidden) if output_hidden_states else None)


EhmamModel.register_for_auto_class("AutoModel")
EhmamConfig.register_for_auto_class()
