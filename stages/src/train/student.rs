//! `student`: one EH-MAM update per masked batch (method §1, steps 1 and 4–10): front-end with
//! gradient, encoder over visible frames with ALiBi on original distances, decoder and loss
//! predictor over noise-filled sequences, `L = (Σ ℓ + α·L_aux_raw)/N`, backward, AdamW with
//! warm-up and cosine decay, EMA of the teacher, new teacher weights published by version.
//! Emits a [`StepRecord`] (health metrics of §1.10) and a [`FrameRecord`] per update, and
//! writes checkpoints (safetensors) every `checkpoint_every` updates and at the end; a rerun of
//! the same spec continues from the last one.

use crate::items::DataPosition;
use crate::items::{FrameRecord, Masked, StepRecord};
use crate::model::fused::fused_ok;
use crate::model::losses::{self, AuxNorm, RankForm};
use crate::model::optim::{accumulate_grads, loss_and_grad_norm, lr_at, tau_at, AdamW};
use crate::model::{self, in_teacher, Model, ModelConfig, Noise, Weights};
use crate::train::{self, stage_err, CheckpointMeta, CloseOnDrop, TeacherWeights, WeightCell};
use candle_core::{DType, Device, Tensor, Var, D};
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// The predictor's objective (§1.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuxLoss {
    /// Pairwise ranking over masked pairs within each utterance (the method).
    #[default]
    Ranking,
    /// Code alternative `relative=False`: MSE to per-utterance z-scored losses (ablation).
    ZscoreMse,
}

/// What the student does with an update whose loss or gradient norm is not finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop the run with an error naming the update, before the optimiser step: the weights, the
    /// teacher and the checkpoints stay those of the updates before it.
    #[default]
    Stop,
    /// Drop the update (no AdamW step, no EMA; the teacher gets the unchanged weights under the
    /// next version), count it (`skipped_updates` in the stage counts) and go on with the next
    /// batch, as fairseq's fp16 trainer does with a gradient overflow.
    Skip,
}

/// Parameters of `student`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StudentParams {
    /// Updates to run; the run ends there (or earlier, when the data ends). `model.preset: base`
    /// makes the defaults of the schedule the paper's base recipe (400k updates, lr 7.5e-4, 8k
    /// warm-up, τ 0.999 → 0.99999 over 75k, a checkpoint every 5000).
    pub max_steps: u64,
    /// Write a checkpoint every this many updates (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest removed first; 0 keeps all).
    pub keep_checkpoints: usize,
    /// Weight α of the loss predictor's objective (§1.9); 0 trains no predictor.
    pub alpha: f64,
    /// joint: L = (Σℓ + α·L_aux_raw)/N; pairs: L_rec + α·L_aux_raw/(ordered pairs).
    pub aux_norm: AuxNorm,
    /// ranking (pairwise, the method) or zscore_mse (ablation).
    pub aux_loss: AuxLoss,
    /// eps: −ln(σ(Δ)+1e-6) as the reference code; softplus: the stable form.
    pub rank_form: RankForm,
    /// Regression loss of the reconstruction (§8): 0 = MSE (the method); β > 0 = smooth L1
    /// with threshold β (`loss_beta` of data2vec 2.0).
    pub loss_beta: f64,
    /// Scale of the per-element losses before the sum over channels; default 1/√D (§1.7).
    pub loss_scale: Option<f64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up updates (default: 10% of the schedule).
    pub warmup_steps: Option<u64>,
    /// Length of the cosine schedule (default: max_steps).
    pub schedule_steps: Option<u64>,
    /// Adam betas.
    pub betas: [f64; 2],
    /// Adam epsilon.
    pub adam_eps: f64,
    /// Decoupled weight decay (on every parameter, as the reference code).
    pub weight_decay: f64,
    /// Exempt 1-D parameters (biases, norms, ALiBi scales) from weight decay.
    pub exempt_1d: bool,
    /// EMA decay at the start (τ0).
    pub tau0: f64,
    /// EMA decay at the end of its ramp (τe).
    pub tau_end: f64,
    /// Updates over which τ rises linearly from τ0 to τe (τn); default: half the schedule
    /// (method §7; the paper's base recipe is 75,000 of 400,000).
    pub tau_steps: Option<u64>,
    /// Continue from the run directory's last checkpoint when there is one.
    pub resume: bool,
    /// Stop the run when target_std < min_target_std or pred_std < min_pred_std after
    /// health_after updates (§1.10); otherwise they are only logged.
    pub stop_on_collapse: bool,
    pub min_target_std: f64,
    pub min_pred_std: f64,
    pub health_after: u64,
    /// A non-finite loss or gradient norm (checked before the optimiser step): stop (default;
    /// error naming the update, nothing changed or written after it) or skip (drop the update,
    /// count it and go on).
    pub on_nonfinite: OnNonFinite,
    /// `model.dtype: f16` only (fairseq's names and defaults): the initial dynamic loss scale; an
    /// update whose scaled gradients overflow is skipped and the scale halved, and after
    /// `fp16_scale_window` updates without overflow it doubles. Overflow below `min_loss_scale`
    /// stops the run.
    pub fp16_init_scale: f64,
    /// `model.dtype: f16`: clean updates after which the loss scale doubles.
    pub fp16_scale_window: u64,
    /// `model.dtype: f16`: an overflow that would take the loss scale below this stops the run.
    pub min_loss_scale: f64,
    /// Batches per update (fairseq's `update_freq`, gradient accumulation): `k` consecutive
    /// batches make one update, their gradients summed with each batch's loss weighted by its
    /// share of the masked frames, so the update is the one of a single batch holding all `k`.
    /// `max_steps`, the schedules, the EMA, the teacher's versions and the mask curriculum count
    /// updates.
    pub update_freq: u64,
}

impl Default for StudentParams {
    fn default() -> Self {
        StudentParams {
            max_steps: 2000,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            alpha: 0.05,
            aux_norm: AuxNorm::Joint,
            aux_loss: AuxLoss::Ranking,
            rank_form: RankForm::Eps,
            loss_beta: 0.0,
            loss_scale: None,
            lr: 1e-3,
            warmup_steps: None,
            schedule_steps: None,
            betas: [0.9, 0.98],
            adam_eps: 1e-6,
            weight_decay: 0.01,
            exempt_1d: false,
            tau0: 0.99,
            tau_end: 0.999,
            tau_steps: None,
            resume: true,
            stop_on_collapse: false,
            min_target_std: 0.1,
            min_pred_std: 0.01,
            health_after: 5000,
            on_nonfinite: OnNonFinite::Stop,
            fp16_init_scale: 128.0,
            fp16_scale_window: 16384,
            min_loss_scale: 1e-4,
            update_freq: 1,
        }
    }
}

impl Params for StudentParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.max_steps == 0 {
            e.push(ParamError::new("max_steps", "must be at least 1"));
        }
        if self.update_freq == 0 {
            e.push(ParamError::new("update_freq", "must be at least 1"));
        }
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            e.push(ParamError::new(
                "alpha",
                format!("must be ≥ 0, got {}", self.alpha),
            ));
        }
        if !(self.loss_beta >= 0.0 && self.loss_beta.is_finite()) {
            e.push(ParamError::new(
                "loss_beta",
                format!("must be ≥ 0 (0 = MSE), got {}", self.loss_beta),
            ));
        }
        if let Some(s) = self.loss_scale {
            if !(s > 0.0 && s.is_finite()) {
                e.push(ParamError::new(
                    "loss_scale",
                    format!("must be > 0 (or null for 1/√D), got {s}"),
                ));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            e.push(ParamError::new(
                "lr",
                format!("must be > 0, got {}", self.lr),
            ));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                e.push(ParamError::new(
                    format!("betas.{i}"),
                    format!("must be in [0, 1), got {b}"),
                ));
            }
        }
        if !(self.fp16_init_scale > 0.0 && self.fp16_init_scale.is_finite()) {
            e.push(ParamError::new(
                "fp16_init_scale",
                format!("must be > 0, got {}", self.fp16_init_scale),
            ));
        }
        if self.fp16_scale_window == 0 {
            e.push(ParamError::new("fp16_scale_window", "must be at least 1"));
        }
        if !(self.min_loss_scale > 0.0 && self.min_loss_scale <= self.fp16_init_scale) {
            e.push(ParamError::new(
                "min_loss_scale",
                format!(
                    "must be in (0, fp16_init_scale = {}], got {}",
                    self.fp16_init_scale, self.min_loss_scale
                ),
            ));
        }
        if !(self.adam_eps > 0.0) {
            e.push(ParamError::new("adam_eps", "must be > 0"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay < 1.0) {
            e.push(ParamError::new(
                "weight_decay",
                format!("must be in [0, 1), got {}", self.weight_decay),
            ));
        }
        for (n, t) in [("tau0", self.tau0), ("tau_end", self.tau_end)] {
            if !(0.0..=1.0).contains(&t) {
                e.push(ParamError::new(n, format!("must be in [0, 1], got {t}")));
            }
        }
        if let (Some(w), s) = (
            self.warmup_steps,
            self.schedule_steps.unwrap_or(self.max_steps),
        ) {
            if w >= s && w > 0 {
                e.push(ParamError::new("warmup_steps", format!("{w} leaves no decay in a schedule of {s} updates (warm-up must be shorter)")));
            }
        }
        e
    }
}

