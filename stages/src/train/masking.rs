//! `mask.easy_to_hard`, `mask.random`, `mask.hard`: the student's mask from the teacher's
//! predicted losses (method §4). One port signature for all three (`in`: [`Taught`], `out`:
//! [`Masked`]), so an ablation swaps the kind and nothing else.
//!
//! Follows EH-MAM (arXiv 2410.13179, §3.2.3, Alg. 1) as its code implements it
//! (`ehmam: data_utils.py` `compute_mask_indices_ema_loss`; the random baseline is
//! `fairseq: fairseq/data/data_utils.py` `compute_mask_indices`), method §4.1:
//!
//! ```text
//! u ~ U[0,1)                                       once per batch (per row: mask.random, or padding)
//! S      = max(1, floor(P·n/L + u))                spans of row b, n its valid frames
//! range  = n − L, or S + 1 if that is ≤ S          random starts come from [0, range)
//! S_rand = floor(S·(1 − r)),  S_hard = S − S_rand    (floor: see `SplitRounding`)
//! hard   = the S_hard frames with the largest predicted loss (ties: the earlier frame)
//! rand   = S_rand of S distinct draws from [0, range), those equal to a hard start left out
//! F_b    = ∪ {s, …, s+L−1} over hard ∪ rand, cut at n
//! trim every F_b to m = min_b |F_b| frames (uniform random subset), then mask_dropout
//! ```
//!
//! Span shape (method §8, fairseq's `mask_type` and `mask_other`): with `mask_type: static` (the
//! default) every span has `L` frames. Otherwise each of the S spans draws its own length, as
//! `compute_mask_indices` does: `uniform` an integer in [mask_other, 2L], `normal`
//! max(1, round(N(L, mask_other²))), `poisson` round(Poisson(L)). Hard spans take the first
//! S_hard lengths (largest predicted loss first), random spans the rest; random starts come from
//! [0, n − min length), widened to S + 1 when that is ≤ S, and spans are cut at n. If every length
//! is 0 (possible with `uniform` from 0 and `poisson`), the first span gets min(L, n − 1) frames
//! (fairseq's fallback). S stays `max(1, floor(P·n/L + u))` with the mean length L.
//!
//! `unit: frame` is the paper-literal Alg. 1 (method §4.4): the top `floor(P·r·n)` frames plus
//! `floor(P·(1−r)·n)` random others, as single frames, trimmed the same way.
//!
//! Padded batches: starts, spans and the hard ranking are restricted to each row's valid frames
//! (`lengths`); padding is never masked. As in the code, the rounding draw `u` is then made per
//! row. Trimming to the batch minimum makes every row of a padded batch mask as many frames as
//! its shortest member allows.
//!
//! Randomness: one ChaCha8 stream per batch, seeded from the stage seed and the batch's `step`,
//! so masks are reproducible and a resumed run draws the same masks without any saved state.

use pipeline::ParamError;
use rand::Rng;
use schemars::JsonSchema;
use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::Value;

// ---------------------------------------------------------------------------------------------
// Pure masking
// ---------------------------------------------------------------------------------------------

/// What a mask is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MaskUnit {
    /// Spans of `span` frames starting at hard and random starts (the code, method §4.1).
    #[default]
    Span,
    /// Single frames: the top `P·r·n` by predicted loss plus `P·(1−r)·n` random (paper Alg. 1, §4.4).
    Frame,
}

/// How span lengths are drawn (method §8 "span shape"; fairseq's `mask_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SpanShape {
    /// Every span `span` frames long (the method's default).
    #[default]
    Static,
    /// Lengths uniform on the integers of [mask_other, 2·span].
    Uniform,
    /// Lengths max(1, round(N(span, mask_other²))): mask_other is the standard deviation.
    Normal,
    /// Lengths round(Poisson(span)); mask_other unused.
    Poisson,
}

impl SpanShape {
    pub fn name(self) -> &'static str {
        match self {
            SpanShape::Static => "static",
            SpanShape::Uniform => "uniform",
            SpanShape::Normal => "normal",
            SpanShape::Poisson => "poisson",
        }
    }
}

/// How the probabilistic-rounding draw `u` of `S = max(1, floor(P·n/L + u))` is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// One `u` for the whole batch (EH-MAM code without padding).
    #[default]
    PerBatch,
    /// One `u` per row (fairseq `compute_mask_indices`, and EH-MAM code with padding).
    PerRow,
}

