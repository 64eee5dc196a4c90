//! The data stream: positions in it, the order of each epoch, the epoch reader shared by
//! `shards.read` and `features.read`, where a resumed training run starts reading, and the part
//! directory (`store`) every store is written as.

pub mod store;

use crate::items::DataPosition;
use pipeline::{Link, Linker, StageContext, StageError, StageIo};
use rand::seq::SliceRandom;
use std::path::{Path, PathBuf};

/// The position after a training checkpoint, provided by the student when it resumes: where
/// the batcher continues.
pub const RESUME_POSITION: Link<DataPosition> = Link::new("stream.resume_position");

/// The same position, read by the stream's readers (`shards.read`, `features.read`). A reader
/// starts there only when it is the plan's one reader; otherwise the stream starts from the top
/// and the engine skips the batches already learned from.
pub const READER_START: Link<DataPosition> = Link::new("stream.reader_start");

/// A student resuming from a checkpoint taken at `pos` provides where the stream continues.
pub fn provide_resume(linker: &mut Linker, pos: DataPosition) -> Result<(), String> {
    linker.provide(&RESUME_POSITION, pos)?;
    linker.provide(&READER_START, pos)
}

/// Where the data stages of this plan start: the position after the student's checkpoint, when
/// the student resumes and exactly one reader can start there.
pub fn resume_position(ctx: &StageContext) -> Option<DataPosition> {
    if ctx.links.readers(&READER_START).len() != 1 {
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

/// Streams the rows of a part directory for `epochs` passes in [`epoch_order`], one part in
/// memory at a time; parts wholly before the start are not opened.
pub struct EpochReader {
    pub seed: u64,
    pub epochs: u32,
    pub shuffle: bool,
    pub start_epoch: u32,
    pub start_index: u64,
    /// Each part's file and its row count (from the index).
    pub parts: Vec<(PathBuf, u64)>,
}

impl EpochReader {
    /// Sends every row on output 0; `read` reads one part (its rows in stored order) for an
    /// epoch; `unit` names the parts in the progress line.
    pub fn run<T: Send + 'static>(
        &self,
        io: &mut StageIo,
        unit: &str,
        read: impl Fn(&Path, u32) -> Result<Vec<T>, StageError>,
    ) -> Result<(), StageError> {
        let rows: Vec<u64> = self.parts.iter().map(|p| p.1).collect();
        io.progress().set_length(
            self.parts.len() as u64 * (self.epochs - self.start_epoch) as u64,
            unit,
        );
        for epoch in self.start_epoch..self.epochs {
            let mut skip = if epoch == self.start_epoch {
                self.start_index
            } else {
                0
            };
            for (k, perm) in epoch_order(self.seed, epoch, &rows, self.shuffle) {
                if skip >= perm.len() as u64 {
                    // Resuming: this whole part lies before the start; not even opened.
                    skip -= perm.len() as u64;
                    io.progress().inc(1);
                    continue;
                }
                let path = &self.parts[k].0;
                let items = read(path, epoch)?;
                if items.len() != perm.len() {
                    return Err(StageError::failed(format!(
                        "{}: {} rows, the index says {}",
                        path.display(),
                        items.len(),
                        perm.len()
                    )));
                }
                let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
                for &r in perm.iter().skip(skip as usize) {
                    if let Some(u) = slots[r].take() {
                        io.send(0, u)?;
                    }
                }
                skip = 0;
                io.progress().inc(1);
            }
        }
        Ok(())
    }
}
