//! The mask stage: one generic stage over a masking strategy (`mask.easy_to_hard`, `mask.random`,
//! `mask.hard`), its parameters and the seeded stream of each batch.

use crate::items::{Masked, Taught};
use crate::train::masking::*;
use pipeline::Linker;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// Parameters of `mask.random` and `mask.hard`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MaskParams {
    /// P: share of frames to mask before span overlaps and trimming, in (0, 1].
    pub mask_prob: f64,
    /// L: span length in frames (unit: span).
    pub span: usize,
    /// span (spans of L frames, as the code) or frame (single frames, the paper's Alg. 1).
    pub unit: MaskUnit,
    /// Share of each row's masked frames unmasked again after trimming, in [0, 1).
    pub mask_dropout: f64,
    /// Span lengths (method §8 span shape, fairseq's mask_type): static (every span `span`
    /// frames), uniform (integers in [mask_other, 2·span]), normal (max(1, round(N(span,
    /// mask_other²)))) or poisson (round(Poisson(span))).
    pub mask_type: SpanShape,
    /// Lower bound (uniform) or standard deviation (normal) of the span lengths; 0 otherwise.
    pub mask_other: f64,
    /// Multi-mask (method §1.5.6, `clone_batch`): each utterance is repeated this many times with
    /// independent masks, all sharing one teacher pass. 1 = off (the README config).
    pub clone_batch: usize,
}

impl Default for MaskParams {
    fn default() -> Self {
        MaskParams {
            mask_prob: 0.5,
            span: 5,
            unit: MaskUnit::Span,
            mask_dropout: 0.0,
            mask_type: SpanShape::Static,
            mask_other: 0.0,
            clone_batch: 1,
        }
    }
}

impl MaskParams {
    pub fn spec(&self, rounding: Rounding) -> MaskSpec {
        MaskSpec {
            mask_prob: self.mask_prob,
            span: self.span,
            unit: self.unit,
            mask_dropout: self.mask_dropout,
            rounding,
            mask_type: self.mask_type,
            mask_other: self.mask_other,
            split_rounding: SplitRounding::Epsilon,
        }
    }
}

impl Params for MaskParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = self.spec(Rounding::PerBatch).check();
        e.extend(check_clone(self.clone_batch));
        e
    }
}

fn check_clone(c: usize) -> Vec<ParamError> {
    if c == 0 {
        vec![ParamError::new(
            "clone_batch",
            "must be at least 1 (1 = no cloning)",
        )]
    } else {
        Vec::new()
    }
}

/// Parameters of `mask.easy_to_hard`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EasyToHardParams {
    /// P: share of frames to mask before span overlaps and trimming, in (0, 1].
    pub mask_prob: f64,
    /// L: span length in frames (unit: span).
    pub span: usize,
    /// span (spans of L frames, as the code) or frame (single frames, the paper's Alg. 1).
    pub unit: MaskUnit,
    /// Share of each row's masked frames unmasked again after trimming, in [0, 1).
    pub mask_dropout: f64,
    /// Span lengths (method §8 span shape, fairseq's mask_type): static (every span `span`
    /// frames), uniform (integers in [mask_other, 2·span]), normal (max(1, round(N(span,
    /// mask_other²)))) or poisson (round(Poisson(span))).
    pub mask_type: SpanShape,
    /// Lower bound (uniform) or standard deviation (normal) of the span lengths; 0 otherwise.
    pub mask_other: f64,
    /// How the hard ratio r grows: linear (r = min(1, step/ramp_updates)·r_max, the paper),
    /// epoch_clamped (r = epoch/150, 0.8 once ≥ 0.7, the code; or {epoch_clamped: {total_epochs,
    /// jump_at, jump_to}}), or {constant: {r: x}}.
    #[schemars(with = "CurriculumName")]
    pub curriculum: CurriculumChoice,
    /// Updates over which the linear curriculum ramps r from 0 to r_max; default: the run's
    /// length (the student's schedule_steps, else its max_steps), as the paper ramps over the
    /// whole of training.
    pub ramp_updates: Option<u64>,
    /// Final hard ratio of the linear curriculum, in [0, 1].
    pub r_max: f64,
    /// How S_rand = floor(S·(1 − r)) is rounded: epsilon (default; exact-arithmetic reading, so
    /// 50·(1 − 0.8) gives 10) or truncate (the code's int() of the raw float: 9 at r = 0.8, one
    /// more hard span whenever S is a multiple of 5). Also the frame counts of unit: frame.
    pub rounding: SplitRounding,
    /// Multi-mask (method §1.5.6, `clone_batch`): each utterance is repeated this many times with
    /// independent masks, all sharing one teacher pass. 1 = off (the README config).
    pub clone_batch: usize,
}

