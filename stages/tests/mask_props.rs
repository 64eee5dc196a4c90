//! Tests of the `mask.*` stages (method §4): the invariants of §4.1 on hand-worked and random
//! inputs, the statistics of §4.3, the curricula of §4.2, the frame variant of §4.4, padding,
//! determinism, and the parameters as users type them.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use stages::items::Taught;
use stages::items::{Batch, DataPosition};
use stages::train::mask::*;
use stages::train::masking::*;

fn spec(p: f64, l: usize) -> MaskSpec {
    MaskSpec {
        mask_prob: p,
        span: l,
        ..MaskSpec::default()
    }
}

/// A batch of `lengths.len()` rows padded to the longest (padding mask only when lengths differ).
fn batch(step: u64, epoch: u32, frames: usize, lengths: &[usize]) -> Batch {
    let size = lengths.len();
    let padded = lengths.iter().any(|&n| n != frames);
    Batch {
        step,
        position: DataPosition::default(),
        epoch,
        utt_ids: (0..size).map(|i| format!("u{i}")).collect(),
        offsets: vec![0; size],
        lengths: lengths.to_vec(),
        longest: lengths.iter().copied().max().unwrap_or(frames),
        frames,
        dim: 1,
        frame_rate: 50.0,
        data: vec![0.0; size * frames],
        padding_mask: padded.then(|| {
            lengths
                .iter()
                .flat_map(|&n| (0..frames).map(move |t| t >= n))
                .collect()
        }),
        transcripts: Vec::new(),
        whole: Vec::new(),
    }
}

