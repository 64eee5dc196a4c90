//! Fused CPU kernels for the training hot path (issue 12): LayerNorm, the post-LN residual
//! `LN(x + dropout(o))`, exact GELU, softmax with an additive bias, dropout, linear, the grouped
//! convolution over time, the attention core, the ALiBi bias, the teacher's instance norm, and
//! AdamW and the EMA. Each is one candle custom op with a hand-written backward (or a plain
//! function for the optimiser), in place of the five to ten primitive ops (and as many tensors)
//! that each costs when composed.
//!
//! They run for f32 tensors on the CPU. Every other device and dtype takes the composed path in
//! `ops.rs`, which is also what the tests compare these kernels with (values and gradients), next
//! to finite differences.
//!
//! Determinism: every result is independent of the number of threads. Rows are split between
//! threads but each row is reduced by one thread in a fixed order; the sums across rows (the
//! LayerNorm weight and bias gradients, a broadcast bias's gradient) add fixed-size chunks' partial
//! sums in chunk order. Reductions keep 16 partial sums (so they vectorise without fast-math)
//! whatever the SIMD width, so AVX2 and AVX-512 machines give the same bits.
//!
//! Dropout masks come from a counter-based generator: element `i` of a call keeps its value when
//! `hash(key, i) ≥ p·2³²`, with a fresh 64-bit `key` drawn from the update's seeded ChaCha stream per
//! call. The mask is never stored: the backward pass regenerates it from the key.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

type Result<T> = candle_core::Result<T>;

static COMPOSED_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the fused kernels off (process-wide) so that CPU f32 runs take the composed ops, the
/// code path of every other device: for the tests that run the model the way a GPU does.
pub fn set_composed_only(on: bool) {
    COMPOSED_ONLY.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Whether `t` takes the fused path: an f32 tensor on the CPU (unless [`set_composed_only`]).
pub fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu()
        && t.dtype() == DType::F32
        && !COMPOSED_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Element kernels (branch-free, so they vectorise; no FMA contraction, so every ISA gives the
// same bits)
// ---------------------------------------------------------------------------------------------

/// `e^x` for f32 (Cephes `expf`: range reduction by ln 2, degree-6 polynomial; within 2 ulp over
/// the normal range). Inputs are clamped to [−87.3, 88], so it never returns 0 or inf; NaN gives
/// NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(-87.3).min(88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // 2ⁿ without a float-to-int conversion (which does not vectorise): n + 127 + 2²³ holds
    // n + 127 in its low mantissa bits, and the shift moves them into the exponent.
    let pow2 = f32::from_bits((n + 8_388_735.0).to_bits() << 23);
    // NaN stays NaN (the clamp would have turned it into a number).
    if x.is_nan() {
        x
    } else {
        e * pow2
    }
}

/// `erf(x)` and `e^{−x²}` (Abramowitz & Stegun 7.1.26, absolute error under 1.5e-7: the
/// approximation PyTorch's vectorised CPU `erf` uses).
#[inline(always)]
fn erf_and_gauss(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut r = 1.061_405_4f32;
    r = r * t - 1.453_152_1;
    r = r * t + 1.421_413_8;
    r = r * t - 0.284_496_72;
    r = r * t + 0.254_829_6;
    let g = exp_f32(-x * x);
    let y = 1.0 - r * t * g;
    (if x < 0.0 { -y } else { y }, g)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_fwd_kernel(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        let (e, _) = erf_and_gauss(x * FRAC_1_SQRT_2);
        *y = 0.5 * x * (1.0 + e);
    }
}

#[inline(always)]
fn gelu_bwd_kernel(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let (e, gauss) = erf_and_gauss(x * FRAC_1_SQRT_2);
        *d = g * (0.5 * (1.0 + e) + x * gauss * INV_SQRT_2PI);
    }
}

/// Sum with 16 partial sums in a fixed order.
#[inline(always)]
fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    let mut s = 0f32;
    for v in chunks.remainder() {
        s += v;
    }
    let mut t = 0f32;
    for a in acc {
        t += a;
    }
    t + s
}

/// Dot product with 16 partial sums in a fixed order.
#[inline(always)]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    let mut t = 0f32;
    for v in acc {
        t += v;
    }
    t + s
}

#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

/// 32-bit hash with low bias (Wellons' `lowbias32`), two rounds keyed by a 64-bit key.
#[inline(always)]
fn hash32(key: u64, i: u32) -> u32 {
    #[inline(always)]
    fn lowbias32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x7feb_352d);
        h ^= h >> 15;
        h = h.wrapping_mul(0x846c_a68b);
        h ^= h >> 16;
        h
    }
    lowbias32(lowbias32(i.wrapping_add(key as u32)) ^ (key >> 32) as u32)
}

/// The keep threshold of a dropout probability: element kept when its hash is at least this.
fn drop_threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * 4_294_967_296.0).min(4_294_967_295.0) as u32
}

#[inline(always)]
fn dropout_kernel(x: &[f32], y: &mut [f32], key: u64, start: u32, thr: u32, scale: f32) {
    for (k, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        let h = hash32(key, start.wrapping_add(k as u32));
        *y = if h >= thr { x * scale } else { 0.0 };
    }
}

/// Runs `$body` compiled for AVX-512 or AVX2 where the CPU has them (the loops inside are plain
/// Rust that LLVM vectorises for the enabled width), else for the baseline.
macro_rules! simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            unsafe fn v4<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the features were detected at run time.
                unsafe { v4(|| $body) }
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                unsafe { v3(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// Elements per parallel task of the elementwise kernels.
const CHUNK: usize = 16 * 1024;
/// Rows per partial sum of the cross-row reductions (fixed, so the result does not depend on
/// the thread count).
const ROWS_PER_PART: usize = 64;

// ---------------------------------------------------------------------------------------------
// Access to CPU f32 storage
// ---------------------------------------------------------------------------------------------

fn as_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what}: the fused kernel takes f32, not {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: the fused kernel takes a contiguous tensor"),
    }
}

/// The f32 values of a CPU tensor (made contiguous first), handed to `f`.
fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(s) => f(as_f32(s, l, what)?),
        _ => candle_core::bail!("{what}: the fused kernel runs on the CPU"),
    }
}

fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)
}

/// The sum of the consecutive blocks of `block` values in `v`, in order (a gradient of something
/// broadcast over the leading dimension).
fn sum_blocks(v: &[f32], block: usize) -> Vec<f32> {
    let mut acc = vec![0f32; block];
    for c in v.chunks_exact(block.max(1)) {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc
}

/// Sums `rows × width` values over the rows in fixed-size parts (thread-count independent).
fn sum_rows(parts: Vec<Vec<f32>>, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; width];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// GELU (exact, erf form)
// ---------------------------------------------------------------------------------------------

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "ehmam-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| simd!(gelu_fwd_kernel(x, y)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(arg, "gelu backward", |x| {
            with_f32(grad, "gelu backward", |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|(d, (x, g))| simd!(gelu_bwd_kernel(x, g, d)));
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, arg.shape())?))
    }
}

