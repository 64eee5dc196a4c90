"""Configuration of an EH-MAM encoder exported by ehmam (`ehmam export RUN_DIR --out DIR`).

Loaded by `transformers.AutoConfig.from_pretrained(DIR, trust_remote_code=True)`. The fields are
those of the run's `model:` block (kept whole under `ehmam_model`) in the names Hugging Face
models use, plus what the input must be (`frontend`, `sampling_rate`, `fbank`) and where the
weights came from (`ehmam_step`, `ehmam_weights`, `frame_rate`).
"""

from transformers import PretrainedConfig


class EhmamConfig(PretrainedConfig):
    model_type = "ehmam"

    def __init__(
        self,
        frontend="cnn",
        input_dim=1,
        conv_layers=None,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        pos_conv_depth=5,
        pos_conv_kernel=19,
        pos_conv_groups=16,
        layer_norm_eps=1e-5,
        sampling_rate=16000,
        waveform_norm_eps=1e-5,
        fbank=None,
        frame_rate=50.0,
        ehmam_model=None,
        ehmam_step=None,
        ehmam_weights="student",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.frontend = frontend
        self.input_dim = input_dim
        self.conv_layers = conv_layers or [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.pos_conv_depth = pos_conv_depth
        self.pos_conv_kernel = pos_conv_kernel
        self.pos_conv_groups = pos_conv_groups
        self.layer_norm_eps = layer_norm_eps
        self.sampling_rate = sampling_rate
        self.waveform_norm_eps = waveform_norm_eps
        # For `frontend: fbank`: torchaudio.compliance.kaldi.fbank's options, then `normalize`
        # ("utterance" or "none") and `stack` (frames stacked into one).
        self.fbank = fbank
        self.frame_rate = frame_rate
        self.ehmam_model = ehmam_model
        self.ehmam_step = ehmam_step
        self.ehmam_weights = ehmam_weights
