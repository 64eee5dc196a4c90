//! The fused CPU kernels (issue 12) against the composed ops they replace (in f64, themselves
//! checked against finite differences in tests/model.rs), against central finite differences of
//! their own, and for thread-count independence and dropout statistics.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use stages::model::fused::{self, Dropout};
use stages::model::ops::{conv1d_time_composed, layer_norm_composed, linear_composed};

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn t32(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn v64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(
            err <= tol,
            "{what}[{i}]: {g} vs {w} (error {err:.2e} > {tol:.0e})"
        );
    }
}

/// `Σ y·r` for a fixed random `r`: a scalar whose gradient sends `r` back through the op.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    let r = t32(&rand_vec(y.elem_count(), seed, 1.0), y.dims())
        .to_dtype(y.dtype())
        .unwrap();
    (y * r).unwrap().sum_all().unwrap()
}

/// Runs `f` (f32 inputs → output) on the fused path and `g` on the composed path in f64, and
/// compares the outputs and the gradients of `probe` with respect to every input.
fn against_composed(
    what: &str,
    inputs: &[(Vec<f32>, Vec<usize>)],
    fused_op: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    let vars32: Vec<Var> = inputs
        .iter()
        .map(|(v, s)| Var::from_tensor(&t32(v, s)).unwrap())
        .collect();
    let vars64: Vec<Var> = inputs
        .iter()
        .map(|(v, s)| Var::from_tensor(&t32(v, s).to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    let x32: Vec<Tensor> = vars32.iter().map(|v| v.as_tensor().clone()).collect();
    let x64: Vec<Tensor> = vars64.iter().map(|v| v.as_tensor().clone()).collect();
    let y32 = fused_op(&x32);
    let y64 = composed(&x64);
    assert_eq!(y32.dtype(), DType::F32);
    close(&format!("{what} value"), &v64(&y32), &v64(&y64), tol);
    let g32 = probe(&y32, 5).backward().unwrap();
    let g64 = probe(&y64, 5).backward().unwrap();
    for (k, (a, b)) in vars32.iter().zip(&vars64).enumerate() {
        let ga = g32
            .get(a.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for input {k}"));
        let gb = g64
            .get(b.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no composed gradient {k}"));
        close(
            &format!("{what} gradient of input {k}"),
            &v64(ga),
            &v64(gb),
            tol * 10.0,
        );
    }
}

/// Central finite differences of `probe(op(x))` in f32 (h = 1e-2, loose tolerance) at a few
/// entries of each input, against the fused backward.
fn finite_differences(
    what: &str,
    inputs: &[(Vec<f32>, Vec<usize>)],
    op: impl Fn(&[Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(v, s)| Var::from_tensor(&t32(v, s)).unwrap())
        .collect();
    let xs = |vars: &[Var]| -> Vec<Tensor> { vars.iter().map(|v| v.as_tensor().clone()).collect() };
    let loss = |vars: &[Var]| -> f64 {
        probe(&op(&xs(vars)), 5)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = probe(&op(&xs(&vars)), 5).backward().unwrap();
    for (k, var) in vars.iter().enumerate() {
        let g = v64(grads.get(var.as_tensor()).unwrap());
        let base = inputs[k].0.clone();
        for &i in &[0usize, base.len() / 3, base.len() - 1] {
            let h = 1e-2f32;
            let set = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&t32(&v, &inputs[k].1)).unwrap();
            };
            set(h);
            let lp = loss(&vars);
            set(-h);
            let lm = loss(&vars);
            set(0.0);
            let fd = (lp - lm) / (2.0 * h as f64);
            let err = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(0.05);
            assert!(
                err < 2e-2,
                "{what} input {k}[{i}]: analytic {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn exp_is_within_two_ulp_of_the_f64_exponential() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.0 * i as f32 / 200_000.0;
        let got = fused::exp_f32(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 2.5e-7, "worst relative error {worst:.3e}");
    // Clamped, never 0 or inf.
    assert!(fused::exp_f32(-1000.0) > 0.0 && fused::exp_f32(1000.0).is_finite());
    assert!(fused::exp_f32(f32::NAN).is_nan());
}

#[test]
fn gelu_matches_the_composed_erf_gelu_and_finite_differences() {
    // Wide range, including the tails where erf saturates.
    let mut x = rand_vec(3000, 1, 6.0);
    x.extend([0.0, -0.0, 1e-6, -1e-6, 9.0, -9.0, 30.0, -30.0]);
    let n = x.len();
    against_composed(
        "gelu",
        &[(x.clone(), vec![n])],
        |a| fused::gelu(&a[0]).unwrap(),
        |a| a[0].gelu_erf().unwrap(),
        4e-7,
    );
    finite_differences("gelu", &[(rand_vec(64, 2, 3.0), vec![64])], |a| {
        fused::gelu(&a[0]).unwrap()
    });
}

#[test]
fn layer_norm_matches_the_composed_one_and_finite_differences() {
    // Widths around the 16-lane blocks (and their remainders), rows across the 64-row parts.
    for (rows, d) in [(3usize, 5usize), (70, 16), (130, 37), (9, 128)] {
        let x = rand_vec(rows * d, d as u64, 2.0);
        let w = rand_vec(d, 7, 1.5);
        let b = rand_vec(d, 8, 0.5);
        against_composed(
            &format!("layer norm {rows}x{d} affine"),
            &[
                (x.clone(), vec![rows, d]),
                (w.clone(), vec![d]),
                (b.clone(), vec![d]),
            ],
            |a| fused::layer_norm_fused(&a[0], Some((&a[1], &a[2])), 1e-5).unwrap(),
            |a| layer_norm_composed(&a[0], Some((&a[1], &a[2])), 1e-5).unwrap(),
            2e-6,
        );
        against_composed(
            &format!("layer norm {rows}x{d}"),
            &[(x, vec![rows, d])],
            |a| fused::layer_norm_fused(&a[0], None, 1e-5).unwrap(),
            |a| layer_norm_composed(&a[0], None, 1e-5).unwrap(),
            2e-6,
        );
    }
    let (x, w, b) = (
        rand_vec(4 * 6, 3, 1.0),
        rand_vec(6, 4, 1.0),
        rand_vec(6, 5, 1.0),
    );
    finite_differences(
        "layer norm",
        &[(x, vec![2, 2, 6]), (w, vec![6]), (b, vec![6])],
        |a| fused::layer_norm_fused(&a[0], Some((&a[1], &a[2])), 1e-5).unwrap(),
    );
}

#[test]
fn softmax_with_bias_matches_the_composed_one_and_finite_differences() {
    // Bias per leading index (the student's ALiBi per row) and broadcast over it (the teacher's).
    for (b, h, t, nb) in [
        (3usize, 2usize, 7usize, 3usize),
        (3, 2, 7, 1),
        (2, 4, 33, 2),
    ] {
        let s = rand_vec(b * h * t * t, 11, 4.0);
        let bias = rand_vec(nb * h * t * t, 12, 3.0);
        against_composed(
            &format!("softmax {b}x{h}x{t}x{t}, bias leading {nb}"),
            &[(s, vec![b, h, t, t]), (bias, vec![nb, h, t, t])],
            |a| fused::softmax_with_bias(&a[0], 0.37, &a[1]).unwrap(),
            |a| {
                candle_nn::ops::softmax(
                    &(&a[0] * 0.37).unwrap().broadcast_add(&a[1]).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
            1e-6,
        );
    }
    finite_differences(
        "softmax",
        &[
            (rand_vec(2 * 2 * 5 * 5, 13, 2.0), vec![2, 2, 5, 5]),
            (rand_vec(2 * 5 * 5, 14, 2.0), vec![1, 2, 5, 5]),
        ],
        |a| fused::softmax_with_bias(&a[0], 0.5, &a[1]).unwrap(),
    );
}

#[test]
fn dropout_keeps_one_minus_p_scales_and_backpropagates_its_own_mask() {
    let n = 200_003;
    let x = rand_vec(n, 21, 1.0);
    for p in [0.1, 0.5] {
        let d = Dropout {
            key: 0xdead_beef_1234_5678,
            p,
        };
        let var = Var::from_tensor(&t32(&x, &[n])).unwrap();
        let y = fused::dropout(var.as_tensor(), d).unwrap();
        let yv = y.to_vec1::<f32>().unwrap();
        let scale = (1.0 / (1.0 - p)) as f32;
        let kept = yv
            .iter()
            .zip(&x)
            .filter(|(y, x)| **y == **x * scale)
            .count();
        let dropped = yv.iter().filter(|y| **y == 0.0).count();
        assert_eq!(
            kept + dropped,
            n,
            "every element is kept (scaled) or dropped"
        );
        // Binomial: within 5 standard deviations.
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (dropped as f64 - n as f64 * p).abs() < 5.0 * sd,
            "p {p}: {dropped} of {n} dropped"
        );
        // The composed path's mask is the same bits.
        let m = d.mask(n);
        assert!(yv.iter().zip(&x).zip(&m).all(|((y, x), m)| *y == *x * *m));
        // dx = g · mask.
        let g = probe(&y, 3).backward().unwrap();
        let gx = g.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let r = rand_vec(n, 3, 1.0);
        assert!(gx.iter().zip(&r).zip(&m).all(|((g, r), m)| *g == *r * *m));
        // Another key, another mask; neighbouring keys are not correlated.
        let other = Dropout {
            key: d.key + 1,
            ..d
        }
        .mask(n);
        let same = other
            .iter()
            .zip(&m)
            .filter(|(a, b)| (**a == 0.0) == (**b == 0.0))
            .count();
        let expect = n as f64 * (p * p + (1.0 - p) * (1.0 - p));
        assert!(
            (same as f64 - expect).abs() < 6.0 * (n as f64).sqrt(),
            "keys d, d+1 agree on {same} of {n}"
        );
    }
    // Normal draws: mean 0, standard deviation as asked.
    let v = fused::normal_counter(42, 100_000, 0.5);
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
    let sd = (v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    assert!(
        mean.abs() < 0.01 && (sd - 0.5).abs() < 0.01,
        "mean {mean}, sd {sd}"
    );
}

/// The same bits whatever the thread count: the kernels split rows between threads but reduce in
/// a fixed order.
#[test]
fn fused_kernels_give_the_same_bits_on_one_and_three_threads() {
    let run = |threads: usize| -> Vec<Vec<f32>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (rows, d) = (300usize, 48usize);
            let x = Var::from_tensor(&t32(&rand_vec(rows * d, 31, 2.0), &[rows, d])).unwrap();
            let w = Var::from_tensor(&t32(&rand_vec(d, 32, 1.0), &[d])).unwrap();
            let b = Var::from_tensor(&t32(&rand_vec(d, 33, 1.0), &[d])).unwrap();
            let y =
                fused::layer_norm_fused(x.as_tensor(), Some((w.as_tensor(), b.as_tensor())), 1e-5)
                    .unwrap();
            let y = fused::gelu(&y).unwrap();
            let y = fused::dropout(&y, Dropout { key: 9, p: 0.1 }).unwrap();
            let s = y.reshape((6, 50, 48)).unwrap().narrow(2, 0, 48).unwrap();
            let s = s.reshape((3, 2, 50, 48)).unwrap().narrow(3, 0, 48).unwrap();
            let bias = Tensor::zeros((1, 2, 50, 48), DType::F32, &Device::Cpu).unwrap();
            let p = fused::softmax_with_bias(&s, 0.2, &bias).unwrap();
            let cw = Var::from_tensor(&t32(&rand_vec(48 * 12 * 5, 34, 0.3), &[48, 12, 5])).unwrap();
            let c = fused::conv1d_time_fused(
                &y.reshape((3, 100, 48)).unwrap(),
                cw.as_tensor(),
                2,
                1,
                4,
            )
            .unwrap();
            let loss = (probe(&p, 4) + probe(&c, 6)).unwrap();
            let g = loss.backward().unwrap();
            let mut out = vec![p.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
            out.push(c.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for v in [&x, &w, &b, &cw] {
                out.push(
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
            out
        })
    };
    let one = run(1);
    let three = run(3);
    for (k, (a, b)) in one.iter().zip(&three).enumerate() {
        assert!(
            a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
            "output {k} differs between 1 and 3 threads"
        );
    }
}

#[test]
fn grouped_conv_matches_the_composed_one_and_finite_differences() {
    // (B, L, C, O, k, pad, stride, groups): the positional conv (same length, 4 groups), the
    // heads' (width change), a strided CNN layer from one channel, and even kernels.
    for (b, l, c, o, k, pad, stride, groups) in [
        (
            2usize, 11usize, 8usize, 8usize, 3usize, 1usize, 1usize, 2usize,
        ),
        (3, 20, 16, 8, 7, 3, 1, 8),
        (2, 40, 1, 6, 10, 0, 5, 1),
        (1, 9, 6, 9, 4, 2, 1, 3),
        (2, 5, 4, 4, 5, 0, 2, 1),
    ] {
        let x = rand_vec(b * l * c, 41 + k as u64, 1.0);
        let w = rand_vec(o * (c / groups) * k, 42, 0.5);
        against_composed(
            &format!("conv B{b} L{l} C{c} O{o} k{k} pad{pad} stride{stride} groups{groups}"),
            &[(x, vec![b, l, c]), (w, vec![o, c / groups, k])],
            |a| fused::conv1d_time_fused(&a[0], &a[1], pad, stride, groups).unwrap(),
            |a| conv1d_time_composed(&a[0], &a[1], pad, stride, groups).unwrap(),
            2e-6,
        );
    }
    // With the bias in the op.
    against_composed(
        "conv with bias",
        &[
            (rand_vec(3 * 12 * 8, 45, 1.0), vec![3, 12, 8]),
            (rand_vec(8 * 2 * 5, 46, 0.5), vec![8, 2, 5]),
            (rand_vec(8, 47, 0.5), vec![8]),
        ],
        |a| fused::conv1d_time_bias_fused(&a[0], &a[1], &a[2], 2, 1, 4).unwrap(),
        |a| {
            conv1d_time_composed(&a[0], &a[1], 2, 1, 4)
                .unwrap()
                .broadcast_add(&a[2])
                .unwrap()
        },
        2e-6,
    );
    finite_differences(
        "conv",
        &[
            (rand_vec(2 * 7 * 4, 43, 1.0), vec![2, 7, 4]),
            (rand_vec(6 * 2 * 3, 44, 1.0), vec![6, 2, 3]),
        ],
        |a| fused::conv1d_time_fused(&a[0], &a[1], 1, 1, 2).unwrap(),
    );
    // Too short for the kernel: an error, not a panic.
    let x = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 5), DType::F32, &Device::Cpu).unwrap();
    let e = fused::conv1d_time_fused(&x, &w, 1, 1, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fewer than the kernel"), "{e}");
}

#[test]
fn linear_matches_the_composed_one_and_finite_differences() {
    for (shape, i, o) in [
        (vec![3usize, 5usize], 7usize, 4usize),
        (vec![2, 70], 16, 33),
        (vec![130], 128, 384),
    ] {
        let rows: usize = shape.iter().product();
        let mut xs = shape.clone();
        xs.push(i);
        against_composed(
            &format!("linear {shape:?}x{i} -> {o}"),
            &[
                (rand_vec(rows * i, 51, 1.0), xs),
                (rand_vec(o * i, 52, 0.3), vec![o, i]),
                (rand_vec(o, 53, 0.3), vec![o]),
            ],
            |a| fused::linear_fused(&a[0], &a[1], &a[2]).unwrap(),
            |a| linear_composed(&a[0], &a[1], Some(&a[2])).unwrap(),
            2e-6,
        );
    }
    finite_differences(
        "linear",
        &[
            (rand_vec(2 * 3 * 4, 54, 1.0), vec![2, 3, 4]),
            (rand_vec(5 * 4, 55, 1.0), vec![5, 4]),
            (rand_vec(5, 56, 1.0), vec![5]),
        ],
        |a| fused::linear_fused(&a[0], &a[1], &a[2]).unwrap(),
    );
}

/// The one-pass AdamW step and EMA give the composed tensor ops' bits (the same operations in the
/// same order), over three steps, with and without weight decay.
#[test]
fn adam_step_and_ema_equal_the_composed_ops_bit_for_bit() {
    let n = 40_000;
    let (b1, b2, eps) = (0.9f64, 0.98f64, 1e-6f64);
    for decay in [0.0f64, 0.01] {
        let mut p = t32(&rand_vec(n, 61, 1.0), &[200, 200]);
        let mut pc = p.clone();
        let (mut m, mut v): (Option<Tensor>, Option<Tensor>) = (None, None);
        let (mut mc, mut vc): (Option<Tensor>, Option<Tensor>) = (None, None);
        for t in 1..=3 {
            let g = t32(&rand_vec(n, 61 + t, 0.1), &[200, 200]);
            let lr = 1e-3 * t as f64;
            let step_size = lr * (1.0 - b2.powi(t as i32)).sqrt() / (1.0 - b1.powi(t as i32));
            let h = fused::AdamStep {
                beta1: b1 as f32,
                beta2: b2 as f32,
                c1: (1.0 - b1) as f32,
                c2: (1.0 - b2) as f32,
                eps: eps as f32,
                decay: (lr * decay) as f32,
                step_size: step_size as f32,
            };
            let (np, nm, nv) = fused::adam_step(&p, &g, m.as_ref(), v.as_ref(), h).unwrap();
            // The composed path (optim.rs).
            let m2 = match &mc {
                Some(m) => ((m * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap(),
                None => (&g * (1.0 - b1)).unwrap(),
            };
            let v2 = match &vc {
                Some(v) => ((v * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap(),
                None => (g.sqr().unwrap() * (1.0 - b2)).unwrap(),
            };
            let p2 = if decay != 0.0 {
                (&pc - (&pc * (lr * decay)).unwrap()).unwrap()
            } else {
                pc.clone()
            };
            let denom = (v2.sqrt().unwrap() + eps).unwrap();
            let p2 = (p2 - (m2.div(&denom).unwrap() * step_size).unwrap()).unwrap();
            for (what, a, b) in [("p", &np, &p2), ("m", &nm, &m2), ("v", &nv, &v2)] {
                let (a, b) = (
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "decay {decay}, step {t}: {what} differs"
                );
            }
            (p, m, v) = (np, Some(nm), Some(nv));
            (pc, mc, vc) = (p2, Some(m2), Some(v2));
        }
    }
    let (t, s) = (
        t32(&rand_vec(n, 71, 1.0), &[n]),
        t32(&rand_vec(n, 72, 1.0), &[n]),
    );
    let tau = 0.9935;
    let a = fused::ema(&t, &s, tau).unwrap().to_vec1::<f32>().unwrap();
    let b = ((&t * tau).unwrap() + (&s * (1.0 - tau)).unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "ema differs"
    );
}

#[test]
fn alibi_bias_and_instance_norm_match_the_composed_ops() {
    // Bias: −dist · m[h], rows × heads × Tv × Tv; gradient to the slopes.
    let (rows, h, tv) = (3usize, 4usize, 9usize);
    let dist: Vec<f32> = rand_vec(rows * tv * tv, 81, 5.0)
        .iter()
        .map(|v| v.abs().round())
        .collect();
    let d2 = dist.clone();
    against_composed(
        "alibi bias",
        &[(rand_vec(h, 82, 1.0), vec![h])],
        move |a| fused::alibi_bias_fused(d2.clone(), rows, tv, &a[0]).unwrap(),
        move |a| {
            let d = Tensor::from_vec(dist.clone(), (rows, 1, tv, tv), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            d.broadcast_mul(&a[0].reshape((1, h, 1, 1)).unwrap())
                .unwrap()
                .neg()
                .unwrap()
        },
        1e-6,
    );
    // Instance norm (forward only).
    let x = rand_vec(2 * 30 * 20, 83, 2.0);
    let got = v64(&fused::instance_norm_time_fused(&t32(&x, &[2, 30, 20]), 1e-5).unwrap());
    let want = v64(&stages::model::ops::instance_norm_time_composed(
        &t32(&x, &[2, 30, 20]).to_dtype(DType::F64).unwrap(),
    )
    .unwrap());
    close("instance norm", &got, &want, 2e-6);
}

/// The attention core (q·kᵀ·scale + bias → softmax → dropout → ·v, heads side by side) against
/// the same computation with candle's ops in f64 and the same dropout mask.
fn attention_composed(
    qkv: &Tensor,
    bias: &Tensor,
    h: usize,
    scale: f64,
    drop: Option<Dropout>,
) -> Tensor {
    let (b, t, d3) = qkv.dims3().unwrap();
    let d = d3 / 3;
    let qkv = qkv
        .reshape((b, t, 3, h, d / h))
        .unwrap()
        .permute((2, 0, 3, 1, 4))
        .unwrap();
    let q = qkv.get(0).unwrap().contiguous().unwrap();
    let k = qkv.get(1).unwrap().contiguous().unwrap();
    let v = qkv.get(2).unwrap().contiguous().unwrap();
    let s = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(bias)
        .unwrap();
    let mut p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    if let Some(dr) = drop {
        let m = Tensor::from_vec(dr.mask(p.elem_count()), p.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(p.dtype())
            .unwrap();
        p = (p * m).unwrap();
    }
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b, t, d))
        .unwrap()
}

#[test]
fn attention_matches_the_composed_ops_and_finite_differences() {
    for (b, t, h, dh, nb, p) in [
        (2usize, 7usize, 2usize, 3usize, 2usize, 0.0f64),
        (3, 19, 4, 8, 3, 0.3),
        (2, 33, 4, 8, 1, 0.1),
        (1, 5, 1, 16, 1, 0.5),
    ] {
        let d = h * dh;
        let drop = (p > 0.0).then_some(Dropout { key: 77, p });
        against_composed(
            &format!("attention B{b} T{t} H{h} dh{dh} bias leading {nb} p {p}"),
            &[
                (rand_vec(b * t * 3 * d, 91, 1.0), vec![b, t, 3 * d]),
                (rand_vec(nb * h * t * t, 92, 2.0), vec![nb, h, t, t]),
            ],
            |a| fused::attention_fused(&a[0], &a[1], h, 0.35, drop).unwrap(),
            |a| attention_composed(&a[0], &a[1], h, 0.35, drop),
            2e-6,
        );
    }
    finite_differences(
        "attention",
        &[
            (rand_vec(2 * 5 * 12, 93, 1.0), vec![2, 5, 12]),
            (rand_vec(2 * 2 * 5 * 5, 94, 1.0), vec![2, 2, 5, 5]),
        ],
        |a| fused::attention_fused(&a[0], &a[1], 2, 0.5, Some(Dropout { key: 5, p: 0.2 })).unwrap(),
    );
}

#[test]
fn residual_layer_norm_matches_the_composed_ops() {
    for p in [0.0f64, 0.25] {
        let (rows, d) = (90usize, 24usize);
        let drop = (p > 0.0).then_some(Dropout { key: 123, p });
        against_composed(
            &format!("LN(x + dropout(o)) p {p}"),
            &[
                (rand_vec(rows * d, 101, 1.0), vec![3, 30, d]),
                (rand_vec(rows * d, 102, 1.0), vec![3, 30, d]),
                (rand_vec(d, 103, 1.0), vec![d]),
                (rand_vec(d, 104, 1.0), vec![d]),
            ],
            |a| fused::add_layer_norm_fused(&a[0], &a[1], drop, &a[2], &a[3], 1e-5).unwrap(),
            |a| {
                let o = match drop {
                    Some(dr) => (&a[1]
                        * Tensor::from_vec(dr.mask(a[1].elem_count()), a[1].dims(), &Device::Cpu)
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap())
                    .unwrap(),
                    None => a[1].clone(),
                };
                layer_norm_composed(&(&a[0] + o).unwrap(), Some((&a[2], &a[3])), 1e-5).unwrap()
            },
            2e-6,
        );
    }
}