/// Exact GELU `0.5·x·(1 + erf(x/√2))`, fused on the CPU for f32.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn ln_row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum16(x) / d;
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            let v = c[k] - mean;
            acc[k] += v * v;
        }
    }
    let mut s = 0f32;
    for &v in chunks.remainder() {
        s += (v - mean) * (v - mean);
    }
    let mut t = 0f32;
    for a in acc {
        t += a;
    }
    let var = (t + s) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn ln_fwd_rows(x: &[f32], y: &mut [f32], d: usize, w: Option<(&[f32], &[f32])>, eps: f32) {
    for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let (mean, rstd) = ln_row_stats(x, eps);
        match w {
            Some((w, b)) => {
                for k in 0..d {
                    y[k] = (x[k] - mean) * rstd * w[k] + b[k];
                }
            }
            None => {
                for k in 0..d {
                    y[k] = (x[k] - mean) * rstd;
                }
            }
        }
    }
}

/// Backward of rows: `dx`, and (affine) this part's sums of `g·x̂` and `g`.
#[inline(always)]
fn ln_bwd_rows(
    x: &[f32],
    g: &[f32],
    dx: &mut [f32],
    d: usize,
    w: Option<&[f32]>,
    eps: f32,
    gw: &mut [f32],
    gb: &mut [f32],
    xhat: &mut [f32],
    gh: &mut [f32],
) {
    let inv_d = 1.0 / d as f32;
    for ((x, g), dx) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = ln_row_stats(x, eps);
        for k in 0..d {
            xhat[k] = (x[k] - mean) * rstd;
        }
        match w {
            Some(w) => {
                for k in 0..d {
                    gw[k] += g[k] * xhat[k];
                    gb[k] += g[k];
                    gh[k] = g[k] * w[k];
                }
            }
            None => gh.copy_from_slice(g),
        }
        let m1 = sum16(gh) * inv_d;
        let m2 = dot16(gh, xhat) * inv_d;
        for k in 0..d {
            dx[k] = rstd * (gh[k] - m1 - xhat[k] * m2);
        }
    }
}

fn ln_forward(x: &[f32], d: usize, w: Option<(&[f32], &[f32])>, eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let rows = (CHUNK / d.max(1)).max(1) * d;
    y.par_chunks_mut(rows)
        .zip(x.par_chunks(rows))
        .for_each(|(y, x)| simd!(ln_fwd_rows(x, y, d, w, eps)));
    y
}

/// `(dx, dw, db)` (the last two only with a weight).
fn ln_backward(
    x: &[f32],
    g: &[f32],
    d: usize,
    w: Option<&[f32]>,
    eps: f32,
) -> (Vec<f32>, Option<(Vec<f32>, Vec<f32>)>) {
    let mut dx = vec![0f32; x.len()];
    let rows = ROWS_PER_PART * d;
    let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(rows)
        .zip(x.par_chunks(rows).zip(g.par_chunks(rows)))
        .map(|(dx, (x, g))| {
            let mut gw = vec![0f32; if w.is_some() { d } else { 0 }];
            let mut gb = vec![0f32; if w.is_some() { d } else { 0 }];
            let (mut xhat, mut gh) = (vec![0f32; d], vec![0f32; d]);
            simd!(ln_bwd_rows(
                x, g, dx, d, w, eps, &mut gw, &mut gb, &mut xhat, &mut gh
            ));
            (gw, gb)
        })
        .collect();
    let affine = w.map(|_| {
        let (gw, gb): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        (sum_rows(gw, d), sum_rows(gb, d))
    });
    (dx, affine)
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "ehmam-layer-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s, l, "layer norm")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        Ok((
            CpuStorage::F32(ln_forward(x, d, None, self.eps)),
            l.shape().clone(),
        ))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.dims().last().copied().unwrap_or(1).max(1);
        let (dx, _) = with_f32(arg, "layer norm backward", |x| {
            with_f32(grad, "layer norm backward", |g| {
                Ok(ln_backward(x, g, d, None, self.eps))
            })
        })?;
        Ok(Some(tensor(dx, arg.shape())?))
    }
}

struct LayerNormAffine {
    eps: f32,
}