fn taught(b: Batch, pred_loss: Vec<f32>) -> Taught {
    let shape = (b.size(), b.frames, 0);
    Taught {
        frames: b.frames,
        batch: b,
        targets: candle_core::Tensor::zeros(
            shape,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        target_dim: 0,
        pred_loss,
        teacher_version: 0,
    }
}

/// i.i.d. uniform noise smoothed by a 10-frame moving average (method §4.3's stand-in for the
/// teacher's predicted losses), `size × frames`.
fn smooth_noise(rng: &mut ChaCha8Rng, size: usize, frames: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(size * frames);
    for _ in 0..size {
        let noise: Vec<f32> = (0..frames + 9).map(|_| rng.random::<f32>()).collect();
        out.extend((0..frames).map(|t| noise[t..t + 10].iter().sum::<f32>() / 10.0));
    }
    out
}

fn row(v: &[bool], b: usize, frames: usize) -> &[bool] {
    &v[b * frames..(b + 1) * frames]
}

fn count(v: &[bool]) -> usize {
    v.iter().filter(|&&x| x).count()
}

/// The invariants of method §4.1 that hold for every output.
fn check_invariants(out: &MaskOut, frames: usize, lengths: &[usize], s: &MaskSpec, r: f64) {
    let size = lengths.len();
    assert_eq!(out.mask.len(), size * frames);
    assert_eq!(out.hard.len(), size * frames);
    let m = out.covered.iter().copied().min().unwrap_or(0);
    let holes = (s.mask_dropout * m as f64).round_ties_even() as usize;
    assert_eq!(
        out.masked_per_row,
        m - holes,
        "trim to the batch minimum, then mask_dropout"
    );
    for b in 0..size {
        let (mask, hard) = (row(&out.mask, b, frames), row(&out.hard, b, frames));
        let n = lengths[b];
        assert_eq!(
            count(mask),
            out.masked_per_row,
            "row {b}: exactly masked_per_row masked"
        );
        assert!(
            hard.iter().zip(mask).all(|(&h, &m)| !h || m),
            "row {b}: hard ⊄ mask"
        );
        assert!(mask[n..].iter().all(|&m| !m), "row {b}: padding masked");
        let spans = out.spans[b];
        match s.unit {
            MaskUnit::Span => {
                assert!(spans >= 1);
                assert_eq!(
                    out.hard_spans[b],
                    num_hard(spans, r).min(n),
                    "row {b}: S_hard = S − floor(S(1−r))"
                );
                assert_eq!(
                    out.rand_starts[b].len(),
                    spans - num_hard(spans, r),
                    "row {b}: S_rand random starts"
                );
                let (hl, rl) = (&out.hard_lengths[b], &out.rand_lengths[b]);
                assert_eq!(
                    hl.len(),
                    out.hard_starts[b].len(),
                    "row {b}: a length per hard span"
                );
                assert_eq!(
                    rl.len(),
                    out.rand_starts[b].len(),
                    "row {b}: a length per random span"
                );
                let lengths: Vec<usize> = hl.iter().chain(rl).copied().collect();
                if s.mask_type == SpanShape::Static {
                    assert!(
                        lengths.iter().all(|&l| l == s.span),
                        "row {b}: static spans are L long"
                    );
                }
                let hard_spans: Vec<(usize, usize)> = out.hard_starts[b]
                    .iter()
                    .copied()
                    .zip(hl.iter().copied())
                    .collect();
                let all_spans: Vec<(usize, usize)> = hard_spans
                    .iter()
                    .copied()
                    .chain(out.rand_starts[b].iter().copied().zip(rl.iter().copied()))
                    .collect();
                // Every hard-marked frame lies in a span started by a hard start.
                for t in (0..n).filter(|&t| hard[t]) {
                    assert!(
                        hard_spans.iter().any(|&(h, l)| h <= t && t < h + l),
                        "row {b}: frame {t} marked hard outside every hard span"
                    );
                }
                // Every masked frame lies in some span.
                for t in (0..n).filter(|&t| mask[t]) {
                    assert!(
                        all_spans.iter().any(|&(st, l)| st <= t && t < st + l),
                        "row {b}: frame {t} masked outside every span"
                    );
                }
                // Without trimming, a row masks exactly the union of its spans.
                if out.covered[b] == out.masked_per_row {
                    for t in 0..n {
                        assert_eq!(
                            mask[t],
                            all_spans.iter().any(|&(st, l)| st <= t && t < st + l),
                            "row {b}: frame {t}"
                        );
                        assert_eq!(
                            hard[t],
                            hard_spans.iter().any(|&(st, l)| st <= t && t < st + l),
                            "row {b}: frame {t} hard"
                        );
                    }
                }
                // Random starts come from [0, n − min length) unless the row is too short for that.
                let l_min = lengths.iter().copied().min().unwrap_or(s.span);
                if n > l_min && n - l_min > spans {
                    assert!(
                        out.rand_starts[b].iter().all(|&st| st < n - l_min),
                        "row {b}: random start in the last L frames"
                    );
                } else {
                    assert!(out.rand_starts[b].iter().all(|&st| st < spans + 1));
                }
            }
            MaskUnit::Frame => {
                let (kh, kr) = frame_counts(s.mask_prob, n, r);
                assert_eq!((spans, out.hard_spans[b]), (kh + kr, kh));
                assert!((0..n)
                    .filter(|&t| hard[t])
                    .all(|t| out.hard_starts[b].contains(&t)));
            }
        }
        // Hard starts are distinct, inside the row, and never random starts.
        let hs = &out.hard_starts[b];
        assert!(hs.iter().all(|&h| h < n));
        let mut sorted = hs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), hs.len(), "row {b}: repeated hard start");
        assert!(
            out.rand_starts[b].iter().all(|st| !hs.contains(st)),
            "row {b}: a random start equals a hard start"
        );
        let mut rs = out.rand_starts[b].clone();
        rs.dedup();
        assert_eq!(
            rs.len(),
            out.rand_starts[b].len(),
            "row {b}: repeated random start"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-worked examples
// ---------------------------------------------------------------------------------------------

/// n = 20, P = 0.5, L = 2: S = floor(0.5·20/2 + u) = 5 for every u in [0, 1).
/// r = 0.6: S_rand = floor(5·0.4) = 2, S_hard = 3: the starts at the three largest losses
/// (frames 3, 11, 17), spans {3,4}, {11,12}, {17,18}. One row, so nothing is trimmed.
#[test]
fn hard_starts_are_the_largest_predicted_losses() {
    let mut lp: Vec<f32> = (0..20).map(|t| 0.01 * t as f32).collect(); // 0 … 0.19, distinct
    lp[3] = 0.9;
    lp[11] = 0.8;
    lp[17] = 0.7;
    lp[6] = 0.6; // fourth: hard only when S_hard ≥ 4
    for seed in 0..50 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let out = eh_mask(&lp, 1, 20, &[20], &spec(0.5, 2), 0.6, &mut rng).unwrap();
        assert_eq!(out.spans, vec![5]);
        assert_eq!(out.hard_spans, vec![3]);
        assert_eq!(out.hard_starts, vec![vec![3, 11, 17]]);
        let hard: Vec<usize> = (0..20).filter(|&t| out.hard[t]).collect();
        assert_eq!(hard, vec![3, 4, 11, 12, 17, 18]);
        assert_eq!(out.rand_starts[0].len(), 2);
        assert!(out.rand_starts[0]
            .iter()
            .all(|&s| s < 18 && ![3, 11, 17].contains(&s)));
        let mut want = vec![false; 20];
        for &s in out.hard_starts[0].iter().chain(&out.rand_starts[0]) {
            want[s] = true;
            want[s + 1] = true;
        }
        assert_eq!(
            out.mask, want,
            "one row: the mask is exactly the union of the spans"
        );
        assert_eq!(out.masked_per_row, count(&want));
    }
    // r = 1: all five spans hard, at frames 3, 11, 17, 6 and then the largest of the ramp (19).
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let out = eh_mask(&lp, 1, 20, &[20], &spec(0.5, 2), 1.0, &mut rng).unwrap();
    assert_eq!(out.hard_starts, vec![vec![3, 11, 17, 6, 19]]);
    assert!(out.rand_starts[0].is_empty());
    // Frame 19's span is cut at n = 20: {3,4,6,7,11,12,17,18,19}.
    let masked: Vec<usize> = (0..20).filter(|&t| out.mask[t]).collect();
    assert_eq!(masked, vec![3, 4, 6, 7, 11, 12, 17, 18, 19]);
    assert_eq!(out.mask, out.hard);
    // r = 0: no hard start at all.
    let out = eh_mask(&lp, 1, 20, &[20], &spec(0.5, 2), 0.0, &mut rng).unwrap();
    assert!(out.hard_starts[0].is_empty() && count(&out.hard) == 0);
    assert_eq!(out.rand_starts[0].len(), 5);
}

/// S_hard = S − floor(S(1 − r)) on worked values (S = 50 at T = 500, P = 0.5, L = 5).
#[test]
fn hard_span_counts() {
    for (r, want) in [(0.0, 0), (0.25, 13), (0.5, 25), (0.8, 40), (1.0, 50)] {
        assert_eq!(num_hard(50, r), want, "r = {r}");
    }
    let lp: Vec<f32> = (0..500).map(|t| ((t * 7919) % 500) as f32).collect(); // distinct values
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for r in [0.0, 0.25, 0.5, 0.8, 1.0] {
        let out = eh_mask(&lp, 1, 500, &[500], &spec(0.5, 5), r, &mut rng).unwrap();
        assert_eq!(out.spans, vec![50]);
        assert_eq!(out.hard_spans, vec![num_hard(50, r)]);
        let mut distinct = out.hard_starts[0].clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), num_hard(50, r));
        let want = {
            let mut v = out.hard_starts[0].clone();
            v.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]));
            v
        };
        assert_eq!(out.hard_starts[0], want);
        // They are the largest: every other frame's loss is at most the smallest hard one.
        if let Some(&last) = out.hard_starts[0].last() {
            assert!((0..500)
                .filter(|t| !out.hard_starts[0].contains(t))
                .all(|t| lp[t] <= lp[last]));
        }
    }
}

