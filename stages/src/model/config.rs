//! The EH-MAM model (data2vec 2.0 encoder with a loss predictor), following
//! `../shared/docs/method.md` §1–§2 and §7 (paper: arXiv 2410.13179, "EH-MAM"; reference code:
//! `cs20s030/ehmam`, a fork of fairseq's `examples/data2vec`).
//!
//! Weights live in a flat map `name → Tensor` (student: the tensors of `Var`s, so gradients flow;
//! teacher: plain EMA tensors). The forward functions read the map, so one implementation serves
//! student and teacher, any dtype (f64 for gradient checks) and any device. Initialisation is
//! drawn on the host from a seeded ChaCha stream (candle's own random init is not seedable on CPU),
//! so a seed gives the same model on every run.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Result<T> = candle_core::Result<T>;
/// Model weights by name.
pub type Weights = BTreeMap<String, Tensor>;

/// Which front-end turns the batch's features into frames (method §1.2, §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendKind {
    /// Stacked log-mel frames (`features.fbank`, 50 Hz): LayerNorm → Linear (method §7).
    Fbank,
    /// Normalised waveform (`features.waveform`): the CNN feature encoder, LayerNorm → Linear (§2.1–2.2).
    Cnn,
}

/// Front-end sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontendConfig {
    pub kind: FrontendKind,
    /// Feature dimension of the input (fbank: 160 for 80 bins stacked by 2; cnn: 1).
    pub input_dim: usize,
    /// CNN layers as `[channels, kernel, stride]` (cnn only).
    pub conv_layers: Vec<[usize; 3]>,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            kind: FrontendKind::Fbank,
            input_dim: 160,
            conv_layers: base_cnn(),
        }
    }
}

fn base_cnn() -> Vec<[usize; 3]> {
    let mut v = vec![[512, 10, 5]];
    v.extend(std::iter::repeat_n([512, 3, 2], 4));
    v.extend(std::iter::repeat_n([512, 2, 2], 2));
    v
}

/// Transformer encoder sizes (§2.3–2.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: usize,
    /// Targets average the FFN outputs of the last `top_k` blocks (§1.3).
    pub top_k: usize,
    pub pos_conv_depth: usize,
    pub pos_conv_kernel: usize,
    pub pos_conv_groups: usize,
    /// Dropout after the input LayerNorm, on attention output and FFN output (student only).
    pub dropout: f64,
    /// Dropout on attention probabilities (student only).
    pub attention_dropout: f64,
    /// Probability that a block is skipped for a whole batch (student only).
    pub layerdrop: f64,
    /// Dropout after the FFN's activation (GELU), wav2vec 2.0's `activation_dropout`; 0 in
    /// pre-training (the method has none), set by fine-tuning.
    pub activation_dropout: f64,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            dim: 128,
            layers: 4,
            heads: 4,
            ffn: 512,
            top_k: 3,
            pos_conv_depth: 2,
            pos_conv_kernel: 9,
            pos_conv_groups: 4,
            dropout: 0.1,
            attention_dropout: 0.1,
            layerdrop: 0.0,
            activation_dropout: 0.0,
        }
    }
}

/// Decoder / loss-predictor sizes (§2.6–2.7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    pub dim: usize,
    pub layers: usize,
    pub kernel: usize,
    pub groups: usize,
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            dim: 64,
            layers: 2,
            kernel: 7,
            groups: 8,
        }
    }
}

