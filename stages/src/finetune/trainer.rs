//! CTC fine-tuning of a pre-trained encoder, as a library (the `finetune.ctc` stage runs it): a
//! linear CTC head over the letter vocabulary on top of the encoder; the front-end frozen; the
//! encoder frozen for the first `freeze_finetune_updates` (only the head learns); wav2vec 2.0's
//! time masking (spans of `mask_length` frames replaced by a learned mask embedding, `mask_prob`
//! of the frames) and channel masking (spans of `mask_channel_length` channels zeroed); the
//! encoder's dropout, activation dropout and layerdrop; AdamW with fairseq's tri-stage schedule.
//! Padded batches of whole utterances (`Model::hidden_states_train`). The loss of an update is the
//! mean CTC loss over its utterances whose labels fit their frames (fairseq's `sentence_avg`).
//!
//! Every random draw of update `t` comes from streams derived from (seed, t), so a run resumed
//! from a checkpoint continues exactly as an uninterrupted one (on the CPU).

use super::ctc::ctc_loss;
use super::schedule::TriStage;
use super::vocab::Vocab;
use crate::model::optim::{accumulate_grads, loss_and_grad_norm, AdamW};
use crate::model::{linear, Model, ModelConfig, Noise, Weights};
use candle_core::{DType, Device, Tensor, Var, D};
use pipeline::{ParamError, Params};
use rand::{Rng, SeedableRng};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Parameters of `finetune.ctc` (defaults: the paper's 10 h recipe, method §9 / Table 5 right).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneParams {
    /// The pre-trained model: a pre-training run directory (its newest complete checkpoint, the
    /// student's weights), or a directory written by `ehmam export` (`--format native` or `hf`).
    pub init: PathBuf,
    /// The letter vocabulary as fairseq's `dict.ltr.txt` (`SYMBOL COUNT` per line).
    pub vocab: Option<PathBuf>,
    /// Build the vocabulary from every transcript of this shard store (every character, and `|`,
    /// most frequent first, as fairseq's `Dictionary` orders them).
    pub vocab_from: Option<PathBuf>,
    /// Peak learning rate.
    pub lr: f64,
    /// Updates.
    pub max_steps: u64,
    /// Tri-stage schedule: warm-up, hold and decay as fractions of `max_steps`.
    pub phase_ratio: [f64; 3],
    /// The warm-up starts at this fraction of `lr`.
    pub init_lr_scale: f64,
    /// The decay ends at this fraction of `lr`.
    pub final_lr_scale: f64,
    /// Updates during which only the CTC head learns (the encoder is frozen).
    pub freeze_finetune_updates: u64,
    /// Time masking: share of the frames in masked spans (wav2vec 2.0's `mask_prob`).
    pub mask_prob: f64,
    /// Time masking: frames per span.
    pub mask_length: usize,
    /// Channel masking: share of the channels in zeroed spans.
    pub mask_channel_prob: f64,
    /// Channel masking: channels per span.
    pub mask_channel_length: usize,
    /// Dropout after the encoder's input LayerNorm, on attention and FFN outputs.
    pub dropout: f64,
    /// Dropout on attention probabilities.
    pub attention_dropout: f64,
    /// Dropout after the FFN activation.
    pub activation_dropout: f64,
    /// Probability that a block is skipped in an update.
    pub layerdrop: f64,
    /// Adam betas.
    pub betas: [f64; 2],
    /// Adam epsilon.
    pub adam_eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Checkpoint every this many updates (and at the end); 0: only at the end.
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest removed first; 0 keeps all).
    pub keep_checkpoints: usize,
    /// Hand the model to the `eval.ctc` stages every this many updates (and at the end); 0: only
    /// at the end.
    pub eval_every: u64,
    /// Continue from the run directory's last checkpoint when there is one.
    pub resume: bool,
    /// Batches per update (fairseq's `update_freq`): the mean CTC loss over all their
    /// utterances, the gradients summed; `max_steps` and the schedule count updates.
    pub update_freq: u64,
}