impl CustomOp3 for LayerNormAffine {
    fn name(&self) -> &'static str {
        "ehmam-layer-norm-affine"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s1, l1, "layer norm")?;
        let w = as_f32(s2, l2, "layer norm weight")?;
        let b = as_f32(s3, l3, "layer norm bias")?;
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer norm: weight {} and bias {} for width {d}",
                w.len(),
                b.len()
            );
        }
        Ok((
            CpuStorage::F32(ln_forward(x, d, Some((w, b)), self.eps)),
            l1.shape().clone(),
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dims().last().copied().unwrap_or(1).max(1);
        let (dx, affine) = with_f32(x, "layer norm backward", |xv| {
            with_f32(w, "layer norm backward", |wv| {
                with_f32(grad, "layer norm backward", |g| {
                    Ok(ln_backward(xv, g, d, Some(wv), self.eps))
                })
            })
        })?;
        let (dw, db) = match affine {
            Some(a) => a,
            None => candle_core::bail!("layer norm backward: no affine gradients"),
        };
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dw, w.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

/// LayerNorm over the last dimension on the fused path (callers check [`fused_ok`]).
pub fn layer_norm_fused(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    match affine {
        Some((w, b)) => x.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNormAffine { eps: eps as f32 },
        ),
        None => x.apply_op1(LayerNorm { eps: eps as f32 }),
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension of `scores + bias` (bias broadcast over the leading dimension)
// ---------------------------------------------------------------------------------------------

struct SoftmaxBias {
    scale: f32,
}

/// `(rows per leading index, width, leading dims of scores and of bias)`.
fn softmax_geometry(ls: &Layout, lb: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (ds, db) = (ls.dims(), lb.dims());
    if ds.len() < 2 || ds.len() != db.len() || ds[1..] != db[1..] {
        candle_core::bail!("softmax with bias: scores {ds:?}, bias {db:?}");
    }
    let (ns, nb) = (ds[0], db[0]);
    if nb == 0 || ns % nb != 0 || (nb != 1 && nb != ns) {
        candle_core::bail!("softmax with bias: scores {ds:?}, bias {db:?}");
    }
    let w = ds[ds.len() - 1].max(1);
    let inner = ds[1..].iter().product::<usize>() / w;
    Ok((inner, w, ns, nb))
}

#[inline(always)]
fn softmax_rows(s: &[f32], b: &[f32], p: &mut [f32], w: usize, scale: f32) {
    for ((s, b), p) in s
        .chunks_exact(w)
        .zip(b.chunks_exact(w))
        .zip(p.chunks_exact_mut(w))
    {
        for k in 0..w {
            p[k] = s[k] * scale + b[k];
        }
        let m = max16(p);
        for v in p.iter_mut() {
            *v = exp_f32(*v - m);
        }
        let inv = 1.0 / sum16(p);
        for v in p.iter_mut() {
            *v *= inv;
        }
    }
}

#[inline(always)]
fn softmax_bwd_rows(p: &[f32], g: &[f32], ds: &mut [f32], w: usize) {
    for ((p, g), ds) in p
        .chunks_exact(w)
        .zip(g.chunks_exact(w))
        .zip(ds.chunks_exact_mut(w))
    {
        let c = dot16(g, p);
        for k in 0..w {
            ds[k] = p[k] * (g[k] - c);
        }
    }
}

impl CustomOp2 for SoftmaxBias {
    fn name(&self) -> &'static str {
        "ehmam-softmax-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = as_f32(s1, l1, "softmax scores")?;
        let b = as_f32(s2, l2, "softmax bias")?;
        let (inner, w, _, nb) = softmax_geometry(l1, l2)?;
        let block = inner * w;
        let mut p = vec![0f32; s.len()];
        p.par_chunks_mut(block)
            .zip(s.par_chunks(block))
            .enumerate()
            .for_each(|(i, (p, s))| {
                let b = &b[(i % nb) * block..(i % nb + 1) * block];
                // Rows in tasks of about CHUNK elements.
                let rows = (CHUNK / w).max(1) * w;
                p.par_chunks_mut(rows)
                    .zip(s.par_chunks(rows).zip(b.par_chunks(rows)))
                    .for_each(|(p, (s, b))| simd!(softmax_rows(s, b, p, w, self.scale)));
            });
        Ok((CpuStorage::F32(p), l1.shape().clone()))
    }
    fn bwd(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ns = scores.dim(0)?;
        let nb = bias.dim(0)?;
        let w = scores.dims().last().copied().unwrap_or(1).max(1);
        let ds = with_f32(res, "softmax backward", |p| {
            with_f32(grad, "softmax backward", |g| {
                let mut ds = vec![0f32; p.len()];
                let rows = (CHUNK / w).max(1) * w;
                ds.par_chunks_mut(rows)
                    .zip(p.par_chunks(rows).zip(g.par_chunks(rows)))
                    .for_each(|(d, (p, g))| simd!(softmax_bwd_rows(p, g, d, w)));
                Ok(ds)
            })
        })?;
        // d(scores) = scale · d(scores·scale + bias); d(bias) is the latter.
        let dscores: Vec<f32> = if self.scale == 1.0 {
            ds.clone()
        } else {
            ds.par_iter().map(|v| v * self.scale).collect()
        };
        let dbias = if nb == ns {
            ds
        } else {
            // Broadcast over the leading dimension: sum its blocks, in order.
            sum_blocks(&ds, ds.len() / ns.max(1))
        };
        Ok((
            Some(tensor(dscores, scores.shape())?),
            Some(tensor(dbias, bias.shape())?),
        ))
    }
}

/// `softmax(scores·scale + bias)` over the last dimension; `bias` has the shape of `scores` or 1
/// as its leading dimension. Fused on the CPU for f32; composed elsewhere.
pub fn softmax_with_bias(scores: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    if fused_ok(scores) && fused_ok(bias) {
        scores.contiguous()?.apply_op2(
            &bias.contiguous()?,
            SoftmaxBias {
                scale: scale as f32,
            },
        )
    } else {
        // Mixed precision: the softmax in f32 (autocast's rule), the probabilities back in the
        // scores' type.
        let acc = super::ops::acc_dtype(scores.dtype());
        candle_nn::ops::softmax(
            &(scores.to_dtype(acc)? * scale)?.broadcast_add(&bias.to_dtype(acc)?)?,
            candle_core::D::Minus1,
        )?
        .to_dtype(scores.dtype())
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

/// Inverted dropout with a counter-based mask (see the module's documentation).
#[derive(Clone, Copy)]
pub struct Dropout {
    pub key: u64,
    pub p: f64,
}

impl Dropout {
    /// The keep mask, scaled (`0` or `1/(1−p)`), of `n` elements (for the composed path and tests).
    pub fn mask(&self, n: usize) -> Vec<f32> {
        let ones = vec![1f32; n];
        let mut m = vec![0f32; n];
        self.apply(&ones, &mut m);
        m
    }

    fn apply(&self, x: &[f32], y: &mut [f32]) {
        let thr = drop_threshold(self.p);
        let scale = (1.0 / (1.0 - self.p)) as f32;
        let key = self.key;
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (y, x))| {
                let start = (c * CHUNK) as u32;
                simd!(dropout_kernel(x, y, key, start, thr, scale))
            });
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "ehmam-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s, l, "dropout")?;
        let mut y = vec![0f32; x.len()];
        self.apply(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // y = x·m, so dx = g·m: the same mask, regenerated from the key.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Applies `d` to `x`: fused on the CPU for f32, else a host-drawn mask (the same bits) times `x`.
pub fn dropout(x: &Tensor, d: Dropout) -> Result<Tensor> {
    if d.p <= 0.0 {
        return Ok(x.clone());
    }
    if fused_ok(x) {
        x.contiguous()?.apply_op1(d)
    } else {
        let m = Tensor::from_vec(d.mask(x.elem_count()), x.shape(), &candle_core::Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        x.mul(&m)
    }
}

/// `n` draws of N(0, std²) from the counter-based generator: Box–Muller on pairs of hashes, both
/// of its outputs used (elements 2i and 2i + 1 from pair i).
pub fn normal_counter(key: u64, n: usize, std: f64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let start = c * CHUNK / 2; // CHUNK is even: chunks hold whole pairs
        for (k, o) in out.chunks_mut(2).enumerate() {
            let i = (start + k) as u32;
            let a = hash32(key, i.wrapping_mul(2));
            let b = hash32(key, i.wrapping_mul(2).wrapping_add(1));
            // u1 in (0, 1], u2 in [0, 1)
            let u1 = (a as f64 + 1.0) / 4_294_967_296.0;
            let u2 = b as f64 / 4_294_967_296.0;
            let r = std * (-2.0 * u1.ln()).sqrt();
            let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
            o[0] = (r * c) as f32;
            if let Some(o1) = o.get_mut(1) {
                *o1 = (r * s) as f32;
            }
        }
    });
    v
}

// ---------------------------------------------------------------------------------------------
// Grouped 1-D convolution over time, channels last (im2col + one GEMM per group, straight into
// the interleaved output; col2im scatter in the backward)
// ---------------------------------------------------------------------------------------------

/// A strided view of an f32 matrix inside a slice: element (i, j) at `off + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View {
    off: usize,
    rs: usize,
    cs: usize,
}

impl View {
    /// Whether an `r × c` matrix seen this way lies inside `len` elements.
    fn fits(&self, r: usize, c: usize, len: usize) -> bool {
        r == 0 || c == 0 || self.off + (r - 1) * self.rs + (c - 1) * self.cs < len
    }
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, or `+=` with `accumulate`, through gemm with
/// candle's thread count (gemm splits rows and columns, never the inner dimension, so the result
/// does not depend on it).
#[allow(clippy::too_many_arguments)]
fn matmul_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    d: View,
    lhs: &[f32],
    l: View,
    rhs: &[f32],
    r: View,
    accumulate: bool,
) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_views(m, n, k, dst, d, lhs, l, rhs, r, accumulate, par)
}

/// `dst (m × n) = lhs · rhs` on this thread (the caller parallelises over tasks).
#[allow(clippy::too_many_arguments)]
fn matmul_seq(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    d: View,
    lhs: &[f32],
    l: View,
    rhs: &[f32],
    r: View,
) -> Result<()> {
    gemm_views(
        m,
        n,
        k,
        dst,
        d,
        lhs,
        l,
        rhs,
        r,
        false,
        gemm::Parallelism::None,
    )
}

/// The one call into gemm: every view bounds-checked first.
#[allow(clippy::too_many_arguments)]
fn gemm_views(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    d: View,
    lhs: &[f32],
    l: View,
    rhs: &[f32],
    r: View,
    accumulate: bool,
    par: gemm::Parallelism,
) -> Result<()> {
    if !(d.fits(m, n, dst.len()) && l.fits(m, k, lhs.len()) && r.fits(k, n, rhs.len())) {
        candle_core::bail!(
            "fused matmul: a matrix view falls outside its buffer ({m}×{k}·{k}×{n})"
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[d.off + i * d.rs + j * d.cs] = 0.0;
                }
            }
        }
        return Ok(());
    }
    // SAFETY: every element each view addresses lies inside its slice (checked above); `dst` is
    // borrowed mutably and the inputs immutably, so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(d.off),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr().add(l.off),
            l.cs as isize,
            l.rs as isize,
            rhs.as_ptr().add(r.off),
            r.cs as isize,
            r.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Geometry of a grouped convolution over time.
#[derive(Clone, Copy, Debug)]
struct ConvGeom {
    b: usize,
    l: usize,
    c: usize,
    o: usize,
    k: usize,
    pad: usize,
    stride: usize,
    groups: usize,
    l_out: usize,
}

impl ConvGeom {
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn og(&self) -> usize {
        self.o / self.groups
    }
    /// Rows of the column matrix (`B·L_out`) and its width per group (`cg·k`).
    fn mk(&self) -> (usize, usize) {
        (self.b * self.l_out, self.cg() * self.k)
    }
}

/// Columns `[G][B·L_out][cg·k]`: `cols[g][(b, t)][c·k + j] = x[b, t·stride + j − pad, g·cg + c]`
/// (0 in the padding).
fn im2col(x: &[f32], g: &ConvGeom) -> Vec<f32> {
    let (m, kk) = g.mk();
    let cg = g.cg();
    let mut cols = vec![0f32; g.groups * m * kk];
    cols.par_chunks_mut(m * kk)
        .enumerate()
        .for_each(|(grp, cols)| {
            cols.par_chunks_mut(kk).enumerate().for_each(|(row, out)| {
                let (bi, t) = (row / g.l_out, row % g.l_out);
                for j in 0..g.k {
                    let pos = t * g.stride + j;
                    if pos < g.pad || pos - g.pad >= g.l {
                        continue;
                    }
                    let src = &x[(bi * g.l + pos - g.pad) * g.c + grp * cg..][..cg];
                    for (c, v) in src.iter().enumerate() {
                        out[c * g.k + j] = *v;
                    }
                }
            });
        });
    cols
}

/// Adds the columns' gradient back onto the input's: the transpose of [`im2col`].
fn col2im(dcols: &[f32], g: &ConvGeom) -> Vec<f32> {
    let (m, kk) = g.mk();
    let cg = g.cg();
    let mut dx = vec![0f32; g.b * g.l * g.c];
    // One utterance per task; within it, a fixed order.
    dx.par_chunks_mut(g.l * g.c)
        .enumerate()
        .for_each(|(bi, dx)| {
            for grp in 0..g.groups {
                for t in 0..g.l_out {
                    let row = &dcols[grp * m * kk + (bi * g.l_out + t) * kk..][..kk];
                    for j in 0..g.k {
                        let pos = t * g.stride + j;
                        if pos < g.pad || pos - g.pad >= g.l {
                            continue;
                        }
                        let dst = &mut dx[(pos - g.pad) * g.c + grp * cg..][..cg];
                        for (c, d) in dst.iter_mut().enumerate() {
                            *d += row[c * g.k + j];
                        }
                    }
                }
            }
        });
    dx
}

struct Conv1dTime {
    pad: usize,
    stride: usize,
    groups: usize,
}

impl Conv1dTime {
    fn geom(&self, xd: &[usize], wd: &[usize]) -> Result<ConvGeom> {
        let (b, l, c) = match xd {
            [b, l, c] => (*b, *l, *c),
            _ => candle_core::bail!("conv1d_time: input {xd:?} is not [B, L, C]"),
        };
        let (o, cg, k) = match wd {
            [o, cg, k] => (*o, *cg, *k),
            _ => candle_core::bail!("conv1d_time: kernel {wd:?} is not [O, C/groups, k]"),
        };
        let groups = self.groups;
        if groups == 0 || c != cg * groups || o % groups != 0 || k == 0 {
            candle_core::bail!(
                "conv1d_time: input has {c} channels, kernel {wd:?}, groups {groups}"
            );
        }
        let lp = l + 2 * self.pad;
        if lp < k {
            candle_core::bail!(
                "conv1d_time: {l} frames (+{} padding each side) are fewer than the kernel's {k}",
                self.pad
            );
        }
        let stride = self.stride.max(1);
        Ok(ConvGeom {
            b,
            l,
            c,
            o,
            k,
            pad: self.pad,
            stride,
            groups,
            l_out: (lp - k) / stride + 1,
        })
    }
}

/// `y = conv(x, w) (+ b)`: columns, then one GEMM per group into its slice of the output.
fn conv_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeom) -> Result<Vec<f32>> {
    let (m, kk) = g.mk();
    let og = g.og();
    let cols = im2col(x, g);
    let mut y = vec![0f32; m * g.o];
    if let Some(b) = b {
        if b.len() != g.o {
            candle_core::bail!(
                "conv1d_time: bias of {} for {} output channels",
                b.len(),
                g.o
            );
        }
        y.par_chunks_mut(g.o).for_each(|r| r.copy_from_slice(b));
    }
    for grp in 0..g.groups {
        // y[:, grp·og..] (m × og, row stride O) (+)= cols_g (m × kk) · w_gᵀ (kk × og)
        matmul_into(
            m,
            og,
            kk,
            &mut y,
            View {
                off: grp * og,
                rs: g.o,
                cs: 1,
            },
            &cols,
            View {
                off: grp * m * kk,
                rs: kk,
                cs: 1,
            },
            w,
            View {
                off: grp * og * kk,
                rs: 1,
                cs: kk,
            },
            b.is_some(),
        )?;
    }
    Ok(y)
}