/// The spec's `model:` block. `preset: tiny` (default; method §7) or `base` (§2, 94.4 M
/// parameters with the CNN front-end) fills every field; keys given beside it override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub preset: String,
    pub frontend: FrontendConfig,
    pub encoder: EncoderConfig,
    pub decoder: HeadConfig,
    pub loss_predictor: HeadConfig,
    /// Dropout on the student's encoder output before each head (§1.6).
    pub head_input_dropout: f64,
    /// Std of the noise tokens at masked positions in the heads (§1.6).
    pub mask_noise_std: f64,
    /// Code quirk of §1.6: the predictor's visible frames go through the decoder's dropout too.
    pub pred_double_dropout: bool,
    /// Target layers (§1.3, §8): false (default) takes each block's FFN output before dropout,
    /// residual and LN2 (`end_of_block_targets: false` in the code); true the block's output.
    pub end_of_block_targets: bool,
    /// What the teacher's loss predictor reads (§1.4, §10 #5): `targets` (the code, default) or
    /// `last_layer` (the paper's `d(f_θt(Z))`: the last block's output).
    pub teacher_pred_input: TeacherPredInput,
    /// Compute precision of the forward and backward passes: `f32` (default), `bf16` or `f16`.
    /// Weights, AdamW moments, the EMA teacher, norms, softmax and the losses stay in f32 (master
    /// weights, as PyTorch's autocast and fairseq's `--fp16`/`--bf16`); matmuls, convolutions,
    /// GELU and the activations between them run in the chosen type. `f16` trains with dynamic
    /// loss scaling (`student.with.fp16_init_scale`, `fp16_scale_window`, `min_loss_scale`).
    pub dtype: ComputeDType,
}

/// The `model.dtype` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ComputeDType {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDType::F32 => candle_core::DType::F32,
            ComputeDType::Bf16 => candle_core::DType::BF16,
            ComputeDType::F16 => candle_core::DType::F16,
        }
    }
}

/// Input of the teacher's loss predictor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherPredInput {
    /// The averaged, instance-normalised targets `y` (the reference code).
    #[default]
    Targets,
    /// The output of the last teacher block (the paper's equation).
    LastLayer,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::tiny()
    }
}

impl ModelConfig {
    /// Method §7: D = 128, 4 heads, FFN 512, 4 post-LN blocks, targets from the top 3, heads of
    /// dim 64, fbank front-end.
    pub fn tiny() -> Self {
        ModelConfig {
            preset: "tiny".into(),
            frontend: FrontendConfig::default(),
            encoder: EncoderConfig::default(),
            decoder: HeadConfig::default(),
            loss_predictor: HeadConfig::default(),
            head_input_dropout: 0.1,
            mask_noise_std: 0.01,
            pred_double_dropout: false,
            end_of_block_targets: false,
            teacher_pred_input: TeacherPredInput::Targets,
            dtype: ComputeDType::F32,
        }
    }

    /// Method §2: the paper's base model with the CNN front-end.
    pub fn base() -> Self {
        ModelConfig {
            preset: "base".into(),
            frontend: FrontendConfig {
                kind: FrontendKind::Cnn,
                input_dim: 1,
                conv_layers: base_cnn(),
            },
            encoder: EncoderConfig {
                dim: 768,
                layers: 12,
                heads: 12,
                ffn: 3072,
                top_k: 8,
                pos_conv_depth: 5,
                pos_conv_kernel: 19,
                pos_conv_groups: 16,
                dropout: 0.1,
                attention_dropout: 0.1,
                layerdrop: 0.05,
                activation_dropout: 0.0,
            },
            decoder: HeadConfig {
                dim: 384,
                layers: 4,
                kernel: 7,
                groups: 16,
            },
            loss_predictor: HeadConfig {
                dim: 384,
                layers: 4,
                kernel: 7,
                groups: 16,
            },
            head_input_dropout: 0.1,
            mask_noise_std: 0.01,
            pred_double_dropout: false,
            end_of_block_targets: false,
            teacher_pred_input: TeacherPredInput::Targets,
            dtype: ComputeDType::F32,
        }
    }