impl Default for FinetuneParams {
    fn default() -> Self {
        FinetuneParams {
            init: PathBuf::new(),
            vocab: None,
            vocab_from: None,
            lr: 5e-5,
            max_steps: 20000,
            phase_ratio: [0.1, 0.4, 0.5],
            init_lr_scale: 0.01,
            final_lr_scale: 0.05,
            freeze_finetune_updates: 10000,
            mask_prob: 0.65,
            mask_length: 10,
            mask_channel_prob: 0.5,
            mask_channel_length: 64,
            dropout: 0.0,
            attention_dropout: 0.0,
            activation_dropout: 0.1,
            layerdrop: 0.05,
            betas: [0.9, 0.98],
            adam_eps: 1e-8,
            weight_decay: 0.0,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            eval_every: 1000,
            resume: true,
            update_freq: 1,
        }
    }
}

impl Params for FinetuneParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.init.as_os_str().is_empty() {
            e.push(ParamError::new(
                "init",
                "required: a pre-training run directory or an `ehmam export` directory",
            ));
        }
        if self.vocab.is_some() && self.vocab_from.is_some() {
            e.push(ParamError::new(
                "vocab_from",
                "give the vocabulary as a file (vocab) or a shard store to build it from (vocab_from), not both",
            ));
        }
        if self.vocab.is_none() && self.vocab_from.is_none() {
            e.push(ParamError::new(
                "vocab",
                "required: a dict.ltr.txt file (vocab), or a shard store whose transcripts make it (vocab_from)",
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            e.push(ParamError::new(
                "lr",
                format!("must be > 0, got {}", self.lr),
            ));
        }
        if self.max_steps == 0 {
            e.push(ParamError::new("max_steps", "must be at least 1"));
        }
        if self.update_freq == 0 {
            e.push(ParamError::new("update_freq", "must be at least 1"));
        }
        let sum: f64 = self.phase_ratio.iter().sum();
        if self.phase_ratio.iter().any(|r| !(*r >= 0.0)) || (sum - 1.0).abs() > 1e-6 {
            e.push(ParamError::new(
                "phase_ratio",
                format!(
                    "three fractions ≥ 0 that sum to 1, got {:?}",
                    self.phase_ratio
                ),
            ));
        }
        for (n, v) in [
            ("init_lr_scale", self.init_lr_scale),
            ("final_lr_scale", self.final_lr_scale),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                e.push(ParamError::new(n, format!("must be in (0, 1], got {v}")));
            }
        }
        for (n, v) in [
            ("mask_prob", self.mask_prob),
            ("mask_channel_prob", self.mask_channel_prob),
        ] {
            if !(0.0..=1.0).contains(&v) {
                e.push(ParamError::new(n, format!("must be in [0, 1], got {v}")));
            }
        }
        for (n, v) in [
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
            ("activation_dropout", self.activation_dropout),
            ("layerdrop", self.layerdrop),
        ] {
            if !(0.0..1.0).contains(&v) {
                e.push(ParamError::new(n, format!("must be in [0, 1), got {v}")));
            }
        }
        if self.mask_length == 0 {
            e.push(ParamError::new("mask_length", "must be at least 1"));
        }
        if self.mask_channel_length == 0 {
            e.push(ParamError::new("mask_channel_length", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.betas[0]) || !(0.0..1.0).contains(&self.betas[1]) {
            e.push(ParamError::new(
                "betas",
                format!("each must be in [0, 1), got {:?}", self.betas),
            ));
        }
        if !(self.adam_eps > 0.0) {
            e.push(ParamError::new("adam_eps", "must be > 0"));
        }
        if !(self.weight_decay >= 0.0) {
            e.push(ParamError::new("weight_decay", "must be ≥ 0"));
        }
        e
    }
}

/// One batch of an update: a padded batch `[B, N, F]`, each row's input frames, each row's labels.
pub type TrainBatch<'a> = (&'a Tensor, &'a [usize], &'a [Vec<u32>]);