impl Default for EasyToHardParams {
    fn default() -> Self {
        EasyToHardParams {
            mask_prob: 0.5,
            span: 5,
            unit: MaskUnit::Span,
            mask_dropout: 0.0,
            mask_type: SpanShape::Static,
            mask_other: 0.0,
            curriculum: CurriculumChoice::Linear,
            ramp_updates: None,
            r_max: 1.0,
            rounding: SplitRounding::Epsilon,
            clone_batch: 1,
        }
    }
}

/// `ramp_updates` when neither the stage nor a student in the plan gives one.
pub const DEFAULT_RAMP_UPDATES: u64 = 2000;

impl EasyToHardParams {
    pub fn spec(&self) -> MaskSpec {
        MaskSpec {
            mask_prob: self.mask_prob,
            span: self.span,
            unit: self.unit,
            mask_dropout: self.mask_dropout,
            rounding: Rounding::PerBatch,
            mask_type: self.mask_type,
            mask_other: self.mask_other,
            split_rounding: self.rounding,
        }
    }
    /// The curriculum these parameters describe.
    pub fn curriculum(&self) -> Curriculum {
        match self.curriculum {
            CurriculumChoice::Linear => Curriculum::Linear {
                ramp_updates: self.ramp_updates.unwrap_or(DEFAULT_RAMP_UPDATES),
                r_max: self.r_max,
            },
            CurriculumChoice::EpochClamped(e) => Curriculum::EpochClamped {
                total_epochs: e.total_epochs,
                jump_at: e.jump_at,
                jump_to: e.jump_to,
            },
            CurriculumChoice::Constant(r) => Curriculum::Constant { r },
        }
    }
}

fn unit_interval(x: f64) -> bool {
    (0.0..=1.0).contains(&x)
}

impl Params for EasyToHardParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = self.spec().check();
        e.extend(check_clone(self.clone_batch));
        if self.ramp_updates == Some(0) {
            e.push(ParamError::new("ramp_updates", "must be at least 1"));
        }
        if !unit_interval(self.r_max) {
            e.push(ParamError::new(
                "r_max",
                format!("must be in [0, 1], got {}", self.r_max),
            ));
        }
        match self.curriculum {
            CurriculumChoice::Linear => {}
            CurriculumChoice::EpochClamped(c) => {
                if c.total_epochs == 0 {
                    e.push(ParamError::new(
                        "curriculum.total_epochs",
                        "must be at least 1",
                    ));
                }
                if !(c.jump_at.is_finite() && c.jump_at > 0.0) {
                    e.push(ParamError::new(
                        "curriculum.jump_at",
                        format!("must be > 0, got {}", c.jump_at),
                    ));
                }
                if !unit_interval(c.jump_to) {
                    e.push(ParamError::new(
                        "curriculum.jump_to",
                        format!("must be in [0, 1], got {}", c.jump_to),
                    ));
                }
            }
            CurriculumChoice::Constant(r) => {
                if !unit_interval(r) {
                    e.push(ParamError::new(
                        "curriculum.r",
                        format!("must be in [0, 1], got {r}"),
                    ));
                }
            }
        }
        e
    }
}

// ---------------------------------------------------------------------------------------------
// Stages
// ---------------------------------------------------------------------------------------------

/// The masking logic of a stage, independent of the engine (tested directly).
#[derive(Debug, Clone, PartialEq)]
pub struct Masker {
    /// The stage kind, written to [`Masked::strategy`].
    pub strategy: &'static str,
    pub spec: MaskSpec,
    pub curriculum: Curriculum,
    pub seed: u64,
    /// Copies of each utterance, masked independently (`clone_batch`; 1 = off).
    pub clone_batch: usize,
    /// Batches per update (the student's `update_freq`): the curriculum follows the update a
    /// batch belongs to (its step divided by this), the masks' randomness the batch itself.
    pub update_freq: u64,
}