/// Probabilistic rounding: S = max(1, floor(P·n/L + u)) with u ∈ [0, 1), so S is the floor or
/// one more; once per batch for easy-to-hard (every row the same), per row for mask.random.
#[test]
fn probabilistic_rounding() {
    // P·n/L = 0.5·101/5 = 10.1: S is 10 (u < 0.9) or 11 (u ≥ 0.9).
    let lp = vec![0.0f32; 16 * 101];
    let (mut batch_mixed, mut rows_mixed, mut elevens, mut total) = (false, false, 0usize, 0usize);
    for step in 0..400 {
        let m = Masker::easy_to_hard(&EasyToHardParams::default(), 11);
        let out = m
            .apply(taught(batch(step, 0, 101, &[101; 16]), lp.clone()))
            .unwrap();
        assert!(
            out.spans.iter().all(|&s| s == out.spans[0]),
            "easy_to_hard: one u per batch"
        );
        assert!(out.spans[0] == 10 || out.spans[0] == 11);
        batch_mixed |= out.spans[0] == 11;
        let m = Masker::random(&MaskParams::default(), 11);
        let out = m
            .apply(taught(batch(step, 0, 101, &[101; 16]), lp.clone()))
            .unwrap();
        assert!(out.spans.iter().all(|&s| s == 10 || s == 11));
        rows_mixed |= out.spans.iter().any(|&s| s != out.spans[0]);
        elevens += out.spans.iter().filter(|&&s| s == 11).count();
        total += 16;
    }
    assert!(batch_mixed, "S = 11 never drawn");
    assert!(rows_mixed, "mask.random: u per row, yet rows always agree");
    // P(S = 11) = 0.1; 6400 rows: 640 ± 24 (1 sd); ± 5 sd is [520, 760].
    assert!(
        (520..=760).contains(&elevens),
        "{elevens} of {total} rows with S = 11"
    );
    // A row far shorter than L still gets one span (min_masks 1), cut at n.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let out = eh_mask(&[0.5, 0.2, 0.1], 1, 3, &[3], &spec(0.5, 5), 1.0, &mut rng).unwrap();
    assert_eq!((out.spans[0], out.hard_starts[0].clone()), (1, vec![0]));
    assert_eq!(out.mask, vec![true, true, true]);
}