/// One fine-tuning update's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneStep {
    /// Mean CTC loss over the utterances that fit (NaN when none did).
    pub loss: f64,
    pub lr: f64,
    /// Utterances whose labels did not fit their frames (no loss, no gradient).
    pub infeasible: usize,
    /// ‖g‖₂ over every parameter with a gradient (NaN when no update happened).
    pub grad_norm: f64,
    /// Share of the valid frames hidden by time masking.
    pub masked_frac: f64,
}

/// A fine-tuned model as evaluation uses it: weights (copies, detached from training), the
/// model block with fine-tuning's dropout, and the vocabulary.
#[derive(Debug, Clone)]
pub struct CtcModel {
    /// Updates it has had.
    pub step: u64,
    pub cfg: ModelConfig,
    pub weights: Weights,
    pub vocab: Vocab,
}

impl CtcModel {
    /// Scores `[B, T, V]` of a padded batch `x` `[B, N, F]` (rows of `input_frames`) with their
    /// valid frames, in inference mode.
    pub fn logits(
        &self,
        x: &Tensor,
        input_frames: &[usize],
    ) -> candle_core::Result<(Tensor, Vec<usize>)> {
        forward(&self.cfg, &self.weights, x, input_frames, None)
    }

    /// Greedy CTC transcripts of a padded batch (no masking, no dropout).
    pub fn transcribe(
        &self,
        x: &Tensor,
        input_frames: &[usize],
    ) -> candle_core::Result<Vec<String>> {
        let (logits, frames) = crate::train::student::on_pool(|| self.logits(x, input_frames))?;
        let best = logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?;
        Ok(best
            .iter()
            .zip(&frames)
            .map(|(row, &n)| self.vocab.greedy_decode(&row[..n.min(row.len())]))
            .collect())
    }
}

/// What training mode draws in [`forward`].
struct TrainMode<'a> {
    p: &'a FinetuneParams,
    rng: &'a mut rand_chacha::ChaCha8Rng,
    noise: &'a mut Noise,
    /// Keep the encoder out of the gradient (the freeze).
    frozen: bool,
    /// Frames hidden by time masking, and valid frames.
    masked: (usize, usize),
}

/// The forward pass: front-end (frozen: no gradient), time and channel masking in training
/// mode, the encoder, the CTC head. Returns the scores and each row's valid frames.
fn forward(
    cfg: &ModelConfig,
    w: &Weights,
    x: &Tensor,
    input_frames: &[usize],
    train: Option<&mut TrainMode>,
) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let m = Model::new(cfg, w);
    let z = m.frontend(x)?.detach();
    let (b, t, d) = z.dims3()?;
    if input_frames.len() != b {
        candle_core::bail!("{} input lengths for a batch of {b}", input_frames.len());
    }
    let frames: Vec<usize> = input_frames
        .iter()
        .map(|&n| cfg.frames_for(n).min(t))
        .collect();
    let get = |k: &str| {
        w.get(k)
            .ok_or_else(|| candle_core::Error::Msg(format!("the model has no `{k}`")))
    };
    let (z, mut train) = match train {
        None => (z, None),
        Some(tm) => {
            let p = tm.p;
            // Time masking: spans replaced by the mask embedding.
            let mut mask = vec![0f32; b * t];
            for (r, &n) in frames.iter().enumerate() {
                let l = p.mask_length.max(1);
                if n <= l {
                    continue;
                }
                let spans = (p.mask_prob * n as f64 / l as f64 + tm.rng.random::<f64>()) as usize;
                for _ in 0..spans {
                    let s = tm.rng.random_range(0..=n - l);
                    mask[r * t + s..r * t + s + l].fill(1.0);
                }
                tm.masked.0 += mask[r * t..r * t + n].iter().filter(|&&v| v > 0.0).count();
                tm.masked.1 += n;
            }
            // Channel masking: spans of channels zeroed for a whole utterance.
            let mut cm = vec![1f32; b * d];
            let lc = p.mask_channel_length.clamp(1, d);
            for r in 0..b {
                let spans =
                    (p.mask_channel_prob * d as f64 / lc as f64 + tm.rng.random::<f64>()) as usize;
                for _ in 0..spans.min(d / lc) {
                    let s = tm.rng.random_range(0..=d - lc);
                    cm[r * d + s..r * d + s + lc].fill(0.0);
                }
            }
            let tmask = Tensor::from_vec(mask, (b, t, 1), z.device())?;
            let keep = (tmask.neg()? + 1.0)?;
            let emb = get("encoder.mask_emb")?.reshape((1, 1, d))?;
            let z = (z.broadcast_mul(&keep)? + tmask.broadcast_mul(&emb)?)?;
            let cm = Tensor::from_vec(cm, (b, 1, d), z.device())?;
            (z.broadcast_mul(&cm)?, Some(tm))
        }
    };
    let hs = {
        let mut nz = train.as_mut().map(|tm| &mut *tm.noise);
        m.hidden_states_train(&z, Some(&frames), &mut nz)?
    };
    let mut h = hs
        .last()
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("the encoder has no blocks".into()))?;
    if train.as_ref().is_some_and(|tm| tm.frozen) {
        h = h.detach();
    }
    let logits = linear(&h, get("ctc.proj.weight")?, Some(get("ctc.proj.bias")?))?;
    Ok((logits, frames))
}

