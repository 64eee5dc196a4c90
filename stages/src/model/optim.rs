//! Optimiser and schedules (method §3, §5): fairseq's Adam with decoupled weight decay, linear
//! warm-up then cosine decay, and the linear EMA decay schedule. candle's AdamW keeps its moments
//! private, so this one stores them as named tensors that checkpoints save and restore.

use super::fused::{adam_step, fused_ok, AdamStep};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

pub type Result<T> = candle_core::Result<T>;

/// fairseq `adam` (AdamW): `p ← p − lr·wd·p`, then the Adam step with bias correction folded
/// into the step size and ε added to `√v` (`fairseq/optim/adam.py`).
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Exempt 1-D parameters (biases, norms, ALiBi scales) from weight decay.
    pub exempt_1d: bool,
    /// Completed steps.
    pub t: u64,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64, exempt_1d: bool) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            exempt_1d,
            t: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update of every variable at learning rate `lr`. A variable without a gradient this
    /// step (a block skipped by layerdrop, a head the loss does not use) is updated as with a zero
    /// gradient, as fairseq's fp16 trainer does (it fills missing gradients with zeros): its
    /// moments decay, weight decay applies, and the Adam step follows the decayed moments.
    pub fn step(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
    ) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let step_size = lr * bc2.sqrt() / bc1;
        for (name, var) in vars {
            let zero;
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g,
                None => {
                    zero = var.as_tensor().zeros_like()?;
                    &zero
                }
            };
            let p = var.as_tensor();
            let decay = self.weight_decay != 0.0 && !(self.exempt_1d && p.rank() <= 1);
            let (m0, v0) = (self.m.get(name), self.v.get(name));
            if fused_ok(p) && fused_ok(g) && m0.is_none_or(fused_ok) && v0.is_none_or(fused_ok) {
                let h = AdamStep {
                    beta1: self.beta1 as f32,
                    beta2: self.beta2 as f32,
                    c1: (1.0 - self.beta1) as f32,
                    c2: (1.0 - self.beta2) as f32,
                    eps: self.eps as f32,
                    decay: if decay {
                        (lr * self.weight_decay) as f32
                    } else {
                        0.0
                    },
                    step_size: step_size as f32,
                };
                let (np, nm, nv) = adam_step(p, g, m0, v0, h)?;
                var.set(&np)?;
                self.m.insert(name.clone(), nm);
                self.v.insert(name.clone(), nv);
                continue;
            }
            let m = match self.m.get(name) {
                Some(m) => ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?,
                None => (g * (1.0 - self.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                None => (g.sqr()? * (1.0 - self.beta2))?,
            };
            let p = if decay {
                (p - (p * (lr * self.weight_decay))?)?
            } else {
                p.clone()
            };
            let denom = (v.sqrt()? + self.eps)?;
            let new = (p - (m.div(&denom)? * step_size)?)?;
            var.set(&new.detach())?;
            self.m.insert(name.clone(), m.detach());
            self.v.insert(name.clone(), v.detach());
        }
        Ok(())
    }
}

/// The loss and ‖g‖₂ over every parameter that has a gradient in this update (what fairseq's
/// trainer clips and logs as `gnorm`), summed in f64 on the device and read in one transfer.
pub fn loss_and_grad_norm(
    loss: &Tensor,
    vars: &BTreeMap<String, Var>,
    grads: &candle_core::backprop::GradStore,
) -> candle_core::Result<(f64, f64)> {
    let mut sq: Option<Tensor> = None;
    for v in vars.values() {
        if let Some(g) = grads.get(v.as_tensor()) {
            let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
            sq = Some(match sq {
                Some(a) => (a + s)?,
                None => s,
            });
        }
    }
    let loss = loss.to_dtype(DType::F64)?.reshape(1)?;
    let sq = match sq {
        Some(s) => s.reshape(1)?,
        None => Tensor::zeros(1, DType::F64, loss.device())?,
    };
    let v = Tensor::cat(&[&loss, &sq], 0)?.to_vec1::<f64>()?;
    Ok((v[0], v[1].sqrt()))
}

/// Adds the gradients `g` of one batch to those of the update's earlier batches (`acc`; `None`
/// for the first), for every variable that has one (gradient accumulation, `update_freq`).
pub fn accumulate_grads(
    acc: Option<candle_core::backprop::GradStore>,
    g: candle_core::backprop::GradStore,
    vars: &BTreeMap<String, Var>,
) -> Result<candle_core::backprop::GradStore> {
    let Some(mut acc) = acc else {
        return Ok(g);
    };
    for v in vars.values() {
        if let Some(gj) = g.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + gj)?,
                None => gj.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

/// Learning rate after `t` completed updates: linear warm-up from 0 over `warmup` updates, then
/// `0.5·peak·(1 + cos(π·(t − warmup)/(total − warmup)))` down to 0 at `total` (§5).
pub fn lr_at(t: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && t < warmup {
        return peak * t as f64 / warmup as f64;
    }
    if total <= warmup {
        return peak;
    }
    let x = ((t - warmup) as f64 / (total - warmup) as f64).min(1.0);
    0.5 * peak * (1.0 + (std::f64::consts::PI * x).cos())
}

/// EMA decay after `n` completed updates (§3): `τe − (τe − τ0)·(1 − n/τn)` for `n < τn`, else `τe`.
pub fn tau_at(n: u64, tau0: f64, tau_end: f64, tau_steps: u64) -> f64 {
    if n >= tau_steps {
        return tau_end;
    }
    tau_end - (tau_end - tau0) * (1.0 - n as f64 / tau_steps as f64)
}
