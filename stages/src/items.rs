//! Every item type that flows on a channel between the speech stages, and nothing that imports
//! a stage: decoded audio, features, batches, what the teacher, masking and student stages hand on.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One utterance: mono audio at `sample_rate` with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    /// Unique id (LibriSpeech: the file stem; otherwise the path relative to the input root,
    /// without extension).
    pub utt_id: String,
    pub speaker: Option<String>,
    /// LibriSpeech chapter (book chapter id), where the layout has one.
    pub chapter: Option<String>,
    /// Path relative to the input root, with `/` separators.
    pub source: String,
    pub transcript: Option<String>,
    pub sample_rate: u32,
    /// Samples in [-1, 1].
    pub samples: Vec<f32>,
    /// Epoch this copy belongs to (0 for freshly decoded audio).
    pub epoch: u32,
}

impl Utterance {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// An input file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Path relative to the input root, as `source` in `utterances`.
    pub source: String,
    pub reason: String,
}

/// What `audio.decode` emits for each input file, in input order. Every input ends with exactly
/// one `Utterance` or `Rejected`; a file longer than `max_segment_seconds` comes as `Part`s (its
/// segments `ID@0`, `ID@1`, …) before that last item, so a consumer counts inputs by their last
/// items.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// The whole file, or the last segment of a long one.
    Utterance(Utterance),
    /// A segment of a long file whose later segments (or its rejection) follow.
    Part(Utterance),
    Rejected(Reject),
}

/// The teacher's output (method §1.3–1.4): a batch with its targets and the teacher's predicted
/// loss of every frame. What every `mask.*` stage takes.
#[derive(Debug, Clone)]
pub struct Taught {
    pub batch: crate::items::Batch,
    /// Targets `y`: `[size, frames, target_dim]` f32 on the training device, where the teacher
    /// made them (average of the instance-normalised FFN outputs of the top-K teacher blocks).
    pub targets: candle_core::Tensor,
    pub target_dim: usize,
    /// Model frames per member (50 Hz). Equals `batch.frames` for fbank features; fewer for
    /// waveforms, which the CNN front-end strides by 320. Masks are `size × frames` of these.
    pub frames: usize,
    /// Teacher's predicted loss `lp`, `size × frames`.
    pub pred_loss: Vec<f32>,
    /// Version of the teacher weights used: the number of student updates they include.
    pub teacher_version: u64,
}

/// A masked batch (method §4): what every `mask.*` stage emits and `student` takes.
#[derive(Debug, Clone)]
pub struct Masked {
    pub taught: Taught,
    /// `size × frames`, true where the frame is hidden from the student. Every row has exactly
    /// `masked_per_row` true (trimmed to the batch minimum).
    pub mask: Vec<bool>,
    /// `size × frames`, true where a masked frame lies in a span whose start was chosen by
    /// predicted hardness (not at random). Always a subset of `mask`.
    pub hard: Vec<bool>,
    pub masked_per_row: usize,
    /// Hard ratio `r` used for this batch (0 for purely random masking).
    pub hard_ratio: f32,
    /// Spans drawn per row before trimming (`S`) and how many of them were hard (`S_hard`).
    pub spans: Vec<usize>,
    pub hard_spans: Vec<usize>,
    /// The mask stage kind that made it (`mask.easy_to_hard`, …).
    pub strategy: String,
    /// Copies of each utterance in the batch (`clone_batch`, method §1.5.6): rows `c·i … c·i+c−1`
    /// are utterance `i` with independent masks. 1 = no cloning.
    pub clones: usize,
}

/// One student update, for `log.steps` (method §1.10 health metrics included).
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u32,
    pub lr: f64,
    /// Joint loss `L` as optimised (method §1.9).
    pub loss: f64,
    pub loss_rec: f64,
    /// `L_aux_raw` as normalised in the joint loss (divided by N, or by the pair count).
    pub loss_aux: f64,
    /// EMA decay applied after this update.
    pub tau: f64,
    pub hard_ratio: f64,
    pub masked_frac: f64,
    /// Frames in the batch (size × frames).
    pub frames: u64,
    pub utterances: u64,
    pub audio_s: f64,
    pub step_ms: f64,
    /// Mean over channels of the per-channel std of targets / student reconstructions over masked
    /// frames.
    pub target_std: f64,
    pub pred_std: f64,
    /// Share of masked pairs (distinct losses) the student's loss predictor orders like the actual
    /// per-frame losses.
    pub rank_agreement: f64,
    /// The same for the teacher's predicted losses.
    pub teacher_rank_agreement: f64,
    /// Global L2 norm of this update's gradients (every parameter that has one), before the
    /// optimiser step.
    pub grad_norm: f64,
    pub teacher_version: u64,
    /// The learner writes a checkpoint right after this update (set on its last record of the
    /// update): a log closes its open part after this record, so that a run killed after the
    /// checkpoint and resumed from it has lost none of the rows before it.
    pub checkpoint_follows: bool,
}