/// `(dx, dw)` of the convolution (the bias's gradient is the column sums of `gy`).
fn conv_backward(x: &[f32], w: &[f32], gy: &[f32], g: &ConvGeom) -> Result<(Vec<f32>, Vec<f32>)> {
    let (m, kk) = g.mk();
    let og = g.og();
    let cols = im2col(x, g);
    let mut dw = vec![0f32; g.o * kk];
    let mut dcols = vec![0f32; g.groups * m * kk];
    for grp in 0..g.groups {
        // dw_g (og × kk) = gy_gᵀ (og × m) · cols_g (m × kk)
        matmul_into(
            og,
            kk,
            m,
            &mut dw,
            View {
                off: grp * og * kk,
                rs: kk,
                cs: 1,
            },
            gy,
            View {
                off: grp * og,
                rs: 1,
                cs: g.o,
            },
            &cols,
            View {
                off: grp * m * kk,
                rs: kk,
                cs: 1,
            },
            false,
        )?;
        // dcols_g (m × kk) = gy_g (m × og) · w_g (og × kk)
        matmul_into(
            m,
            kk,
            og,
            &mut dcols,
            View {
                off: grp * m * kk,
                rs: kk,
                cs: 1,
            },
            gy,
            View {
                off: grp * og,
                rs: g.o,
                cs: 1,
            },
            w,
            View {
                off: grp * og * kk,
                rs: kk,
                cs: 1,
            },
            false,
        )?;
    }
    Ok((col2im(&dcols, g), dw))
}