/// How `S_rand = floor(S·(1 − r))` (and the frame counts of `unit: frame`) are taken from the
/// float product (method §4.1, §10 #2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SplitRounding {
    /// floor with a relative epsilon of 1e-9, so that products that are whole numbers in exact
    /// arithmetic count as such (50·(1 − 0.8) = 10).
    #[default]
    Epsilon,
    /// floor of the raw f64 product, as the code's `int(num_mask * (1 - keep_ratio))`: at
    /// r = 0.8, 50·(1 − 0.8) = 9.999999999999998 gives 9 random and 41 hard spans.
    Truncate,
}

/// The settings of one mask draw (everything but the hard ratio).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskSpec {
    /// `P`: the share of frames to mask before overlaps, in (0, 1].
    pub mask_prob: f64,
    /// `L`: span length in frames, ≥ 1 (unused with `unit: frame`).
    pub span: usize,
    pub unit: MaskUnit,
    /// Share of each row's masked frames unmasked again after trimming, in [0, 1).
    pub mask_dropout: f64,
    pub rounding: Rounding,
    /// How span lengths are drawn (`unit: span` only).
    pub mask_type: SpanShape,
    /// The second parameter of `mask_type`: the lower bound (uniform) or standard deviation (normal).
    pub mask_other: f64,
    /// How the hard/random split is rounded.
    pub split_rounding: SplitRounding,
}

impl Default for MaskSpec {
    fn default() -> Self {
        MaskSpec {
            mask_prob: 0.5,
            span: 5,
            unit: MaskUnit::Span,
            mask_dropout: 0.0,
            rounding: Rounding::PerBatch,
            mask_type: SpanShape::Static,
            mask_other: 0.0,
            split_rounding: SplitRounding::Epsilon,
        }
    }
}

impl MaskSpec {
    /// Range checks, every problem reported (field names as the stages' parameters).
    pub fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if !(self.mask_prob > 0.0 && self.mask_prob <= 1.0) {
            e.push(ParamError::new(
                "mask_prob",
                format!("must be in (0, 1], got {}", self.mask_prob),
            ));
        }
        if self.span == 0 {
            e.push(ParamError::new("span", "must be at least 1 frame"));
        }
        if !(self.mask_dropout >= 0.0 && self.mask_dropout < 1.0) {
            e.push(ParamError::new(
                "mask_dropout",
                format!("must be in [0, 1), got {}", self.mask_dropout),
            ));
        }
        let other = self.mask_other;
        if !other.is_finite() {
            e.push(ParamError::new(
                "mask_other",
                format!("must be a finite number, got {other}"),
            ));
            return e;
        }
        if self.unit == MaskUnit::Frame && self.mask_type != SpanShape::Static {
            e.push(ParamError::new(
                "mask_type",
                format!(
                    "{} span lengths need unit: span (unit: frame masks single frames)",
                    self.mask_type.name()
                ),
            ));
        }
        match self.mask_type {
            SpanShape::Static | SpanShape::Poisson if other != 0.0 => {
                e.push(ParamError::new(
                    "mask_other",
                    format!(
                        "is not used by mask_type: {} (leave it at 0), got {other}",
                        self.mask_type.name()
                    ),
                ));
            }
            SpanShape::Uniform
                if !(other >= 0.0 && other.fract() == 0.0 && other <= 2.0 * self.span as f64) =>
            {
                e.push(ParamError::new("mask_other", format!("is the smallest span length of mask_type: uniform: a whole number in [0, 2·span = {}], got {other}", 2 * self.span)));
            }
            SpanShape::Normal if other < 0.0 => {
                e.push(ParamError::new(
                    "mask_other",
                    format!(
                        "is the standard deviation of mask_type: normal: must be ≥ 0, got {other}"
                    ),
                ));
            }
            _ => {}
        }
        e
    }
}