/// The learner, usable without the engine (tests, benchmarks).
pub struct Student {
    pub p: StudentParams,
    pub cfg: ModelConfig,
    pub device: Device,
    pub vars: BTreeMap<String, Var>,
    /// EMA teacher parameters (teacher scope only).
    pub teacher: Weights,
    pub adam: AdamW,
    /// Completed updates.
    pub step: u64,
    pub seed: u64,
    pub position: Option<DataPosition>,
    pub epoch: u32,
    /// The encoder's output frame rate on the data seen (input rate / front-end stride).
    pub frame_rate: Option<f64>,
    /// `model.dtype: f16`: the dynamic loss scale and the overflow-free updates since it changed.
    pub fp16_scale: (f64, u64),
    /// Data parallel: every rank's position after the last update (checkpoints keep them).
    pub ranks: Option<Vec<Option<DataPosition>>>,
    /// Test hook: multiplies one gradient of the next update by this factor (∞ or NaN injects
    /// a non-finite gradient under a finite loss).
    #[cfg(test)]
    pub(crate) grad_fault: Option<f64>,
}

/// What one update produced.
pub struct StepOut {
    pub record: StepRecord,
    pub frames: FrameRecord,
    /// `Some(why)` when the update was dropped (`on_nonfinite: skip`): the records then hold the
    /// non-finite values and no weight changed.
    pub skipped: Option<String>,
    /// Where the update's time went (the benchmark's breakdown; not logged).
    pub timing: StepTiming,
}

/// What [`Student::train_update`] returns: the update's record and one frame record per batch.
#[derive(Debug, Clone)]
pub struct UpdateOut {
    pub record: StepRecord,
    pub frames: Vec<FrameRecord>,
    pub skipped: Option<String>,
    pub timing: StepTiming,
}

/// One batch's figures of an update, read while its graph is alive.
struct BatchMetrics {
    loss: f64,
    rec: f64,
    aux: f64,
    target_std: f64,
    pred_std: f64,
    rank_agreement: f64,
    teacher_rank_agreement: f64,
    student_pred: Vec<f32>,
    recon: Vec<f32>,
}

impl BatchMetrics {
    /// Metrics of §1.10 of one batch of the update.
    fn of(m: &Masked, parts: &LossParts) -> candle_core::Result<BatchMetrics> {
        let b = &m.taught.batch;
        let (n, t, mm, d) = (b.size(), parts.t, parts.mm, m.taught.target_dim);
        let ell = values(&parts.ell)?;
        let mut teacher_m = Vec::with_capacity(n * mm);
        for r in 0..n {
            for i in 0..t {
                if m.mask[r * t + i] {
                    teacher_m.push(m.taught.pred_loss[r * t + i]);
                }
            }
        }
        let (student_pred, rank_agreement) = match &parts.pred {
            Some((p_all, p_m)) => (
                values(p_all)?,
                losses::rank_agreement(&values(p_m)?, &ell, mm),
            ),
            None => (vec![f32::NAN; n * t], f64::NAN),
        };
        let mut recon = vec![f32::NAN; n * t];
        let mut k = 0;
        for (i, r) in recon.iter_mut().enumerate() {
            if m.mask[i] {
                *r = ell[k];
                k += 1;
            }
        }
        Ok(BatchMetrics {
            loss: parts.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            rec: parts.rec.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            aux: parts.aux.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            target_std: losses::mean_channel_std(&values(&parts.y_m)?, d),
            pred_std: losses::mean_channel_std(&values(&parts.yhat_m)?, d),
            rank_agreement,
            teacher_rank_agreement: losses::rank_agreement(&teacher_m, &ell, mm),
            student_pred,
            recon,
        })
    }
}

/// Wall-clock milliseconds of an update's phases.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTiming {
    /// Front-end, student encoder, decoder, predictor and losses.
    pub forward_ms: f64,
    /// `loss.backward()`.
    pub backward_ms: f64,
    /// Gradient norm, AdamW and the EMA of the teacher.
    pub optimizer_ms: f64,
    /// The step's health metrics and records.
    pub metrics_ms: f64,
    /// Data parallel: the gradients copied into one buffer, summed over the ranks and copied
    /// back (part of `optimizer_ms`).
    pub allreduce_ms: f64,
}

/// What a data-parallel update needs of the other ranks (see [`crate::dist`]): the collective,
/// this rank's place, and the update's totals over every rank, exchanged before it.
pub struct RankShare<'a> {
    pub comm: &'a dyn crate::dist::Collective,
    pub rank: usize,
    pub world: usize,
    /// Masked frames of the update's batches on every rank: each batch's loss is weighted by
    /// its share of them.
    pub masked: u64,
    /// Frames, utterances and seconds of audio of the update on every rank (the step record's).
    pub frames: u64,
    pub utterances: u64,
    pub audio_s: f64,
}