/// Frame-level view of one student update, for `log.frames`: row-major `size × frames` arrays.
#[derive(Debug, Clone)]
pub struct FrameRecord {
    pub step: u64,
    pub epoch: u32,
    pub utt_ids: Vec<String>,
    /// Crop offset of each member in its utterance, in seconds (exact whatever the front-end's
    /// stride: a waveform crop may start between two output frames).
    pub offsets_s: Vec<f64>,
    pub frame_rate: f64,
    pub frames: usize,
    pub mask: Vec<bool>,
    pub hard: Vec<bool>,
    pub teacher_pred: Vec<f32>,
    pub student_pred: Vec<f32>,
    /// Per-frame reconstruction loss `ℓ` (method §1.7); NaN where not masked.
    pub recon_loss: Vec<f32>,
    pub hard_ratio: f32,
    /// The student's input features, `size × frames × feature_dim` (for plots).
    pub features: std::sync::Arc<Vec<f32>>,
    pub feature_dim: usize,
    /// The learner writes a checkpoint right after this update (set on its last record of the
    /// update): a log closes its open part after this record, so that a run killed after the
    /// checkpoint and resumed from it has lost none of the rows before it.
    pub checkpoint_follows: bool,
}

/// Features of one utterance.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub utt_id: String,
    pub speaker: Option<String>,
    pub source: String,
    pub transcript: Option<String>,
    pub epoch: u32,
    /// Frames per second after stacking.
    pub frame_rate: f64,
    pub num_frames: usize,
    pub dim: usize,
    /// Row-major `num_frames × dim`.
    pub data: Vec<f32>,
}

/// Where a batch comes from in the data stream, enough to regenerate the stream from there
/// without re-reading the epoch from its start: the batcher's randomness is drawn per epoch,
/// per utterance and per buffer, never from one running stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataPosition {
    pub epoch: u32,
    /// Index, in the epoch's utterance order, of the first utterance of this batch's buffer.
    pub start: u64,
    /// Buffer number within the epoch.
    pub flush: u64,
    /// Batch number within the buffer.
    pub index: u64,
    /// The batch's step.
    pub step: u64,
}

impl DataPosition {
    /// The position to resume from once this batch has been consumed.
    pub fn after(&self) -> DataPosition {
        DataPosition {
            index: self.index + 1,
            step: self.step + 1,
            ..*self
        }
    }
}

/// A batch: `size × frames × dim` features, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// 0-based index of the batch in the run.
    pub step: u64,
    /// Where it comes from (for resuming the data stream).
    pub position: DataPosition,
    pub epoch: u32,
    pub utt_ids: Vec<String>,
    /// Where each member starts in its utterance's features (frames); seconds = offset / frame_rate.
    pub offsets: Vec<usize>,
    /// Valid frames of each member (all equal to `frames` unless padded).
    pub lengths: Vec<usize>,
    /// Frames of the longest member before the crop to the shortest (after the `max_utt_seconds`
    /// crop): the batch's padded cost is `longest × size`, whatever the crop mode.
    pub longest: usize,
    pub frames: usize,
    pub dim: usize,
    pub frame_rate: f64,
    pub data: Vec<f32>,
    /// `size × frames`, true where a frame is padding (`crop: pad` only).
    pub padding_mask: Option<Vec<bool>>,
    /// Each member's transcript, as its utterance carries it (empty where no stage gives them).
    pub transcripts: Vec<Option<String>>,
    /// Whether each member is its whole utterance (not cropped, so its transcript is its own):
    /// what CTC fine-tuning may learn from. Empty where no stage gives them.
    pub whole: Vec<bool>,
}

impl Batch {
    pub fn size(&self) -> usize {
        self.utt_ids.len()
    }
    /// Padded cost in frames: longest member × members (what a padded batch of the same
    /// utterances would hold; the budget is counted this way in both crop modes, as fairseq's
    /// `max_tokens` is).
    pub fn cost_frames(&self) -> usize {
        self.longest * self.size()
    }
}
