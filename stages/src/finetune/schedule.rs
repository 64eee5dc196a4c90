//! fairseq's tri-stage learning-rate schedule (`fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py`),
//! which wav2vec 2.0 / data2vec fine-tuning uses: linear warm-up from `init_lr_scale·peak`, a hold
//! at the peak, exponential decay to `final_lr_scale·peak`, then that value.

/// The schedule in updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TriStage {
    pub peak: f64,
    pub warmup: u64,
    pub hold: u64,
    pub decay: u64,
    pub init_lr_scale: f64,
    pub final_lr_scale: f64,
}

impl TriStage {
    /// Phases as fractions of `total` updates (fairseq's `phase_ratio`, e.g. [0.1, 0.4, 0.5]).
    pub fn from_ratios(peak: f64, total: u64, ratios: [f64; 3], init: f64, fin: f64) -> Self {
        let n = |r: f64| (r * total as f64) as u64;
        TriStage {
            peak,
            warmup: n(ratios[0]),
            hold: n(ratios[1]),
            decay: n(ratios[2]),
            init_lr_scale: init,
            final_lr_scale: fin,
        }
    }

    /// Learning rate after `t` updates (fairseq's `_decide_stage` and `step_update`).
    pub fn lr(&self, t: u64) -> f64 {
        let init = self.init_lr_scale * self.peak;
        if t < self.warmup {
            let rate = if self.warmup > 0 {
                (self.peak - init) / self.warmup as f64
            } else {
                0.0
            };
            return init + rate * t as f64;
        }
        let mut offset = self.warmup;
        if t < offset + self.hold {
            return self.peak;
        }
        offset += self.hold;
        if t <= offset + self.decay {
            let factor = -self.final_lr_scale.ln() / self.decay.max(1) as f64;
            return self.peak * (-factor * (t - offset) as f64).exp();
        }
        self.final_lr_scale * self.peak
    }
}