/// Runs `f` on a worker thread of rayon's global pool (here if this already is one) and waits.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl Student {
    /// A fresh student (teacher = exact copy) from `seed`, in `dtype` (f32; f64 for checks).
    pub fn new(
        p: StudentParams,
        cfg: ModelConfig,
        device: Device,
        seed: u64,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let w = model::init_weights(&cfg, crate::seed::model_init(seed), &device, dtype)?;
        let p_scale = p.fp16_init_scale;
        let mut vars = BTreeMap::new();
        let mut teacher = Weights::new();
        for (k, t) in w {
            if in_teacher(&k) {
                teacher.insert(k.clone(), t.copy()?);
            }
            vars.insert(k, Var::from_tensor(&t)?);
        }
        let adam = AdamW::new(
            p.betas[0],
            p.betas[1],
            p.adam_eps,
            p.weight_decay,
            p.exempt_1d,
        );
        Ok(Student {
            p,
            cfg,
            device,
            vars,
            teacher,
            adam,
            step: 0,
            seed,
            position: None,
            epoch: 0,
            frame_rate: None,
            fp16_scale: (p_scale, 0),
            ranks: None,
            #[cfg(test)]
            grad_fault: None,
        })
    }

    /// Current student weights (variables: gradients flow through them).
    pub fn weights(&self) -> Weights {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// What the teacher needs: EMA parameters plus a copy of the student's front-end.
    pub fn teacher_weights(&self) -> candle_core::Result<TeacherWeights> {
        let mut w = self.teacher.clone();
        for (k, v) in &self.vars {
            if k.starts_with("frontend.") {
                w.insert(k.clone(), v.as_tensor().copy()?.detach());
            }
        }
        Ok(TeacherWeights {
            version: self.step,
            weights: w,
        })
    }

    /// The type of the weights, moments and teacher (f32; f64 in gradient checks).
    pub fn master_dtype(&self) -> DType {
        self.vars.values().next().map_or(DType::F32, |v| v.dtype())
    }

    /// The type of the forward and backward passes: `model.dtype` over f32 master weights (an
    /// f64 student, for checks, computes in f64).
    pub fn compute_dtype(&self) -> DType {
        match self.master_dtype() {
            DType::F32 => self.cfg.dtype.dtype(),
            other => other,
        }
    }

    pub fn schedule_steps(&self) -> u64 {
        self.p.schedule_steps.unwrap_or(self.p.max_steps)
    }
    pub fn tau_steps(&self) -> u64 {
        self.p.tau_steps.unwrap_or(self.schedule_steps() / 2)
    }
    pub fn warmup_steps(&self) -> u64 {
        self.p.warmup_steps.unwrap_or(self.schedule_steps() / 10)
    }

    /// The joint loss of §1.9 for a masked batch, with its parts (for the update and for checks).
    pub fn loss(&self, m: &Masked, noise: &mut Noise) -> candle_core::Result<LossParts> {
        let b = &m.taught.batch;
        let (n, f) = (b.size(), b.dim);
        let t = m.taught.frames;
        let d = m.taught.target_dim;
        let mm = m.masked_per_row;
        if mm == 0 || mm >= t {
            candle_core::bail!("batch {}: {mm} masked frames of {t} per row; the student needs some hidden and some visible", b.step);
        }
        if m.mask.len() != n * t {
            candle_core::bail!(
                "batch {}: mask has {} entries for {n}×{t} frames",
                b.step,
                m.mask.len()
            );
        }
        let dtype = self.compute_dtype();
        // Mixed precision: the f32 master weights cast to the compute type (the casts are on the
        // graph, so the gradients reach the master weights in f32).
        let w: Weights = if dtype == self.master_dtype() {
            self.weights()
        } else {
            self.vars
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?)))
                .collect::<candle_core::Result<_>>()?
        };
        let model = Model::new(&self.cfg, &w);
        let acc = model::acc_dtype(dtype);
        let x = Tensor::from_slice(&b.data, (n, b.frames, f), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(dtype)?;
        let z = model.frontend(&x)?;
        if z.dim(1)? != t {
            candle_core::bail!(
                "batch {}: the front-end gives {} frames, the teacher {t}",
                b.step,
                z.dim(1)?
            );
        }
        let (h, positions) = model.student_encoder(&z, &m.mask, &mut Some(noise))?;
        let p_drop = self.cfg.head_input_dropout;
        let dec_dropped = noise.dropout(&h, p_drop)?;
        let dec_in = model.fill(&h, &positions, t, dec_dropped.clone(), noise)?;
        let yhat = model.head("decoder", &dec_in, &self.cfg.decoder, false)?;
        // Masked positions, row by row in time order.
        let idx: Vec<u32> = (0..n)
            .flat_map(|r| {
                (0..t)
                    .filter(move |&i| m.mask[r * t + i])
                    .map(move |i| (r * t + i) as u32)
            })
            .collect();
        if idx.len() != n * mm {
            candle_core::bail!("batch {}: rows do not all hide {mm} frames", b.step);
        }
        let idx = Tensor::from_vec(idx, n * mm, &self.device)?;
        // The teacher's targets, where the teacher left them (on this device, f32).
        let y = &m.taught.targets;
        if y.dims() != [n, t, d] {
            candle_core::bail!(
                "batch {}: targets of shape {:?}, expected [{n}, {t}, {d}]",
                b.step,
                y.dims()
            );
        }
        let y = y.to_device(&self.device)?.to_dtype(acc)?;
        let y_m = y
            .reshape((n * t, d))?
            .index_select(&idx, 0)?
            .reshape((n, mm, d))?;
        // The losses in f32 (or f64) whatever the compute type.
        let yhat_m = yhat
            .reshape((n * t, d))?
            .index_select(&idx, 0)?
            .reshape((n, mm, d))?
            .to_dtype(acc)?;
        let ell = losses::recon_per_frame_with(&yhat_m, &y_m, self.p.loss_beta, self.p.loss_scale)?;
        let count = (n * mm) as f64;
        let rec_sum = ell.sum_all()?;
        let mut pred = None;
        let (loss, aux) = if self.p.alpha > 0.0 {
            // §1.6: an independent dropout per head; the code's quirk (in-place dropout) sends
            // the decoder's dropped `h` through the predictor's dropout again.
            let h2 = if self.cfg.pred_double_dropout {
                noise.dropout(&dec_dropped, p_drop)?
            } else {
                noise.dropout(&h, p_drop)?
            };
            let pred_in = model.fill(&h, &positions, t, h2, noise)?;
            let p_all = model
                .head("loss_predictor", &pred_in, &self.cfg.loss_predictor, true)?
                .to_dtype(acc)?
                .mean(D::Minus1)?;
            let p_m = p_all
                .reshape(n * t)?
                .index_select(&idx, 0)?
                .reshape((n, mm))?;
            // Pair labels and z-scores are made on the device from the detached losses.
            let (raw, pairs) = match self.p.aux_loss {
                AuxLoss::Ranking => losses::ranking_loss_t(&p_m, &ell, self.p.rank_form)?,
                AuxLoss::ZscoreMse => {
                    let (raw, k) = losses::zscore_mse_loss_t(&p_m, &ell)?;
                    (raw, Tensor::new(k as f64, &self.device)?)
                }
            };
            pred = Some((p_all, p_m));
            match self.p.aux_norm {
                AuxNorm::Joint => {
                    let aux = (raw / count)?;
                    (((&rec_sum / count)? + (&aux * self.p.alpha)?)?, aux)
                }
                AuxNorm::Pairs => {
                    // raw · (1/pairs), the reciprocal rounded to raw's type (as `raw / x` does).
                    let inv = pairs.maximum(1.0)?.recip()?.to_dtype(raw.dtype())?;
                    let aux = raw.broadcast_mul(&inv)?;
                    (((&rec_sum / count)? + (&aux * self.p.alpha)?)?, aux)
                }
            }
        } else {
            let zero = Tensor::zeros((), acc, &self.device)?;
            ((&rec_sum / count)?, zero)
        };
        Ok(LossParts {
            loss,
            rec: (rec_sum / count)?,
            aux,
            ell: ell.detach(),
            y_m,
            yhat_m,
            pred,
            mm,
            t,
        })
    }

    /// One update on a masked batch. The loss and the global gradient norm are checked before
    /// the optimiser step: when either is not finite, `on_nonfinite: stop` returns
    /// [`crate::Error::Diverged`] naming the update with nothing changed (weights, optimiser
    /// moments, teacher, step), and `skip` drops the update: the step counter moves on (the batch
    /// is consumed and the teacher's next version is these same weights), AdamW and the EMA do
    /// not run, and [`StepOut::skipped`] says why.
    pub fn train_step(&mut self, m: &Masked) -> crate::Result<StepOut> {
        let mut out = self.train_update(std::slice::from_ref(m))?;
        Ok(StepOut {
            record: out.record,
            frames: out.frames.remove(0),
            skipped: out.skipped,
            timing: out.timing,
        })
    }

    /// One update from the batches of `ms` (`update_freq`: fairseq's gradient accumulation): each
    /// batch's loss weighted by its share of the update's masked frames, the gradients summed, so
    /// the update equals that of one batch holding them all (up to summation order; with
    /// `aux_norm: pairs` the auxiliary term of each batch is weighted by its masked frames, not
    /// by its pairs). One optimiser step, one EMA step, one step of every schedule.
    pub fn train_update(&mut self, ms: &[Masked]) -> crate::Result<UpdateOut> {
        self.train_update_with(ms, None)
    }

    /// [`Student::train_update`] as one rank of a data-parallel run (`share`): the `j`-th
    /// batch draws the noise of part `j·world + rank` of the update, each batch's loss is
    /// weighted by its share of the masked frames of every rank, and the gradients and the loss
    /// are summed over the ranks before the (identical) optimiser step.
    pub fn train_update_with(
        &mut self,
        ms: &[Masked],
        share: Option<&RankShare>,
    ) -> crate::Result<UpdateOut> {
        // Run on a worker of rayon's pool, so that the update's serial stretches and its parallel
        // kernels share that pool's threads instead of adding a thread that competes with them
        // (with 2 threads on 2 cores, the calling thread plus two spinning workers).
        on_pool(|| self.train_update_inner(ms, share))
    }

    /// The gradients of every variable (zeros where there is none), the loss and `extra` (the
    /// step's weighted metric sums), summed over the ranks in one flat f32 buffer; returns the
    /// summed loss and extras.
    fn all_reduce(
        &self,
        share: &RankShare,
        grads: &mut candle_core::backprop::GradStore,
        loss: &Tensor,
        extra: &[f32],
    ) -> crate::Result<(Tensor, Vec<f32>)> {
        let n: usize = self.vars.values().map(|v| v.elem_count()).sum();
        let what = format!("update {}", self.step);
        if !self.device.is_cpu() {
            // A GPU rank: one flat f32 tensor summed on the device (NCCL), split back.
            let mut parts = Vec::with_capacity(self.vars.len() + 1);
            for v in self.vars.values() {
                parts.push(match grads.get(v.as_tensor()) {
                    Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                    None => Tensor::zeros(v.elem_count(), DType::F32, &self.device)?,
                });
            }
            parts.push(loss.to_dtype(DType::F32)?.reshape(1)?);
            parts.push(Tensor::from_slice(extra, extra.len(), &self.device)?);
            let flat = Tensor::cat(&parts, 0)?;
            if let Some(sum) = share.comm.all_reduce_device(&what, &flat) {
                let sum = sum?;
                let mut o = 0;
                for v in self.vars.values() {
                    let k = v.elem_count();
                    let g = sum
                        .narrow(0, o, k)?
                        .reshape(v.shape())?
                        .to_dtype(v.dtype())?;
                    grads.insert(v.as_tensor(), g);
                    o += k;
                }
                let extra = sum.narrow(0, n + 1, extra.len())?.to_vec1::<f32>()?;
                let loss = sum.narrow(0, n, 1)?.reshape(())?.to_dtype(loss.dtype())?;
                return Ok((loss, extra));
            }
        }
        let mut buf: Vec<f32> = Vec::with_capacity(n + 1);
        for v in self.vars.values() {
            match grads.get(v.as_tensor()) {
                Some(g) => buf.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => buf.extend(std::iter::repeat_n(0f32, v.elem_count())),
            }
        }
        buf.push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        buf.extend_from_slice(extra);
        share.comm.all_reduce_sum(&what, &mut buf)?;
        let mut o = 0;
        for v in self.vars.values() {
            let k = v.elem_count();
            let g =
                Tensor::from_slice(&buf[o..o + k], v.shape(), &self.device)?.to_dtype(v.dtype())?;
            grads.insert(v.as_tensor(), g);
            o += k;
        }
        Ok((
            Tensor::new(buf[n], &self.device)?.to_dtype(loss.dtype())?,
            buf[n + 1..].to_vec(),
        ))
    }

    fn train_update_inner(
        &mut self,
        ms: &[Masked],
        share: Option<&RankShare>,
    ) -> crate::Result<UpdateOut> {
        let t0 = Instant::now();
        let Some(last) = ms.last() else {
            return Err("an update needs at least one batch".into());
        };
        let counts: Vec<f64> = ms
            .iter()
            .map(|m| (m.taught.batch.size() * m.masked_per_row) as f64)
            .collect();
        let total: f64 = match share {
            Some(s) => s.masked as f64,
            None => counts.iter().sum::<f64>(),
        }
        .max(1.0);
        // One batch on one process: its loss as it is (the update of before).
        let alone = ms.len() == 1 && share.is_none();
        let (rank, world) = share.map_or((0, 1), |s| (s.rank as u64, s.world as u64));
        // f16: the loss scaled before the backward pass, the gradients unscaled after it.
        let fp16 = self.compute_dtype() == DType::F16;
        let scale = if fp16 { self.fp16_scale.0 } else { 1.0 };
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss_acc: Option<Tensor> = None;
        let mut parts_out: Vec<BatchMetrics> = Vec::with_capacity(ms.len());
        let (mut fwd_ms, mut bwd_ms) = (0.0, 0.0);
        for (j, m) in ms.iter().enumerate() {
            let tb = Instant::now();
            let part = j as u64 * world + rank;
            let mut noise = Noise::on(
                crate::seed::update_noise_part(self.seed, self.step, part),
                crate::seed::update_device_noise_part(self.seed, self.step, part),
                &self.device,
            )?;
            let parts = self.loss(m, &mut noise)?;
            // One batch: its loss as it is (the update of before); several: weighted by its share
            // of the masked frames.
            let l = if alone {
                parts.loss.clone()
            } else {
                (&parts.loss * (counts[j] / total))?
            };
            let tf = Instant::now();
            let g = if fp16 {
                (&l * scale)?.backward()?
            } else {
                l.backward()?
            };
            bwd_ms += tf.elapsed().as_secs_f64() * 1e3;
            fwd_ms += (tf - tb).as_secs_f64() * 1e3;
            grads = Some(accumulate_grads(grads.take(), g, &self.vars)?);
            let ld = l.detach();
            loss_acc = Some(match loss_acc.take() {
                None => ld,
                Some(a) => (a + ld)?,
            });
            // The batch's figures now: its graph is freed before the next batch's forward.
            parts_out.push(BatchMetrics::of(m, &parts)?);
        }
        let (Some(mut grads), Some(mut loss_t)) = (grads, loss_acc) else {
            return Err("an update needs at least one batch".into());
        };
        let t_bwd = Instant::now();
        let mut allreduce_ms = 0.0;
        // Data parallel: the step's health metrics over every rank's batches, as one process
        // weighs them (each batch by its share of the update's masked frames, finite values only):
        // (Σ w·x, Σ w) per metric, summed with the gradients.
        let metric_of: [fn(&BatchMetrics) -> f64; 6] = [
            |b| b.rec,
            |b| b.aux,
            |b| b.target_std,
            |b| b.pred_std,
            |b| b.rank_agreement,
            |b| b.teacher_rank_agreement,
        ];
        let mut global_metrics: Option<[f64; 6]> = None;
        if let Some(s) = share {
            let mut extra = Vec::with_capacity(12);
            for f in metric_of {
                let (mut a, mut ws) = (0.0f64, 0.0f64);
                for (b, c) in parts_out.iter().zip(&counts) {
                    let x = f(b);
                    if x.is_finite() {
                        a += c / total * x;
                        ws += c / total;
                    }
                }
                extra.push(a as f32);
                extra.push(ws as f32);
            }
            let (l, sums) = self.all_reduce(s, &mut grads, &loss_t, &extra)?;
            loss_t = l;
            let mut g = [f64::NAN; 6];
            for (i, m) in g.iter_mut().enumerate() {
                let (a, ws) = (sums[2 * i] as f64, sums[2 * i + 1] as f64);
                if ws > 0.0 {
                    *m = a / ws;
                }
            }
            global_metrics = Some(g);
            allreduce_ms = t_bwd.elapsed().as_secs_f64() * 1e3;
        }
        #[cfg(test)]
        if let Some(x) = self.grad_fault.take() {
            if let Some(v) = self.vars.get("decoder.proj.bias") {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let g = (g * x)?;
                    grads.insert(v.as_tensor(), g);
                }
            }
        }
        // The loss and the gradient norm in one transfer from the device.
        let (loss_value, grad_norm) = loss_and_grad_norm(&loss_t, &self.vars, &grads)?;
        let grad_norm = grad_norm / scale;
        let lr = lr_at(
            self.step,
            self.p.lr,
            self.warmup_steps(),
            self.schedule_steps(),
        );
        let finite = loss_value.is_finite() && grad_norm.is_finite();
        let skipped = if finite {
            if fp16 {
                unscale(&self.vars, &mut grads, scale)?;
                self.fp16_scale.1 += 1;
                if self.fp16_scale.1 >= self.p.fp16_scale_window {
                    self.fp16_scale = (self.fp16_scale.0 * 2.0, 0);
                }
            }
            None
        } else if fp16 {
            // fairseq's fp16 trainer: an overflow drops the update and halves the scale, whatever
            // `on_nonfinite` says; overflow at the smallest scale is divergence.
            let lowered = scale / 2.0;
            if lowered < self.p.min_loss_scale {
                return Err(crate::Error::Diverged {
                    step: self.step,
                    what: format!("the f16 gradients overflow even at loss scale {scale} (min_loss_scale {}); stopped before the optimiser step (lower lr, or train in bf16)", self.p.min_loss_scale),
                });
            }
            self.fp16_scale = (lowered, 0);
            Some(format!(
                "f16 gradient overflow at loss scale {scale} (loss {loss_value}, gradient norm {grad_norm}); scale lowered to {lowered}"
            ))
        } else {
            let what = if loss_value.is_finite() {
                format!("the loss is finite ({loss_value:.6}) but the gradient norm is {grad_norm}")
            } else {
                format!("the loss is {loss_value} (gradient norm {grad_norm})")
            };
            match self.p.on_nonfinite {
                OnNonFinite::Stop => {
                    return Err(crate::Error::Diverged {
                        step: self.step,
                        what: format!("{what}; stopped before the optimiser step, so the weights, the teacher and the checkpoints are those of the updates before (lower lr, or set on_nonfinite: skip to drop such updates)"),
                    });
                }
                OnNonFinite::Skip => Some(what),
            }
        };
        if skipped.is_none() {
            self.adam.step(&self.vars, &grads, lr)?;
        }
        let update = self.step;
        self.step += 1;
        // EMA (§3) with τ(t+1); a dropped update leaves the teacher as it was.
        let tau = tau_at(self.step, self.p.tau0, self.p.tau_end, self.tau_steps());
        if skipped.is_none() {
            for (k, tw) in self.teacher.iter_mut() {
                if let Some(v) = self.vars.get(k) {
                    *tw = if fused_ok(tw) && fused_ok(v.as_tensor()) {
                        crate::model::fused::ema(tw, v.as_tensor(), tau)?
                    } else {
                        ((&*tw * tau)? + (v.as_tensor() * (1.0 - tau))?)?.detach()
                    };
                }
            }
        }
        // Work queued on a GPU is finished before the weights go to the teacher's thread (candle
        // queues on the calling thread's stream).
        self.device.synchronize()?;
        let t_opt = Instant::now();
        let lb = &last.taught.batch;
        self.position = Some(lb.position);
        self.epoch = lb.epoch;
        self.frame_rate = Some(lb.frame_rate / self.cfg.stride() as f64);
        // One batch: its step as the batcher numbered it (the update's, as before); several: the
        // update's number.
        let step = if alone {
            ms[0].taught.batch.step
        } else {
            update
        };
        let w: Vec<f64> = counts.iter().map(|c| c / total).collect();
        // Weighted means over the batches, of the finite values only (NaN where none is).
        let mean = |f: &dyn Fn(&BatchMetrics) -> f64| -> f64 {
            let (mut a, mut ws) = (0.0, 0.0);
            for (b, &wj) in parts_out.iter().zip(&w) {
                let x = f(b);
                if x.is_finite() {
                    a += wj * x;
                    ws += wj;
                }
            }
            if ws > 0.0 {
                a / ws
            } else {
                f64::NAN
            }
        };
        let single = |f: &dyn Fn(&BatchMetrics) -> f64| -> f64 {
            if parts_out.len() == 1 {
                f(&parts_out[0])
            } else {
                mean(f)
            }
        };
        let first = &ms[0];
        let (mut frames_n, mut masked_n, mut utts, mut audio) = (0usize, 0usize, 0usize, 0.0);
        for m in ms {
            let b = &m.taught.batch;
            let n = b.size();
            frames_n += n * m.taught.frames;
            masked_n += n * m.masked_per_row;
            // Distinct audio: cloned rows (clone_batch) are counted once.
            utts += n / m.clones.max(1);
            audio += ((n / m.clones.max(1)) * b.frames) as f64 / b.frame_rate;
        }
        let record = StepRecord {
            step,
            epoch: lb.epoch,
            lr,
            loss: if alone { parts_out[0].loss } else { loss_value },
            loss_rec: global_metrics.map_or_else(|| single(&|b| b.rec), |g| g[0]),
            loss_aux: global_metrics.map_or_else(|| single(&|b| b.aux), |g| g[1]),
            tau,
            hard_ratio: first.hard_ratio as f64,
            masked_frac: if alone {
                first.masked_per_row as f64 / first.taught.frames as f64
            } else if let Some(s) = share {
                s.masked as f64 / s.frames.max(1) as f64
            } else {
                masked_n as f64 / frames_n.max(1) as f64
            },
            frames: share.map_or(frames_n as u64, |s| s.frames),
            utterances: share.map_or(utts as u64, |s| s.utterances),
            audio_s: share.map_or(audio, |s| s.audio_s),
            step_ms: t0.elapsed().as_secs_f64() * 1e3,
            target_std: global_metrics.map_or_else(|| single(&|b| b.target_std), |g| g[2]),
            pred_std: global_metrics.map_or_else(|| single(&|b| b.pred_std), |g| g[3]),
            rank_agreement: global_metrics.map_or_else(|| single(&|b| b.rank_agreement), |g| g[4]),
            teacher_rank_agreement: global_metrics
                .map_or_else(|| single(&|b| b.teacher_rank_agreement), |g| g[5]),
            grad_norm,
            teacher_version: first.taught.teacher_version,
            checkpoint_follows: false,
        };
        let stride = self.cfg.stride();
        let frames: Vec<FrameRecord> = ms
            .iter()
            .zip(parts_out)
            .map(|(m, bm)| {
                let b = &m.taught.batch;
                FrameRecord {
                    step,
                    epoch: b.epoch,
                    utt_ids: b.utt_ids.clone(),
                    offsets_s: b.offsets.iter().map(|&o| o as f64 / b.frame_rate).collect(),
                    frame_rate: b.frame_rate / stride as f64,
                    frames: m.taught.frames,
                    mask: m.mask.clone(),
                    hard: m.hard.clone(),
                    teacher_pred: m.taught.pred_loss.clone(),
                    student_pred: bm.student_pred,
                    recon_loss: bm.recon,
                    hard_ratio: m.hard_ratio,
                    features: Arc::new(b.data.clone()),
                    feature_dim: b.dim,
                    checkpoint_follows: false,
                }
            })
            .collect();
        let ms_of = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let timing = StepTiming {
            forward_ms: fwd_ms,
            backward_ms: bwd_ms,
            optimizer_ms: ms_of(t_bwd, t_opt),
            metrics_ms: ms_of(t_opt, Instant::now()),
            allreduce_ms,
        };
        Ok(UpdateOut {
            record,
            frames,
            skipped,
            timing,
        })
    }

    /// Every tensor a checkpoint holds.
    pub fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.vars {
            out.insert(format!("student.{k}"), v.as_tensor().clone());
        }
        for (k, v) in &self.teacher {
            out.insert(format!("teacher.{k}"), v.clone());
        }
        for (k, v) in &self.adam.m {
            out.insert(format!("adam.m.{k}"), v.clone());
        }
        for (k, v) in &self.adam.v {
            out.insert(format!("adam.v.{k}"), v.clone());
        }
        out
    }

    pub fn checkpoint_meta(&self) -> CheckpointMeta {
        CheckpointMeta {
            format: 1,
            step: self.step,
            epoch: self.epoch,
            position: self.position,
            seed: self.seed,
            rng: "chacha8 streams derived from (seed, step): dropout, layerdrop and noise tokens of update t use mix(seed, t, 1)".into(),
            adam_t: self.adam.t,
            model: self.cfg.clone(),
            tensors: format!("step-{:08}.safetensors", self.step),
            frame_rate: self.frame_rate,
            fp16_scale: (self.compute_dtype() == DType::F16).then_some(self.fp16_scale),
            finetune: None,
            ranks: self.ranks.clone(),
        }
    }

    /// Restores the state of a checkpoint.
    pub fn restore(
        &mut self,
        meta: &CheckpointMeta,
        tensors: &BTreeMap<String, Tensor>,
    ) -> crate::Result<()> {
        // The compute type may change between attempts (the weights are f32 either way).
        let same_model = {
            let mut a = meta.model.clone();
            a.dtype = self.cfg.dtype;
            a == self.cfg
        };
        if !same_model {
            return Err("the checkpoint was written for another model: block (remove the run's checkpoints/ directory, or set student.with.resume: false)".into());
        }
        for (k, v) in &self.vars {
            let t = tensors
                .get(&format!("student.{k}"))
                .ok_or_else(|| format!("checkpoint lacks student.{k}"))?;
            v.set(t).map_err(|e| format!("student.{k}: {e}"))?;
        }
        for (k, v) in self.teacher.iter_mut() {
            *v = tensors
                .get(&format!("teacher.{k}"))
                .ok_or_else(|| format!("checkpoint lacks teacher.{k}"))?
                .clone();
        }
        self.adam.m.clear();
        self.adam.v.clear();
        for (k, v) in tensors {
            if let Some(name) = k.strip_prefix("adam.m.") {
                self.adam.m.insert(name.to_string(), v.clone());
            } else if let Some(name) = k.strip_prefix("adam.v.") {
                self.adam.v.insert(name.to_string(), v.clone());
            }
        }
        self.adam.t = meta.adam_t;
        self.step = meta.step;
        self.position = meta.position;
        self.epoch = meta.epoch;
        self.frame_rate = meta.frame_rate;
        self.ranks = meta.ranks.clone();
        if let Some(sc) = meta.fp16_scale {
            self.fp16_scale = sc;
        }
        Ok(())
    }
}