pub struct Finetuner {
    /// The model block, with fine-tuning's dropout, activation dropout and layerdrop.
    pub cfg: ModelConfig,
    pub p: FinetuneParams,
    /// The front-end (frozen).
    pub frontend: Weights,
    /// Encoder, mask embedding and CTC head.
    pub vars: BTreeMap<String, Var>,
    pub adam: AdamW,
    /// Updates done.
    pub step: u64,
    pub vocab: Vocab,
    pub seed: u64,
    pub device: Device,
}

impl Finetuner {
    /// From pre-trained front-end and encoder weights (an export's or a checkpoint's student), on
    /// the CPU.
    pub fn new(
        cfg: ModelConfig,
        pretrained: &Weights,
        vocab: Vocab,
        p: FinetuneParams,
        seed: u64,
    ) -> candle_core::Result<Self> {
        Self::on(cfg, pretrained, vocab, p, seed, &Device::Cpu)
    }

    /// The same on `device`.
    pub fn on(
        mut cfg: ModelConfig,
        pretrained: &Weights,
        vocab: Vocab,
        p: FinetuneParams,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        cfg.encoder.dropout = p.dropout;
        cfg.encoder.attention_dropout = p.attention_dropout;
        cfg.encoder.activation_dropout = p.activation_dropout;
        cfg.encoder.layerdrop = p.layerdrop;
        let d = cfg.encoder.dim;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xc7c);
        let mut frontend = Weights::new();
        let mut vars = BTreeMap::new();
        for (k, t) in pretrained {
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            if k.starts_with("frontend.") {
                frontend.insert(k.clone(), t);
            } else if k.starts_with("encoder.") && k != "encoder.mask_emb" {
                vars.insert(k.clone(), Var::from_tensor(&t)?);
            }
        }
        let v = vocab.len();
        // The head: PyTorch's default Linear; the mask embedding U(0, 1) as wav2vec 2.0's.
        let b = 1.0 / (d as f64).sqrt();
        let mut uni = |n: usize, lo: f64, hi: f64| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(lo..hi) as f32).collect()
        };
        let w = Tensor::from_vec(uni(v * d, -b, b), (v, d), device)?;
        let bias = Tensor::from_vec(uni(v, -b, b), v, device)?;
        let emb = Tensor::from_vec(uni(d, 0.0, 1.0), d, device)?;
        vars.insert("ctc.proj.weight".into(), Var::from_tensor(&w)?);
        vars.insert("ctc.proj.bias".into(), Var::from_tensor(&bias)?);
        vars.insert("encoder.mask_emb".into(), Var::from_tensor(&emb)?);
        let adam = AdamW::new(p.betas[0], p.betas[1], p.adam_eps, p.weight_decay, false);
        Ok(Finetuner {
            cfg,
            p,
            frontend,
            vars,
            adam,
            step: 0,
            vocab,
            seed,
            device: device.clone(),
        })
    }

    pub fn schedule(&self) -> TriStage {
        TriStage::from_ratios(
            self.p.lr,
            self.p.max_steps,
            self.p.phase_ratio,
            self.p.init_lr_scale,
            self.p.final_lr_scale,
        )
    }

    /// Frames of each utterance of `input_frames` input frames.
    pub fn frames(&self, input_frames: &[usize]) -> Vec<usize> {
        input_frames
            .iter()
            .map(|&n| self.cfg.frames_for(n))
            .collect()
    }

    /// Every weight, the live ones (shared with training).
    fn weights(&self) -> Weights {
        let mut w: Weights = self.frontend.clone();
        for (k, v) in &self.vars {
            w.insert(k.clone(), v.as_tensor().clone());
        }
        w
    }

    /// The model as it is now, for evaluation: copies of the weights, so training goes on
    /// without touching them.
    pub fn snapshot(&self) -> candle_core::Result<CtcModel> {
        let mut weights = Weights::new();
        for (k, t) in self.weights() {
            weights.insert(k, t.copy()?);
        }
        Ok(CtcModel {
            step: self.step,
            cfg: self.cfg.clone(),
            weights,
            vocab: self.vocab.clone(),
        })
    }

    /// One update on a padded batch with its label sequences. Runs on a worker of rayon's pool
    /// (as the pre-training update does), so the parallel kernels inside stay on it.
    pub fn train_step(
        &mut self,
        x: &Tensor,
        input_frames: &[usize],
        labels: &[Vec<u32>],
    ) -> candle_core::Result<FinetuneStep> {
        self.train_update(&[(x, input_frames, labels)])
    }

    /// One update from several padded batches (`update_freq`): the mean CTC loss over every
    /// utterance of them that fits (fairseq's `sentence_avg` over the update), the gradients
    /// summed over the batches, so the update is that of one batch holding them all.
    pub fn train_update(&mut self, batches: &[TrainBatch]) -> candle_core::Result<FinetuneStep> {
        crate::train::student::on_pool(|| self.train_update_inner(batches))
    }

    fn train_update_inner(&mut self, batches: &[TrainBatch]) -> candle_core::Result<FinetuneStep> {
        // The utterances whose labels fit their frames, known before any forward pass.
        let fits = |(_, input_frames, labels): &TrainBatch| -> usize {
            input_frames
                .iter()
                .zip(labels.iter())
                .filter(|(&n, l)| n > 0 && super::ctc::min_frames(l) <= self.cfg.frames_for(n))
                .count()
        };
        let total: usize = batches.iter().map(fits).sum();
        let lr = self.schedule().lr(self.step);
        let w = self.weights();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss_acc: Option<Tensor> = None;
        let mut infeasible = 0usize;
        let mut masked = (0usize, 0usize);
        for (j, b) in batches.iter().enumerate() {
            let (x, input_frames, labels) = *b;
            let part = j as u64;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::update_noise_part(
                self.seed ^ 0x7a5,
                self.step,
                part,
            ));
            // On a GPU the dropout masks come from its generator, seeded per update (as the
            // pre-training update does); layerdrop's coins from the seeded host stream everywhere.
            let mut noise = Noise::on(
                crate::seed::update_noise_part(self.seed ^ 0xf1e, self.step, part),
                crate::seed::update_device_noise_part(self.seed ^ 0xf1e, self.step, part),
                &self.device,
            )?;
            let mut tm = TrainMode {
                p: &self.p,
                rng: &mut rng,
                noise: &mut noise,
                frozen: self.step < self.p.freeze_finetune_updates,
                masked: (0, 0),
            };
            let (logits, frames) = forward(&self.cfg, &w, x, input_frames, Some(&mut tm))?;
            masked.0 += tm.masked.0;
            masked.1 += tm.masked.1;
            let out = ctc_loss(&logits, &frames, labels, super::vocab::BLANK)?;
            let n = out.feasible.iter().filter(|&&f| f).count();
            infeasible += out.feasible.len() - n;
            if n == 0 || total == 0 {
                continue;
            }
            let loss = (out.loss.sum_all()? / total as f64)?;
            let g = loss.backward()?;
            grads = Some(accumulate_grads(grads.take(), g, &self.vars)?);
            let ld = loss.detach();
            loss_acc = Some(match loss_acc.take() {
                None => ld,
                Some(a) => (a + ld)?,
            });
        }
        let (mut loss_value, mut grad_norm) = (f64::NAN, f64::NAN);
        if let (Some(grads), Some(loss)) = (grads, loss_acc) {
            // The loss and the gradient norm in one transfer from the device.
            (loss_value, grad_norm) = loss_and_grad_norm(&loss, &self.vars, &grads)?;
            self.adam.step(&self.vars, &grads, lr)?;
        }
        self.step += 1;
        Ok(FinetuneStep {
            loss: loss_value,
            lr,
            infeasible,
            grad_norm,
            masked_frac: masked.0 as f64 / masked.1.max(1) as f64,
        })
    }

    /// Greedy CTC transcripts of a padded batch (no masking, no dropout).
    pub fn transcribe(
        &self,
        x: &Tensor,
        input_frames: &[usize],
    ) -> candle_core::Result<Vec<String>> {
        CtcModel {
            step: self.step,
            cfg: self.cfg.clone(),
            weights: self.weights(),
            vocab: self.vocab.clone(),
        }
        .transcribe(x, input_frames)
    }

    /// What a checkpoint holds besides its JSON: the model (`model.*`: front-end, encoder, mask
    /// embedding, head) and Adam's moments (`adam.m.*`, `adam.v.*`).
    pub fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, v) in self.weights() {
            out.insert(format!("model.{k}"), v);
        }
        for (k, v) in &self.adam.m {
            out.insert(format!("adam.m.{k}"), v.clone());
        }
        for (k, v) in &self.adam.v {
            out.insert(format!("adam.v.{k}"), v.clone());
        }
        out
    }

    /// Back to a checkpoint's state (its tensors and Adam's step count).
    pub fn restore(
        &mut self,
        step: u64,
        adam_t: u64,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<(), String> {
        let get = |k: &str| {
            tensors
                .get(&format!("model.{k}"))
                .ok_or_else(|| format!("the checkpoint lacks model.{k}"))
        };
        for (k, v) in &self.vars {
            let t = get(k)?;
            if t.dims() != v.as_tensor().dims() {
                return Err(format!(
                    "model.{k}: shape {:?}, the model has {:?}",
                    t.dims(),
                    v.as_tensor().dims()
                ));
            }
            v.set(&t.to_device(&self.device).map_err(|e| e.to_string())?)
                .map_err(|e| format!("model.{k}: {e}"))?;
        }
        for (k, v) in self.frontend.iter_mut() {
            *v = get(k)?.to_device(&self.device).map_err(|e| e.to_string())?;
        }
        self.adam.m.clear();
        self.adam.v.clear();
        for (k, v) in tensors {
            let v = v.to_device(&self.device).map_err(|e| e.to_string())?;
            if let Some(name) = k.strip_prefix("adam.m.") {
                self.adam.m.insert(name.to_string(), v);
            } else if let Some(name) = k.strip_prefix("adam.v.") {
                self.adam.v.insert(name.to_string(), v);
            }
        }
        self.adam.t = adam_t;
        self.step = step;
        Ok(())
    }
}