    /// Reads the `model:` block (absent: the tiny preset). Errors carry paths from the spec's top.
    pub fn from_spec(
        v: Option<&serde_yaml::Value>,
    ) -> std::result::Result<ModelConfig, Vec<(String, String)>> {
        let empty = serde_yaml::Value::Mapping(Default::default());
        let v = v.unwrap_or(&empty);
        let serde_yaml::Value::Mapping(m) = v else {
            return Err(vec![("model".into(), "must be a mapping".into())]);
        };
        let preset = match m.get("preset") {
            None => ModelConfig::tiny(),
            Some(serde_yaml::Value::String(s)) if s == "tiny" => ModelConfig::tiny(),
            Some(serde_yaml::Value::String(s)) if s == "base" => ModelConfig::base(),
            Some(other) => {
                return Err(vec![(
                    "model.preset".into(),
                    format!(
                        "must be `tiny` or `base`, got {}",
                        crate::model::yaml_brief(other)
                    ),
                )])
            }
        };
        let preset_value =
            serde_yaml::to_value(&preset).map_err(|e| vec![("model".into(), e.to_string())])?;
        // The spec's own deep merge (`extends:`): a `null` removes a key, which takes its default.
        let mut merged = pipeline::spec::merge(preset_value.clone(), v.clone());
        // Every mistyped or unknown field: report it, put the preset's value (or nothing) in its
        // place and read again, so that one pass reports them all.
        let mut errs: Vec<(String, String)> = Vec::new();
        let cfg = loop {
            match serde_path_to_error::deserialize::<_, ModelConfig>(merged.clone()) {
                Ok(cfg) => break Some(cfg),
                Err(e) => {
                    let p = e.path().to_string();
                    let path = if p == "." || p.is_empty() {
                        "model".to_string()
                    } else {
                        format!("model.{p}")
                    };
                    errs.push((path, e.inner().to_string()));
                    let segs: Vec<String> = e
                        .path()
                        .iter()
                        .filter_map(|s| match s {
                            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                            serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                            _ => None,
                        })
                        .collect();
                    if errs.len() > 64
                        || segs.is_empty()
                        || !replace_at(&mut merged, &preset_value, &segs)
                    {
                        break None;
                    }
                }
            }
        };
        let reported: Vec<String> = errs.iter().map(|(p, _)| p.clone()).collect();
        if let Some(cfg) = &cfg {
            // Consistency checks over what was readable, except on fields already reported.
            errs.extend(cfg.check().into_iter().filter(|(p, _)| {
                !reported
                    .iter()
                    .any(|r| r == p || p.starts_with(&format!("{r}.")))
            }));
        }
        match cfg {
            Some(cfg) if errs.is_empty() => Ok(cfg),
            _ => Err(errs),
        }
    }