/// A mask for one batch, with what went into it.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskOut {
    /// `size × frames`, true where masked; exactly `masked_per_row` true in every row.
    pub mask: Vec<bool>,
    /// `size × frames`, true where a masked frame lies in a span started by a hard start (for
    /// `unit: frame`, where it is one of the top frames). A subset of `mask`.
    pub hard: Vec<bool>,
    pub masked_per_row: usize,
    /// `S` per row: spans (or frames, `unit: frame`) drawn before trimming.
    pub spans: Vec<usize>,
    /// `S_hard` per row: the distinct hard starts (frames) among them.
    pub hard_spans: Vec<usize>,
    /// Hard starts per row, by descending predicted loss.
    pub hard_starts: Vec<Vec<usize>>,
    /// Random starts per row, ascending.
    pub rand_starts: Vec<Vec<usize>>,
    /// Span lengths per row, aligned with `hard_starts` (1 for `unit: frame`).
    pub hard_lengths: Vec<Vec<usize>>,
    /// Span lengths per row, aligned with `rand_starts` (1 for `unit: frame`).
    pub rand_lengths: Vec<Vec<usize>>,
    /// `|F_b|` per row: frames covered before trimming to the batch minimum.
    pub covered: Vec<usize>,
}

/// Why a mask could not be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaskError {
    #[error("pred_loss has {got} values, expected size × frames = {size} × {frames}")]
    PredLossShape {
        got: usize,
        size: usize,
        frames: usize,
    },
    #[error("lengths has {got} entries for a batch of {size}")]
    LengthsShape { got: usize, size: usize },
    #[error("row {row} has {length} valid frames, more than the batch's {frames}")]
    LengthTooLong {
        row: usize,
        length: usize,
        frames: usize,
    },
    #[error("padding_mask disagrees with lengths in row {row} (padding must be the frames from lengths[row] on)")]
    PaddingMismatch { row: usize },
    #[error("hard ratio must be in [0, 1], got {0}")]
    HardRatio(f64),
    #[error("invalid mask settings: {0}")]
    Spec(String),
}

/// `floor(x)` that absorbs the rounding error of a product of ratios (`50·(1 − 0.8)` is
/// 9.999999999999998 in f64; the method means 10).
fn floor_ratio(x: f64) -> usize {
    (x + 1e-9 * x.abs().max(1.0)).floor().max(0.0) as usize
}

/// `floor(x)` as `rounding` says.
fn floor_with(x: f64, rounding: SplitRounding) -> usize {
    match rounding {
        SplitRounding::Epsilon => floor_ratio(x),
        // Python's int() of a non-negative float.
        SplitRounding::Truncate => x.floor().max(0.0) as usize,
    }
}

/// Number of spans of a row of `n` valid frames: `S = max(1, floor(P·n/L + u))` (method §4.1).
pub fn num_spans(mask_prob: f64, n: usize, span: usize, u: f64) -> usize {
    let s = (mask_prob * n as f64 / span.max(1) as f64 + u).floor();
    (s.max(0.0) as usize).max(1)
}

/// Hard spans among `spans`: `S_hard = S − floor(S·(1 − r))` (method §4.1), epsilon rounding.
pub fn num_hard(spans: usize, r: f64) -> usize {
    num_hard_with(spans, r, SplitRounding::Epsilon)
}

/// [`num_hard`] with the given rounding of `S·(1 − r)`.
pub fn num_hard_with(spans: usize, r: f64, rounding: SplitRounding) -> usize {
    spans - floor_with(spans as f64 * (1.0 - r), rounding).min(spans)
}

/// Frames of the paper-literal variant (method §4.4): `(floor(P·r·n), floor(P·(1−r)·n))`,
/// epsilon rounding.
pub fn frame_counts(mask_prob: f64, n: usize, r: f64) -> (usize, usize) {
    frame_counts_with(mask_prob, n, r, SplitRounding::Epsilon)
}

/// [`frame_counts`] with the given rounding.
pub fn frame_counts_with(
    mask_prob: f64,
    n: usize,
    r: f64,
    rounding: SplitRounding,
) -> (usize, usize) {
    let hard = floor_with(mask_prob * r * n as f64, rounding).min(n);
    let rand = floor_with(mask_prob * (1.0 - r) * n as f64, rounding).min(n - hard);
    (hard, rand)
}

/// Indices of the `k` largest values of `lp`, largest first; ties go to the earlier frame and
/// NaN counts as the smallest.
pub fn top_k(lp: &[f32], k: usize) -> Vec<usize> {
    let key = |i: usize| {
        if lp[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            lp[i]
        }
    };
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k.min(lp.len()));
    idx
}

