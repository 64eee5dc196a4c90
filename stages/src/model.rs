//! The EH-MAM model (data2vec 2.0 encoder with a loss predictor), following
//! `../shared/docs/method.md` §1–§2 and §7 (paper: arXiv 2410.13179, "EH-MAM"; reference code:
//! `cs20s030/ehmam`, a fork of fairseq's `examples/data2vec`).
//!
//! Weights live in a flat map `name → Tensor` (student: the tensors of `Var`s, so gradients flow;
//! teacher: plain EMA tensors). The forward functions read the map, so one implementation serves
//! student and teacher, any dtype (f64 for gradient checks) and any device. Initialisation is
//! drawn on the host from a seeded ChaCha stream (candle's own random init is not seedable on CPU),
//! so a seed gives the same model on every run.

use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
        FrontendConfig { kind: FrontendKind::Fbank, input_dim: 160, conv_layers: base_cnn() }
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
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig { dim: 128, layers: 4, heads: 4, ffn: 512, top_k: 3, pos_conv_depth: 2, pos_conv_kernel: 9, pos_conv_groups: 4, dropout: 0.1, attention_dropout: 0.1, layerdrop: 0.0 }
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
        HeadConfig { dim: 64, layers: 2, kernel: 7, groups: 8 }
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
        }
    }

    /// Method §2: the paper's base model with the CNN front-end.
    pub fn base() -> Self {
        ModelConfig {
            preset: "base".into(),
            frontend: FrontendConfig { kind: FrontendKind::Cnn, input_dim: 1, conv_layers: base_cnn() },
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
            },
            decoder: HeadConfig { dim: 384, layers: 4, kernel: 7, groups: 16 },
            loss_predictor: HeadConfig { dim: 384, layers: 4, kernel: 7, groups: 16 },
            head_input_dropout: 0.1,
            mask_noise_std: 0.01,
            pred_double_dropout: false,
            end_of_block_targets: false,
            teacher_pred_input: TeacherPredInput::Targets,
        }
    }

    /// Reads the `model:` block (absent: the tiny preset). Errors carry paths from the spec's top.
    pub fn from_spec(v: Option<&serde_yaml::Value>) -> std::result::Result<ModelConfig, Vec<(String, String)>> {
        let empty = serde_yaml::Value::Mapping(Default::default());
        let v = v.unwrap_or(&empty);
        let serde_yaml::Value::Mapping(m) = v else {
            return Err(vec![("model".into(), "must be a mapping".into())]);
        };
        let preset = match m.get("preset") {
            None => ModelConfig::tiny(),
            Some(serde_yaml::Value::String(s)) if s == "tiny" => ModelConfig::tiny(),
            Some(serde_yaml::Value::String(s)) if s == "base" => ModelConfig::base(),
            Some(other) => return Err(vec![("model.preset".into(), format!("must be `tiny` or `base`, got {}", crate::model::yaml_brief(other)))]),
        };
        let preset_value = serde_yaml::to_value(&preset).map_err(|e| vec![("model".into(), e.to_string())])?;
        let mut merged = preset_value.clone();
        merge(&mut merged, v);
        // Every mistyped or unknown field: report it, put the preset's value (or nothing) in its
        // place and read again, so that one pass reports them all.
        let mut errs: Vec<(String, String)> = Vec::new();
        let cfg = loop {
            match serde_path_to_error::deserialize::<_, ModelConfig>(merged.clone()) {
                Ok(cfg) => break Some(cfg),
                Err(e) => {
                    let p = e.path().to_string();
                    let path = if p == "." || p.is_empty() { "model".to_string() } else { format!("model.{p}") };
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
                    if errs.len() > 64 || segs.is_empty() || !replace_at(&mut merged, &preset_value, &segs) {
                        break None;
                    }
                }
            }
        };
        let reported: Vec<String> = errs.iter().map(|(p, _)| p.clone()).collect();
        if let Some(cfg) = &cfg {
            // Consistency checks over what was readable, except on fields already reported.
            errs.extend(cfg.check().into_iter().filter(|(p, _)| !reported.iter().any(|r| r == p || p.starts_with(&format!("{r}.")))));
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
        need(enc.layers > 0, "encoder.layers", "must be at least 1".into());
        need(enc.heads > 0 && enc.dim % enc.heads.max(1) == 0, "encoder.heads", format!("must divide encoder.dim ({}), got {}", enc.dim, enc.heads));
        need(enc.ffn > 0, "encoder.ffn", "must be at least 1".into());
        need(enc.top_k >= 1 && enc.top_k <= enc.layers, "encoder.top_k", format!("must be in 1..={} (encoder.layers), got {}", enc.layers, enc.top_k));
        need(enc.pos_conv_kernel >= 1, "encoder.pos_conv_kernel", "must be at least 1".into());
        need(enc.pos_conv_groups >= 1 && enc.dim % enc.pos_conv_groups.max(1) == 0, "encoder.pos_conv_groups", format!("must divide encoder.dim ({}), got {}", enc.dim, enc.pos_conv_groups));
        for (name, p) in [("encoder.dropout", enc.dropout), ("encoder.attention_dropout", enc.attention_dropout), ("encoder.layerdrop", enc.layerdrop), ("head_input_dropout", self.head_input_dropout)]
        {
            need((0.0..1.0).contains(&p), name, format!("must be in [0, 1), got {p}"));
        }
        need(self.mask_noise_std >= 0.0 && self.mask_noise_std.is_finite(), "mask_noise_std", format!("must be ≥ 0, got {}", self.mask_noise_std));
        for (name, h) in [("decoder", &self.decoder), ("loss_predictor", &self.loss_predictor)] {
            need(h.dim >= 1, &format!("{name}.dim"), "must be at least 1".into());
            need(h.layers >= 1, &format!("{name}.layers"), "must be at least 1".into());
            need(h.kernel >= 1 && h.kernel % 2 == 1, &format!("{name}.kernel"), format!("must be odd (length-preserving padding), got {}", h.kernel));
            need(
                h.groups >= 1 && h.dim % h.groups.max(1) == 0 && enc.dim % h.groups.max(1) == 0,
                &format!("{name}.groups"),
                format!("must divide {name}.dim ({}) and encoder.dim ({}), got {}", h.dim, enc.dim, h.groups),
            );
        }
        match self.frontend.kind {
            FrontendKind::Fbank => need(self.frontend.input_dim >= 1, "frontend.input_dim", "must be at least 1".into()),
            FrontendKind::Cnn => {
                need(!self.frontend.conv_layers.is_empty(), "frontend.conv_layers", "needs at least one layer".into());
                for (i, l) in self.frontend.conv_layers.iter().enumerate() {
                    need(l.iter().all(|&x| x >= 1), &format!("frontend.conv_layers.{i}"), format!("channels, kernel and stride must be ≥ 1, got {l:?}"));
                }
                need(self.frontend.input_dim == 1, "frontend.input_dim", format!("the CNN front-end reads waveforms (features.waveform, dim 1), got {}", self.frontend.input_dim));
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
            FrontendKind::Cnn => self.frontend.conv_layers.iter().fold(n, |n, l| if n < l[1] { 0 } else { (n - l[1]) / l[2] + 1 }),
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
    serde_yaml::to_string(v).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// Puts `preset`'s value at `path` into `v` (or removes the key where the preset has none).
/// False when nothing could be changed.
fn replace_at(v: &mut serde_yaml::Value, preset: &serde_yaml::Value, path: &[String]) -> bool {
    use serde_yaml::Value;
    let Some((head, rest)) = path.split_first() else { return false };
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
            let Some(i) = head.parse::<usize>().ok().filter(|&i| i < s.len()) else { return false };
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

fn merge(base: &mut serde_yaml::Value, over: &serde_yaml::Value) {
    match (base, over) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_mapping() && v.is_mapping() => merge(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters and initialisation (method §2.8)
// ---------------------------------------------------------------------------------------------

enum Init {
    /// N(0, std).
    Normal(f64),
    /// U(−b, b).
    Uniform(f64),
    Const(f64),
}

struct Builder<'a> {
    rng: ChaCha8Rng,
    out: Vec<(String, Vec<usize>, Vec<f64>)>,
    _cfg: &'a ModelConfig,
}

impl Builder<'_> {
    fn add(&mut self, name: String, shape: &[usize], init: Init) {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = match init {
            Init::Const(c) => vec![c; n],
            Init::Uniform(b) => (0..n).map(|_| self.rng.random_range(-b..b)).collect(),
            Init::Normal(s) => (0..n)
                .map(|_| {
                    // Box–Muller on the seeded stream.
                    let u1: f64 = self.rng.random::<f64>().max(1e-300);
                    let u2: f64 = self.rng.random::<f64>();
                    s * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect(),
        };
        self.out.push((name, shape.to_vec(), v));
    }
    /// BERT-style Linear: N(0, 0.02), bias 0.
    fn linear_bert(&mut self, p: &str, i: usize, o: usize) {
        self.add(format!("{p}.weight"), &[o, i], Init::Normal(0.02));
        self.add(format!("{p}.bias"), &[o], Init::Const(0.0));
    }
    /// PyTorch's default Linear: U(±1/√fan_in) for weight and bias.
    fn linear_default(&mut self, p: &str, i: usize, o: usize) {
        let b = 1.0 / (i as f64).sqrt();
        self.add(format!("{p}.weight"), &[o, i], Init::Uniform(b));
        self.add(format!("{p}.bias"), &[o], Init::Uniform(b));
    }
    /// PyTorch's default Conv1d: U(±1/√(in/groups·k)) for weight and bias.
    fn conv_default(&mut self, p: &str, i: usize, o: usize, k: usize, groups: usize) {
        let b = 1.0 / ((i / groups * k) as f64).sqrt();
        self.add(format!("{p}.weight"), &[o, i / groups, k], Init::Uniform(b));
        self.add(format!("{p}.bias"), &[o], Init::Uniform(b));
    }
    fn layer_norm(&mut self, p: &str, d: usize) {
        self.add(format!("{p}.weight"), &[d], Init::Const(1.0));
        self.add(format!("{p}.bias"), &[d], Init::Const(0.0));
    }
    fn head(&mut self, p: &str, h: &HeadConfig, d: usize, predictor: bool) {
        for l in 0..h.layers {
            let i = if l == 0 { d } else { h.dim };
            self.conv_default(&format!("{p}.blocks.{l}.conv"), i, h.dim, h.kernel, h.groups);
        }
        if predictor {
            self.layer_norm(&format!("{p}.ln"), h.dim);
        }
        self.linear_default(&format!("{p}.proj"), h.dim, d);
    }
}

/// Names, shapes and initial values of every parameter, drawn from `seed` (§2.8).
pub fn init_values(cfg: &ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let mut b = Builder { rng: ChaCha8Rng::seed_from_u64(seed), out: Vec::new(), _cfg: cfg };
    let d = cfg.encoder.dim;
    match cfg.frontend.kind {
        FrontendKind::Fbank => {
            b.layer_norm("frontend.ln", cfg.frontend.input_dim);
            b.linear_default("frontend.proj", cfg.frontend.input_dim, d);
        }
        FrontendKind::Cnn => {
            let mut c_in = 1;
            for (i, l) in cfg.frontend.conv_layers.iter().enumerate() {
                // Kaiming normal (fan_in, gain √2); no bias (conv_bias off); LayerNorm after each.
                let std = (2.0 / (c_in * l[1]) as f64).sqrt();
                b.add(format!("frontend.conv.{i}.weight"), &[l[0], c_in, l[1]], Init::Normal(std));
                b.layer_norm(&format!("frontend.conv.{i}.ln"), l[0]);
                c_in = l[0];
            }
            b.layer_norm("frontend.ln", c_in);
            b.linear_default("frontend.proj", c_in, d);
        }
    }
    let e = &cfg.encoder;
    for l in 0..e.pos_conv_depth {
        b.conv_default(&format!("encoder.pos_conv.{l}"), d, d, e.pos_conv_kernel, e.pos_conv_groups);
    }
    b.layer_norm("encoder.ln_in", d);
    b.add("encoder.alibi_scale".into(), &[e.heads], Init::Const(1.0));
    for l in 0..e.layers {
        let p = format!("encoder.blocks.{l}");
        b.linear_bert(&format!("{p}.attn.qkv"), d, 3 * d);
        b.linear_bert(&format!("{p}.attn.proj"), d, d);
        b.layer_norm(&format!("{p}.ln1"), d);
        b.linear_bert(&format!("{p}.fc1"), d, e.ffn);
        b.linear_bert(&format!("{p}.fc2"), e.ffn, d);
        b.layer_norm(&format!("{p}.ln2"), d);
    }
    b.head("decoder", &cfg.decoder, d, false);
    b.head("loss_predictor", &cfg.loss_predictor, d, true);
    b.out
}

/// Initial weights as tensors of `dtype` on `device`.
pub fn init_weights(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Weights> {
    let mut w = Weights::new();
    for (name, shape, v) in init_values(cfg, seed) {
        let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        w.insert(name, t);
    }
    Ok(w)
}

/// Number of parameters (student side: front-end, encoder, decoder, loss predictor).
pub fn parameter_count(cfg: &ModelConfig) -> usize {
    shapes_of(cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// Names and shapes of every parameter, in the order [`init_values`] draws them.
pub fn shapes_of(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    struct Shapes(Vec<(String, Vec<usize>)>);
    impl Shapes {
        fn add(&mut self, n: String, s: &[usize]) {
            self.0.push((n, s.to_vec()));
        }
    }
    let mut s = Shapes(Vec::new());
    let d = cfg.encoder.dim;
    let ln = |s: &mut Shapes, p: &str, n: usize| {
        s.add(format!("{p}.weight"), &[n]);
        s.add(format!("{p}.bias"), &[n]);
    };
    let lin = |s: &mut Shapes, p: &str, i: usize, o: usize| {
        s.add(format!("{p}.weight"), &[o, i]);
        s.add(format!("{p}.bias"), &[o]);
    };
    match cfg.frontend.kind {
        FrontendKind::Fbank => {
            ln(&mut s, "frontend.ln", cfg.frontend.input_dim);
            lin(&mut s, "frontend.proj", cfg.frontend.input_dim, d);
        }
        FrontendKind::Cnn => {
            let mut c_in = 1;
            for (i, l) in cfg.frontend.conv_layers.iter().enumerate() {
                s.add(format!("frontend.conv.{i}.weight"), &[l[0], c_in, l[1]]);
                ln(&mut s, &format!("frontend.conv.{i}.ln"), l[0]);
                c_in = l[0];
            }
            ln(&mut s, "frontend.ln", c_in);
            lin(&mut s, "frontend.proj", c_in, d);
        }
    }
    let e = &cfg.encoder;
    for l in 0..e.pos_conv_depth {
        s.add(format!("encoder.pos_conv.{l}.weight"), &[d, d / e.pos_conv_groups, e.pos_conv_kernel]);
        s.add(format!("encoder.pos_conv.{l}.bias"), &[d]);
    }
    ln(&mut s, "encoder.ln_in", d);
    s.add("encoder.alibi_scale".into(), &[e.heads]);
    for l in 0..e.layers {
        let p = format!("encoder.blocks.{l}");
        lin(&mut s, &format!("{p}.attn.qkv"), d, 3 * d);
        lin(&mut s, &format!("{p}.attn.proj"), d, d);
        ln(&mut s, &format!("{p}.ln1"), d);
        lin(&mut s, &format!("{p}.fc1"), d, e.ffn);
        lin(&mut s, &format!("{p}.fc2"), e.ffn, d);
        ln(&mut s, &format!("{p}.ln2"), d);
    }
    for (p, h, pred) in [("decoder", &cfg.decoder, false), ("loss_predictor", &cfg.loss_predictor, true)] {
        for l in 0..h.layers {
            let i = if l == 0 { d } else { h.dim };
            s.add(format!("{p}.blocks.{l}.conv.weight"), &[h.dim, i / h.groups, h.kernel]);
            s.add(format!("{p}.blocks.{l}.conv.bias"), &[h.dim]);
        }
        if pred {
            ln(&mut s, &format!("{p}.ln"), h.dim);
        }
        lin(&mut s, &format!("{p}.proj"), h.dim, d);
    }
    s.0
}

/// Whether a parameter belongs to the EMA teacher (method §3: positional conv, input LN, blocks,
/// ALiBi scales, loss predictor; not the front-end nor the decoder).
pub fn in_teacher(name: &str) -> bool {
    name.starts_with("encoder.") || name.starts_with("loss_predictor.")
}

// ---------------------------------------------------------------------------------------------
// Randomness for dropout, layerdrop and noise tokens (seeded, host-drawn)
// ---------------------------------------------------------------------------------------------

/// The student's training randomness: `None` for eval (teacher, export).
pub struct Noise {
    pub rng: ChaCha8Rng,
}

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Inverted dropout with keep-mask drawn from the seeded stream.
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let scale = 1.0 / (1.0 - p);
        let m: Vec<f32> = (0..n).map(|_| if self.rng.random::<f64>() < p { 0.0 } else { scale as f32 }).collect();
        let m = Tensor::from_vec(m, x.shape(), &Device::Cpu)?.to_dtype(x.dtype())?.to_device(x.device())?;
        x.mul(&m)
    }

    /// Gaussian noise N(0, std²) of `shape`.
    pub fn normal(&mut self, shape: &[usize], std: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let u1: f64 = self.rng.random::<f64>().max(1e-300);
                let u2: f64 = self.rng.random::<f64>();
                (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    pub fn coin(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// LayerNorm over the last dimension (eps 1e-5), with or without affine. Written with primitive
/// ops so that it differentiates (candle's fused layer_norm has no backward).
pub fn layer_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / d)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / d)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    match affine {
        Some((w, b)) => y.broadcast_mul(w)?.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x W^T + b` over the last dimension of a `[.., in]` tensor.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let i = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / i.max(1);
    let y = x.reshape((rows, i))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    if let Some(l) = out.last_mut() {
        *l = w.dim(0)?;
    }
    y.reshape(out)
}

/// Grouped 1-D convolution over time of a `[B, L, C]` tensor (channels last) with a PyTorch-layout
/// kernel `[O, C/groups, k]`: zero padding `pad` on both sides, stride `stride`; returns
/// `[B, L_out, O]` with `L_out = floor((L + 2·pad − k)/stride) + 1`. Written as im2col
/// (index_select of the k taps) and one batched matmul, so the backward pass is the matmul's:
/// candle 0.11's own grouped conv1d backward disagrees with finite differences (it runs the kernel
/// gradient of each group on non-contiguous views), which the gradient test caught.
pub fn conv1d_time(x: &Tensor, w: &Tensor, pad: usize, stride: usize, groups: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    let (o, cg, k) = w.dims3()?;
    if groups == 0 || c != cg * groups || o % groups != 0 {
        candle_core::bail!("conv1d_time: input has {c} channels, kernel {:?}, groups {groups}", w.dims());
    }
    let lp = l + 2 * pad;
    if lp < k {
        candle_core::bail!("conv1d_time: {l} frames (+{pad} padding each side) are fewer than the kernel's {k}");
    }
    let stride = stride.max(1);
    let l_out = (lp - k) / stride + 1;
    let xp = if pad > 0 {
        let z = Tensor::zeros((b, pad, c), x.dtype(), x.device())?;
        Tensor::cat(&[&z, x, &z], 1)?
    } else {
        x.clone()
    };
    // cols[b, t, c, j] = xp[b, t·stride + j, c]
    let idx: Vec<u32> = (0..l_out).flat_map(|t| (0..k).map(move |j| (t * stride + j) as u32)).collect();
    let idx = Tensor::from_vec(idx, l_out * k, x.device())?;
    let cols = xp.index_select(&idx, 1)?.reshape((b, l_out, k, c))?.transpose(2, 3)?; // [B, L_out, C, k]
    let og = o / groups;
    // [G, B·L_out, cg·k] × [G, cg·k, og] → [G, B·L_out, og]
    let cols = cols.contiguous()?.reshape((b * l_out, groups, cg * k))?.transpose(0, 1)?.contiguous()?;
    let wg = w.reshape((groups, og, cg * k))?.transpose(1, 2)?.contiguous()?;
    let y = cols.matmul(&wg)?; // [G, B·L_out, og]
    y.transpose(0, 1)?.contiguous()?.reshape((b, l_out, o))
}

/// Instance norm over time (dim 1) of a `[B, T, C]` tensor, no affine, eps 1e-5 (§1.3).
pub fn instance_norm_time(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(1)? as f64;
    let mean = (x.sum_keepdim(1)? / t)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(1)? / t)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)
}

/// ALiBi slopes for `h` heads (the usual rule for head counts that are not powers of two, §2.4).
pub fn alibi_slopes(h: usize) -> Vec<f64> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-8.0 / n as f64);
        (0..n).map(|i| start.powi(i as i32 + 1)).collect()
    }
    if h == 0 {
        return Vec::new();
    }
    if h.is_power_of_two() {
        return pow2(h);
    }
    let p = 1usize << (usize::BITS - 1 - h.leading_zeros());
    let mut s = pow2(p);
    s.extend(pow2(2 * p).into_iter().step_by(2).take(h - p));
    s
}

/// Dense `[B, Tv, Tv]` distances `|pos_i − pos_j|` between the kept frames of each row.
fn distances(positions: &[Vec<usize>]) -> Vec<f32> {
    let mut out = Vec::new();
    for p in positions {
        for &i in p {
            for &j in p {
                out.push((i as f32 - j as f32).abs());
            }
        }
    }
    out
}

/// The model's forward functions over a weight map.
pub struct Model<'a> {
    pub cfg: &'a ModelConfig,
    pub w: &'a Weights,
}

/// What the teacher produces for a batch (§1.3–1.4).
pub struct TeacherOut {
    /// `[B, T, D]` targets.
    pub targets: Tensor,
    /// `[B, T]` predicted per-frame losses.
    pub pred_loss: Tensor,
}

impl<'a> Model<'a> {
    pub fn new(cfg: &'a ModelConfig, w: &'a Weights) -> Self {
        Model { cfg, w }
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.w.get(name).ok_or_else(|| candle_core::Error::Msg(format!("model weight `{name}` missing")))
    }

    fn ln(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        layer_norm(x, Some((self.get(&format!("{p}.weight"))?, self.get(&format!("{p}.bias"))?)), 1e-5)
    }

    fn lin(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        linear(x, self.get(&format!("{p}.weight"))?, Some(self.get(&format!("{p}.bias"))?))
    }

    /// Same-length grouped conv over time of a `[B, T, C]` tensor (returns `[B, T, O]`).
    fn conv_time(&self, x: &Tensor, p: &str, groups: usize) -> Result<Tensor> {
        let w = self.get(&format!("{p}.weight"))?;
        let b = self.get(&format!("{p}.bias"))?;
        let k = w.dim(2)?;
        let t = x.dim(1)?;
        let y = conv1d_time(x, w, k / 2, 1, groups)?;
        // Even kernels give one extra frame (fairseq's SamePad drops it).
        let y = if y.dim(1)? > t { y.narrow(1, 0, t)? } else { y };
        y.broadcast_add(b)
    }

    /// Front-end (§1.2, §7): batch features `[B, N, F]` → frames `[B, T, D]`.
    pub fn frontend(&self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.frontend.kind {
            FrontendKind::Fbank => {
                let y = self.ln(x, "frontend.ln")?;
                self.lin(&y, "frontend.proj")
            }
            FrontendKind::Cnn => {
                // Channels last throughout: [B, samples, 1] → [B, T, 512].
                let mut h = x.clone();
                for (i, l) in self.cfg.frontend.conv_layers.iter().enumerate() {
                    let w = self.get(&format!("frontend.conv.{i}.weight"))?;
                    h = conv1d_time(&h, w, 0, l[2], 1)?;
                    // LayerNorm over channels, then GELU.
                    h = self.ln(&h, &format!("frontend.conv.{i}.ln"))?.gelu_erf()?;
                }
                let y = self.ln(&h, "frontend.ln")?;
                self.lin(&y, "frontend.proj")
            }
        }
    }

    /// Convolutional positional encoder (§2.3): `[B, T, D]` → `[B, T, D]` (to be added).
    pub fn pos_conv(&self, x: &Tensor) -> Result<Tensor> {
        let e = &self.cfg.encoder;
        let mut h = x.clone();
        for l in 0..e.pos_conv_depth {
            h = self.conv_time(&h, &format!("encoder.pos_conv.{l}"), e.pos_conv_groups)?;
            h = layer_norm(&h, None, 1e-5)?.gelu_erf()?;
        }
        Ok(h)
    }

    /// ALiBi bias `[B|1, H, Tv, Tv]` for the kept positions of each row, scaled by the learned
    /// per-head scale clamped at ≥ 0 (§2.4).
    pub fn alibi(&self, positions: &[Vec<usize>], dtype: DType, device: &Device) -> Result<Tensor> {
        let h = self.cfg.encoder.heads;
        let rows = positions.len();
        let tv = positions.first().map_or(0, |p| p.len());
        let dist = Tensor::from_vec(distances(positions), (rows, 1, tv, tv), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        let slopes: Vec<f32> = alibi_slopes(h).into_iter().map(|s| s as f32).collect();
        let slopes = Tensor::from_vec(slopes, (1, h, 1, 1), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        let scale = self.get("encoder.alibi_scale")?.relu()?.reshape((1, h, 1, 1))?;
        let m = slopes.mul(&scale)?;
        dist.broadcast_mul(&m)?.neg()
    }

    /// One post-LN block (§2.5). Returns the block output and its FFN output `f` (the target
    /// layer, before dropout, residual and LN2).
    pub fn block(&self, l: usize, x: &Tensor, bias: &Tensor, noise: &mut Option<&mut Noise>) -> Result<(Tensor, Tensor)> {
        let e = &self.cfg.encoder;
        let p = format!("encoder.blocks.{l}");
        let (b, t, d) = x.dims3()?;
        let h = e.heads;
        let dh = d / h;
        let qkv = self.lin(x, &format!("{p}.attn.qkv"))?.reshape((b, t, 3, h, dh))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (1.0 / (dh as f64).sqrt()))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let att = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let mut att = candle_nn::ops::softmax(&att, D::Minus1)?;
        if let Some(n) = noise.as_deref_mut() {
            att = n.dropout(&att, e.attention_dropout)?;
        }
        let o = att.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, t, d))?;
        let mut o = self.lin(&o, &format!("{p}.attn.proj"))?;
        if let Some(n) = noise.as_deref_mut() {
            o = n.dropout(&o, e.dropout)?;
        }
        let h1 = self.ln(&(x + o)?, &format!("{p}.ln1"))?;
        let f = self.lin(&self.lin(&h1, &format!("{p}.fc1"))?.gelu_erf()?, &format!("{p}.fc2"))?;
        let fd = match noise.as_deref_mut() {
            Some(n) => n.dropout(&f, e.dropout)?,
            None => f.clone(),
        };
        let out = self.ln(&(h1 + fd)?, &format!("{p}.ln2"))?;
        Ok((out, f))
    }

    /// Teacher forward (§1.3–1.4) on front-end frames `z` `[B, T, D]` (detached by the caller):
    /// targets = mean of the instance-normalised FFN outputs of the top-K blocks; predicted
    /// loss = mean over channels of the loss predictor applied to the targets.
    pub fn teacher(&self, z: &Tensor) -> Result<TeacherOut> {
        let e = &self.cfg.encoder;
        let (b, t, _) = z.dims3()?;
        let x = (z + self.pos_conv(z)?)?;
        let mut x = self.ln(&x, "encoder.ln_in")?;
        let positions: Vec<Vec<usize>> = vec![(0..t).collect()];
        let bias = self.alibi(&positions, z.dtype(), z.device())?;
        let mut acc: Option<Tensor> = None;
        let mut none = None;
        for l in 0..e.layers {
            let (out, f) = self.block(l, &x, &bias, &mut none)?;
            if l + e.top_k >= e.layers {
                let layer = if self.cfg.end_of_block_targets { &out } else { &f };
                let n = instance_norm_time(&layer.to_dtype(DType::F32)?)?;
                acc = Some(match acc {
                    Some(a) => (a + n)?,
                    None => n,
                });
            }
            x = out;
        }
        let targets = match acc {
            Some(a) => (a / e.top_k as f64)?,
            None => candle_core::bail!("top_k is 0"),
        };
        let pred_in = match self.cfg.teacher_pred_input {
            TeacherPredInput::Targets => targets.to_dtype(z.dtype())?,
            TeacherPredInput::LastLayer => x,
        };
        let pred = self.head("loss_predictor", &pred_in, &self.cfg.loss_predictor, true)?;
        let pred_loss = pred.mean(D::Minus1)?.to_dtype(DType::F32)?;
        let _ = b;
        Ok(TeacherOut { targets, pred_loss })
    }

    /// Student encoder (§1.5) on frames `z` `[B, T, D]` (with gradient) and the mask (`true` =
    /// hidden; every row hides the same number of frames). Returns `h` `[B, T − M, D]` and the
    /// visible positions of each row.
    pub fn student_encoder(&self, z: &Tensor, mask: &[bool], noise: &mut Option<&mut Noise>) -> Result<(Tensor, Vec<Vec<usize>>)> {
        let e = &self.cfg.encoder;
        let (b, t, d) = z.dims3()?;
        let keep: Vec<f32> = mask.iter().map(|&m| if m { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (b, t, 1), &Device::Cpu)?.to_dtype(z.dtype())?.to_device(z.device())?;
        let x0 = z.broadcast_mul(&keep)?;
        let pos = self.pos_conv(&x0)?;
        let positions: Vec<Vec<usize>> = (0..b).map(|r| (0..t).filter(|&i| !mask[r * t + i]).collect()).collect();
        let tv = positions.first().map_or(0, |p| p.len());
        if positions.iter().any(|p| p.len() != tv) {
            candle_core::bail!("every row must hide the same number of frames");
        }
        let idx: Vec<u32> = positions.iter().enumerate().flat_map(|(r, p)| p.iter().map(move |&i| (r * t + i) as u32)).collect();
        let idx = Tensor::from_vec(idx, b * tv, z.device())?;
        let v = (z + pos)?.reshape((b * t, d))?.index_select(&idx, 0)?.reshape((b, tv, d))?;
        let mut x = self.ln(&v, "encoder.ln_in")?;
        if let Some(n) = noise.as_deref_mut() {
            x = n.dropout(&x, e.dropout)?;
        }
        let bias = self.alibi(&positions, z.dtype(), z.device())?;
        for l in 0..e.layers {
            if let Some(n) = noise.as_deref_mut() {
                if n.coin(e.layerdrop) {
                    continue;
                }
            }
            x = self.block(l, &x, &bias, noise)?.0;
        }
        Ok((x, positions))
    }

    /// Encoder for downstream use: every frame visible, no dropout. Returns the output of each
    /// block (`[B, T, D]` each).
    pub fn encode(&self, z: &Tensor) -> Result<Vec<Tensor>> {
        let (_, t, _) = z.dims3()?;
        let x = (z + self.pos_conv(z)?)?;
        let mut x = self.ln(&x, "encoder.ln_in")?;
        let bias = self.alibi(&[(0..t).collect()], z.dtype(), z.device())?;
        let mut none = None;
        let mut outs = Vec::new();
        for l in 0..self.cfg.encoder.layers {
            x = self.block(l, &x, &bias, &mut none)?.0;
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// Decoder (§2.6) or loss predictor (§2.7) over `[B, T, D]` → `[B, T, D]`.
    pub fn head(&self, p: &str, u: &Tensor, h: &HeadConfig, predictor: bool) -> Result<Tensor> {
        let mut x = u.clone();
        for l in 0..h.layers {
            let y = self.conv_time(&x, &format!("{p}.blocks.{l}.conv"), h.groups)?;
            let y = layer_norm(&y, None, 1e-5)?.gelu_erf()?;
            x = if l == 0 { y } else { (x + y)? };
        }
        if predictor {
            x = self.ln(&x, &format!("{p}.ln"))?;
        }
        self.lin(&x, &format!("{p}.proj"))
    }

    /// `fill` of §1.6: dropout on `h` `[B, Tv, D]`, scattered back to its positions among `T`
    /// frames, fresh noise tokens N(0, σ²) at the hidden ones.
    pub fn fill(&self, h: &Tensor, positions: &[Vec<usize>], t: usize, dropped: Tensor, noise: &mut Noise) -> Result<Tensor> {
        let (b, tv, d) = h.dims3()?;
        let m = t - tv;
        let tokens = noise.normal(&[b * m, d], self.cfg.mask_noise_std, h.dtype(), h.device())?;
        let _ = h;
        let all = Tensor::cat(&[&dropped.reshape((b * tv, d))?, &tokens], 0)?;
        // Row r, frame i: visible → its index among the kept rows; hidden → a noise token.
        let mut idx = Vec::with_capacity(b * t);
        for (r, p) in positions.iter().enumerate() {
            let mut k = 0usize;
            let mut hidden = 0usize;
            for i in 0..t {
                if k < p.len() && p[k] == i {
                    idx.push((r * tv + k) as u32);
                    k += 1;
                } else {
                    idx.push((b * tv + r * m + hidden) as u32);
                    hidden += 1;
                }
            }
        }
        let idx = Tensor::from_vec(idx, b * t, h.device())?;
        all.index_select(&idx, 0)?.reshape((b, t, d))
    }
}
