//! Building blocks: seeded noise (dropout, layerdrop, noise tokens), layer norm, linear,
//! the grouped convolution over time, instance norm, ALiBi.

use super::config::*;
use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Randomness for dropout, layerdrop and noise tokens (seeded, host-drawn)
// ---------------------------------------------------------------------------------------------

/// The student's training randomness: `None` for eval (teacher, export).
///
/// On the CPU every draw is a pure function of the seed (bit-exact runs and resumes). On a GPU
/// (`Noise::on`) the dropout masks and noise tokens are drawn on the device by its generator
/// (cuRAND), seeded once per update from the same seed: nothing per element crosses from the
/// host, runs are repeatable on one GPU model and driver, but they are not bit-identical to CPU
/// runs. Layerdrop coins and the keys still come from the seeded ChaCha stream on every device,
/// so both draw the same sequence of keys and coins.
pub struct Noise {
    pub rng: ChaCha8Rng,
    /// Draw on this (non-CPU) device's generator instead of the counter-based host one.
    device: Option<Device>,
}

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: None,
        }
    }

    /// The noise of an update on `device`: the CPU's counter-based draws there, else the
    /// device's generator, seeded now with `device_seed` (see the type's documentation).
    pub fn on(seed: u64, device_seed: u64, device: &Device) -> Result<Self> {
        let mut n = Noise::new(seed);
        if !device.is_cpu() {
            device.set_seed(device_seed)?;
            n.device = Some(device.clone());
        }
        Ok(n)
    }

    /// Inverted dropout: a fresh 64-bit key from the seeded stream per call, the mask counter-based
    /// from it (`fused::Dropout`; fused on the CPU, a host-drawn mask of the same bits for other
    /// CPU dtypes), or drawn on the device (see [`Noise::on`]).
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let key = self.rng.next_u64();
        if let Some(dev) = self.device.as_ref().filter(|d| x.device().same_device(d)) {
            // u ∈ [0, 1) per element; kept where u ≥ p, scaled by 1/(1 − p).
            let u = Tensor::rand(0f32, 1f32, x.shape(), dev)?;
            let m = (u.ge(p)?.to_dtype(x.dtype())? * (1.0 / (1.0 - p)))?;
            return x.mul(&m);
        }
        super::fused::dropout(x, super::fused::Dropout { key, p })
    }

    /// The dropout of probability `p` that [`Noise::dropout`] would apply next (its key drawn
    /// now; `None`, drawing nothing, when `p` is 0), for ops that apply it themselves.
    pub fn dropout_spec(&mut self, p: f64) -> Option<super::fused::Dropout> {
        (p > 0.0).then(|| super::fused::Dropout {
            key: self.rng.next_u64(),
            p,
        })
    }

    /// Gaussian noise N(0, std²) of `shape` (counter-based, keyed from the seeded stream).
    pub fn normal(
        &mut self,
        shape: &[usize],
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let key = self.rng.next_u64();
        if let Some(dev) = self.device.as_ref().filter(|d| device.same_device(d)) {
            return Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(dtype);
        }
        Tensor::from_vec(
            super::fused::normal_counter(key, n, std),
            shape,
            &Device::Cpu,
        )?
        .to_dtype(dtype)?
        .to_device(device)
    }

    pub fn coin(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// LayerNorm over the last dimension (eps 1e-5), with or without affine: the fused CPU kernel
/// for f32 (`fused.rs`), else [`layer_norm_composed`].
pub fn layer_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    if is_half(x.dtype()) {
        // Mixed precision: norms run in f32 (autocast's rule), the result back in x's type.
        let xf = x.to_dtype(DType::F32)?;
        let aff = match affine {
            Some((w, b)) => Some((w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)),
            None => None,
        };
        return layer_norm(&xf, aff.as_ref().map(|(w, b)| (w, b)), eps)?.to_dtype(x.dtype());
    }
    let fused = super::fused::fused_ok(x)
        && affine.is_none_or(|(w, b)| super::fused::fused_ok(w) && super::fused::fused_ok(b));
    if fused {
        super::fused::layer_norm_fused(x, affine, eps)
    } else {
        layer_norm_composed(x, affine, eps)
    }
}

/// Whether `dt` is a 16-bit float type (`model.dtype: bf16 | f16`).
pub fn is_half(dt: DType) -> bool {
    matches!(dt, DType::BF16 | DType::F16)
}

/// The type that norms, softmax, the ALiBi bias and the losses use for activations of type `dt`:
/// f32 for the 16-bit types (as PyTorch's autocast), else `dt` itself.
pub fn acc_dtype(dt: DType) -> DType {
    if is_half(dt) {
        DType::F32
    } else {
        dt
    }
}

/// `a.matmul(b)` after checking that cuBLAS takes both operands' layouts as they are (candle's
/// CUDA matmul refuses layouts that its CPU matmul accepts), so that a CPU run catches what a GPU
/// would refuse. Every matmul of the model's composed path goes through here.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Err(why) = cublas_layout_ok(a, b) {
        candle_core::bail!(
            "matmul of {:?} (strides {:?}) by {:?} (strides {:?}): {why} (cuBLAS would refuse it; make the operand contiguous)",
            a.dims(),
            a.stride(),
            b.dims(),
            b.stride()
        );
    }
    a.matmul(b)
}