/// The loss and what the metrics need.
pub struct LossParts {
    pub loss: Tensor,
    pub rec: Tensor,
    pub aux: Tensor,
    /// Per-frame losses at masked frames `[B, M]` (detached).
    pub ell: Tensor,
    pub y_m: Tensor,
    pub yhat_m: Tensor,
    /// Student predictor output `[B, T]` and at masked frames `[B, M]`.
    pub pred: Option<(Tensor, Tensor)>,
    pub mm: usize,
    pub t: usize,
}

/// The `student` stage.
pub struct StudentStage {
    student: Student,
    cell: Arc<WeightCell>,
    run_dir: PathBuf,
    /// Said once the stage runs (where the progress bars are): the checkpoints passed over and
    /// the one resumed from.
    resumed_from: Vec<String>,
    /// Data parallel: this process's rank of the run.
    dist: Option<Arc<crate::dist::Dist>>,
    /// Data parallel: a rank's data ended, so every rank stopped.
    peer_stopped: bool,
    /// Data parallel: the all-reduce's milliseconds and the updates' milliseconds, summed.
    allreduce_ms: (f64, f64),
}

impl StageDef for StudentStage {
    type Params = StudentParams;
    /// A rerun with a larger `max_steps` trains on from the last checkpoint (same run).
    const CONTINUABLE: &'static [&'static str] = &["max_steps"];
    const KIND: &'static str = "student";
    const DOC: &'static str = "Updates the student on masked batches (L = L_rec + α·L_aux), keeps the EMA teacher and publishes\nits weights by version, logs steps and frames, and checkpoints (resumes from the run's last one).";

    /// `model.preset: base` brings the paper's base schedule (data2vec 2.0's base recipe, which
    /// EH-MAM keeps): 400k updates, peak lr 7.5e-4 after 8k warm-up updates, τ from 0.999 to
    /// 0.99999 over 75k updates, a checkpoint every 5000 updates. Keys in `with:` override.
    fn context_defaults(ctx: &StageContext) -> Option<serde_yaml::Value> {
        let preset = ctx.model.as_ref()?.get("preset")?.as_str()?;
        (preset == "base").then(|| {
            serde_yaml::from_str(
                "{max_steps: 400000, lr: 7.5e-4, warmup_steps: 8000, tau0: 0.999, tau_end: 0.99999, tau_steps: 75000, checkpoint_every: 5000}",
            )
            .expect("a literal mapping")
        })
    }

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Masked>(
            "in",
            "masked batches (any mask.* stage)",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![
            Port::cloneable::<StepRecord>("steps", "one record per update (log.steps)"),
            Port::cloneable::<FrameRecord>(
                "frames",
                "frame-level view of each update (log.frames)",
            ),
        ]
    }
    fn validate(p: &StudentParams, ctx: &StageContext) -> Vec<ParamError> {
        let mut e = train::validate_model(ctx);
        if p.resume {
            match train::find_checkpoint(&crate::dist::checkpoint_root(&ctx.run_dir)) {
                Err(err) => e.push(ParamError::new(
                    "resume",
                    format!("{err} (set resume: false to start afresh)"),
                )),
                Ok(Some(found)) => {
                    let (rank, world) =
                        crate::dist::current().map_or((0, 1), |d| (d.rank, d.world));
                    if let Err(err) = found.meta.rank_position(rank, world) {
                        e.push(ParamError::new("resume", err));
                    }
                }
                Ok(None) => {}
            }
        }
        e
    }
    fn link(
        p: &StudentParams,
        ctx: &StageContext,
        linker: &mut pipeline::Linker,
    ) -> Vec<ParamError> {
        let mut e = Vec::new();
        let mut provide = |r: Result<(), pipeline::AlreadyProvided>| {
            if let Err(other) = r {
                e.push(ParamError::new(
                    "",
                    format!(
                        "stage `{}` is a student too: one spec trains one student",
                        other.by
                    ),
                ));
            }
        };
        provide(linker.provide(
            &train::TOTAL_UPDATES,
            p.schedule_steps.unwrap_or(p.max_steps),
        ));
        provide(linker.provide(&train::TEACHER_WEIGHTS, Arc::new(WeightCell::default())));
        // A data-parallel run's update is `update_freq` batches on each of its ranks.
        let world = crate::dist::current().map_or(1, |d| d.world) as u64;
        provide(linker.provide(&train::UPDATE_FREQ, p.update_freq.max(1) * world));
        if let Some(pos) = resume_position(p, ctx) {
            provide(crate::stream::provide_resume(linker, pos));
        }
        e
    }
    fn create(p: &StudentParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        let cfg = train::model_config(ctx)?;
        let device = train::device(&ctx.device)?;
        let mut student = Student::new(p.clone(), cfg, device.clone(), ctx.seed, DType::F32)
            .map_err(stage_err("student: building the model"))?;
        let mut resumed_at = None;
        let mut resumed_from = Vec::new();
        let (rank, world) = crate::dist::current().map_or((0, 1), |d| (d.rank, d.world));
        if p.resume {
            if let Some(found) =
                train::find_checkpoint(&crate::dist::checkpoint_root(&ctx.run_dir))?
            {
                let (meta, path) = (&found.meta, &found.path);
                let tensors = train::load_tensors(path, &device)?;
                student
                    .restore(meta, &tensors)
                    .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
                resumed_from = found.fallback_notes();
                resumed_from.push(format!(
                    "resuming from {} (step {})",
                    path.display(),
                    meta.step
                ));
                resumed_at = meta
                    .rank_position(rank, world)
                    .map_err(StageError::failed)?;
            }
        }
        // The data stages start where validation said the checkpoint continues; a checkpoint
        // that appeared or went away since would put the teacher and the student out of step.
        if resumed_at != ctx.links.get(&crate::stream::RESUME_POSITION).map(|p| *p) {
            return Err(StageError::failed(format!(
                "the checkpoints in {} changed between validation and start (a run moved aside or another process writing there); run again",
                ctx.run_dir.join("checkpoints").display()
            )));
        }
        let cell = ctx.links.get(&train::TEACHER_WEIGHTS).ok_or_else(|| {
            StageError::failed("internal: the student's weight cell was not linked")
        })?;
        Ok(StudentStage {
            student,
            cell: (*cell).clone(),
            run_dir: ctx.run_dir.clone(),
            resumed_from,
            dist: crate::dist::current(),
            peer_stopped: false,
            allreduce_ms: (0.0, 0.0),
        })
    }
}

