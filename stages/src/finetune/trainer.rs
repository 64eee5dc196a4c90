//! CTC fine-tuning of a pre-trained encoder, as a library (the `finetune.ctc` stage is to be built
//! on it): a linear CTC head over the letter vocabulary on top of the encoder; the front-end
//! frozen; the encoder frozen for the first `freeze_finetune_updates` (only the head learns);
//! wav2vec 2.0's time masking (spans of `mask_length` frames replaced by a learned mask
//! embedding, `mask_prob` of the frames) and channel masking (spans of `mask_channel_length`
//! channels zeroed); the encoder's dropout and layerdrop; AdamW with fairseq's tri-stage schedule.
//! Padded batches of whole utterances (`Model::hidden_states_train`). The loss of an update is the
//! mean CTC loss over its utterances whose labels fit their frames (fairseq's `sentence_avg`).

use super::ctc::ctc_loss;
use super::schedule::TriStage;
use super::vocab::Vocab;
use crate::model::optim::AdamW;
use crate::model::{linear, Model, ModelConfig, Noise, Weights};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// The recipe's parameters (defaults: data2vec 2.0 / wav2vec 2.0 base fine-tuning on 10 h).
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneParams {
    pub lr: f64,
    pub max_steps: u64,
    pub phase_ratio: [f64; 3],
    pub init_lr_scale: f64,
    pub final_lr_scale: f64,
    pub freeze_finetune_updates: u64,
    pub mask_prob: f64,
    pub mask_length: usize,
    pub mask_channel_prob: f64,
    pub mask_channel_length: usize,
    pub betas: [f64; 2],
    pub adam_eps: f64,
    pub weight_decay: f64,
}

