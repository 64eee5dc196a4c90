//! EH-MAM losses (method §1.7–1.9): the reconstruction loss over masked frames with the 1/√D
//! scale, the pairwise ranking loss of the loss predictor in the ε form, and their joint
//! normalisation. Also the rank-agreement metric of §1.10.

use candle_core::{DType, Tensor, D};

pub type Result<T> = candle_core::Result<T>;

/// Per-frame reconstruction loss `ℓ = (1/√D) Σ_c (ŷ − y)²` (§1.7) of `[B, M, D]` tensors → `[B, M]`.
pub fn recon_per_frame(yhat: &Tensor, y: &Tensor) -> Result<Tensor> {
    recon_per_frame_with(yhat, y, 0.0, None)
}

/// `d2v_loss` of the reference code with its options (§1.7, §8 "regression loss"): per element
/// MSE (`loss_beta = 0`) or smooth L1 with threshold β (`0.5·d²/β` where |d| < β, else
/// `|d| − β/2`), times `loss_scale` (`None`: 1/√D), summed over channels → `[B, M]`.
pub fn recon_per_frame_with(
    yhat: &Tensor,
    y: &Tensor,
    loss_beta: f64,
    loss_scale: Option<f64>,
) -> Result<Tensor> {
    let d = yhat.dim(D::Minus1)? as f64;
    let scale = loss_scale.unwrap_or(1.0 / d.sqrt());
    let diff = (yhat - y)?;
    let per = if loss_beta > 0.0 {
        let a = diff.abs()?;
        // Which branch each element takes (no gradient through the choice).
        let quad = a.lt(loss_beta)?.to_dtype(a.dtype())?.detach();
        let lin = (quad.neg()? + 1.0)?;
        ((quad * (diff.sqr()? * (0.5 / loss_beta))?)? + (lin * (a - 0.5 * loss_beta)?)?)?
    } else {
        diff.sqr()?
    };
    per.sum(D::Minus1)? * scale
}

/// Form of the pairwise term.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
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
/// (Host losses: the tests' entry; the trainer calls [`ranking_loss_t`] with the losses where they
/// are.)
pub fn ranking_loss(p: &Tensor, l: &[f32], form: RankForm) -> Result<(Tensor, usize)> {
    let (b, m) = p.dims2()?;
    if l.len() != b * m {
        candle_core::bail!(
            "ranking_loss: {} targets for {}×{} predictions",
            l.len(),
            b,
            m
        );
    }
    let l = Tensor::from_slice(l, (b, m), p.device())?;
    let (total, pairs) = ranking_loss_t(p, &l, form)?;
    Ok((total, pairs.to_scalar::<f64>()? as usize))
}

/// [`ranking_loss`] with the losses `l` as a `[B, M]` tensor on `p`'s device (detached here): the
/// pair labels are built there, nothing crosses to the host. The count of ordered pairs is an f64
/// scalar tensor (exact up to 2⁵³).
pub fn ranking_loss_t(p: &Tensor, l: &Tensor, form: RankForm) -> Result<(Tensor, Tensor)> {
    let (b, m) = p.dims2()?;
    if l.dims() != [b, m] {
        candle_core::bail!(
            "ranking_loss: losses of shape {:?} for {}×{} predictions",
            l.dims(),
            b,
            m
        );
    }
    let l = l.detach();
    // [b, i, j]: l_j against l_i.
    let lj = l.unsqueeze(1)?.broadcast_as((b, m, m))?;
    let li = l.unsqueeze(2)?.broadcast_as((b, m, m))?;
    let gt = lj.gt(&li)?;
    let lt = lj.lt(&li)?;
    let pairs = (gt.to_dtype(DType::F64)?.sum_all()? + lt.to_dtype(DType::F64)?.sum_all()?)?;
    let (gt, lt) = (gt.to_dtype(p.dtype())?, lt.to_dtype(p.dtype())?);
    // d[b, i, j] = p_j − p_i
    let d = p.unsqueeze(1)?.broadcast_sub(&p.unsqueeze(2)?)?;
    let total = match form {
        RankForm::Eps => {
            // σ(Δ) and 1 − σ(Δ) = σ(−Δ), each from its own exponential (no cancellation in 1 − σ).
            // |Δ| is clamped at 80: beyond it σ is 0 or 1 to f32 precision and its slope under
            // 1e-34, so values and gradients are unchanged, but e^{|Δ|} can no longer overflow to
            // inf (whose backward, 0·inf, would poison every gradient with NaN).
            let dc = d.clamp(-80f32, 80f32)?;
            let sig = |x: &Tensor| -> Result<Tensor> { (x.neg()?.exp()? + 1.0)?.recip() };
            let up = ((sig(&dc)? + 1e-6)?.log()?.neg()? * &gt)?;
            let down = ((sig(&dc.neg()?)? + 1e-6)?.log()?.neg()? * &lt)?;
            (up + down)?.sum_all()?
        }
        RankForm::Softplus => {
            // −ln σ(Δ) = softplus(−Δ); −ln(1 − σ(Δ)) = softplus(Δ). softplus(x) = relu(x) + ln(1 + e^{−|x|}).
            let softplus = |x: &Tensor| -> Result<Tensor> {
                x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
            };
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
    if l.len() != b * m {
        candle_core::bail!("zscore_mse: {} targets for {b}×{m} predictions", l.len());
    }
    let l = Tensor::from_slice(l, (b, m), p.device())?;
    zscore_mse_loss_t(p, &l)
}

/// [`zscore_mse_loss`] with the losses `l` `[B, M]` on `p`'s device: mean and std per row in f64
/// there (the std floored at 1e-6), the z-scores in `p`'s type.
pub fn zscore_mse_loss_t(p: &Tensor, l: &Tensor) -> Result<(Tensor, usize)> {
    let (b, m) = p.dims2()?;
    let l = l.detach().to_dtype(DType::F64)?;
    let mean = (l.sum_keepdim(1)? / m.max(1) as f64)?;
    let c = l.broadcast_sub(&mean)?;
    let var = (c.sqr()?.sum_keepdim(1)? / m.max(1) as f64)?;
    let sd = var.sqrt()?.maximum(1e-6)?;
    let z = c.broadcast_div(&sd)?.to_dtype(p.dtype())?;
    Ok(((p - z)?.sqr()?.sum_all()?, b * m))
}

/// How `L_aux` joins the objective (§1.9).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
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
