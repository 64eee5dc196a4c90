//! The data stream: positions in it, the order of each epoch, the epoch reader shared by
//! `shards.read` and `features.read`, where a resumed training run starts reading, and the part
//! directory (`store`) every store is written as.

pub mod reader;
pub mod store;

use crate::items::DataPosition;
use pipeline::{Link, Linker, StageContext};
use rand::seq::SliceRandom;

/// The position after a training checkpoint, provided by the student when it resumes: where
/// the batcher continues.
pub const RESUME_POSITION: Link<DataPosition> = Link::new("stream.resume_position");

/// Batches per update (`student.with.update_freq`, times the ranks of a data-parallel run): the
/// student provides it; the teacher and the mask stages count updates with it (a batch's update
/// is its step divided by it), the batcher numbers a rank's batches with it.
pub const UPDATE_FREQ: Link<u64> = Link::new("train.update_freq");

/// The batcher's `min_utt_seconds` (`batch.by_duration` provides it): no batch member is shorter.
/// The mask stages refuse a span longer than that many model frames.
pub const MIN_UTT_SECONDS: Link<f64> = Link::new("stream.min_utt_seconds");

/// The same position, read by the stream's readers (`shards.read`, `features.read`). A reader
/// starts there only when it is the one reader whose stream reaches the learner; otherwise the
/// stream starts from the top. Readers and batchers of other streams (a held-out set scored
/// while training) always start from the top.
pub const READER_START: Link<DataPosition> = Link::new("stream.reader_start");

/// A learner resuming from a checkpoint taken at `pos` provides where the stream continues.
pub fn provide_resume(
    linker: &mut Linker,
    pos: DataPosition,
) -> Result<(), pipeline::AlreadyProvided> {
    linker.provide(&RESUME_POSITION, pos)?;
    linker.provide(&READER_START, pos)
}

/// Where this data stage (a reader or a batcher) starts: the position after the learner's
/// checkpoint, when the learner resumes, this stage's stream reaches it, and exactly one reader
/// feeds it.
pub fn resume_position(ctx: &StageContext) -> Option<DataPosition> {
    let learner = ctx
        .links
        .list()
        .into_iter()
        .find(|l| l.name == RESUME_POSITION.name())?
        .provider?;
    if !ctx.graph.reaches(&ctx.stage, &learner) {
        return None;
    }
    let feeding = ctx
        .links
        .readers(&READER_START)
        .iter()
        .filter(|r| ctx.graph.reaches(r, &learner))
        .count();
    if feeding != 1 {
        return None;
    }
    ctx.links.get(&RESUME_POSITION).map(|p| *p)
}

/// Where a reader of `epochs` passes starts when the plan resumes a training run: `(epoch,
/// index in that epoch's order)`; `None` to start from the top.
pub fn reader_start(ctx: &StageContext, epochs: u32) -> Option<(u32, u64)> {
    let pos = resume_position(ctx)?;
    (pos.epoch < epochs).then_some((pos.epoch, pos.start))
}

/// The utterance order of one epoch: (part, row permutation) in reading order. A pure function
/// of the seed, the epoch and the parts' row counts, so a resumed run finds its place without
/// reading anything before it.
pub fn epoch_order(seed: u64, epoch: u32, rows: &[u64], shuffle: bool) -> Vec<(usize, Vec<usize>)> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    if shuffle {
        order.shuffle(&mut crate::seed::epoch_order(seed, epoch, None));
    }
    order
        .into_iter()
        .map(|k| {
            let mut perm: Vec<usize> = (0..rows[k] as usize).collect();
            if shuffle {
                perm.shuffle(&mut crate::seed::epoch_order(seed, epoch, Some(k as u64)));
            }
            (k, perm)
        })
        .collect()
}

pub use reader::{
    EpochReader, Part, PartSource, ReadStage, ReaderParams, SpeakerFilter, SpeakerId,
};