/// Divides every gradient by the f16 loss scale `scale`.
fn unscale(
    vars: &BTreeMap<String, Var>,
    grads: &mut candle_core::backprop::GradStore,
    scale: f64,
) -> candle_core::Result<()> {
    for v in vars.values() {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * (1.0 / scale))?);
        }
    }
    Ok(())
}

/// Where the data stream continues when the student resumes from its latest checkpoint.
fn resume_position(p: &StudentParams, ctx: &StageContext) -> Option<crate::items::DataPosition> {
    if !p.resume {
        return None;
    }
    let found = train::find_checkpoint(&crate::dist::checkpoint_root(&ctx.run_dir)).ok()??;
    let (rank, world) = crate::dist::current().map_or((0, 1), |d| (d.rank, d.world));
    found.meta.rank_position(rank, world).ok()?
}

impl StudentStage {
    fn checkpoint(&self) -> Result<(), StageError> {
        // Data parallel: rank 0 writes the run's checkpoints (every rank holds the same state).
        if crate::dist::current().is_some_and(|d| d.rank != 0) {
            return Ok(());
        }
        let s = &self.student;
        train::save_checkpoint(
            &self.run_dir,
            &s.checkpoint_meta(),
            &s.checkpoint_tensors(),
            s.p.keep_checkpoints,
        )?;
        Ok(())
    }
}