impl Masker {
    pub fn easy_to_hard(p: &EasyToHardParams, seed: u64) -> Self {
        Masker {
            strategy: EasyToHard::KIND,
            spec: p.spec(),
            curriculum: p.curriculum(),
            seed,
            clone_batch: p.clone_batch,
            update_freq: 1,
        }
    }
    /// data2vec 2.0's random masking: r ≡ 0, one rounding draw per row (method §4.5).
    pub fn random(p: &MaskParams, seed: u64) -> Self {
        Masker {
            strategy: Random::KIND,
            spec: p.spec(Rounding::PerRow),
            curriculum: Curriculum::Constant { r: 0.0 },
            seed,
            clone_batch: p.clone_batch,
            update_freq: 1,
        }
    }
    /// Hard-only masking: r ≡ 1 from step 0 (method §8).
    pub fn hard(p: &MaskParams, seed: u64) -> Self {
        Masker {
            strategy: Hard::KIND,
            spec: p.spec(Rounding::PerBatch),
            curriculum: Curriculum::Constant { r: 1.0 },
            seed,
            clone_batch: p.clone_batch,
            update_freq: 1,
        }
    }

    /// The random stream of the batch at `step`.
    pub fn rng(&self, step: u64) -> ChaCha8Rng {
        crate::seed::mask_batch(self.seed, step)
    }

    /// Masks one batch.
    pub fn apply(&self, taught: Taught) -> Result<Masked, MaskError> {
        let clones = self.clone_batch.max(1);
        let taught = if clones > 1 {
            clone_rows(taught, clones)?
        } else {
            taught
        };
        let b = &taught.batch;
        // Model frames (50 Hz): fewer than the batch's input frames for waveforms.
        let (size, frames) = (b.size(), taught.frames);
        if frames != b.frames && b.padding_mask.is_some() {
            return Err(MaskError::Spec("padded batches of waveforms cannot be masked (use batch.by_duration crop: shortest)".into()));
        }
        let lengths: Vec<usize> = if frames == b.frames {
            b.lengths.clone()
        } else {
            vec![frames; size]
        };
        let mut spec = self.spec;
        if let Some(pad) = &b.padding_mask {
            if Some(pad.len()) != size.checked_mul(frames) {
                return Err(MaskError::Spec(format!(
                    "padding_mask has {} values, expected {size} × {frames}",
                    pad.len()
                )));
            }
            if b.lengths.len() == size {
                for (row, &n) in b.lengths.iter().enumerate() {
                    if n > frames || (0..frames).any(|t| pad[row * frames + t] != (t >= n)) {
                        return Err(MaskError::PaddingMismatch { row });
                    }
                }
            }
        }
        if b.padding_mask.is_some() || lengths.iter().any(|&n| n != frames) {
            spec.rounding = Rounding::PerRow;
        }
        let r = hard_ratio(&self.curriculum, b.step / self.update_freq.max(1), b.epoch);
        let mut rng = self.rng(b.step);
        let out = eh_mask(
            &taught.pred_loss,
            size,
            frames,
            &lengths,
            &spec,
            r,
            &mut rng,
        )?;
        Ok(Masked {
            taught,
            mask: out.mask,
            hard: out.hard,
            masked_per_row: out.masked_per_row,
            hard_ratio: r as f32,
            spans: out.spans,
            hard_spans: out.hard_spans,
            strategy: self.strategy.to_string(),
            clones,
        })
    }
}