/// `amount` distinct elements of `pool`, uniformly (`amount ≤ pool.len()`).
fn choose<R: Rng + ?Sized>(rng: &mut R, pool: &[usize], amount: usize) -> Vec<usize> {
    let amount = amount.min(pool.len());
    rand::seq::index::sample(rng, pool.len(), amount)
        .into_iter()
        .map(|i| pool[i])
        .collect()
}

/// One row before trimming: the covered frames (ascending) and which of them are hard.
struct Row {
    frames: Vec<usize>,
    hard_cover: Vec<bool>,
    spans: usize,
    hard_starts: Vec<usize>,
    rand_starts: Vec<usize>,
    hard_lengths: Vec<usize>,
    rand_lengths: Vec<usize>,
}

/// The lengths of `s` spans of mean `l` (method §8 span shape; fairseq `compute_mask_indices`).
/// Static draws nothing, so the default consumes the random stream exactly as before.
pub fn span_lengths<R: Rng + ?Sized>(
    shape: SpanShape,
    l: usize,
    other: f64,
    s: usize,
    n: usize,
    rng: &mut R,
) -> Vec<usize> {
    let mut lengths: Vec<usize> = match shape {
        SpanShape::Static => return vec![l; s],
        SpanShape::Uniform => {
            let lo = (other.max(0.0) as usize).min(2 * l);
            (0..s).map(|_| rng.random_range(lo..=2 * l)).collect()
        }
        SpanShape::Normal => match rand_distr::Normal::new(l as f64, other.max(0.0)) {
            Ok(d) => (0..s)
                .map(|_| (rng.sample(d).round().max(1.0)) as usize)
                .collect(),
            Err(_) => vec![l; s],
        },
        SpanShape::Poisson => match rand_distr::Poisson::new(l as f64) {
            Ok(d) => (0..s)
                .map(|_| rng.sample::<f64, _>(d).round().max(0.0) as usize)
                .collect(),
            Err(_) => vec![l; s],
        },
    };
    if !lengths.is_empty() && lengths.iter().all(|&x| x == 0) {
        lengths[0] = l.min(n.saturating_sub(1)).max(1);
    }
    lengths
}

/// Method §4.1 for one row of `lp.len()` valid frames.
fn span_row<R: Rng + ?Sized>(lp: &[f32], spec: &MaskSpec, r: f64, u: f64, rng: &mut R) -> Row {
    let n = lp.len();
    let s = num_spans(spec.mask_prob, n, spec.span, u);
    let lengths = span_lengths(spec.mask_type, spec.span, spec.mask_other, s, n, rng);
    let l_min = lengths.iter().copied().min().unwrap_or(spec.span);
    // Random starts come from [0, range); the code widens it when the row is too short.
    let range = if n > l_min && n - l_min > s {
        n - l_min
    } else {
        s + 1
    };
    let s_hard = num_hard_with(s, r, spec.split_rounding);
    let s_rand = s - s_hard;
    let hard_starts = top_k(lp, s_hard);
    let mut is_hard_start = vec![false; n];
    for &h in &hard_starts {
        is_hard_start[h] = true;
    }
    // S candidates, then S_rand of those that are not a hard start (only exact collisions are
    // avoided; |cand \ hard| ≥ S − S_hard = S_rand always).
    let cand = rand::seq::index::sample(rng, range, s).into_vec();
    let pool: Vec<usize> = cand
        .into_iter()
        .filter(|&c| !(c < n && is_hard_start[c]))
        .collect();
    let mut rand_starts = choose(rng, &pool, s_rand);
    rand_starts.sort_unstable();
    let mut cover = vec![false; n];
    let mut hard_cover = vec![false; n];
    // Hard spans take the first lengths (hard_starts may be fewer than S_hard on a short row).
    let (hard_len, rand_len) = lengths.split_at(hard_starts.len().min(lengths.len()));
    for (&st, &l) in hard_starts.iter().zip(hard_len) {
        for t in st..(st + l).min(n) {
            cover[t] = true;
            hard_cover[t] = true;
        }
    }
    for (&st, &l) in rand_starts.iter().zip(rand_len) {
        for t in st.min(n)..(st + l).min(n) {
            cover[t] = true;
        }
    }
    let frames = (0..n).filter(|&t| cover[t]).collect();
    // S_rand ≤ the lengths left after the hard ones (fewer hard starts on a short row leave more).
    let (hard_lengths, rand_lengths) = (hard_len.to_vec(), rand_len[..rand_starts.len()].to_vec());
    Row {
        frames,
        hard_cover,
        spans: s,
        hard_starts,
        rand_starts,
        hard_lengths,
        rand_lengths,
    }
}