impl Stage for StudentStage {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let _close = CloseOnDrop(self.cell.clone());
        for line in std::mem::take(&mut self.resumed_from) {
            io.note(line);
        }
        let max = self.student.p.max_steps;
        if self.student.step >= max {
            io.note(format!(
                "already at step {} of max_steps {}; nothing to train",
                self.student.step, max
            ));
            return Ok(());
        }
        self.cell.publish(
            self.student
                .teacher_weights()
                .map_err(stage_err("student"))?,
        );
        io.progress().set_length(max, "steps");
        io.progress().inc(self.student.step);
        let mut last_saved = self.student.step;
        let mut skipped = 0u64;
        // A data-parallel run's update holds `update_freq` batches of every rank.
        let per_rank = self.student.p.update_freq.max(1);
        let k = per_rank * self.dist.as_ref().map_or(1, |d| d.world as u64);
        let mut group: Vec<Masked> = Vec::new();
        let mut ended = false;
        loop {
            // The batches of one update (k consecutive ones); a stream that ends inside an update
            // trains on what it has (as fairseq's last update of an epoch).
            let next = if ended { None } else { io.recv::<Masked>(0)? };
            match next {
                Some(m) => {
                    let u = m.taught.batch.step / k;
                    if u < self.student.step {
                        continue;
                    }
                    let same = group.first().is_none_or(|g| g.taught.batch.step / k == u);
                    if same {
                        group.push(m);
                        if (group.len() as u64) < per_rank {
                            continue;
                        }
                    } else {
                        // A gap in the stream: the update so far, then this batch starts the next.
                        let ms = std::mem::replace(&mut group, vec![m]);
                        if self.update(io, &ms, &mut skipped, &mut last_saved)? {
                            break;
                        }
                        continue;
                    }
                }
                None => {
                    ended = true;
                    if group.is_empty() {
                        break;
                    }
                }
            }
            let ms = std::mem::take(&mut group);
            if self.update(io, &ms, &mut skipped, &mut last_saved)? || ended {
                break;
            }
        }
        if let Some(d) = self.dist.clone() {
            // This rank's data ended first: the others, waiting at their next update, learn it.
            if self.student.step < max && !self.peer_stopped {
                let step = self.student.step;
                d.comm
                    .exchange(&format!("update {step}"), &[0; HEADER])
                    .map_err(StageError::failed)?;
                io.note(format!(
                    "rank {}: the data stream ended before update {step}; every rank stops there",
                    d.rank
                ));
            }
            let (a, u) = self.allreduce_ms;
            if u > 0.0 {
                io.note(format!(
                    "rank {} of {}: all-reduce {:.2} ms of {:.2} ms per update ({:.1}% of the update)",
                    d.rank,
                    d.world,
                    a / (self.student.step.max(1) as f64),
                    u / (self.student.step.max(1) as f64),
                    100.0 * a / u
                ));
            }
        }
        if self.student.step != last_saved {
            self.checkpoint()?;
        }
        Ok(())
    }
}