impl CustomOp2 for Conv1dTime {
    fn name(&self) -> &'static str {
        "ehmam-conv1d-time"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s1, l1, "conv input")?;
        let w = as_f32(s2, l2, "conv kernel")?;
        let g = self.geom(l1.dims(), l2.dims())?;
        let y = conv_forward(x, w, None, &g)?;
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.l_out, g.o))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geom(x.dims(), w.dims())?;
        let (dx, dw) = with_f32(x, "conv backward", |xv| {
            with_f32(w, "conv backward", |wv| {
                with_f32(grad, "conv backward", |gy| conv_backward(xv, wv, gy, &g))
            })
        })?;
        Ok((Some(tensor(dx, x.shape())?), Some(tensor(dw, w.shape())?)))
    }
}

impl CustomOp3 for Conv1dTime {
    fn name(&self) -> &'static str {
        "ehmam-conv1d-time-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s1, l1, "conv input")?;
        let w = as_f32(s2, l2, "conv kernel")?;
        let b = as_f32(s3, l3, "conv bias")?;
        let g = self.geom(l1.dims(), l2.dims())?;
        let y = conv_forward(x, w, Some(b), &g)?;
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.l_out, g.o))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geom(x.dims(), w.dims())?;
        let (dx, dw, db) = with_f32(x, "conv backward", |xv| {
            with_f32(w, "conv backward", |wv| {
                with_f32(grad, "conv backward", |gy| {
                    let (dx, dw) = conv_backward(xv, wv, gy, &g)?;
                    Ok((dx, dw, column_sums(gy, g.o)))
                })
            })
        })?;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dw, w.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

/// The grouped convolution of `ops::conv1d_time` on the fused path (callers check
/// [`fused_ok`]).
pub fn conv1d_time_fused(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Conv1dTime {
            pad,
            stride,
            groups,
        },
    )
}

