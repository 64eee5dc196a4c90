//! EH-MAM losses (method §1.7–1.9): the reconstruction loss over masked frames with the 1/√D
//! scale, the pairwise ranking loss of the loss predictor in the ε form, and their joint
//! normalisation. Also the rank-agreement metric of §1.10.

use candle_core::{Device, Tensor, D};

pub type Result<T> = candle_core::Result<T>;

/// Per-frame reconstruction loss `ℓ = (1/√D) Σ_c (ŷ − y)²` (§1.7) of `[B, M, D]` tensors → `[B, M]`.
pub fn recon_per_frame(yhat: &Tensor, y: &Tensor) -> Result<Tensor> {
    let d = yhat.dim(D::Minus1)? as f64;
    (yhat - y)?.sqr()?.sum(D::Minus1)? / d.sqrt()
}

/// Form of the pairwise term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RankForm {
    /// `−ln(σ(Δ) + ε)` as the reference code computes it (ε = 1e-6).
    Eps,
    /// `softplus(−Δ)`: the stable form; differs only for gaps over about 13.
    Softplus,
}

/// Raw pairwise ranking loss (§1.8) of predictions `p` `[B, M]` (with gradient) against the
/// detached per-frame losses `l` (row-major `B × M`): for each row, every ordered pair (i, j) with
/// `l_j > l_i` adds `−ln(σ(p_j − p_i) + ε)` and with `l_j < l_i` adds `−ln(1 − σ(p_j − p_i) + ε)`;
/// ties and the diagonal add nothing. Returns the plain sum and the number of ordered pairs counted.
pub fn ranking_loss(p: &Tensor, l: &[f32], form: RankForm) -> Result<(Tensor, usize)> {
    let (b, m) = p.dims2()?;
    if l.len() != b * m {
        candle_core::bail!("ranking_loss: {} targets for {}×{} predictions", l.len(), b, m);
    }
    let mut gt = vec![0f32; b * m * m];
    let mut lt = vec![0f32; b * m * m];
    let mut pairs = 0usize;
    for r in 0..b {
        let row = &l[r * m..(r + 1) * m];
        for i in 0..m {
            for j in 0..m {
                let k = r * m * m + i * m + j;
                if row[j] > row[i] {
                    gt[k] = 1.0;
                    pairs += 1;
                } else if row[j] < row[i] {
                    lt[k] = 1.0;
                    pairs += 1;
                }
            }
        }
    }
    let dev = p.device();
    let to = |v: Vec<f32>| -> Result<Tensor> { Tensor::from_vec(v, (b, m, m), &Device::Cpu)?.to_dtype(p.dtype())?.to_device(dev) };
    let (gt, lt) = (to(gt)?, to(lt)?);
    // d[b, i, j] = p_j − p_i
    let d = p.unsqueeze(1)?.broadcast_sub(&p.unsqueeze(2)?)?;
    let total = match form {
        RankForm::Eps => {
            let s = (d.neg()?.exp()? + 1.0)?.recip()?;
            let up = ((&s + 1e-6)?.log()?.neg()? * &gt)?;
            let down = (((s.neg()? + 1.0)? + 1e-6)?.log()?.neg()? * &lt)?;
            (up + down)?.sum_all()?
        }
        RankForm::Softplus => {
            // −ln σ(Δ) = softplus(−Δ); −ln(1 − σ(Δ)) = softplus(Δ). softplus(x) = relu(x) + ln(1 + e^{−|x|}).
            let softplus = |x: &Tensor| -> Result<Tensor> { x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()? };
            let up = (softplus(&d.neg()?)? * &gt)?;
            let down = (softplus(&d)? * &lt)?;
            (up + down)?.sum_all()?
        }
    };
    Ok((total, pairs))
}

/// Code alternative of §1.8 (`relative=False`): z-score the losses of each row over its masked
/// frames, then the summed squared error to `p`. Returns the sum and the count of terms.
pub fn zscore_mse_loss(p: &Tensor, l: &[f32]) -> Result<(Tensor, usize)> {
    let (b, m) = p.dims2()?;
    let mut z = vec![0f32; b * m];
    for r in 0..b {
        let row = &l[r * m..(r + 1) * m];
        let mean = row.iter().map(|&x| x as f64).sum::<f64>() / m.max(1) as f64;
        let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / m.max(1) as f64;
        let sd = var.sqrt().max(1e-6);
        for i in 0..m {
            z[r * m + i] = ((row[i] as f64 - mean) / sd) as f32;
        }
    }
    let z = Tensor::from_vec(z, (b, m), &Device::Cpu)?.to_dtype(p.dtype())?.to_device(p.device())?;
    Ok(((p - z)?.sqr()?.sum_all()?, b * m))
}

/// How `L_aux` joins the objective (§1.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuxNorm {
    /// `L = (Σ ℓ + α·L_aux_raw) / N` (the recommended default).
    #[default]
    Joint,
    /// `L = L_rec + α·L_aux_raw / (ordered pairs counted)`.
    Pairs,
}

/// Share of pairs with distinct actual losses that `pred` orders like `actual`, over rows of
/// `m` values each (§1.10). NaN when no pair is distinct.
pub fn rank_agreement(pred: &[f32], actual: &[f32], m: usize) -> f64 {
    if m == 0 {
        return f64::NAN;
    }
    let (mut agree, mut total) = (0u64, 0u64);
    for (p, a) in pred.chunks(m).zip(actual.chunks(m)) {
        for i in 0..m {
            for j in i + 1..m {
                if a[i] == a[j] {
                    continue;
                }
                total += 1;
                if (p[j] - p[i]) * (a[j] - a[i]) > 0.0 {
                    agree += 1;
                }
            }
        }
    }
    if total == 0 {
        f64::NAN
    } else {
        agree as f64 / total as f64
    }
}

/// Mean over channels of the per-channel std over rows of a `[N, C]` matrix (§1.10 collapse
/// guards: `target_std`, `pred_std`).
pub fn mean_channel_std(x: &[f32], c: usize) -> f64 {
    if c == 0 || x.len() < 2 * c {
        return 0.0;
    }
    let n = x.len() / c;
    let mut sum = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for row in x.chunks(c) {
        for (k, &v) in row.iter().enumerate() {
            sum[k] += v as f64;
            sq[k] += (v as f64) * (v as f64);
        }
    }
    let mut total = 0.0;
    for k in 0..c {
        let mean = sum[k] / n as f64;
        // Unbiased, as torch.std.
        let var = ((sq[k] - n as f64 * mean * mean) / (n as f64 - 1.0)).max(0.0);
        total += var.sqrt();
    }
    total / c as f64
}