/// Words of a rank's update header (see [`StudentStage::exchange`]).
const HEADER: usize = 12;

impl StudentStage {
    /// One update from the batches `ms`; true once `max_steps` is reached.
    fn update(
        &mut self,
        io: &mut StageIo,
        ms: &[Masked],
        skipped: &mut u64,
        last_saved: &mut u64,
    ) -> Result<bool, StageError> {
        let max = self.student.p.max_steps;
        let step = self.student.step;
        let share = match self.dist.clone() {
            Some(d) => match self.exchange(io, &d, ms)? {
                Some(s) => Some((d, s)),
                None => return Ok(true),
            },
            None => None,
        };
        let rank_share = share.as_ref().map(|(d, s)| RankShare {
            comm: d.comm.as_ref(),
            rank: d.rank,
            world: d.world,
            masked: s.0,
            frames: s.1,
            utterances: s.2,
            audio_s: s.3,
        });
        let out = self
            .student
            .train_update_with(ms, rank_share.as_ref())
            .map_err(|e| match e {
                e @ crate::Error::Diverged { .. } => StageError::failed(e.to_string()),
                e => StageError::failed(format!("update {step}: {e}")),
            })?;
        // The teacher may be waiting for these weights.
        self.cell.publish(
            self.student
                .teacher_weights()
                .map_err(stage_err("student"))?,
        );
        io.progress().inc(1);
        if share.is_some() {
            self.allreduce_ms.0 += out.timing.allreduce_ms;
            self.allreduce_ms.1 += out.record.step_ms;
        }
        if let Some(why) = &out.skipped {
            *skipped += 1;
            io.count("skipped_updates", 1);
            if *skipped <= 10 {
                io.note(format!(
                    "update {step} skipped (on_nonfinite: skip): {why}{}",
                    if *skipped == 10 {
                        "; further skipped updates are only counted (skipped_updates)"
                    } else {
                        ""
                    }
                ));
            }
        }
        let r = &out.record;
        let s = &self.student.p;
        if out.skipped.is_none()
            && s.stop_on_collapse
            && self.student.step > s.health_after
            && (r.target_std < s.min_target_std || r.pred_std < s.min_pred_std)
        {
            self.checkpoint()?;
            return Err(StageError::failed(format!(
                "update {step}: collapse guard: target_std {:.4} (min {}), pred_std {:.4} (min {})",
                r.target_std, s.min_target_std, r.pred_std, s.min_pred_std
            )));
        }
        // `self.student.step` counts this update already: a checkpoint follows it when due.
        let every = self.student.p.checkpoint_every;
        let checkpoint_due = every > 0 && self.student.step % every == 0;
        // A dropped update has no row: its values are not finite and nothing was learned.
        if out.skipped.is_none() {
            if io.is_connected(0) {
                let mut record = out.record;
                record.checkpoint_follows = checkpoint_due;
                ok_or_closed(io.send(0, record))?;
            }
            if io.is_connected(1) {
                let n = out.frames.len();
                for (i, mut f) in out.frames.into_iter().enumerate() {
                    f.checkpoint_follows = checkpoint_due && i + 1 == n;
                    ok_or_closed(io.send(1, f))?;
                }
            }
        }
        if checkpoint_due {
            self.checkpoint()?;
            *last_saved = self.student.step;
        }
        Ok(self.student.step >= max)
    }
}

impl StudentStage {
    /// Data parallel, before an update: every rank's header (has data, update number, masked
    /// frames, frames, utterances, seconds of audio, data position) through rank 0. Returns the
    /// update's totals over the ranks (masked, frames, utterances, audio seconds), or `None`
    /// when a rank's data ended (every rank stops).
    #[allow(clippy::type_complexity)]
    fn exchange(
        &mut self,
        io: &mut StageIo,
        d: &crate::dist::Dist,
        ms: &[Masked],
    ) -> Result<Option<(u64, u64, u64, f64)>, StageError> {
        let step = self.student.step;
        let kw = self.student.p.update_freq.max(1) * d.world as u64;
        let (mut masked, mut frames, mut utts, mut audio) = (0u64, 0u64, 0u64, 0f64);
        for m in ms {
            let b = &m.taught.batch;
            let n = b.size();
            masked += (n * m.masked_per_row) as u64;
            frames += (n * m.taught.frames) as u64;
            let distinct = n / m.clones.max(1);
            utts += distinct as u64;
            audio += (distinct * b.frames) as f64 / b.frame_rate;
        }
        let u = ms.first().map_or(0, |m| m.taught.batch.step / kw);
        let pos = ms.last().map(|m| m.taught.batch.position);
        let p = pos.unwrap_or_default();
        let mine: [u64; HEADER] = [
            1,
            u,
            masked,
            frames,
            utts,
            audio.to_bits(),
            pos.is_some() as u64,
            p.epoch as u64,
            p.start,
            p.flush,
            p.index,
            p.step,
        ];
        let table = d
            .comm
            .exchange(&format!("update {step}"), &mine)
            .map_err(StageError::failed)?;
        let dry: Vec<usize> = (0..table.len()).filter(|&r| table[r][0] == 0).collect();
        if !dry.is_empty() {
            self.peer_stopped = true;
            io.note(format!(
                "the data stream of {} ended before update {step}; every rank stops there",
                crate::dist::name_ranks(&dry)
            ));
            return Ok(None);
        }
        if table.iter().any(|h| h[1] != u) {
            let at = table
                .iter()
                .enumerate()
                .map(|(r, h)| format!("rank {r} at update {}", h[1]))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(StageError::failed(format!(
                "the ranks are out of step ({at}): their data streams differ (the same spec, data and world size on every rank?)"
            )));
        }
        self.student.ranks = Some(
            table
                .iter()
                .map(|h| {
                    (h[6] == 1).then_some(DataPosition {
                        epoch: h[7] as u32,
                        start: h[8],
                        flush: h[9],
                        index: h[10],
                        step: h[11],
                    })
                })
                .collect(),
        );
        let sum = |i: usize| table.iter().map(|h| h[i]).sum::<u64>();
        Ok(Some((
            sum(2),
            sum(3),
            sum(4),
            table.iter().map(|h| f64::from_bits(h[5])).sum(),
        )))
    }
}