/// candle 0.11's CUDA `gemm_config` rules (`cuda_backend/mod.rs`): each operand's two minor
/// dimensions row- or column-major, and at most two batch dimensions with one stride between
/// batches. Also checked for the operands of the backward pass (`g·bᵀ`, `aᵀ·g` with `g`
/// contiguous), whose layouts are these transposed.
pub fn cublas_layout_ok(a: &Tensor, b: &Tensor) -> std::result::Result<(), String> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() < 2 || bd.len() < 2 {
        return Ok(()); // candle itself refuses these
    }
    let (m, k) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let n = bd[bd.len() - 1];
    let minor_ok = |st: &[usize], rows: usize, cols: usize| {
        let (s1, s2) = (st[st.len() - 1], st[st.len() - 2]);
        ((s1 == 1 || cols == 1) && (s2 == cols || rows == 1))
            || ((s1 == rows || cols == 1) && (s2 == 1 || rows == 1))
    };
    let batch_ok = |dims: &[usize], st: &[usize]| {
        let bs = &st[..st.len() - 2];
        match bs.len() {
            0 | 1 => true,
            2 => bs[0] == bs[1] * dims[1] || dims[0] == 1 || dims[1] == 1,
            _ => false,
        }
    };
    let (sa, sb) = (a.stride(), b.stride());
    if !minor_ok(sa, m, k) {
        return Err(
            "the left operand's last two dimensions are neither row- nor column-major".into(),
        );
    }
    if !minor_ok(sb, k, n) {
        return Err(
            "the right operand's last two dimensions are neither row- nor column-major".into(),
        );
    }
    if !batch_ok(ad, sa) || !batch_ok(bd, sb) {
        return Err(
            "the batch dimensions have no single stride (more than two, or not nested)".into(),
        );
    }
    Ok(())
}

/// LayerNorm written with primitive ops, so that it differentiates on every device (candle's
/// fused layer_norm has no backward).
pub fn layer_norm_composed(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
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

/// `x W^T + b` over the last dimension of a `[.., in]` tensor: with a bias, for f32 on the CPU,
/// one fused op (`fused.rs`); else [`linear_composed`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    use super::fused::{fused_ok, linear_fused};
    match b {
        Some(b) if fused_ok(x) && fused_ok(w) && fused_ok(b) => linear_fused(x, w, b),
        _ => linear_composed(x, w, b),
    }
}

/// [`linear`] with primitive ops (a matmul and a broadcast add).
pub fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let i = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / i.max(1);
    let y = matmul(&x.reshape((rows, i))?, &w.t()?)?;
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
/// `[B, L_out, O]` with `L_out = floor((L + 2·pad − k)/stride) + 1`. For f32 on the CPU a fused
/// kernel (im2col and one GEMM per group written straight into the output, col2im in the
/// backward: `fused.rs`); elsewhere im2col (index_select of the k taps) and one batched matmul, so
/// the backward pass is the matmul's. candle 0.11's own grouped conv1d backward disagrees with
/// finite differences (it runs the kernel gradient of each group on non-contiguous views), which
/// the gradient test caught.
pub fn conv1d_time(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    if super::fused::fused_ok(x) && super::fused::fused_ok(w) {
        super::fused::conv1d_time_fused(x, w, pad, stride, groups)
    } else {
        conv1d_time_composed(x, w, pad, stride, groups)
    }
}

/// [`conv1d_time`] written with primitive ops (every device and dtype; the fused CPU kernel's
/// reference in the tests).
pub fn conv1d_time_composed(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    let (o, cg, k) = w.dims3()?;
    if groups == 0 || c != cg * groups || o % groups != 0 {
        candle_core::bail!(
            "conv1d_time: input has {c} channels, kernel {:?}, groups {groups}",
            w.dims()
        );
    }
    let lp = l + 2 * pad;
    if lp < k {
        candle_core::bail!(
            "conv1d_time: {l} frames (+{pad} padding each side) are fewer than the kernel's {k}"
        );
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
    let idx: Vec<u32> = (0..l_out)
        .flat_map(|t| (0..k).map(move |j| (t * stride + j) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, l_out * k, x.device())?;
    let cols = xp
        .index_select(&idx, 1)?
        .reshape((b, l_out, k, c))?
        .transpose(2, 3)?; // [B, L_out, C, k]
    let og = o / groups;
    // [G, B·L_out, cg·k] × [G, cg·k, og] → [G, B·L_out, og]
    let cols = cols
        .contiguous()?
        .reshape((b * l_out, groups, cg * k))?
        .transpose(0, 1)?
        .contiguous()?;
    let wg = w
        .reshape((groups, og, cg * k))?
        .transpose(1, 2)?
        .contiguous()?;
    let y = matmul(&cols, &wg)?; // [G, B·L_out, og]
    y.transpose(0, 1)?.contiguous()?.reshape((b, l_out, o))
}

/// Instance norm over time (dim 1) of a `[B, T, C]` tensor, no affine, eps 1e-5 (§1.3). The
/// teacher's: for a tensor that tracks no gradient, a fused CPU kernel for f32.
pub fn instance_norm_time(x: &Tensor) -> Result<Tensor> {
    if super::fused::fused_ok(x) && !x.track_op() {
        return super::fused::instance_norm_time_fused(x, 1e-5);
    }
    instance_norm_time_composed(x)
}

/// [`instance_norm_time`] with primitive ops (differentiable, every device).
pub fn instance_norm_time_composed(x: &Tensor) -> Result<Tensor> {
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
pub(crate) fn distances(positions: &[Vec<usize>]) -> Vec<f32> {
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
