//! Parameters and their initialisation (method §2.8): names, shapes, seeded values.

use super::config::*;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
            self.conv_default(
                &format!("{p}.blocks.{l}.conv"),
                i,
                h.dim,
                h.kernel,
                h.groups,
            );
        }
        if predictor {
            self.layer_norm(&format!("{p}.ln"), h.dim);
        }
        self.linear_default(&format!("{p}.proj"), h.dim, d);
    }
}

/// Names, shapes and initial values of every parameter, drawn from `seed` (§2.8).
pub fn init_values(cfg: &ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let mut b = Builder {
        rng: ChaCha8Rng::seed_from_u64(seed),
        out: Vec::new(),
        _cfg: cfg,
    };
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
                b.add(
                    format!("frontend.conv.{i}.weight"),
                    &[l[0], c_in, l[1]],
                    Init::Normal(std),
                );
                b.layer_norm(&format!("frontend.conv.{i}.ln"), l[0]);
                c_in = l[0];
            }
            b.layer_norm("frontend.ln", c_in);
            b.linear_default("frontend.proj", c_in, d);
        }
    }
    let e = &cfg.encoder;
    for l in 0..e.pos_conv_depth {
        b.conv_default(
            &format!("encoder.pos_conv.{l}"),
            d,
            d,
            e.pos_conv_kernel,
            e.pos_conv_groups,
        );
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
pub fn init_weights(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<Weights> {
    let mut w = Weights::new();
    for (name, shape, v) in init_values(cfg, seed) {
        let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        w.insert(name, t);
    }
    Ok(w)
}

/// Number of parameters (student side: front-end, encoder, decoder, loss predictor).
pub fn parameter_count(cfg: &ModelConfig) -> usize {
    shapes_of(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
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
        s.add(
            format!("encoder.pos_conv.{l}.weight"),
            &[d, d / e.pos_conv_groups, e.pos_conv_kernel],
        );
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
    for (p, h, pred) in [
        ("decoder", &cfg.decoder, false),
        ("loss_predictor", &cfg.loss_predictor, true),
    ] {
        for l in 0..h.layers {
            let i = if l == 0 { d } else { h.dim };
            s.add(
                format!("{p}.blocks.{l}.conv.weight"),
                &[h.dim, i / h.groups, h.kernel],
            );
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