#[test]
fn random_starts_never_in_the_last_span() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..200 {
        let lp = smooth_noise(&mut rng, 4, 120);
        let r = rng.random::<f64>();
        let s = spec(0.5, 10);
        let out = eh_mask(&lp, 4, 120, &[120; 4], &s, r, &mut rng).unwrap();
        check_invariants(&out, 120, &[120; 4], &s, r);
        for b in 0..4 {
            assert!(out.rand_starts[b].iter().all(|&st| st < 110));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Method §4.3 statistics
// ---------------------------------------------------------------------------------------------

/// Mean final masked fraction, mean covered fraction before trimming, and the hard share of
/// spans, over `batches` batches of B = 8, T = 500.
fn simulate(r: f64, rounding: Rounding, batches: usize, seed: u64) -> (f64, f64, f64) {
    let (t, b) = (500, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let s = MaskSpec {
        rounding,
        ..spec(0.5, 5)
    };
    let (mut fin, mut pre, mut hard, mut spans) = (0.0, 0.0, 0usize, 0usize);
    for _ in 0..batches {
        let lp = smooth_noise(&mut rng, b, t);
        let out = eh_mask(&lp, b, t, &[t; 8], &s, r, &mut rng).unwrap();
        check_invariants(&out, t, &[t; 8], &s, r);
        fin += out.masked_per_row as f64 / t as f64;
        pre += out.covered.iter().sum::<usize>() as f64 / (b * t) as f64;
        hard += out.hard_spans.iter().sum::<usize>();
        spans += out.spans.iter().sum::<usize>();
    }
    (
        fin / batches as f64,
        pre / batches as f64,
        hard as f64 / spans as f64,
    )
}

/// Method §4.3: random masking covers ≈ 41 % before trimming and ≈ 39 % after; the final masked
/// fraction falls as r grows, ≈ 0.35 / 0.30 / 0.22 / 0.18 at r = 0.25 / 0.5 / 0.8 / 1.0.
///
/// Tolerance ± 0.03 (absolute) on each. Sampling noise is far smaller: one batch's masked
/// fraction varies by about ± 0.02, so the mean of 300 batches is known to about ± 0.001. The
/// tolerance covers what the method's figures leave unspecified (the smoothing window's
/// alignment, the number of batches, their two-digit rounding), not randomness, so it does not
/// make the test flaky; a change of the algorithm (e.g. S_hard wrong, no trimming, spans not
/// unioned) moves these numbers by more than 0.03.
#[test]
fn masked_fraction_matches_method_4_3() {
    let (fin0, pre0, share0) = simulate(0.0, Rounding::PerRow, 300, 1);
    eprintln!("r = 0: before trim {pre0:.4}, final {fin0:.4}");
    assert!(
        (pre0 - 0.41).abs() <= 0.03,
        "random, before trimming: {pre0}"
    );
    assert!((fin0 - 0.39).abs() <= 0.03, "random, final: {fin0}");
    assert!(fin0 < pre0, "trimming to the batch minimum removes frames");
    assert_eq!(share0, 0.0);
    let mut last = fin0;
    for (r, want) in [(0.25, 0.35), (0.5, 0.30), (0.8, 0.22), (1.0, 0.18)] {
        let (fin, pre, share) = simulate(r, Rounding::PerBatch, 300, 2);
        eprintln!("r = {r}: before trim {pre:.4}, final {fin:.4}, hard share of spans {share:.4}");
        assert!(
            (fin - want).abs() <= 0.03,
            "r = {r}: final masked fraction {fin}, method §4.3 says {want}"
        );
        assert!(
            fin < last,
            "masked fraction must fall as r grows ({last} → {fin} at r = {r})"
        );
        last = fin;
        // S = 50 in every row at T = 500, so the hard share is exactly S_hard / S.
        assert_eq!(share, num_hard(50, r) as f64 / 50.0, "r = {r}");
    }
}

// ---------------------------------------------------------------------------------------------
// Curriculum (method §4.2)
// ---------------------------------------------------------------------------------------------

#[test]
fn linear_curriculum() {
    let c = Curriculum::Linear {
        ramp_updates: 1000,
        r_max: 1.0,
    };
    assert_eq!(hard_ratio(&c, 0, 0), 0.0);
    assert_eq!(hard_ratio(&c, 500, 3), 0.5);
    assert_eq!(hard_ratio(&c, 250, 0), 0.25);
    assert_eq!(hard_ratio(&c, 1000, 0), 1.0);
    assert_eq!(
        hard_ratio(&c, 5000, 0),
        1.0,
        "holds at r_max after the ramp"
    );
    let c = Curriculum::Linear {
        ramp_updates: 1000,
        r_max: 0.8,
    };
    assert_eq!(hard_ratio(&c, 0, 0), 0.0);
    assert!((hard_ratio(&c, 500, 0) - 0.4).abs() < 1e-12);
    assert!((hard_ratio(&c, 1000, 0) - 0.8).abs() < 1e-12);
    assert!((hard_ratio(&c, 9999, 0) - 0.8).abs() < 1e-12);
}

#[test]
fn epoch_clamped_curriculum() {
    let c = Curriculum::EpochClamped {
        total_epochs: 150,
        jump_at: 0.7,
        jump_to: 0.8,
    };
    // e = epoch + 1 (1-based); the step does not matter.
    assert!((hard_ratio(&c, 0, 0) - 1.0 / 150.0).abs() < 1e-12);
    assert!((hard_ratio(&c, 77, 74) - 0.5).abs() < 1e-12);
    assert!(
        (hard_ratio(&c, 0, 103) - 104.0 / 150.0).abs() < 1e-12,
        "0.693 < 0.7: no jump yet"
    );
    assert_eq!(hard_ratio(&c, 0, 104), 0.8, "e = 105 → 0.7 → 0.8");
    assert_eq!(hard_ratio(&c, 0, 200), 0.8);
    assert_eq!(
        hard_ratio(&c, 0, 599),
        0.8,
        "max_epoch 600 in the README config"
    );
    // Without the jump (jump_at above 1) r = e/total is capped at 1.
    let c = Curriculum::EpochClamped {
        total_epochs: 10,
        jump_at: 2.0,
        jump_to: 0.8,
    };
    assert!((hard_ratio(&c, 0, 8) - 0.9).abs() < 1e-12);
    assert_eq!(hard_ratio(&c, 0, 30), 1.0);
}

#[test]
fn constant_and_fixed_curricula() {
    assert_eq!(hard_ratio(&Curriculum::Constant { r: 0.3 }, 0, 0), 0.3);
    assert_eq!(
        hard_ratio(&Curriculum::Constant { r: 0.3 }, 123_456, 99),
        0.3
    );
    let lp = vec![0.0f32; 2 * 50];
    let p = MaskParams::default();
    for step in [0, 1, 10_000] {
        let t = || taught(batch(step, 7, 50, &[50, 50]), lp.clone());
        let rand = Masker::random(&p, 1).apply(t()).unwrap();
        assert_eq!(
            (rand.hard_ratio, rand.strategy.as_str()),
            (0.0, "mask.random")
        );
        assert!(rand.hard.iter().all(|&h| !h) && rand.hard_spans.iter().all(|&h| h == 0));
        let hard = Masker::hard(&p, 1).apply(t()).unwrap();
        assert_eq!(
            (hard.hard_ratio, hard.strategy.as_str()),
            (1.0, "mask.hard")
        );
        assert_eq!(
            hard.hard_spans, hard.spans,
            "r ≡ 1 from step 0: every span hard"
        );
        assert_eq!(hard.mask, hard.hard);
    }
    // easy_to_hard follows its curriculum by step: 0 at step 0, r_max at ramp_updates.
    let p = EasyToHardParams {
        ramp_updates: Some(100),
        r_max: 0.8,
        ..EasyToHardParams::default()
    };
    let m = Masker::easy_to_hard(&p, 1);
    assert_eq!(
        m.apply(taught(batch(0, 0, 50, &[50, 50]), lp.clone()))
            .unwrap()
            .hard_ratio,
        0.0
    );
    assert_eq!(
        m.apply(taught(batch(50, 0, 50, &[50, 50]), lp.clone()))
            .unwrap()
            .hard_ratio,
        0.4
    );
    assert_eq!(
        m.apply(taught(batch(100, 0, 50, &[50, 50]), lp.clone()))
            .unwrap()
            .hard_ratio,
        0.8
    );
}

// ---------------------------------------------------------------------------------------------
// Determinism, frame variant, padding, dropout
// ---------------------------------------------------------------------------------------------

#[test]
fn same_seed_same_masks() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let lp = smooth_noise(&mut rng, 6, 200);
    let p = EasyToHardParams {
        ramp_updates: Some(10),
        ..EasyToHardParams::default()
    };
    let a = Masker::easy_to_hard(&p, 42);
    let b = Masker::easy_to_hard(&p, 42);
    let c = Masker::easy_to_hard(&p, 43);
    let run = |m: &Masker, step| {
        m.apply(taught(batch(step, 0, 200, &[200; 6]), lp.clone()))
            .unwrap()
    };
    for step in [0, 5, 10, 1000] {
        let (x, y) = (run(&a, step), run(&b, step));
        assert_eq!(
            (&x.mask, &x.hard, x.masked_per_row, &x.spans),
            (&y.mask, &y.hard, y.masked_per_row, &y.spans)
        );
        assert_ne!(x.mask, run(&c, step).mask, "another seed, another mask");
        assert_ne!(x.mask, run(&a, step + 1).mask, "another step, another mask");
    }
}

#[test]
fn frame_variant_counts() {
    let (n, size) = (101, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for r in [0.0, 0.1, 0.3, 0.5, 0.8, 1.0] {
        let lp = smooth_noise(&mut rng, size, n);
        let s = MaskSpec {
            unit: MaskUnit::Frame,
            ..spec(0.5, 5)
        };
        let out = eh_mask(&lp, size, n, &[n; 3], &s, r, &mut rng).unwrap();
        check_invariants(&out, n, &[n; 3], &s, r);
        let kh = (0.5 * r * n as f64 + 1e-9).floor() as usize;
        let kr = (0.5 * (1.0 - r) * n as f64 + 1e-9).floor() as usize;
        assert_eq!(frame_counts(0.5, n, r), (kh, kr));
        // Equal rows: nothing is trimmed, so every row masks exactly kh + kr single frames.
        assert_eq!(out.masked_per_row, kh + kr, "r = {r}");
        for b in 0..size {
            let lp_b = &lp[b * n..(b + 1) * n];
            let hard: Vec<usize> = (0..n).filter(|&t| out.hard[b * n + t]).collect();
            let mut top = top_k(lp_b, kh);
            top.sort_unstable();
            assert_eq!(
                hard, top,
                "row {b}: the hard frames are the top floor(P·r·n)"
            );
        }
    }
    // r = 0.5, n = 101: floor(25.25) + floor(25.25) = 50.
    assert_eq!(frame_counts(0.5, 101, 0.5), (25, 25));
    assert_eq!(frame_counts(0.5, 100, 0.8), (40, 10));
}

#[test]
fn padded_rows_mask_only_valid_frames() {
    let lengths = [40, 25, 33];
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut lp = smooth_noise(&mut rng, 3, 40);
    // Make padding frames the "hardest" so a ranking over the whole row would pick them.
    for (b, &n) in lengths.iter().enumerate() {
        for t in n..40 {
            lp[b * 40 + t] = 100.0;
        }
    }
    let m = Masker::hard(
        &MaskParams {
            span: 3,
            ..MaskParams::default()
        },
        5,
    );
    for step in 0..50 {
        let out = m
            .apply(taught(batch(step, 0, 40, &lengths), lp.clone()))
            .unwrap();
        for (b, &n) in lengths.iter().enumerate() {
            assert!(
                row(&out.mask, b, 40)[n..].iter().all(|&x| !x),
                "padding masked"
            );
            assert_eq!(count(row(&out.mask, b, 40)), out.masked_per_row);
        }
    }
    // A padding mask that disagrees with lengths is refused.
    let mut bad = batch(0, 0, 40, &lengths);
    if let Some(p) = bad.padding_mask.as_mut() {
        p[0] = true;
    }
    assert!(matches!(
        m.apply(taught(bad, lp.clone())),
        Err(MaskError::PaddingMismatch { row: 0 })
    ));
    // As does a pred_loss of the wrong shape.
    assert!(matches!(
        m.apply(taught(batch(0, 0, 40, &lengths), vec![0.0; 7])),
        Err(MaskError::PredLossShape { .. })
    ));
}

#[test]
fn mask_dropout_removes_a_rounded_share() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for d in [0.1, 0.25, 0.5] {
        let lp = smooth_noise(&mut rng, 4, 300);
        let s = MaskSpec {
            mask_dropout: d,
            ..spec(0.5, 5)
        };
        let out = eh_mask(&lp, 4, 300, &[300; 4], &s, 0.5, &mut rng).unwrap();
        check_invariants(&out, 300, &[300; 4], &s, 0.5);
        let m = *out.covered.iter().min().unwrap();
        assert_eq!(
            out.masked_per_row,
            m - (d * m as f64).round_ties_even() as usize
        );
        assert!(out.masked_per_row < m);
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters and registry
// ---------------------------------------------------------------------------------------------

/// Multi-mask (§1.5.6, `clone_batch: c`): every utterance becomes c consecutive rows with the
/// same features, targets and predicted losses, each with its own mask; all rows mask the same
/// number of frames.
#[test]
fn clone_batch_repeats_rows_with_independent_masks() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (size, frames, c) = (3usize, 120usize, 4usize);
    let lp = smooth_noise(&mut rng, size, frames);
    let mut b = batch(7, 0, frames, &vec![frames; size]);
    b.data = (0..size * frames).map(|i| i as f32).collect();
    b.offsets = vec![5, 10, 15];
    let t = Taught {
        targets: candle_core::Tensor::from_vec(
            (0..size * frames * 2)
                .map(|i| -(i as f32))
                .collect::<Vec<_>>(),
            (size, frames, 2),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        target_dim: 2,
        ..taught(b, lp.clone())
    };
    let p: MaskParams = parse(&format!("{{clone_batch: {c}}}")).unwrap();
    let m = Masker::random(&p, 1).apply(t).unwrap();
    assert_eq!(m.clones, c);
    let mb = &m.taught.batch;
    assert_eq!(mb.size(), size * c);
    let targets: Vec<f32> = m.taught.targets.flatten_all().unwrap().to_vec1().unwrap();
    for r in 0..size * c {
        let i = r / c;
        assert_eq!(mb.utt_ids[r], format!("u{i}"));
        assert_eq!(mb.offsets[r], 5 * (i + 1));
        assert_eq!(
            &mb.data[r * frames..(r + 1) * frames],
            &(i * frames..(i + 1) * frames)
                .map(|x| x as f32)
                .collect::<Vec<_>>()[..]
        );
        assert_eq!(
            &targets[r * frames * 2..(r + 1) * frames * 2],
            &(i * frames * 2..(i + 1) * frames * 2)
                .map(|x| -(x as f32))
                .collect::<Vec<_>>()[..]
        );
        assert_eq!(
            &m.taught.pred_loss[r * frames..(r + 1) * frames],
            &lp[i * frames..(i + 1) * frames]
        );
        assert_eq!(count(row(&m.mask, r, frames)), m.masked_per_row);
    }
    // The copies of an utterance are masked independently.
    for i in 0..size {
        let copies: Vec<&[bool]> = (0..c).map(|k| row(&m.mask, i * c + k, frames)).collect();
        assert!(
            copies.windows(2).any(|w| w[0] != w[1]),
            "utterance {i}: identical masks"
        );
    }
    assert!(parse::<EasyToHardParams>("{clone_batch: 0}").is_err());
}

fn parse<P: pipeline::Params>(yaml: &str) -> Result<P, Vec<pipeline::ParamError>> {
    pipeline::parse_params::<P>(&serde_yaml::from_str(yaml).unwrap())
}

#[test]
fn curriculum_as_users_type_it() {
    let p: EasyToHardParams = parse("{}").unwrap();
    assert_eq!(
        p.curriculum(),
        Curriculum::Linear {
            ramp_updates: 2000,
            r_max: 1.0
        }
    );
    assert_eq!(
        (p.mask_prob, p.span, p.unit, p.mask_dropout),
        (0.5, 5, MaskUnit::Span, 0.0)
    );
    let p: EasyToHardParams =
        parse("{curriculum: linear, ramp_updates: 400000, r_max: 0.8}").unwrap();
    assert_eq!(
        p.curriculum(),
        Curriculum::Linear {
            ramp_updates: 400_000,
            r_max: 0.8
        }
    );
    let code = Curriculum::EpochClamped {
        total_epochs: 150,
        jump_at: 0.7,
        jump_to: 0.8,
    };
    for y in [
        "{curriculum: epoch_clamped}",
        "{curriculum: {epoch_clamped: {total_epochs: 150}}}",
        "{curriculum: {epoch_clamped: {}}}",
        "{curriculum: {kind: epoch_clamped, jump_to: 0.8}}",
        "{curriculum: !epoch_clamped {jump_at: 0.7}}",
    ] {
        assert_eq!(
            parse::<EasyToHardParams>(y).unwrap().curriculum(),
            code,
            "{y}"
        );
    }
    let p: EasyToHardParams =
        parse("{curriculum: {epoch_clamped: {total_epochs: 300, jump_at: 0.9, jump_to: 1.0}}}")
            .unwrap();
    assert_eq!(
        p.curriculum(),
        Curriculum::EpochClamped {
            total_epochs: 300,
            jump_at: 0.9,
            jump_to: 1.0
        }
    );
    for y in [
        "{curriculum: {constant: {r: 0.25}}}",
        "{curriculum: {constant: 0.25}}",
        "{curriculum: {kind: constant, r: 0.25}}",
    ] {
        assert_eq!(
            parse::<EasyToHardParams>(y).unwrap().curriculum(),
            Curriculum::Constant { r: 0.25 },
            "{y}"
        );
    }
    let p: MaskParams =
        parse("{mask_prob: 0.3, span: 10, unit: frame, mask_dropout: 0.1}").unwrap();
    assert_eq!(
        (p.mask_prob, p.span, p.unit, p.mask_dropout),
        (0.3, 10, MaskUnit::Frame, 0.1)
    );
}

/// The fields `mask.easy_to_hard` refuses in `yaml`, sorted.
fn fields(yaml: &str) -> Vec<String> {
    let mut f: Vec<String> = parse::<EasyToHardParams>(yaml)
        .unwrap_err()
        .into_iter()
        .map(|e| e.field)
        .collect();
    f.sort();
    f
}

#[test]
fn bad_parameters_are_refused_with_their_field() {
    assert_eq!(
        fields("{mask_prob: 0, span: 0, r_max: 1.5, mask_dropout: 1.0, ramp_updates: 0}"),
        vec!["mask_dropout", "mask_prob", "r_max", "ramp_updates", "span"]
    );
    assert_eq!(fields("{mask_prob: 1.01}"), vec!["mask_prob"]);
    assert_eq!(
        fields("{curriculum: {constant: {r: 2}}}"),
        vec!["curriculum.r"]
    );
    assert_eq!(
        fields("{curriculum: {epoch_clamped: {total_epochs: 0, jump_to: -1}}}"),
        vec!["curriculum.jump_to", "curriculum.total_epochs"]
    );
    assert_eq!(
        fields("{curriculum: {epoch_clamped: {total: 3}}}"),
        vec!["curriculum"]
    );
    assert_eq!(fields("{curriculum: cosine}"), vec!["curriculum"]);
    assert_eq!(fields("{curriculum: constant}"), vec!["curriculum"]);
    assert_eq!(fields("{mask_porb: 0.5}"), vec!["mask_porb"]);
    let e = parse::<EasyToHardParams>("{curriculum: cosine}").unwrap_err();
    assert!(
        e[0].message.contains("linear, epoch_clamped or constant"),
        "{}",
        e[0].message
    );
    let e = parse::<EasyToHardParams>("{curriculum: constant}").unwrap_err();
    assert!(
        e[0].message.contains("{constant: {r: 0.5}}"),
        "{}",
        e[0].message
    );
    // mask.random / mask.hard have no curriculum.
    let e = parse::<MaskParams>("{curriculum: linear, span: 0}").unwrap_err();
    assert_eq!(e.len(), 2);
    assert!(e
        .iter()
        .any(|e| e.field == "curriculum" && e.message.contains("unknown parameter")));
}

#[test]
fn registry_offers_three_swappable_kinds() {
    let reg = stages::registry();
    let kinds = ["mask.easy_to_hard", "mask.random", "mask.hard"];
    let ports = |k: &str| {
        let s = reg.get(k).unwrap_or_else(|| panic!("{k} not registered"));
        let f =
            |ps: Vec<pipeline::Port>| ps.iter().map(|p| (p.name, p.ty.name)).collect::<Vec<_>>();
        (f(s.inputs()), f(s.outputs()))
    };
    assert_eq!(
        ports(kinds[0]),
        (vec![("in", "Taught")], vec![("out", "Masked")])
    );
    assert_eq!(ports(kinds[0]), ports(kinds[1]));
    assert_eq!(ports(kinds[0]), ports(kinds[2]));
    for k in kinds {
        let params = reg.get(k).map(|s| s.params()).unwrap_or_default();
        for name in ["mask_prob", "span", "unit", "mask_dropout"] {
            let d = params
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("{k}: no {name}"));
            assert!(!d.doc.is_empty(), "{k}.{name} undocumented");
        }
    }
    let e2h = reg.get(kinds[0]).map(|s| s.params()).unwrap_or_default();
    let cur = e2h
        .iter()
        .find(|p| p.name == "curriculum")
        .expect("curriculum");
    assert_eq!(cur.ty, "linear|epoch_clamped|constant");
    assert_eq!(cur.default, "\"linear\"");
    assert!(e2h.iter().any(|p| p.name == "ramp_updates"));
    assert!(reg.describe().contains("mask.easy_to_hard"));
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Span shapes (method §8, fairseq's mask_type)
// ---------------------------------------------------------------------------------------------

/// Pearson's χ² of observed counts against expected probabilities (cells with p > 0).
fn chi2(counts: &[usize], probs: &[f64], total: usize) -> f64 {
    counts
        .iter()
        .zip(probs)
        .filter(|(_, &p)| p > 0.0)
        .map(|(&o, &p)| (o as f64 - p * total as f64).powi(2) / (p * total as f64))
        .sum()
}

fn histogram(lengths: &[usize], cells: usize) -> Vec<usize> {
    let mut h = vec![0; cells];
    for &l in lengths {
        h[l.min(cells - 1)] += 1;
    }
    h
}

#[test]
fn span_lengths_follow_their_distributions() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let draws = 40_000;
    // static: L every time, and no draw from the stream.
    let mut a = ChaCha8Rng::seed_from_u64(3);
    assert_eq!(
        span_lengths(SpanShape::Static, 5, 0.0, 4, 100, &mut a),
        vec![5; 4]
    );
    assert_eq!(
        a.random::<u64>(),
        ChaCha8Rng::seed_from_u64(3).random::<u64>()
    );

    // uniform on the integers of [2, 2L = 10]: 9 equally likely values. χ² with 8 degrees of
    // freedom; 26.1 is its 0.001 quantile.
    let l = span_lengths(SpanShape::Uniform, 5, 2.0, draws, 1000, &mut rng);
    assert!(l.iter().all(|&x| (2..=10).contains(&x)));
    let probs: Vec<f64> = (0..12)
        .map(|k| {
            if (2..=10).contains(&k) {
                1.0 / 9.0
            } else {
                0.0
            }
        })
        .collect();
    let c = chi2(&histogram(&l, 12), &probs, draws);
    assert!(c < 26.1, "uniform lengths: χ² = {c}");

    // poisson(λ = L = 5): P(k) = e^−λ λ^k / k!, tail ≥ 14 pooled. χ² with 14 degrees of freedom;
    // 36.1 is its 0.001 quantile.
    let l = span_lengths(SpanShape::Poisson, 5, 0.0, draws, 1000, &mut rng);
    let mut probs: Vec<f64> = (0..15)
        .map(|k| (-5.0f64).exp() * 5f64.powi(k) / (1..=k).map(f64::from).product::<f64>())
        .collect();
    probs[14] = 1.0 - probs[..14].iter().sum::<f64>();
    let c = chi2(&histogram(&l, 15), &probs, draws);
    assert!(c < 36.1, "poisson lengths: χ² = {c}");
    assert!(l.contains(&0), "poisson lengths include 0 (P = e^−5)");

    // normal(L = 10, σ = 2), rounded: mean 10, variance σ² + 1/12 (rounding); clamping at 1 is
    // negligible here.
    let l = span_lengths(SpanShape::Normal, 10, 2.0, draws, 1000, &mut rng);
    let mean = l.iter().sum::<usize>() as f64 / draws as f64;
    let var = l.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / draws as f64;
    assert!((mean - 10.0).abs() < 0.05, "normal mean {mean}");
    assert!(
        (var - (4.0 + 1.0 / 12.0)).abs() < 0.15,
        "normal variance {var}"
    );
    // normal(L = 3, σ = 5): every draw below 1.5 becomes 1: P(1) = Φ((1.5 − 3)/5) = Φ(−0.3) = 0.38209.
    let l = span_lengths(SpanShape::Normal, 3, 5.0, draws, 1000, &mut rng);
    assert!(l.iter().all(|&x| x >= 1));
    let p1 = l.iter().filter(|&&x| x == 1).count() as f64 / draws as f64;
    assert!((p1 - 0.38209).abs() < 0.01, "P(length 1) = {p1}");
}

#[test]
fn all_zero_lengths_fall_back_to_one_span() {
    // uniform on [0, 2] with L = 1: one span of length 0 a third of the time; fairseq then gives
    // the first span min(L, n − 1) frames.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..300 {
        let l = span_lengths(SpanShape::Uniform, 1, 0.0, 1, 50, &mut rng);
        assert!(l == vec![1] || l == vec![2], "{l:?}");
        let l = span_lengths(SpanShape::Poisson, 1, 0.0, 2, 50, &mut rng);
        assert!(l.iter().any(|&x| x > 0), "{l:?}");
    }
    // A row of one frame: still at least one frame.
    let mut seen_zero_draw = false;
    for _ in 0..300 {
        let l = span_lengths(SpanShape::Uniform, 1, 0.0, 1, 1, &mut rng);
        seen_zero_draw |= l == vec![1];
        assert!(l[0] >= 1);
    }
    assert!(seen_zero_draw);
}

/// One long row at r = 0.5 with Poisson lengths: spans are placed where the lengths say, hard
/// spans take the first lengths, and the masked share follows the mean length.
#[test]
fn shaped_spans_in_a_mask() {
    let n = 4000;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let lp = smooth_noise(&mut rng, 1, n);
    let mut covered = Vec::new();
    for shape in [SpanShape::Static, SpanShape::Poisson, SpanShape::Uniform] {
        let s = MaskSpec {
            mask_type: shape,
            mask_other: 0.0,
            ..spec(0.65, 10)
        };
        let out = eh_mask(&lp, 1, n, &[n], &s, 0.5, &mut rng).unwrap();
        check_invariants(&out, n, &[n], &s, 0.5);
        let lengths: Vec<usize> = out.hard_lengths[0]
            .iter()
            .chain(&out.rand_lengths[0])
            .copied()
            .collect();
        assert_eq!(lengths.len(), out.spans[0]);
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        assert!((mean - 10.0).abs() < 1.0, "{shape:?}: mean length {mean}");
        if shape != SpanShape::Static {
            assert!(lengths.iter().any(|&l| l != 10), "{shape:?}: lengths vary");
        }
        covered.push(out.covered[0] as f64 / n as f64);
    }
    // Same mean length, same number of spans: the covered shares agree within a few percent.
    for c in &covered[1..] {
        assert!((c - covered[0]).abs() < 0.06, "covered shares {covered:?}");
    }
}

#[test]
fn span_shape_parameters() {
    let p: MaskParams = parse("{mask_type: poisson}").unwrap();
    assert_eq!((p.mask_type, p.mask_other), (SpanShape::Poisson, 0.0));
    let p: EasyToHardParams = parse("{mask_type: uniform, mask_other: 3, span: 4}").unwrap();
    assert_eq!(
        (p.spec().mask_type, p.spec().mask_other),
        (SpanShape::Uniform, 3.0)
    );
    let p: EasyToHardParams = parse("{mask_type: normal, mask_other: 1.5}").unwrap();
    assert_eq!(p.spec().mask_type, SpanShape::Normal);
    assert_eq!(
        parse::<MaskParams>("{}").unwrap().mask_type,
        SpanShape::Static
    );
    assert_eq!(fields("{mask_type: gamma}"), vec!["mask_type"]);
    assert_eq!(
        fields("{mask_type: uniform, mask_other: 11, span: 5}"),
        vec!["mask_other"]
    );
    assert_eq!(
        fields("{mask_type: uniform, mask_other: 1.5}"),
        vec!["mask_other"]
    );
    assert_eq!(
        fields("{mask_type: normal, mask_other: -1}"),
        vec!["mask_other"]
    );
    assert_eq!(fields("{mask_other: 2}"), vec!["mask_other"]);
    assert_eq!(
        fields("{mask_type: poisson, mask_other: 2}"),
        vec!["mask_other"]
    );
    assert_eq!(
        fields("{mask_type: poisson, unit: frame}"),
        vec!["mask_type"]
    );
    let e = parse::<MaskParams>("{mask_type: uniform, mask_other: 11, span: 5}").unwrap_err();
    assert!(
        e[0].message.contains("[0, 2·span = 10]"),
        "{}",
        e[0].message
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn mask_invariants(
        lengths in prop::collection::vec(0usize..90, 1..7),
        pad_extra in 0usize..5,
        mask_prob in 0.01f64..=1.0,
        span in 1usize..12,
        r in 0.0f64..=1.0,
        dropout in prop_oneof![Just(0.0), 0.0f64..0.9],
        frame in any::<bool>(),
        per_row in any::<bool>(),
        shape in 0usize..4,
        seed in any::<u64>(),
    ) {
        let frames = lengths.iter().copied().max().unwrap_or(0) + pad_extra;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let lp: Vec<f32> = (0..lengths.len() * frames).map(|_| rng.random::<f32>()).collect();
        let s = MaskSpec {
            mask_prob, span,
            unit: if frame { MaskUnit::Frame } else { MaskUnit::Span },
            mask_dropout: dropout,
            rounding: if per_row { Rounding::PerRow } else { Rounding::PerBatch },
            // Span shapes (method §8) only with unit: span; uniform from 1, normal σ = 2.
            mask_type: if frame { SpanShape::Static } else { [SpanShape::Static, SpanShape::Uniform, SpanShape::Normal, SpanShape::Poisson][shape] },
            mask_other: match (frame, shape) { (false, 1) => 1.0, (false, 2) => 2.0, _ => 0.0 },
            ..MaskSpec::default()
        };
        let out = eh_mask(&lp, lengths.len(), frames, &lengths, &s, r, &mut rng).unwrap();
        check_invariants(&out, frames, &lengths, &s, r);
        for (b, &n) in lengths.iter().enumerate() {
            if !frame {
                // Hard starts are the S_hard largest losses of the valid frames.
                let want = top_k(&lp[b * frames..b * frames + n], out.hard_spans[b]);
                prop_assert_eq!(&out.hard_starts[b], &want);
                if !per_row {
                    let x = mask_prob * n as f64 / span as f64;
                    prop_assert!(out.spans[b] == (x.floor() as usize).max(1) || out.spans[b] == (x.floor() as usize + 1).max(1));
                }
            }
        }
        // Same stream, same mask.
        let mut rng2 = ChaCha8Rng::seed_from_u64(seed);
        let _: Vec<f32> = (0..lengths.len() * frames).map(|_| rng2.random::<f32>()).collect();
        let again = eh_mask(&lp, lengths.len(), frames, &lengths, &s, r, &mut rng2).unwrap();
        prop_assert_eq!(out, again);
    }

    #[test]
    fn stage_masks_are_consistent(
        size in 1usize..6,
        frames in 1usize..200,
        step in 0u64..10_000,
        epoch in 0u32..300,
        seed in any::<u64>(),
        kind in 0usize..3,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let lp = smooth_noise(&mut rng, size, frames);
        let m = match kind {
            0 => Masker::easy_to_hard(&EasyToHardParams { ramp_updates: Some(5000), ..EasyToHardParams::default() }, seed),
            1 => Masker::random(&MaskParams::default(), seed),
            _ => Masker::hard(&MaskParams::default(), seed),
        };
        let out = m.apply(taught(batch(step, epoch, frames, &vec![frames; size]), lp)).unwrap();
        prop_assert_eq!(out.mask.len(), size * frames);
        for b in 0..size {
            prop_assert_eq!(count(row(&out.mask, b, frames)), out.masked_per_row);
            prop_assert!(row(&out.hard, b, frames).iter().zip(row(&out.mask, b, frames)).all(|(&h, &x)| !h || x));
            prop_assert!(out.hard_spans[b] <= out.spans[b]);
        }
        let want_r = match kind { 0 => (step as f64 / 5000.0).min(1.0), 1 => 0.0, _ => 1.0 };
        prop_assert_eq!(out.hard_ratio, want_r as f32);
    }
}