impl Default for FinetuneParams {
    fn default() -> Self {
        FinetuneParams {
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
            betas: [0.9, 0.98],
            adam_eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One fine-tuning update's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneStep {
    pub loss: f64,
    pub lr: f64,
    /// Utterances whose labels did not fit their frames (no loss, no gradient).
    pub infeasible: usize,
}

pub struct Finetuner {
    pub cfg: ModelConfig,
    pub p: FinetuneParams,
    /// The front-end (frozen).
    pub frontend: Weights,
    /// Encoder, mask embedding and CTC head.
    pub vars: BTreeMap<String, Var>,
    pub adam: AdamW,
    pub step: u64,
    pub vocab: Vocab,
    pub seed: u64,
}

impl Finetuner {
    /// From pre-trained front-end and encoder weights (an export's or a checkpoint's student).
    pub fn new(
        cfg: ModelConfig,
        pretrained: &Weights,
        vocab: Vocab,
        p: FinetuneParams,
        seed: u64,
    ) -> candle_core::Result<Self> {
        let d = cfg.encoder.dim;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xc7c);
        let mut frontend = Weights::new();
        let mut vars = BTreeMap::new();
        for (k, t) in pretrained {
            let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            if k.starts_with("frontend.") {
                frontend.insert(k.clone(), t);
            } else if k.starts_with("encoder.") {
                vars.insert(k.clone(), Var::from_tensor(&t)?);
            }
        }
        let v = vocab.len();
        // The head: PyTorch's default Linear; the mask embedding U(0, 1) as wav2vec 2.0's.
        let b = 1.0 / (d as f64).sqrt();
        let mut uni = |n: usize, lo: f64, hi: f64| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(lo..hi) as f32).collect()
        };
        let w = Tensor::from_vec(uni(v * d, -b, b), (v, d), &Device::Cpu)?;
        let bias = Tensor::from_vec(uni(v, -b, b), v, &Device::Cpu)?;
        let emb = Tensor::from_vec(uni(d, 0.0, 1.0), d, &Device::Cpu)?;
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
        })
    }

    fn schedule(&self) -> TriStage {
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

    /// Scores `[B, T, V]` of a padded batch `x` `[B, N, F]` (rows of `input_frames`); training
    /// mode (masking, dropout, layerdrop) with `rng`.
    pub fn logits(
        &self,
        x: &Tensor,
        input_frames: &[usize],
        rng: Option<&mut rand_chacha::ChaCha8Rng>,
    ) -> candle_core::Result<(Tensor, Vec<usize>)> {
        let mut w: Weights = self.frontend.clone();
        for (k, v) in &self.vars {
            w.insert(k.clone(), v.as_tensor().clone());
        }
        let m = Model::new(&self.cfg, &w);
        let z = m.frontend(x)?.detach();
        let (b, t, d) = z.dims3()?;
        let frames: Vec<usize> = self
            .frames(input_frames)
            .into_iter()
            .map(|n| n.min(t))
            .collect();
        let train = rng.is_some();
        let z = match rng {
            None => z,
            Some(rng) => {
                // Time masking: spans replaced by the mask embedding.
                let mut tm = vec![0f32; b * t];
                for (r, &n) in frames.iter().enumerate() {
                    let l = self.p.mask_length.max(1);
                    if n <= l {
                        continue;
                    }
                    let spans =
                        (self.p.mask_prob * n as f64 / l as f64 + rng.random::<f64>()) as usize;
                    for _ in 0..spans {
                        let s = rng.random_range(0..=n - l);
                        tm[r * t + s..r * t + s + l].fill(1.0);
                    }
                }
                // Channel masking: spans of channels zeroed for a whole utterance.
                let mut cm = vec![1f32; b * d];
                let lc = self.p.mask_channel_length.clamp(1, d);
                for r in 0..b {
                    let spans = (self.p.mask_channel_prob * d as f64 / lc as f64
                        + rng.random::<f64>()) as usize;
                    for _ in 0..spans.min(d / lc) {
                        let s = rng.random_range(0..=d - lc);
                        cm[r * d + s..r * d + s + lc].fill(0.0);
                    }
                }
                let tm = Tensor::from_vec(tm, (b, t, 1), z.device())?;
                let keep = (tm.neg()? + 1.0)?;
                let emb = w
                    .get("encoder.mask_emb")
                    .ok_or_else(|| candle_core::Error::Msg("no mask embedding".into()))?
                    .reshape((1, 1, d))?;
                let z = (z.broadcast_mul(&keep)? + tm.broadcast_mul(&emb)?)?;
                let cm = Tensor::from_vec(cm, (b, 1, d), z.device())?;
                z.broadcast_mul(&cm)?
            }
        };
        let mut noise = Noise::new(crate::seed::update_noise(self.seed ^ 0xf1e, self.step));
        let mut nz = if train { Some(&mut noise) } else { None };
        let hs = m.hidden_states_train(&z, Some(&frames), &mut nz)?;
        let mut h = hs
            .last()
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no blocks".into()))?;
        if train && self.step < self.p.freeze_finetune_updates {
            h = h.detach();
        }
        let logits = linear(
            &h,
            self.vars["ctc.proj.weight"].as_tensor(),
            Some(self.vars["ctc.proj.bias"].as_tensor()),
        )?;
        Ok((logits, frames))
    }

    /// One update on a padded batch with its label sequences.
    pub fn train_step(
        &mut self,
        x: &Tensor,
        input_frames: &[usize],
        labels: &[Vec<u32>],
    ) -> candle_core::Result<FinetuneStep> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::update_noise(
            self.seed ^ 0x7a5,
            self.step,
        ));
        let (logits, frames) = self.logits(x, input_frames, Some(&mut rng))?;
        let out = ctc_loss(&logits, &frames, labels, super::vocab::BLANK)?;
        let n = out.feasible.iter().filter(|&&f| f).count();
        let lr = self.schedule().lr(self.step);
        let loss_value;
        if n > 0 {
            let loss = (out.loss.sum_all()? / n as f64)?;
            loss_value = loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            self.adam.step(&self.vars, &grads, lr)?;
        } else {
            loss_value = f64::NAN;
        }
        self.step += 1;
        Ok(FinetuneStep {
            loss: loss_value,
            lr,
            infeasible: out.feasible.len() - n,
        })
    }

    /// Greedy CTC transcripts of a padded batch (no masking, no dropout).
    pub fn transcribe(
        &self,
        x: &Tensor,
        input_frames: &[usize],
    ) -> candle_core::Result<Vec<String>> {
        let (logits, frames) = self.logits(x, input_frames, None)?;
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