/// Repeats every row of a taught batch `c` times in place (`repeat_interleave`, as the code's
/// `clone_batch`): rows `c·i … c·i+c−1` are copies of row `i`, with its features, targets and
/// predicted losses.
pub fn clone_rows(mut t: Taught, c: usize) -> Result<Taught, MaskError> {
    let n = t.batch.size();
    let rep = |v: &[f32], per: usize, what: &str| -> Result<Vec<f32>, MaskError> {
        if v.len() != n * per {
            return Err(MaskError::Spec(format!(
                "{what} has {} values, expected {n} × {per}",
                v.len()
            )));
        }
        Ok(v.chunks(per.max(1))
            .flat_map(|row| std::iter::repeat_n(row, c).flatten().copied())
            .collect())
    };
    if t.targets.dims() != [n, t.frames, t.target_dim] {
        return Err(MaskError::Spec(format!(
            "targets have shape {:?}, expected [{n}, {}, {}]",
            t.targets.dims(),
            t.frames,
            t.target_dim
        )));
    }
    // Rows repeated where the targets are (index_select on their device).
    let rows: Vec<u32> = (0..n as u32)
        .flat_map(|i| std::iter::repeat_n(i, c))
        .collect();
    // On a GPU the copy is queued on this thread's stream: wait for it before the batch goes
    // to the student's thread.
    t.targets = candle_core::Tensor::from_vec(rows, n * c, t.targets.device())
        .and_then(|idx| t.targets.index_select(&idx, 0))
        .and_then(|y| y.device().synchronize().map(|_| y))
        .map_err(|e| MaskError::Spec(format!("repeating the targets: {e}")))?;
    t.pred_loss = rep(&t.pred_loss, t.frames, "pred_loss")?;
    let b = &mut t.batch;
    b.data = rep(&b.data, b.frames * b.dim, "the batch's features")?;
    let each = |i: usize| std::iter::repeat_n(i, c);
    b.utt_ids = (0..n)
        .flat_map(each)
        .map(|i| b.utt_ids[i].clone())
        .collect();
    b.offsets = (0..n).flat_map(each).map(|i| b.offsets[i]).collect();
    b.lengths = (0..n)
        .flat_map(each)
        .map(|i| b.lengths.get(i).copied().unwrap_or(b.frames))
        .collect();
    if let Some(m) = &b.padding_mask {
        b.padding_mask = Some(
            m.chunks(b.frames.max(1))
                .flat_map(|row| std::iter::repeat_n(row, c).flatten().copied())
                .collect(),
        );
    }
    Ok(t)
}

/// A masking strategy: its stage kind, its parameters and the [`Masker`] they make. Every
/// strategy runs as the same [`MaskStage`], so an ablation swaps one `kind:`.
pub trait Strategy: Send + Sync + 'static {
    type Params: Params + Clone;
    const KIND: &'static str;
    const DOC: &'static str;
    /// The masker of a stage with seed `seed`; `total_updates` is the student's schedule length
    /// (the default length of a curriculum's ramp), where the plan has a student.
    fn masker(p: &Self::Params, seed: u64, total_updates: Option<u64>) -> Masker;
    /// The span length and unit the parameters ask for.
    fn span(p: &Self::Params) -> (usize, MaskUnit);
}

/// Model frames of the shortest utterance a batcher with `min_utt_seconds` lets through: the
/// features' rate is 50 Hz for the fbank front-end (80 bins at 100 Hz stacked by 2, method §7)
/// and 16 kHz samples for the CNN, whose frame count is then the CNN's.
pub fn shortest_model_frames(cfg: &crate::model::ModelConfig, min_utt_seconds: f64) -> usize {
    let rate = match cfg.frontend.kind {
        crate::model::FrontendKind::Fbank => 50.0,
        crate::model::FrontendKind::Cnn => 16_000.0,
    };
    let input = (min_utt_seconds * rate).ceil();
    if !(input.is_finite() && input >= 0.0) {
        return 0;
    }
    cfg.frames_for(input as usize)
}