/// Method §4.4 for one row: single frames, the top ones plus random others.
fn frame_row<R: Rng + ?Sized>(lp: &[f32], spec: &MaskSpec, r: f64, rng: &mut R) -> Row {
    let n = lp.len();
    let (k_hard, k_rand) = frame_counts_with(spec.mask_prob, n, r, spec.split_rounding);
    let hard_starts = top_k(lp, k_hard);
    let mut hard_cover = vec![false; n];
    for &h in &hard_starts {
        hard_cover[h] = true;
    }
    let others: Vec<usize> = (0..n).filter(|&t| !hard_cover[t]).collect();
    let mut rand_starts = choose(rng, &others, k_rand);
    rand_starts.sort_unstable();
    let mut frames: Vec<usize> = hard_starts.iter().chain(&rand_starts).copied().collect();
    frames.sort_unstable();
    let (hard_lengths, rand_lengths) = (vec![1; hard_starts.len()], vec![1; rand_starts.len()]);
    Row {
        frames,
        hard_cover,
        spans: k_hard + k_rand,
        hard_starts,
        rand_starts,
        hard_lengths,
        rand_lengths,
    }
}

/// Draws the mask of one batch (method §4.1, or §4.4 with `unit: frame`).
///
/// `pred_loss` is `size × frames` row-major; row `b` has `lengths[b]` valid frames at its start
/// (the rest is padding and is never masked). `r` is the hard ratio in [0, 1]. The draws come
/// from `rng` only, in a fixed order, so the same stream gives the same mask.
pub fn eh_mask<R: Rng + ?Sized>(
    pred_loss: &[f32],
    size: usize,
    frames: usize,
    lengths: &[usize],
    spec: &MaskSpec,
    r: f64,
    rng: &mut R,
) -> Result<MaskOut, MaskError> {
    let problems = spec.check();
    if !problems.is_empty() {
        let msg = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(MaskError::Spec(msg));
    }
    if !(0.0..=1.0).contains(&r) {
        return Err(MaskError::HardRatio(r));
    }
    if Some(pred_loss.len()) != size.checked_mul(frames) {
        return Err(MaskError::PredLossShape {
            got: pred_loss.len(),
            size,
            frames,
        });
    }
    if lengths.len() != size {
        return Err(MaskError::LengthsShape {
            got: lengths.len(),
            size,
        });
    }
    if let Some(row) = lengths.iter().position(|&n| n > frames) {
        return Err(MaskError::LengthTooLong {
            row,
            length: lengths[row],
            frames,
        });
    }

    let batch_u: f64 = match (spec.unit, spec.rounding) {
        (MaskUnit::Span, Rounding::PerBatch) => rng.random(),
        _ => 0.0,
    };
    let mut rows = Vec::with_capacity(size);
    for (b, &n) in lengths.iter().enumerate() {
        let lp = &pred_loss[b * frames..b * frames + n];
        let row = match spec.unit {
            MaskUnit::Span => {
                let u = if spec.rounding == Rounding::PerRow {
                    rng.random()
                } else {
                    batch_u
                };
                span_row(lp, spec, r, u, rng)
            }
            MaskUnit::Frame => frame_row(lp, spec, r, rng),
        };
        rows.push(row);
    }

    // Trim every row to the batch minimum by a uniform random subset of its frames, then drop
    // round(d·m) more (numpy's rint: ties to even).
    let m = rows.iter().map(|r| r.frames.len()).min().unwrap_or(0);
    let holes = (spec.mask_dropout * m as f64).round_ties_even() as usize;
    let keep = m - holes.min(m);
    let mut mask = vec![false; size * frames];
    let mut hard = vec![false; size * frames];
    let covered = rows.iter().map(|r| r.frames.len()).collect();
    for (b, row) in rows.iter().enumerate() {
        let mut kept = if row.frames.len() > m {
            choose(rng, &row.frames, m)
        } else {
            row.frames.clone()
        };
        if keep < kept.len() {
            kept = choose(rng, &kept, keep);
        }
        for t in kept {
            mask[b * frames + t] = true;
            hard[b * frames + t] = row.hard_cover[t];
        }
    }
    Ok(MaskOut {
        mask,
        hard,
        masked_per_row: keep,
        spans: rows.iter().map(|r| r.spans).collect(),
        hard_spans: rows.iter().map(|r| r.hard_starts.len()).collect(),
        hard_starts: rows.iter().map(|r| r.hard_starts.clone()).collect(),
        rand_starts: rows.iter().map(|r| r.rand_starts.clone()).collect(),
        hard_lengths: rows.iter().map(|r| r.hard_lengths.clone()).collect(),
        rand_lengths: rows.into_iter().map(|r| r.rand_lengths).collect(),
        covered,
    })
}