/// [`conv1d_time_fused`] plus a bias `[O]`, in the same op (the bias written first, its gradient
/// the output gradient's column sums).
pub fn conv1d_time_bias_fused(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    pad: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Conv1dTime {
            pad,
            stride,
            groups,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Linear `x·Wᵀ + b` over the last dimension (bias written first, the product accumulated onto it)
// ---------------------------------------------------------------------------------------------

struct Linear;

/// `(rows, in, out)` of a linear op.
fn linear_geom(xd: &[usize], wd: &[usize], bd: &[usize]) -> Result<(usize, usize, usize)> {
    let i = xd.last().copied().unwrap_or(0);
    let (o, wi) = match wd {
        [o, wi] => (*o, *wi),
        _ => candle_core::bail!("linear: weight {wd:?} is not [out, in]"),
    };
    if wi != i || bd != [o] {
        candle_core::bail!("linear: input {xd:?}, weight {wd:?}, bias {bd:?}");
    }
    let rows = if i == 0 {
        0
    } else {
        xd.iter().product::<usize>() / i
    };
    Ok((rows, i, o))
}

/// Column sums of a `rows × width` matrix, in fixed row parts (thread-count independent).
fn column_sums(g: &[f32], width: usize) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    let parts: Vec<Vec<f32>> = g
        .par_chunks(ROWS_PER_PART * width)
        .map(|part| {
            let mut acc = vec![0f32; width];
            for row in part.chunks_exact(width) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    sum_rows(parts, width)
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "ehmam-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s1, l1, "linear input")?;
        let w = as_f32(s2, l2, "linear weight")?;
        let b = as_f32(s3, l3, "linear bias")?;
        let (rows, i, o) = linear_geom(l1.dims(), l2.dims(), l3.dims())?;
        let mut y = vec![0f32; rows * o];
        if o > 0 {
            y.par_chunks_mut(o).for_each(|r| r.copy_from_slice(b));
        }
        // y (rows × o) += x (rows × i) · Wᵀ (i × o)
        matmul_into(
            rows,
            o,
            i,
            &mut y,
            View {
                off: 0,
                rs: o,
                cs: 1,
            },
            x,
            View {
                off: 0,
                rs: i,
                cs: 1,
            },
            w,
            View {
                off: 0,
                rs: 1,
                cs: i,
            },
            true,
        )?;
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = o;
        }
        Ok((CpuStorage::F32(y), Shape::from_dims(&dims)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, i, o) = linear_geom(x.dims(), w.dims(), b.dims())?;
        let (dx, dw, db) = with_f32(x, "linear backward", |xv| {
            with_f32(w, "linear backward", |wv| {
                with_f32(grad, "linear backward", |g| {
                    let mut dx = vec![0f32; rows * i];
                    // dx (rows × i) = g (rows × o) · W (o × i)
                    matmul_into(
                        rows,
                        i,
                        o,
                        &mut dx,
                        View {
                            off: 0,
                            rs: i,
                            cs: 1,
                        },
                        g,
                        View {
                            off: 0,
                            rs: o,
                            cs: 1,
                        },
                        wv,
                        View {
                            off: 0,
                            rs: i,
                            cs: 1,
                        },
                        false,
                    )?;
                    let mut dw = vec![0f32; o * i];
                    // dW (o × i) = gᵀ (o × rows) · x (rows × i)
                    matmul_into(
                        o,
                        i,
                        rows,
                        &mut dw,
                        View {
                            off: 0,
                            rs: i,
                            cs: 1,
                        },
                        g,
                        View {
                            off: 0,
                            rs: 1,
                            cs: o,
                        },
                        xv,
                        View {
                            off: 0,
                            rs: i,
                            cs: 1,
                        },
                        false,
                    )?;
                    Ok((dx, dw, column_sums(g, o)))
                })
            })
        })?;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dw, w.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

/// `x·Wᵀ + b` on the fused path (callers check [`fused_ok`]).
pub fn linear_fused(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

// ---------------------------------------------------------------------------------------------
// AdamW and the EMA, one pass per parameter
// ---------------------------------------------------------------------------------------------

/// The hyper-parameters of one AdamW step (as `optim::AdamW` computes them).
#[derive(Clone, Copy)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    /// `1 − β₁` and `1 − β₂`, computed in f64 as the composed path does.
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
    /// `lr·wd`, or 0 where the parameter is exempt.
    pub decay: f32,
    /// `lr·√(1−β₂ᵗ)/(1−β₁ᵗ)`.
    pub step_size: f32,
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_kernel(
    p: &[f32],
    g: &[f32],
    m: Option<&[f32]>,
    v: Option<&[f32]>,
    np: &mut [f32],
    nm: &mut [f32],
    nv: &mut [f32],
    h: AdamStep,
) {
    // The composed path's order of operations, element by element (the same bits).
    let (c1, c2) = (h.c1, h.c2);
    for i in 0..p.len() {
        let gi = g[i];
        let mi = match m {
            Some(m) => m[i] * h.beta1 + gi * c1,
            None => gi * c1,
        };
        let vi = match v {
            Some(v) => v[i] * h.beta2 + gi * gi * c2,
            None => gi * gi * c2,
        };
        let pi = if h.decay != 0.0 {
            p[i] - p[i] * h.decay
        } else {
            p[i]
        };
        let denom = vi.sqrt() + h.eps;
        np[i] = pi - (mi / denom) * h.step_size;
        nm[i] = mi;
        nv[i] = vi;
    }
}

/// One AdamW step of a CPU f32 parameter: `(p, m, v)` new, from the parameter, its gradient and
/// the moments (`None` before the first step).
pub fn adam_step(
    p: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    h: AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = p.elem_count();
    for (what, t) in [
        ("gradient", Some(g)),
        ("first moment", m),
        ("second moment", v),
    ] {
        if let Some(t) = t {
            if t.elem_count() != n {
                candle_core::bail!("adam: {what} has {} values for {n}", t.elem_count());
            }
        }
    }
    let (np, nm, nv) = with_f32(p, "adam", |pv| {
        with_f32(g, "adam", |gv| {
            let run = |mv: Option<&[f32]>, vv: Option<&[f32]>| {
                let (mut np, mut nm, mut nv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                np.par_chunks_mut(CHUNK)
                    .zip(nm.par_chunks_mut(CHUNK).zip(nv.par_chunks_mut(CHUNK)))
                    .enumerate()
                    .for_each(|(c, (np, (nm, nv)))| {
                        let r = c * CHUNK..(c * CHUNK + np.len());
                        let mv = mv.map(|s| &s[r.clone()]);
                        let vv = vv.map(|s| &s[r.clone()]);
                        simd!(adam_kernel(
                            &pv[r.clone()],
                            &gv[r.clone()],
                            mv,
                            vv,
                            np,
                            nm,
                            nv,
                            h
                        ))
                    });
                Ok((np, nm, nv))
            };
            match (m, v) {
                (Some(m), Some(v)) => with_f32(m, "adam", |mv| {
                    with_f32(v, "adam", |vv| run(Some(mv), Some(vv)))
                }),
                (None, None) => run(None, None),
                _ => candle_core::bail!("adam: one moment without the other"),
            }
        })
    })?;
    Ok((
        tensor(np, p.shape())?,
        tensor(nm, p.shape())?,
        tensor(nv, p.shape())?,
    ))
}

/// `teacher·τ + student·(1−τ)` for CPU f32 tensors, in one pass (the composed path's order).
pub fn ema(teacher: &Tensor, student: &Tensor, tau: f64) -> Result<Tensor> {
    if teacher.elem_count() != student.elem_count() {
        candle_core::bail!(
            "ema: {} teacher values for {} student ones",
            teacher.elem_count(),
            student.elem_count()
        );
    }
    let (a, b) = (tau as f32, (1.0 - tau) as f32);
    let out = with_f32(teacher, "ema", |t| {
        with_f32(student, "ema", |s| {
            let mut o = vec![0f32; t.len()];
            o.par_chunks_mut(CHUNK)
                .zip(t.par_chunks(CHUNK).zip(s.par_chunks(CHUNK)))
                .for_each(|(o, (t, s))| {
                    for i in 0..o.len() {
                        o[i] = t[i] * a + s[i] * b;
                    }
                });
            Ok(o)
        })
    })?;
    tensor(out, teacher.shape())
}

// ---------------------------------------------------------------------------------------------
// ALiBi bias from per-head slopes, and the teacher's instance norm over time
// ---------------------------------------------------------------------------------------------

/// `bias[r, h, i, j] = −dist[r, i, j] · m[h]` from the per-head slopes `m` `[H]` (the learned
/// scale already applied); its backward gives `dm[h] = −Σ g[r, h, i, j] · dist[r, i, j]`.
struct AlibiBias {
    dist: std::sync::Arc<Vec<f32>>,
    rows: usize,
    tv: usize,
}

impl CustomOp1 for AlibiBias {
    fn name(&self) -> &'static str {
        "ehmam-alibi-bias"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let m = as_f32(s, l, "alibi slopes")?;
        let (h, tt) = (m.len(), self.tv * self.tv);
        if self.dist.len() != self.rows * tt {
            candle_core::bail!(
                "alibi: {} distances for {} rows of {}²",
                self.dist.len(),
                self.rows,
                self.tv
            );
        }
        let mut out = vec![0f32; self.rows * h * tt];
        out.par_chunks_mut(tt.max(1))
            .enumerate()
            .for_each(|(k, o)| {
                let (r, head) = (k / h, k % h);
                let d = &self.dist[r * tt..(r + 1) * tt];
                let s = -m[head];
                for (o, d) in o.iter_mut().zip(d) {
                    *o = d * s;
                }
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.rows, h, self.tv, self.tv)),
        ))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let h = arg.elem_count();
        let tt = self.tv * self.tv;
        let dm = with_f32(grad, "alibi backward", |g| {
            if g.len() != self.rows * h * tt {
                candle_core::bail!("alibi backward: gradient of {} values", g.len());
            }
            // One partial sum per (row, head), added in order.
            let parts: Vec<f32> = g
                .par_chunks(tt.max(1))
                .enumerate()
                .map(|(k, g)| {
                    let r = k / h;
                    -simd!(dot16(g, &self.dist[r * tt..(r + 1) * tt]))
                })
                .collect();
            let mut dm = vec![0f32; h];
            for (k, v) in parts.iter().enumerate() {
                dm[k % h] += v;
            }
            Ok(dm)
        })?;
        Ok(Some(tensor(dm, arg.shape())?))
    }
}

/// The ALiBi bias `[rows, H, Tv, Tv]` of distances `dist` (`rows × Tv × Tv`) and slopes `m`
/// `[H]`, on the fused path (callers check [`fused_ok`]).
pub fn alibi_bias_fused(dist: Vec<f32>, rows: usize, tv: usize, m: &Tensor) -> Result<Tensor> {
    m.contiguous()?.apply_op1(AlibiBias {
        dist: std::sync::Arc::new(dist),
        rows,
        tv,
    })
}

/// Instance norm over time (dim 1) of `[B, T, C]`, no affine (forward only: the teacher's).
struct InstanceNorm {
    eps: f32,
}

impl CustomOp1 for InstanceNorm {
    fn name(&self) -> &'static str {
        "ehmam-instance-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s, l, "instance norm")?;
        let (t, c) = match l.dims() {
            [_, t, c] => (*t, *c),
            d => candle_core::bail!("instance norm: {d:?} is not [B, T, C]"),
        };
        let mut y = vec![0f32; x.len()];
        if t > 0 && c > 0 {
            y.par_chunks_mut(t * c)
                .zip(x.par_chunks(t * c))
                .for_each(|(y, x)| {
                    // Per channel, frames summed in time order.
                    let mut mean = vec![0f32; c];
                    for row in x.chunks_exact(c) {
                        for (m, v) in mean.iter_mut().zip(row) {
                            *m += v;
                        }
                    }
                    mean.iter_mut().for_each(|m| *m /= t as f32);
                    let mut var = vec![0f32; c];
                    for row in x.chunks_exact(c) {
                        for k in 0..c {
                            let d = row[k] - mean[k];
                            var[k] += d * d;
                        }
                    }
                    let rstd: Vec<f32> = var
                        .iter()
                        .map(|v| 1.0 / (v / t as f32 + self.eps).sqrt())
                        .collect();
                    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                        for k in 0..c {
                            yr[k] = (xr[k] - mean[k]) * rstd[k];
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// Instance norm over time on the fused path (forward only; callers check [`fused_ok`] and that no
/// gradient is wanted).
pub fn instance_norm_time_fused(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&InstanceNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Attention core: softmax(q·kᵀ·scale + bias) with dropout, times v, per (utterance, head) with
// strided GEMMs straight out of the qkv projection
// ---------------------------------------------------------------------------------------------

/// The attention core of a block: `qkv` `[B, T, 3D]` (q, k, v side by side, heads inside each)
/// and the bias `[B|1, H, T, T]` → `[B, T, D]` (heads side by side, before the output
/// projection). The attention probabilities are kept for the backward pass.
pub struct Attention {
    heads: usize,
    scale: f32,
    drop: Option<Dropout>,
    keep: bool,
    probs: std::sync::Mutex<Option<std::sync::Arc<Vec<f32>>>>,
}

#[derive(Clone, Copy)]
struct AttnGeom {
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    nb: usize,
}

impl AttnGeom {
    fn d(&self) -> usize {
        self.h * self.dh
    }
}

impl Attention {
    fn geom(&self, qd: &[usize], bd: &[usize]) -> Result<AttnGeom> {
        let (b, t, d3) = match qd {
            [b, t, d3] => (*b, *t, *d3),
            _ => candle_core::bail!("attention: qkv {qd:?} is not [B, T, 3D]"),
        };
        let h = self.heads;
        if h == 0 || d3 % (3 * h) != 0 {
            candle_core::bail!("attention: qkv width {d3} is not 3 × {h} heads × a head width");
        }
        let nb = match bd {
            [nb, bh, bt, bt2] if *bh == h && *bt == t && *bt2 == t && (*nb == 1 || *nb == b) => *nb,
            _ => candle_core::bail!(
                "attention: bias {bd:?} for {b} utterances, {h} heads, {t} frames"
            ),
        };
        Ok(AttnGeom {
            b,
            t,
            h,
            dh: d3 / (3 * h),
            nb,
        })
    }

    /// The dropout mask value (0 or 1/(1−p)) of element `idx` of the `[B, H, T, T]` probabilities.
    #[inline(always)]
    fn mask_row(&self, start: usize, row: &mut [f32]) {
        match self.drop {
            Some(d) => {
                let thr = drop_threshold(d.p);
                let scale = (1.0 / (1.0 - d.p)) as f32;
                for (k, m) in row.iter_mut().enumerate() {
                    let hsh = hash32(d.key, (start + k) as u32);
                    *m = if hsh >= thr { scale } else { 0.0 };
                }
            }
            None => row.iter_mut().for_each(|m| *m = 1.0),
        }
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "ehmam-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = as_f32(s1, l1, "attention qkv")?;
        let bias = as_f32(s2, l2, "attention bias")?;
        let g = self.geom(l1.dims(), l2.dims())?;
        let (t, dh, d) = (g.t, g.dh, g.d());
        let tt = t * t;
        let mut probs = vec![0f32; g.b * g.h * tt];
        let mut out_bh = vec![0f32; g.b * g.h * t * dh];
        probs
            .par_chunks_mut(tt.max(1))
            .zip(out_bh.par_chunks_mut((t * dh).max(1)))
            .enumerate()
            .try_for_each(|(task, (p, o))| -> Result<()> {
                let (bi, hi) = (task / g.h, task % g.h);
                let base = bi * t * 3 * d;
                let mut s = vec![0f32; tt];
                // S = Q·Kᵀ
                matmul_seq(
                    t,
                    t,
                    dh,
                    &mut s,
                    View {
                        off: 0,
                        rs: t,
                        cs: 1,
                    },
                    qkv,
                    View {
                        off: base + hi * dh,
                        rs: 3 * d,
                        cs: 1,
                    },
                    qkv,
                    View {
                        off: base + d + hi * dh,
                        rs: 1,
                        cs: 3 * d,
                    },
                )?;
                let bb = if g.nb == 1 { 0 } else { bi };
                let brow = &bias[(bb * g.h + hi) * tt..][..tt];
                simd!(softmax_rows(&s, brow, p, t, self.scale));
                // P_d = P ⊙ mask (into s, reused)
                let mut m = vec![0f32; t];
                for i in 0..t {
                    self.mask_row(task * tt + i * t, &mut m);
                    for j in 0..t {
                        s[i * t + j] = p[i * t + j] * m[j];
                    }
                }
                // O = P_d·V
                matmul_seq(
                    t,
                    dh,
                    t,
                    o,
                    View {
                        off: 0,
                        rs: dh,
                        cs: 1,
                    },
                    &s,
                    View {
                        off: 0,
                        rs: t,
                        cs: 1,
                    },
                    qkv,
                    View {
                        off: base + 2 * d + hi * dh,
                        rs: 3 * d,
                        cs: 1,
                    },
                )?;
                Ok(())
            })?;
        // [B, H, T, dh] → [B, T, H·dh]
        let mut out = vec![0f32; g.b * t * d];
        out.par_chunks_mut((t * d).max(1))
            .enumerate()
            .for_each(|(bi, o)| {
                for hi in 0..g.h {
                    let src = &out_bh[(bi * g.h + hi) * t * dh..][..t * dh];
                    for ti in 0..t {
                        o[ti * d + hi * dh..][..dh].copy_from_slice(&src[ti * dh..][..dh]);
                    }
                }
            });
        if self.keep {
            if let Ok(mut slot) = self.probs.lock() {
                *slot = Some(std::sync::Arc::new(probs));
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, t, d))))
    }
    fn bwd(
        &self,
        qkv_t: &Tensor,
        bias_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geom(qkv_t.dims(), bias_t.dims())?;
        let probs = match self.probs.lock().ok().and_then(|s| s.clone()) {
            Some(p) => p,
            None => {
                candle_core::bail!("attention backward: the forward pass kept no probabilities")
            }
        };
        let (t, dh, d) = (g.t, g.dh, g.d());
        let tt = t * t;
        let (dqkv_bh, dbias_full) = with_f32(qkv_t, "attention backward", |qkv| {
            with_f32(grad, "attention backward", |go| {
                let mut dqkv_bh = vec![0f32; g.b * g.h * 3 * t * dh];
                let mut dbias = vec![0f32; g.b * g.h * tt];
                dqkv_bh
                    .par_chunks_mut((3 * t * dh).max(1))
                    .zip(dbias.par_chunks_mut(tt.max(1)))
                    .enumerate()
                    .try_for_each(|(task, (dq, ds))| -> Result<()> {
                        let (bi, hi) = (task / g.h, task % g.h);
                        let base = bi * t * 3 * d;
                        let p = &probs[task * tt..][..tt];
                        let go_view = View {
                            off: bi * t * d + hi * dh,
                            rs: d,
                            cs: 1,
                        };
                        // dP_d = dO·Vᵀ
                        let mut dp = vec![0f32; tt];
                        matmul_seq(
                            t,
                            t,
                            dh,
                            &mut dp,
                            View {
                                off: 0,
                                rs: t,
                                cs: 1,
                            },
                            go,
                            go_view,
                            qkv,
                            View {
                                off: base + 2 * d + hi * dh,
                                rs: 1,
                                cs: 3 * d,
                            },
                        )?;
                        // P_d (for dV) and dS = P ⊙ (dP − Σ dP·P), dP = dP_d ⊙ mask
                        let mut pd = vec![0f32; tt];
                        let mut m = vec![0f32; t];
                        for i in 0..t {
                            self.mask_row(task * tt + i * t, &mut m);
                            let r = i * t..(i + 1) * t;
                            for j in 0..t {
                                pd[i * t + j] = p[i * t + j] * m[j];
                                dp[i * t + j] *= m[j];
                            }
                            let c = dot16(&dp[r.clone()], &p[r.clone()]);
                            for j in 0..t {
                                ds[i * t + j] = p[i * t + j] * (dp[i * t + j] - c);
                            }
                        }
                        // dS scaled (into dp, reused)
                        for (x, y) in dp.iter_mut().zip(ds.iter()) {
                            *x = y * self.scale;
                        }
                        let (dqs, rest) = dq.split_at_mut(t * dh);
                        let (dks, dvs) = rest.split_at_mut(t * dh);
                        // dQ = dS·K
                        matmul_seq(
                            t,
                            dh,
                            t,
                            dqs,
                            View {
                                off: 0,
                                rs: dh,
                                cs: 1,
                            },
                            &dp,
                            View {
                                off: 0,
                                rs: t,
                                cs: 1,
                            },
                            qkv,
                            View {
                                off: base + d + hi * dh,
                                rs: 3 * d,
                                cs: 1,
                            },
                        )?;
                        // dK = dSᵀ·Q
                        matmul_seq(
                            t,
                            dh,
                            t,
                            dks,
                            View {
                                off: 0,
                                rs: dh,
                                cs: 1,
                            },
                            &dp,
                            View {
                                off: 0,
                                rs: 1,
                                cs: t,
                            },
                            qkv,
                            View {
                                off: base + hi * dh,
                                rs: 3 * d,
                                cs: 1,
                            },
                        )?;
                        // dV = P_dᵀ·dO
                        matmul_seq(
                            t,
                            dh,
                            t,
                            dvs,
                            View {
                                off: 0,
                                rs: dh,
                                cs: 1,
                            },
                            &pd,
                            View {
                                off: 0,
                                rs: 1,
                                cs: t,
                            },
                            go,
                            go_view,
                        )?;
                        Ok(())
                    })?;
                Ok((dqkv_bh, dbias))
            })
        })?;
        // [B, H, 3, T, dh] → [B, T, 3·H·dh]
        let mut dqkv = vec![0f32; g.b * t * 3 * d];
        dqkv.par_chunks_mut((t * 3 * d).max(1))
            .enumerate()
            .for_each(|(bi, o)| {
                for hi in 0..g.h {
                    for part in 0..3 {
                        let src = &dqkv_bh[((bi * g.h + hi) * 3 + part) * t * dh..][..t * dh];
                        for ti in 0..t {
                            o[ti * 3 * d + part * d + hi * dh..][..dh]
                                .copy_from_slice(&src[ti * dh..][..dh]);
                        }
                    }
                }
            });
        let dbias = if g.nb == g.b {
            dbias_full
        } else {
            sum_blocks(&dbias_full, g.h * tt)
        };
        Ok((
            Some(tensor(dqkv, qkv_t.shape())?),
            Some(tensor(dbias, bias_t.shape())?),
        ))
    }
}

/// The attention core on the fused path (callers check [`fused_ok`]): `qkv` `[B, T, 3D]`, `bias`
/// `[B|1, H, T, T]`, dropout `drop` on the probabilities → `[B, T, D]`.
pub fn attention_fused(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    drop: Option<Dropout>,
) -> Result<Tensor> {
    let keep = qkv.track_op() || bias.track_op();
    qkv.contiguous()?.apply_op2(
        &bias.contiguous()?,
        Attention {
            heads,
            scale: scale as f32,
            drop: drop.filter(|d| d.p > 0.0),
            keep,
            probs: std::sync::Mutex::new(None),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Post-LN residual: LayerNorm(x + dropout(o)) with affine, one op
// ---------------------------------------------------------------------------------------------

/// `LN(x + dropout(o))·w + b` over the last dimension; `wb` is `[w; b]` (`[2·D]`). The sum is
/// recomputed in the backward pass from `x`, `o` and the dropout key.
struct AddLayerNorm {
    drop: Option<Dropout>,
    eps: f32,
}

impl AddLayerNorm {
    /// `x + dropout(o)`.
    fn sum(&self, x: &[f32], o: &[f32]) -> Vec<f32> {
        let mut s = vec![0f32; x.len()];
        match self.drop {
            Some(d) => d.apply(o, &mut s),
            None => s.copy_from_slice(o),
        }
        s.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(s, x)| s.iter_mut().zip(x).for_each(|(s, x)| *s += x));
        s
    }
}

impl CustomOp3 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "ehmam-add-dropout-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s1, l1, "residual input")?;
        let o = as_f32(s2, l2, "residual branch")?;
        let wb = as_f32(s3, l3, "layer norm weight and bias")?;
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        if l1.dims() != l2.dims() || wb.len() != 2 * d {
            candle_core::bail!(
                "residual layer norm: {:?} + {:?}, affine of {}",
                l1.dims(),
                l2.dims(),
                wb.len()
            );
        }
        let s = self.sum(x, o);
        let (w, b) = wb.split_at(d);
        Ok((
            CpuStorage::F32(ln_forward(&s, d, Some((w, b)), self.eps)),
            l1.shape().clone(),
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        o: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dims().last().copied().unwrap_or(1).max(1);
        let (ds, dwb) = with_f32(x, "residual layer norm backward", |xv| {
            with_f32(o, "residual layer norm backward", |ov| {
                with_f32(wb, "residual layer norm backward", |wbv| {
                    with_f32(grad, "residual layer norm backward", |g| {
                        let s = self.sum(xv, ov);
                        let (ds, affine) = ln_backward(&s, g, d, Some(&wbv[..d]), self.eps);
                        let (mut dw, db) = match affine {
                            Some(a) => a,
                            None => candle_core::bail!(
                                "residual layer norm backward: no affine gradients"
                            ),
                        };
                        dw.extend(db);
                        Ok((ds, dw))
                    })
                })
            })
        })?;
        // d(o) = d(sum) ⊙ mask
        let dout = match self.drop {
            Some(dr) => {
                let mut v = vec![0f32; ds.len()];
                dr.apply(&ds, &mut v);
                v
            }
            None => ds.clone(),
        };
        Ok((
            Some(tensor(ds, x.shape())?),
            Some(tensor(dout, o.shape())?),
            Some(tensor(dwb, wb.shape())?),
        ))
    }
}

/// `LayerNorm(x + dropout(o))·w + b` on the fused path (callers check [`fused_ok`]).
pub fn add_layer_norm_fused(
    x: &Tensor,
    o: &Tensor,
    drop: Option<Dropout>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let wb = Tensor::cat(&[w, b], 0)?;
    x.contiguous()?.apply_op3(
        &o.contiguous()?,
        &wb,
        AddLayerNorm {
            drop: drop.filter(|d| d.p > 0.0),
            eps: eps as f32,
        },
    )
}