/// `span` against the shortest utterance the batcher allows (the `stream.min_utt_seconds` link):
/// a span longer than that row could not fit in it.
fn check_span_fits(span: usize, unit: MaskUnit, ctx: &StageContext) -> Vec<ParamError> {
    if unit != MaskUnit::Span {
        return Vec::new();
    }
    let Some(min_s) = ctx.links.get(&crate::stream::MIN_UTT_SECONDS) else {
        return Vec::new();
    };
    // A bad model block is reported by the teacher and student; nothing to compare with here.
    let Ok(cfg) = crate::model::ModelConfig::from_spec(ctx.model.as_ref()) else {
        return Vec::new();
    };
    let frames = shortest_model_frames(&cfg, *min_s);
    // min_utt_seconds: 0 sets no lower bound to check against.
    if frames == 0 || span <= frames {
        return Vec::new();
    }
    vec![ParamError::new(
        "span",
        format!(
            "{span} frames is longer than the shortest utterance the batcher lets through: min_utt_seconds {min_s} s is {frames} model frames; lower span or raise the batcher's min_utt_seconds"
        ),
    )]
}

/// `mask.easy_to_hard`: EH-MAM's curriculum (method §4.1).
pub struct EasyToHard;
/// `mask.random`: data2vec 2.0's random masking.
pub struct Random;
/// `mask.hard`: hard-only masking.
pub struct Hard;

impl Strategy for EasyToHard {
    type Params = EasyToHardParams;
    const KIND: &'static str = "mask.easy_to_hard";
    const DOC: &'static str =
        "EH-MAM easy-to-hard masking (method §4.1): spans of `span` frames, a share r(t) of them\nstarting at the frames with the largest predicted loss, the rest random; r follows `curriculum`.";
    fn masker(p: &EasyToHardParams, seed: u64, total_updates: Option<u64>) -> Masker {
        let mut p = p.clone();
        if p.ramp_updates.is_none() {
            p.ramp_updates = total_updates;
        }
        Masker::easy_to_hard(&p, seed)
    }
    fn span(p: &EasyToHardParams) -> (usize, MaskUnit) {
        (p.span, p.unit)
    }
}

impl Strategy for Random {
    type Params = MaskParams;
    const KIND: &'static str = "mask.random";
    const DOC: &'static str = "data2vec 2.0 random span masking (r ≡ 0, rounding drawn per row; method §4.5, §8 `random`).";
    fn masker(p: &MaskParams, seed: u64, _: Option<u64>) -> Masker {
        Masker::random(p, seed)
    }
    fn span(p: &MaskParams) -> (usize, MaskUnit) {
        (p.span, p.unit)
    }
}

impl Strategy for Hard {
    type Params = MaskParams;
    const KIND: &'static str = "mask.hard";
    const DOC: &'static str = "Hard-only masking (r ≡ 1 from step 0; method §8 `hard_only`): every span starts at a\nframe with one of the largest predicted losses.";
    fn masker(p: &MaskParams, seed: u64, _: Option<u64>) -> Masker {
        Masker::hard(p, seed)
    }
    fn span(p: &MaskParams) -> (usize, MaskUnit) {
        (p.span, p.unit)
    }
}

/// The mask stage of strategy `S`: teacher output in, masked batches out.
pub struct MaskStage<S> {
    masker: Masker,
    _strategy: PhantomData<fn() -> S>,
}

impl<S: Strategy> StageDef for MaskStage<S> {
    type Params = S::Params;
    const KIND: &'static str = S::KIND;
    const DOC: &'static str = S::DOC;
    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Taught>(
            "in",
            "batches with the teacher's predicted losses",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Masked>(
            "out",
            "masked batches (exactly masked_per_row frames per row)",
        )]
    }
    fn link(_: &S::Params, _: &StageContext, linker: &mut Linker) -> Vec<ParamError> {
        linker.read(&crate::train::TOTAL_UPDATES);
        linker.read(&crate::train::UPDATE_FREQ);
        linker.read(&crate::stream::MIN_UTT_SECONDS);
        Vec::new()
    }
    fn check_links(p: &S::Params, ctx: &StageContext) -> Vec<ParamError> {
        let (span, unit) = S::span(p);
        check_span_fits(span, unit, ctx)
    }
    fn create(p: &S::Params, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        let total = ctx.links.get(&crate::train::TOTAL_UPDATES).map(|n| *n);
        let mut masker = S::masker(p, ctx.seed, total);
        masker.update_freq = ctx.links.get(&crate::train::UPDATE_FREQ).map_or(1, |k| *k);
        Ok(MaskStage {
            masker,
            _strategy: PhantomData,
        })
    }
}