/// [`eh_mask`] with `unit: span` (method §4.1), whatever `spec.unit` says.
pub fn span_mask<R: Rng + ?Sized>(
    pred_loss: &[f32],
    size: usize,
    frames: usize,
    lengths: &[usize],
    spec: &MaskSpec,
    r: f64,
    rng: &mut R,
) -> Result<MaskOut, MaskError> {
    eh_mask(
        pred_loss,
        size,
        frames,
        lengths,
        &MaskSpec {
            unit: MaskUnit::Span,
            ..*spec
        },
        r,
        rng,
    )
}

/// [`eh_mask`] with `unit: frame` (method §4.4), whatever `spec.unit` says.
pub fn frame_mask<R: Rng + ?Sized>(
    pred_loss: &[f32],
    size: usize,
    frames: usize,
    lengths: &[usize],
    spec: &MaskSpec,
    r: f64,
    rng: &mut R,
) -> Result<MaskOut, MaskError> {
    eh_mask(
        pred_loss,
        size,
        frames,
        lengths,
        &MaskSpec {
            unit: MaskUnit::Frame,
            ..*spec
        },
        r,
        rng,
    )
}

// ---------------------------------------------------------------------------------------------
// Hard ratio r (the easy-to-hard curriculum, method §4.2)
// ---------------------------------------------------------------------------------------------

/// How the hard ratio `r` moves during training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Curriculum {
    /// `r(t) = min(1, t / ramp_updates) · r_max` (paper §3.2.3; the recommended default).
    Linear { ramp_updates: u64, r_max: f64 },
    /// `r = e / total_epochs` with `e` the 1-based epoch; `jump_to` once `r ≥ jump_at` (the code).
    EpochClamped {
        total_epochs: u32,
        jump_at: f64,
        jump_to: f64,
    },
    /// A fixed `r` (ablations; `mask.random` is 0, `mask.hard` is 1).
    Constant { r: f64 },
}

/// Hard ratio `r` for a batch at update `step` (completed updates before it) in 0-based `epoch`
/// (method §4.2). Always in [0, 1].
pub fn hard_ratio(c: &Curriculum, step: u64, epoch: u32) -> f64 {
    let r = match *c {
        Curriculum::Linear {
            ramp_updates,
            r_max,
        } => {
            let ramp = if ramp_updates == 0 {
                1.0
            } else {
                (step as f64 / ramp_updates as f64).min(1.0)
            };
            ramp * r_max
        }
        Curriculum::EpochClamped {
            total_epochs,
            jump_at,
            jump_to,
        } => {
            // ehmam: data_utils.py: keep_ratio = (current_epoch + 1) / total_epoch; ≥ 0.7 → 0.8.
            // Capped at 1 first, so that `jump_at` above 1 means "never jump".
            let r = ((epoch as f64 + 1.0) / total_epochs.max(1) as f64).min(1.0);
            if r >= jump_at {
                jump_to
            } else {
                r
            }
        }
        Curriculum::Constant { r } => r,
    };
    if r.is_nan() {
        0.0
    } else {
        r.clamp(0.0, 1.0)
    }
}

/// Settings of `curriculum: epoch_clamped`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EpochClamped {
    /// Epochs of the ramp (hard-coded 150 in the code).
    pub total_epochs: u32,
    /// Once `r` reaches this, it jumps to `jump_to`.
    pub jump_at: f64,
    pub jump_to: f64,
}

impl Default for EpochClamped {
    fn default() -> Self {
        EpochClamped {
            total_epochs: 150,
            jump_at: 0.7,
            jump_to: 0.8,
        }
    }
}