    /// Size and consistency checks, every problem reported.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut e = Vec::new();
        let mut need = |ok: bool, path: &str, msg: String| {
            if !ok {
                e.push((format!("model.{path}"), msg));
            }
        };
        let enc = &self.encoder;
        need(enc.dim > 0, "encoder.dim", "must be at least 1".into());
        need(
            enc.layers > 0,
            "encoder.layers",
            "must be at least 1".into(),
        );
        need(
            enc.heads > 0 && enc.dim % enc.heads.max(1) == 0,
            "encoder.heads",
            format!("must divide encoder.dim ({}), got {}", enc.dim, enc.heads),
        );
        need(enc.ffn > 0, "encoder.ffn", "must be at least 1".into());
        need(
            enc.top_k >= 1 && enc.top_k <= enc.layers,
            "encoder.top_k",
            format!(
                "must be in 1..={} (encoder.layers), got {}",
                enc.layers, enc.top_k
            ),
        );
        need(
            enc.pos_conv_kernel >= 1,
            "encoder.pos_conv_kernel",
            "must be at least 1".into(),
        );
        need(
            enc.pos_conv_groups >= 1 && enc.dim % enc.pos_conv_groups.max(1) == 0,
            "encoder.pos_conv_groups",
            format!(
                "must divide encoder.dim ({}), got {}",
                enc.dim, enc.pos_conv_groups
            ),
        );
        for (name, p) in [
            ("encoder.dropout", enc.dropout),
            ("encoder.attention_dropout", enc.attention_dropout),
            ("encoder.layerdrop", enc.layerdrop),
            ("encoder.activation_dropout", enc.activation_dropout),
            ("head_input_dropout", self.head_input_dropout),
        ] {
            need(
                (0.0..1.0).contains(&p),
                name,
                format!("must be in [0, 1), got {p}"),
            );
        }
        need(
            self.mask_noise_std >= 0.0 && self.mask_noise_std.is_finite(),
            "mask_noise_std",
            format!("must be ≥ 0, got {}", self.mask_noise_std),
        );
        for (name, h) in [
            ("decoder", &self.decoder),
            ("loss_predictor", &self.loss_predictor),
        ] {
            need(
                h.dim >= 1,
                &format!("{name}.dim"),
                "must be at least 1".into(),
            );
            need(
                h.layers >= 1,
                &format!("{name}.layers"),
                "must be at least 1".into(),
            );
            need(
                h.kernel >= 1 && h.kernel % 2 == 1,
                &format!("{name}.kernel"),
                format!("must be odd (length-preserving padding), got {}", h.kernel),
            );
            need(
                h.groups >= 1 && h.dim % h.groups.max(1) == 0 && enc.dim % h.groups.max(1) == 0,
                &format!("{name}.groups"),
                format!(
                    "must divide {name}.dim ({}) and encoder.dim ({}), got {}",
                    h.dim, enc.dim, h.groups
                ),
            );
        }
        match self.frontend.kind {
            FrontendKind::Fbank => need(
                self.frontend.input_dim >= 1,
                "frontend.input_dim",
                "must be at least 1".into(),
            ),
            FrontendKind::Cnn => {
                need(
                    !self.frontend.conv_layers.is_empty(),
                    "frontend.conv_layers",
                    "needs at least one layer".into(),
                );
                for (i, l) in self.frontend.conv_layers.iter().enumerate() {
                    need(
                        l.iter().all(|&x| x >= 1),
                        &format!("frontend.conv_layers.{i}"),
                        format!("channels, kernel and stride must be ≥ 1, got {l:?}"),
                    );
                }
                need(
                    self.frontend.input_dim == 1,
                    "frontend.input_dim",
                    format!(
                        "the CNN front-end reads waveforms (features.waveform, dim 1), got {}",
                        self.frontend.input_dim
                    ),
                );
            }
        }
        e
    }

    /// Feature dimension the front-end expects from the batches.
    pub fn input_dim(&self) -> usize {
        self.frontend.input_dim
    }

    /// Model frames for `n` input frames (the CNN's `floor((n − k)/s) + 1` per layer).
    pub fn frames_for(&self, n: usize) -> usize {
        match self.frontend.kind {
            FrontendKind::Fbank => n,
            FrontendKind::Cnn => self.frontend.conv_layers.iter().fold(n, |n, l| {
                if n < l[1] {
                    0
                } else {
                    (n - l[1]) / l[2] + 1
                }
            }),
        }
    }

    /// Input frames per model frame (1 for fbank, 320 for the base CNN).
    pub fn stride(&self) -> usize {
        match self.frontend.kind {
            FrontendKind::Fbank => 1,
            FrontendKind::Cnn => self.frontend.conv_layers.iter().map(|l| l[2]).product(),
        }
    }
}

pub(crate) fn yaml_brief(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Puts `preset`'s value at `path` into `v` (or removes the key where the preset has none).
/// False when nothing could be changed.
fn replace_at(v: &mut serde_yaml::Value, preset: &serde_yaml::Value, path: &[String]) -> bool {
    use serde_yaml::Value;
    let Some((head, rest)) = path.split_first() else {
        return false;
    };
    let sub = |p: &Value| -> Option<Value> {
        match p {
            Value::Mapping(m) => m.get(head.as_str()).cloned(),
            Value::Sequence(s) => head.parse::<usize>().ok().and_then(|i| s.get(i).cloned()),
            _ => None,
        }
    };
    let pre = sub(preset);
    match v {
        Value::Mapping(m) => {
            let key = Value::String(head.clone());
            if rest.is_empty() {
                return match pre {
                    Some(p) => {
                        m.insert(key, p);
                        true
                    }
                    None => m.remove(&key).is_some(),
                };
            }
            match m.get_mut(&key) {
                Some(child) => replace_at(child, pre.as_ref().unwrap_or(&Value::Null), rest),
                None => false,
            }
        }
        Value::Sequence(s) => {
            let Some(i) = head.parse::<usize>().ok().filter(|&i| i < s.len()) else {
                return false;
            };
            if rest.is_empty() {
                match pre {
                    Some(p) => s[i] = p,
                    None => {
                        s.remove(i);
                    }
                }
                return true;
            }
            replace_at(&mut s[i], pre.as_ref().unwrap_or(&Value::Null), rest)
        }
        _ => false,
    }
}