impl<S: Strategy> Stage for MaskStage<S> {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(t) = io.recv::<Taught>(0)? {
            let step = t.batch.step;
            let masked = self.masker.apply(t).map_err(|e| {
                StageError::failed(format!("{}: batch at step {step}: {e}", io.stage()))
            })?;
            io.send(0, masked)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn spec(p: f64, l: usize) -> MaskSpec {
        MaskSpec {
            mask_prob: p,
            span: l,
            ..MaskSpec::default()
        }
    }

    #[test]
    fn hard_spans_absorb_float_error() {
        // 50·(1 − 0.8) is 9.999999999999998 in f64; the method means S_rand = 10.
        assert_eq!(num_hard(50, 0.8), 40);
        assert_eq!(num_hard(50, 0.0), 0);
        assert_eq!(num_hard(50, 1.0), 50);
        assert_eq!(num_hard(7, 0.5), 4); // S_rand = floor(3.5) = 3
        assert_eq!(num_hard(1, 0.3), 1); // S_rand = floor(0.7) = 0
    }

    #[test]
    fn num_spans_rounds_probabilistically() {
        assert_eq!(num_spans(0.5, 500, 5, 0.0), 50);
        assert_eq!(num_spans(0.5, 500, 5, 0.999), 50);
        assert_eq!(num_spans(0.5, 101, 5, 0.0), 10); // 10.1
        assert_eq!(num_spans(0.5, 101, 5, 0.95), 11); // 11.05
        assert_eq!(num_spans(0.5, 3, 5, 0.1), 1); // max(1, 0)
        assert_eq!(num_spans(0.5, 0, 5, 0.5), 1);
    }

    #[test]
    fn top_k_ranks_ties_and_nan() {
        let lp = [0.1, f32::NAN, 0.9, 0.9, 0.5];
        assert_eq!(top_k(&lp, 3), vec![2, 3, 4]);
        assert_eq!(top_k(&lp, 10).len(), 5);
        assert_eq!(top_k(&lp, 5)[4], 1);
    }

    #[test]
    fn tiny_rows_never_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for n in 0..8 {
            for l in 1..7 {
                let lp: Vec<f32> = (0..n).map(|t| t as f32).collect();
                let out = eh_mask(&lp, 1, n, &[n], &spec(1.0, l), 0.5, &mut rng).unwrap();
                assert!(out.masked_per_row <= n);
                assert_eq!(out.mask.iter().filter(|&&m| m).count(), out.masked_per_row);
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!(matches!(
            eh_mask(&[0.0; 5], 1, 4, &[4], &spec(0.5, 2), 0.5, &mut rng),
            Err(MaskError::PredLossShape { .. })
        ));
        assert!(matches!(
            eh_mask(&[0.0; 4], 1, 4, &[5], &spec(0.5, 2), 0.5, &mut rng),
            Err(MaskError::LengthTooLong { .. })
        ));
        assert!(matches!(
            eh_mask(&[0.0; 4], 1, 4, &[4, 4], &spec(0.5, 2), 0.5, &mut rng),
            Err(MaskError::LengthsShape { .. })
        ));
        assert!(matches!(
            eh_mask(&[0.0; 4], 1, 4, &[4], &spec(0.5, 2), 1.5, &mut rng),
            Err(MaskError::HardRatio(_))
        ));
        assert!(matches!(
            eh_mask(&[0.0; 4], 1, 4, &[4], &spec(0.0, 2), 0.5, &mut rng),
            Err(MaskError::Spec(_))
        ));
        assert!(matches!(
            eh_mask(&[0.0; 4], 1, 4, &[4], &spec(0.5, 0), 0.5, &mut rng),
            Err(MaskError::Spec(_))
        ));
    }

    #[test]
    fn curriculum_serializes_back() {
        for c in [
            CurriculumChoice::Linear,
            CurriculumChoice::EpochClamped(EpochClamped {
                total_epochs: 9,
                jump_at: 0.5,
                jump_to: 0.6,
            }),
            CurriculumChoice::Constant(0.25),
        ] {
            let v = serde_yaml::to_value(c).unwrap();
            assert_eq!(CurriculumChoice::from_value(v).unwrap(), c);
        }
    }
}