/// A log sink that stopped early does not stop training.
fn ok_or_closed(r: Result<(), StageError>) -> Result<(), StageError> {
    match r {
        Err(StageError::Closed) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::{Batch, Taught};

    fn tiny() -> ModelConfig {
        let v: serde_yaml::Value = serde_yaml::from_str(
            "{frontend: {input_dim: 6}, encoder: {dim: 8, heads: 2, ffn: 12, layers: 2, top_k: 2, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}, decoder: {dim: 4, layers: 2, kernel: 3, groups: 2}, loss_predictor: {dim: 4, layers: 2, kernel: 3, groups: 2}}",
        )
        .unwrap();
        ModelConfig::from_spec(Some(&v)).unwrap()
    }

    /// A masked batch of 2 rows × 12 frames, 5 hidden per row, at `step`.
    fn batch(cfg: &ModelConfig, step: u64, poison: bool) -> Masked {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(step);
        let (rows, t, f, d) = (2, 12, cfg.input_dim(), cfg.encoder.dim);
        let mut data: Vec<f32> = (0..rows * t * f)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        if poison {
            data[3] = f32::INFINITY;
        }
        let targets: Vec<f32> = (0..rows * t * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut mask = vec![false; rows * t];
        for r in 0..rows {
            for k in 0..5 {
                mask[r * t + (k * 7 + r) % t] = true;
            }
        }
        let batch = Batch {
            step,
            position: DataPosition::default(),
            epoch: 0,
            utt_ids: (0..rows).map(|r| format!("u{r}")).collect(),
            offsets: vec![0; rows],
            lengths: vec![t; rows],
            longest: t,
            frames: t,
            dim: f,
            frame_rate: 50.0,
            data,
            padding_mask: None,
            transcripts: Vec::new(),
            whole: Vec::new(),
        };
        Masked {
            taught: Taught {
                batch,
                targets: Tensor::from_vec(targets, (rows, t, d), &Device::Cpu).unwrap(),
                target_dim: d,
                frames: t,
                pred_loss: vec![0.0; rows * t],
                teacher_version: step,
            },
            hard: vec![false; rows * t],
            mask,
            masked_per_row: 5,
            hard_ratio: 0.0,
            spans: vec![1; rows],
            hard_spans: vec![0; rows],
            strategy: "test".into(),
            clones: 1,
        }
    }

    /// Two masked batches as one (rows of `a`, then rows of `b`).
    fn concat(a: &Masked, b: &Masked) -> Masked {
        let mut c = a.clone();
        let (x, y) = (&mut c.taught.batch, &b.taught.batch);
        x.utt_ids = a
            .taught
            .batch
            .utt_ids
            .iter()
            .map(|u| format!("a{u}"))
            .collect();
        x.utt_ids.extend(y.utt_ids.iter().map(|u| format!("b{u}")));
        x.offsets.extend(&y.offsets);
        x.lengths.extend(&y.lengths);
        x.data.extend(&y.data);
        c.taught.targets = Tensor::cat(&[&a.taught.targets, &b.taught.targets], 0).unwrap();
        c.taught.pred_loss.extend(&b.taught.pred_loss);
        c.mask.extend(&b.mask);
        c.hard.extend(&b.hard);
        c.spans.extend(&b.spans);
        c.hard_spans.extend(&b.hard_spans);
        c
    }

    /// Issue 14: `update_freq: 2` — one update from two batches equals one update from their
    /// concatenation, within 1e-6 relative on every parameter, the teacher's EMA and Adam's
    /// moments included, over two updates in a row (the predictor and L_aux on; dropout, noise
    /// tokens and layerdrop off, whose draws are per batch).
    #[test]
    fn two_batches_of_one_update_equal_their_concatenation() {
        // f64: within 1e-6 of every tensor's scale. f32: the summation order shows where Adam
        // divides a tiny gradient by a tiny second moment (the predictor's LayerNorm bias moves
        // by 3e-8 either way), so there tensors are held to 1e-5 of max(their scale, 1e-2).
        accumulation_matches(DType::F64, 1e-6, 1e-6);
        accumulation_matches(DType::F32, 1e-5, 1e-2);
    }

    fn accumulation_matches(dtype: DType, tol: f64, floor: f64) {
        let mut cfg = tiny();
        cfg.encoder.dropout = 0.0;
        cfg.encoder.attention_dropout = 0.0;
        cfg.encoder.layerdrop = 0.0;
        cfg.head_input_dropout = 0.0;
        cfg.mask_noise_std = 0.0;
        let p = StudentParams {
            max_steps: 10,
            warmup_steps: Some(1),
            checkpoint_every: 0,
            update_freq: 2,
            ..StudentParams::default()
        };
        let mut acc = Student::new(p.clone(), cfg.clone(), Device::Cpu, 3, dtype).unwrap();
        let mut one = Student::new(p, cfg.clone(), Device::Cpu, 3, dtype).unwrap();
        // Batches of different sizes (2 and 4 rows), so that the weighting by masked frames
        // matters (every row hides 5 of 12 frames: one batch of all rows can hold them).
        let b0 = batch(&cfg, 0, false);
        let mut b1 = concat(&batch(&cfg, 1, false), &batch(&cfg, 5, false));
        b1.taught.batch.step = 1;
        let (b2, b3) = (batch(&cfg, 2, false), batch(&cfg, 3, false));
        let (a, b) = (concat(&b0, &b1), concat(&b2, &b3));
        for (pair, cat) in [((&b0, &b1), &a), ((&b2, &b3), &b)] {
            let ms = [pair.0.clone(), pair.1.clone()];
            let r1 = acc.train_update(&ms).unwrap();
            let r2 = one.train_step(cat).unwrap();
            let rel = (r1.record.loss - r2.record.loss).abs() / r2.record.loss.abs();
            assert!(rel < tol, "loss {} vs {}", r1.record.loss, r2.record.loss);
            assert_eq!(r1.frames.len(), 2);
        }
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let close = |name: &str, x: &Tensor, y: &Tensor| {
            let (x, y) = (flat(x), flat(y));
            // Relative to the tensor's largest entry; a tensor that stays near 0 (a LayerNorm bias
            // with no gradient to speak of) is held to `tol` of `floor` instead.
            let top = y.iter().fold(0f64, |m, v| m.max(v.abs())).max(floor);
            let gap = x
                .iter()
                .zip(&y)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(gap / top <= tol, "{dtype:?} {name}: {gap} of {top}");
        };
        for (k, v) in &acc.vars {
            close(k, v.as_tensor(), one.vars[k].as_tensor());
        }
        for (k, t) in &acc.teacher {
            close(&format!("teacher {k}"), t, &one.teacher[k]);
        }
        for (k, t) in &acc.adam.v {
            close(&format!("adam.v {k}"), t, &one.adam.v[k]);
        }
        assert_eq!((acc.step, one.step), (2, 2));
        // And the updates moved the weights (the comparison is not of two untouched models).
        let fresh = Student::new(StudentParams::default(), cfg, Device::Cpu, 3, dtype).unwrap();
        let k = "encoder.blocks.0.fc1.weight";
        assert_ne!(
            flat(acc.vars[k].as_tensor()),
            flat(fresh.vars[k].as_tensor())
        );
    }

    fn student(on: OnNonFinite) -> Student {
        let p = StudentParams {
            warmup_steps: Some(0),
            tau0: 0.9,
            tau_end: 0.9,
            on_nonfinite: on,
            ..StudentParams::default()
        };
        Student::new(p, tiny(), Device::Cpu, 1, DType::F32).unwrap()
    }

    /// Every value of the student's state: weights, teacher, AdamW moments and step counter.
    fn state(s: &Student) -> (BTreeMap<String, Vec<f32>>, u64, u64) {
        let t = s
            .checkpoint_tensors()
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        (t, s.adam.t, s.step)
    }

    /// A finite loss with a non-finite gradient (injected), and a non-finite loss (an infinite
    /// feature): `on_nonfinite: stop` refuses the update before AdamW and the EMA, naming it,
    /// and leaves every weight, moment and the step counter as they were.
    #[test]
    fn nonfinite_gradient_or_loss_stops_before_the_step() {
        let cfg = tiny();
        for (fault, poison) in [
            (Some(f64::INFINITY), false),
            (Some(f64::NAN), false),
            (None, true),
        ] {
            let mut s = student(OnNonFinite::Stop);
            s.train_step(&batch(&cfg, 0, false)).unwrap();
            let before = state(&s);
            s.grad_fault = fault;
            let e = match s.train_step(&batch(&cfg, 1, poison)) {
                Err(e) => e,
                Ok(_) => panic!("a non-finite update must not pass ({fault:?}, {poison})"),
            };
            assert!(matches!(e, crate::Error::Diverged { step: 1, .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.starts_with("update 1:"), "{msg}");
            if fault.is_some() {
                assert!(msg.contains("the loss is finite"), "{msg}");
            }
            assert!(state(&s) == before, "state changed ({fault:?}, {poison})");
        }
    }

    /// `on_nonfinite: skip` drops the update: no AdamW step (weights and moments unchanged, Adam's
    /// own counter too), no EMA, the step counter moves on so the teacher's next version is
    /// published; the next finite batch trains normally.
    #[test]
    fn nonfinite_update_is_skipped_and_training_goes_on() {
        let cfg = tiny();
        let mut s = student(OnNonFinite::Skip);
        s.train_step(&batch(&cfg, 0, false)).unwrap();
        let (w0, adam_t0, _) = state(&s);
        s.grad_fault = Some(f64::INFINITY);
        let out = s.train_step(&batch(&cfg, 1, false)).unwrap();
        let why = out.skipped.expect("skipped");
        assert!(why.contains("gradient norm is inf"), "{why}");
        let (w1, adam_t1, step1) = state(&s);
        assert_eq!((step1, adam_t1), (2, adam_t0));
        assert!(w1 == w0, "a skipped update changed the state");
        assert_eq!(s.teacher_weights().unwrap().version, 2);
        // Loss path too.
        let out = s.train_step(&batch(&cfg, 2, true)).unwrap();
        assert!(out.skipped.unwrap().contains("the loss is"));
        assert!(state(&s).0 == w0);
        // And on: a finite batch updates again.
        let out = s.train_step(&batch(&cfg, 3, false)).unwrap();
        assert!(out.skipped.is_none() && out.record.loss.is_finite());
        assert_eq!((s.step, s.adam.t), (4, adam_t0 + 1));
        assert!(state(&s).0 != w0);
    }
}
