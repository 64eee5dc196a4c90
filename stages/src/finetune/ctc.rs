//! CTC loss (Graves et al. 2006) with its own backward pass, for fine-tuning (issue 19).
//!
//! `ctc_loss(logits, input_lengths, targets, target_lengths, blank)` takes unnormalised scores
//! `[B, T, V]` (the log-softmax is taken inside), each utterance's frame count and label sequence,
//! and returns each utterance's `−ln p(labels | x)` `[B]`. The forward–backward recursions run in
//! f64 log space on the host; the gradient with respect to the scores is
//! `softmax(x)_{t,k} − (1/p)·Σ_{s: l'_s = k} α_t(s)·β_t(s)` over the frames each utterance has (0 on
//! its padding). An utterance whose labels cannot fit its frames (fewer frames than labels plus the
//! blanks its repeated labels need) has no alignment: its loss is reported as infeasible and it
//! contributes 0 and no gradient, never inf or NaN. Checked against `torch.nn.functional.ctc_loss`
//! (fixtures with the script that made them) and finite differences (`stages/tests/ctc.rs`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

type Result<T> = candle_core::Result<T>;

/// What `ctc_loss` returns besides the losses.
#[derive(Debug, Clone)]
pub struct CtcOut {
    /// `[B]` losses (`−ln p`; 0 where infeasible), with gradient.
    pub loss: Tensor,
    /// Per utterance: false where the labels do not fit the frames.
    pub feasible: Vec<bool>,
}

struct CtcOp {
    input_lengths: Vec<usize>,
    targets: Vec<Vec<u32>>,
    blank: u32,
    /// Gradient of each loss with respect to the scores, kept from the forward pass.
    grad: Arc<Mutex<Option<Vec<f64>>>>,
    feasible: Arc<Mutex<Vec<bool>>>,
}

fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Frames needed by a label sequence: its length plus one blank between each pair of repeats.
pub fn min_frames(labels: &[u32]) -> usize {
    labels.len() + labels.windows(2).filter(|w| w[0] == w[1]).count()
}