/// Settings of `curriculum: constant`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ConstantArgs {
    r: f64,
}

/// The `curriculum` parameter of `mask.easy_to_hard`.
///
/// In YAML: `linear` (uses the stage's `ramp_updates` and `r_max`), `epoch_clamped` (the code's
/// preset), `{epoch_clamped: {total_epochs: 150, jump_at: 0.7, jump_to: 0.8}}` (any field may be
/// left out), `{constant: {r: 0.5}}` or `{constant: 0.5}`. `{kind: constant, r: 0.5}` and the YAML
/// tag form `!constant {r: 0.5}` are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CurriculumChoice {
    #[default]
    Linear,
    EpochClamped(EpochClamped),
    Constant(f64),
}

/// The curriculum names, for the parameter docs.
#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub(crate) enum CurriculumName {
    Linear,
    EpochClamped,
    Constant,
}

const CURRICULA: &str = "linear, epoch_clamped or constant";

impl CurriculumChoice {
    /// Reads the YAML forms listed on the type.
    pub fn from_value(v: Value) -> crate::Result<Self> {
        let (name, args) = match v {
            Value::String(s) => (s, Value::Null),
            Value::Tagged(t) => (t.tag.to_string().trim_start_matches('!').to_string(), t.value),
            Value::Mapping(mut m) => {
                if let Some(kind) = m.remove("kind") {
                    let Some(kind) = kind.as_str().map(str::to_string) else {
                        return Err(crate::Error::from(format!("`kind` must be a name: {CURRICULA}")));
                    };
                    (kind, if m.is_empty() { Value::Null } else { Value::Mapping(m) })
                } else if m.len() == 1 {
                    let Some((k, v)) = m.into_iter().next() else { return Err("empty mapping".into()) };
                    let Some(k) = k.as_str().map(str::to_string) else {
                        return Err(crate::Error::from(format!("expected a curriculum name ({CURRICULA}) as the key")));
                    };
                    (k, v)
                } else {
                    return Err(crate::Error::from(format!("expected a curriculum name ({CURRICULA}), or a mapping with one of them as its only key, e.g. {{constant: {{r: 0.5}}}}")));
                }
            }
            _ => return Err(crate::Error::from(format!("expected a curriculum name ({CURRICULA}), or a mapping such as {{constant: {{r: 0.5}}}}"))),
        };
        let empty =
            matches!(&args, Value::Null) || matches!(&args, Value::Mapping(m) if m.is_empty());
        match name.as_str() {
            "linear" if empty => Ok(CurriculumChoice::Linear),
            "linear" => Err(
                "linear takes no settings here: set `ramp_updates` and `r_max` on the stage".into(),
            ),
            "epoch_clamped" if empty => Ok(CurriculumChoice::EpochClamped(EpochClamped::default())),
            "epoch_clamped" => serde_yaml::from_value::<EpochClamped>(args)
                .map(CurriculumChoice::EpochClamped)
                .map_err(|e| format!("epoch_clamped: {}", clean(&e.to_string())))
                .map_err(crate::Error::from),
            "constant" => match args {
                Value::Number(n) => n
                    .as_f64()
                    .map(CurriculumChoice::Constant)
                    .ok_or_else(|| "constant: r must be a number".to_string())
                    .map_err(crate::Error::from),
                Value::Null => Err("constant needs its ratio: write {constant: {r: 0.5}}".into()),
                a => serde_yaml::from_value::<ConstantArgs>(a)
                    .map(|c| CurriculumChoice::Constant(c.r))
                    .map_err(|e| format!("constant: {}", clean(&e.to_string())))
                    .map_err(crate::Error::from),
            },
            other => Err(crate::Error::from(format!(
                "unknown curriculum `{other}`; expected {CURRICULA}"
            ))),
        }
    }
}

fn clean(m: &str) -> String {
    match m.find(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m.to_string(),
    }
}

impl<'de> Deserialize<'de> for CurriculumChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        CurriculumChoice::from_value(v).map_err(D::Error::custom)
    }
}

impl Serialize for CurriculumChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CurriculumChoice::Linear => s.serialize_str("linear"),
            CurriculumChoice::EpochClamped(e) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("epoch_clamped", e)?;
                m.end()
            }
            CurriculumChoice::Constant(r) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("constant", &ConstantArgs { r: *r })?;
                m.end()
            }
        }
    }
}