/// One utterance: scores `x` (`t × v`, row-major). Returns the loss and the gradient (`t × v`),
/// or `None` when the labels do not fit.
fn one(x: &[f64], t: usize, v: usize, labels: &[u32], blank: u32) -> Option<(f64, Vec<f64>)> {
    if t == 0 || min_frames(labels) > t {
        return None;
    }
    // log-softmax per frame
    let mut lp = vec![0f64; t * v];
    for f in 0..t {
        let row = &x[f * v..(f + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|&a| (a - m).exp()).sum();
        let lse = m + s.ln();
        for k in 0..v {
            lp[f * v + k] = row[k] - lse;
        }
    }
    // extended labels: blank, l1, blank, l2, …, blank
    let s_len = 2 * labels.len() + 1;
    let ext: Vec<u32> = (0..s_len)
        .map(|s| if s % 2 == 0 { blank } else { labels[s / 2] })
        .collect();
    let ninf = f64::NEG_INFINITY;
    let mut alpha = vec![ninf; t * s_len];
    let mut beta = vec![ninf; t * s_len];
    let e = |f: usize, s: usize| lp[f * v + ext[s] as usize];
    alpha[0] = e(0, 0);
    if s_len > 1 {
        alpha[1] = e(0, 1);
    }
    for f in 1..t {
        for s in 0..s_len {
            let mut a = alpha[(f - 1) * s_len + s];
            if s >= 1 {
                a = log_add(a, alpha[(f - 1) * s_len + s - 1]);
            }
            if s >= 2 && ext[s] != blank && ext[s] != ext[s - 2] {
                a = log_add(a, alpha[(f - 1) * s_len + s - 2]);
            }
            alpha[f * s_len + s] = if a == ninf { ninf } else { a + e(f, s) };
        }
    }
    let last = (t - 1) * s_len;
    beta[last + s_len - 1] = e(t - 1, s_len - 1);
    if s_len > 1 {
        beta[last + s_len - 2] = e(t - 1, s_len - 2);
    }
    for f in (0..t - 1).rev() {
        for s in 0..s_len {
            let mut b = beta[(f + 1) * s_len + s];
            if s + 1 < s_len {
                b = log_add(b, beta[(f + 1) * s_len + s + 1]);
            }
            if s + 2 < s_len && ext[s] != blank && ext[s] != ext[s + 2] {
                b = log_add(b, beta[(f + 1) * s_len + s + 2]);
            }
            beta[f * s_len + s] = if b == ninf { ninf } else { b + e(f, s) };
        }
    }
    let mut ll = alpha[last + s_len - 1];
    if s_len > 1 {
        ll = log_add(ll, alpha[last + s_len - 2]);
    }
    if !ll.is_finite() {
        return None;
    }
    // γ_t(k) = Σ_{s: ext_s = k} α_t(s)·β_t(s) / e_t(k) / p  (α and β both include frame t's emission)
    let mut grad = vec![0f64; t * v];
    for f in 0..t {
        let mut acc = vec![ninf; v];
        for s in 0..s_len {
            let ab = alpha[f * s_len + s] + beta[f * s_len + s];
            let k = ext[s] as usize;
            acc[k] = log_add(acc[k], ab);
        }
        for k in 0..v {
            let post = if acc[k] == ninf {
                0.0
            } else {
                (acc[k] - lp[f * v + k] - ll).exp()
            };
            grad[f * v + k] = lp[f * v + k].exp() - post;
        }
    }
    Some((-ll, grad))
}

impl CustomOp1 for CtcOp {
    fn name(&self) -> &'static str {
        "ehmam-ctc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, v) = l.shape().dims3()?;
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("ctc: scores must be contiguous".into()))?;
        let x: Vec<f64> = match s {
            CpuStorage::F32(d) => d[start..end].iter().map(|&a| a as f64).collect(),
            CpuStorage::F64(d) => d[start..end].to_vec(),
            _ => candle_core::bail!("ctc: scores must be f32 or f64"),
        };
        let mut losses = vec![0f64; b];
        let mut grads = vec![0f64; b * t * v];
        let mut feasible = vec![false; b];
        for i in 0..b {
            let n = self.input_lengths[i].min(t);
            let xi = &x[i * t * v..i * t * v + n * v];
            if let Some((loss, g)) = one(xi, n, v, &self.targets[i], self.blank) {
                losses[i] = loss;
                grads[i * t * v..i * t * v + n * v].copy_from_slice(&g);
                feasible[i] = true;
            }
        }
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
        *self.feasible.lock().unwrap_or_else(|e| e.into_inner()) = feasible;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(losses.iter().map(|&a| a as f32).collect()),
            _ => CpuStorage::F64(losses),
        };
        Ok((out, Shape::from(b)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = self
            .grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("ctc: backward before forward".into()))?;
        let (b, t, v) = arg.dims3()?;
        let g = Tensor::from_vec(g, (b, t, v), arg.device())?.to_dtype(arg.dtype())?;
        let scale = grad_res.reshape((b, 1, 1))?.to_dtype(arg.dtype())?;
        Ok(Some(g.broadcast_mul(&scale)?))
    }
}

/// The CTC loss of each utterance (see the module documentation). `logits` `[B, T, V]` (f32 or
/// f64, on the CPU: other devices copy to it and back), `input_lengths[b] ≤ T`, `targets[b]` the
/// label ids (none of them `blank`, each `< V`).
pub fn ctc_loss(
    logits: &Tensor,
    input_lengths: &[usize],
    targets: &[Vec<u32>],
    blank: u32,
) -> Result<CtcOut> {
    let (b, t, v) = logits.dims3()?;
    if input_lengths.len() != b || targets.len() != b {
        candle_core::bail!(
            "ctc: {} input lengths and {} targets for a batch of {b}",
            input_lengths.len(),
            targets.len()
        );
    }
    if let Some(n) = input_lengths.iter().find(|&&n| n > t) {
        candle_core::bail!("ctc: an input length of {n} frames exceeds the {t} frames given");
    }
    for (i, l) in targets.iter().enumerate() {
        if let Some(&k) = l.iter().find(|&&k| k as usize >= v || k == blank) {
            candle_core::bail!(
                "ctc: utterance {i} has label {k}, which is the blank ({blank}) or outside the vocabulary of {v}"
            );
        }
    }
    let op = CtcOp {
        input_lengths: input_lengths.to_vec(),
        targets: targets.to_vec(),
        blank,
        grad: Arc::new(Mutex::new(None)),
        feasible: Arc::new(Mutex::new(Vec::new())),
    };
    let feasible_cell = op.feasible.clone();
    let device = logits.device().clone();
    let x = logits.to_device(&candle_core::Device::Cpu)?.contiguous()?;
    let loss = x.apply_op1(op)?.to_device(&device)?;
    let feasible = feasible_cell
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(CtcOut { loss, feasible })
}
