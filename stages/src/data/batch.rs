//! `batch.by_duration`: utterance features → batches under a padded-cost budget.
//!
//! Utterances shorter than `min_utt_seconds` are dropped; longer than `max_utt_seconds` are
//! randomly cropped to it. A shuffle buffer of `buffer` utterances is sorted by length and cut
//! greedily into batches whose padded cost (longest × count) stays within `max_seconds` (or
//! `max_frames`), and the batches of a buffer are emitted in a seeded random order. By default
//! every member is cropped to the batch's shortest (no padding, as data2vec 2.0 does); with
//! `crop: pad` members are padded to the longest and a padding mask is carried. Each batch carries
//! its step, epoch, utterance ids and crop offsets, so logs can point back into the audio.

use crate::items::Features;
use crate::items::{Batch, DataPosition};
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How members of different lengths are made one length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Crop every member (at a random offset) to the batch's shortest.
    #[default]
    Shortest,
    /// Pad every member to the batch's longest; `padding_mask` marks the padded frames.
    Pad,
}

/// Parameters of `batch.by_duration`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BatchParams {
    /// Budget of one batch in seconds of padded audio (longest member × members).
    pub max_seconds: f64,
    /// Budget in frames instead of seconds (overrides `max_seconds` when set).
    pub max_frames: Option<usize>,
    /// Utterances shorter than this are dropped.
    pub min_utt_seconds: f64,
    /// Utterances longer than this are randomly cropped to it.
    pub max_utt_seconds: f64,
    /// shortest (crop to the shortest member, no padding) or pad (pad to the longest, with a mask).
    pub crop: CropMode,
    /// Utterances buffered, sorted by length and cut into batches (the bucketing window).
    pub buffer: usize,
    /// Shuffle the batches of each buffer (seeded); off keeps length order.
    pub shuffle: bool,
    /// Continue a stream after a consumed batch (`position.after()`); the reader must start at
    /// the same epoch and `start` index (`shards.read`'s `start_epoch` / `start_index`).
    pub resume_from: Option<DataPosition>,
}

impl Default for BatchParams {
    fn default() -> Self {
        BatchParams {
            max_seconds: 32.0,
            max_frames: None,
            min_utt_seconds: 1.0,
            max_utt_seconds: 8.0,
            crop: CropMode::Shortest,
            buffer: 256,
            shuffle: true,
            resume_from: None,
        }
    }
}

impl Params for BatchParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if !(self.max_seconds > 0.0 && self.max_seconds.is_finite()) {
            e.push(ParamError::new(
                "max_seconds",
                format!("must be > 0, got {}", self.max_seconds),
            ));
        }
        if self.max_frames == Some(0) {
            e.push(ParamError::new("max_frames", "must be at least 1"));
        }
        if !(self.min_utt_seconds >= 0.0) {
            e.push(ParamError::new(
                "min_utt_seconds",
                format!("must be ≥ 0, got {}", self.min_utt_seconds),
            ));
        }
        if !(self.max_utt_seconds > 0.0 && self.max_utt_seconds >= self.min_utt_seconds) {
            e.push(ParamError::new(
                "max_utt_seconds",
                format!(
                    "must be > 0 and ≥ min_utt_seconds ({}), got {}",
                    self.min_utt_seconds, self.max_utt_seconds
                ),
            ));
        }
        if self.max_frames.is_none() && self.max_utt_seconds > self.max_seconds {
            e.push(ParamError::new(
                "max_utt_seconds",
                format!(
                    "{} s does not fit in a batch of max_seconds {}",
                    self.max_utt_seconds, self.max_seconds
                ),
            ));
        }
        if self.buffer == 0 {
            e.push(ParamError::new("buffer", "must be at least 1"));
        }
        e
    }
}

/// An utterance after the length filter and the first crop.
struct Item {
    f: Features,
    /// Offset of `f.data` in the original features.
    offset: usize,
    /// Not cropped by `max_utt_seconds`.
    whole: bool,
}

/// The batching logic, independent of the engine (tested directly).
pub struct Batcher {
    p: BatchParams,
    seed: u64,
    rng: rand_chacha::ChaCha8Rng,
    buffer: Vec<Item>,
    epoch: Option<u32>,
    step: u64,
    /// Utterances pushed in this epoch (dropped ones included).
    index: u64,
    /// Epoch index of the first utterance of the current buffer.
    buffer_start: u64,
    /// Buffers cut in this epoch.
    flushes: u64,
    /// Batches of the next buffer to drop (resuming inside a buffer).
    skip: u64,
    /// Utterances dropped for length.
    pub dropped: u64,
    /// Data parallel: `(rank, world, batches per rank and update)`. The utterances pushed are
    /// this rank's share of the epoch (index `i` here is `i·world + rank` in the epoch's order);
    /// a batch's step is the run's ([`crate::dist::global_step`]), its position's step this
    /// rank's count.
    pub split: Option<(usize, usize, u64)>,
}

impl Batcher {
    pub fn new(p: &BatchParams, seed: u64) -> Self {
        Batcher {
            p: p.clone(),
            seed,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            buffer: Vec::new(),
            epoch: None,
            step: 0,
            index: 0,
            buffer_start: 0,
            flushes: 0,
            skip: 0,
            dropped: 0,
            split: None,
        }
    }

    /// A batcher that continues the stream at `pos` (from [`DataPosition::after`] of the last
    /// batch consumed). Feed it the epoch's utterances from index `pos.start` on.
    pub fn resume(p: &BatchParams, seed: u64, pos: DataPosition) -> Self {
        let mut b = Batcher::new(p, seed);
        b.epoch = Some(pos.epoch);
        b.index = pos.start;
        b.buffer_start = pos.start;
        b.flushes = pos.flush;
        b.skip = pos.index;
        b.step = pos.step;
        b
    }

    fn budget(&self, frame_rate: f64) -> usize {
        self.p
            .max_frames
            .unwrap_or((self.p.max_seconds * frame_rate).floor() as usize)
            .max(1)
    }

    /// Takes one utterance; returns the batches that became ready.
    pub fn push(&mut self, f: Features) -> Vec<Batch> {
        let mut out = Vec::new();
        if self.epoch.is_some_and(|e| e != f.epoch) {
            out.extend(self.flush());
            self.index = 0;
            self.buffer_start = 0;
            self.flushes = 0;
        }
        self.epoch = Some(f.epoch);
        // Crops of this utterance draw from its own stream (epoch, index in the epoch).
        let i = self.index;
        self.index += 1;
        let gi = self.split.map_or(i, |(r, w, _)| i * w as u64 + r as u64);
        self.rng = crate::seed::batch_crop(self.seed, f.epoch, gi);
        let min = (self.p.min_utt_seconds * f.frame_rate).ceil() as usize;
        let max = ((self.p.max_utt_seconds * f.frame_rate).floor() as usize)
            .min(self.budget(f.frame_rate))
            .max(1);
        if f.num_frames < min.max(1) {
            self.dropped += 1;
            return out;
        }
        let (mut f, mut offset) = (f, 0);
        let whole = f.num_frames <= max;
        if !whole {
            offset = self.rng.random_range(0..=f.num_frames - max);
            f.data = f.data[offset * f.dim..(offset + max) * f.dim].to_vec();
            f.num_frames = max;
        }
        self.buffer.push(Item { f, offset, whole });
        if self.buffer.len() >= self.p.buffer {
            out.extend(self.flush());
        }
        out
    }

    /// Cuts the buffer into batches (at the end of an epoch or of the input).
    pub fn flush(&mut self) -> Vec<Batch> {
        let mut items = std::mem::take(&mut self.buffer);
        let (start, flush) = (self.buffer_start, self.flushes);
        self.buffer_start = self.index;
        self.flushes += 1;
        if items.is_empty() {
            self.skip = 0;
            return Vec::new();
        }
        // This buffer's batching draws from its own stream (epoch, buffer number).
        let epoch = self.epoch.unwrap_or(0);
        self.rng = crate::seed::batch_order(self.seed, epoch, flush);
        // Sort by length (ties by id, so the order never depends on arrival).
        items.sort_by(|a, b| {
            a.f.num_frames
                .cmp(&b.f.num_frames)
                .then_with(|| a.f.utt_id.cmp(&b.f.utt_id))
        });
        let budget = self.budget(items[0].f.frame_rate);
        let mut groups: Vec<Vec<Item>> = Vec::new();
        let mut cur: Vec<Item> = Vec::new();
        for it in items {
            // Sorted ascending, so the newcomer is the longest: padded cost = its length ×
            // (count + 1), in both crop modes (cropping to the shortest only lowers memory).
            if !cur.is_empty() && it.f.num_frames * (cur.len() + 1) > budget {
                groups.push(std::mem::take(&mut cur));
            }
            cur.push(it);
        }
        if !cur.is_empty() {
            groups.push(cur);
        }
        if self.p.shuffle {
            groups.shuffle(&mut self.rng);
        }
        let skip = std::mem::take(&mut self.skip) as usize;
        let mut out = Vec::new();
        for (j, g) in groups.into_iter().enumerate() {
            // Crops are drawn even for skipped batches, so the stream stays the same.
            let b = self.make(
                g,
                DataPosition {
                    epoch,
                    start,
                    flush,
                    index: j as u64,
                    step: 0,
                },
            );
            if j >= skip {
                out.push(b);
            }
        }
        for b in &mut out {
            b.step = match self.split {
                Some((r, w, k)) => crate::dist::global_step(self.step, k, r, w),
                None => self.step,
            };
            b.position.step = self.step;
            self.step += 1;
        }
        out
    }

    fn make(&mut self, mut g: Vec<Item>, position: DataPosition) -> Batch {
        // Members in a stable order within the batch.
        g.sort_by(|a, b| a.f.utt_id.cmp(&b.f.utt_id));
        let dim = g[0].f.dim;
        let frame_rate = g[0].f.frame_rate;
        let epoch = g[0].f.epoch;
        let (frames, pad) = match self.p.crop {
            CropMode::Shortest => (g.iter().map(|i| i.f.num_frames).min().unwrap_or(0), false),
            CropMode::Pad => (g.iter().map(|i| i.f.num_frames).max().unwrap_or(0), true),
        };
        let mut data = Vec::with_capacity(g.len() * frames * dim);
        let mut offsets = Vec::with_capacity(g.len());
        let mut lengths = Vec::with_capacity(g.len());
        let mut mask = Vec::new();
        let whole: Vec<bool> = g
            .iter()
            .map(|it| it.whole && (pad || it.f.num_frames == frames))
            .collect();
        for it in &g {
            let n = it.f.num_frames;
            if pad {
                data.extend_from_slice(&it.f.data[..n * dim]);
                data.extend(std::iter::repeat_n(0.0, (frames - n) * dim));
                mask.extend((0..frames).map(|t| t >= n));
                offsets.push(it.offset);
                lengths.push(n);
            } else {
                let extra = n - frames;
                let o = if extra > 0 {
                    self.rng.random_range(0..=extra)
                } else {
                    0
                };
                data.extend_from_slice(&it.f.data[o * dim..(o + frames) * dim]);
                offsets.push(it.offset + o);
                lengths.push(frames);
            }
        }
        Batch {
            step: 0,
            position,
            epoch,
            utt_ids: g.iter().map(|i| i.f.utt_id.clone()).collect(),
            offsets,
            lengths,
            longest: g.iter().map(|i| i.f.num_frames).max().unwrap_or(0),
            frames,
            dim,
            frame_rate,
            data,
            padding_mask: pad.then_some(mask),
            transcripts: g.iter().map(|i| i.f.transcript.clone()).collect(),
            whole,
        }
    }
}

/// The `batch.by_duration` stage.
pub struct BatchByDuration {
    batcher: Batcher,
}

impl StageDef for BatchByDuration {
    type Params = BatchParams;
    const KIND: &'static str = "batch.by_duration";
    const DOC: &'static str =
        "Groups utterance features of similar length into batches under a padded-cost budget\n(longest × count); crops to the shortest member by default (no padding), or pads with a mask.";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>("in", "utterance features")]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Batch>("out", "batches")]
    }
    fn link(p: &BatchParams, _: &StageContext, linker: &mut pipeline::Linker) -> Vec<ParamError> {
        linker.read(&crate::stream::RESUME_POSITION);
        linker.read(&crate::stream::UPDATE_FREQ);
        // With two batchers in one graph the first one's bound is the one checked against.
        let _ = linker.provide(&crate::stream::MIN_UTT_SECONDS, p.min_utt_seconds);
        Vec::new()
    }
    fn create(p: &BatchParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        // A training run resuming from a checkpoint continues the stream where it stopped, when
        // its reader (shards.read, features.read) resumes too.
        let resume = crate::stream::resume_position(ctx).or(p.resume_from);
        let mut batcher = match resume {
            Some(pos) => Batcher::resume(p, ctx.seed, pos),
            None => Batcher::new(p, ctx.seed),
        };
        if let Some((rank, world)) = crate::dist::stream_split(ctx) {
            let kw = ctx.links.get(&crate::stream::UPDATE_FREQ).map_or(1, |k| *k);
            batcher.split = Some((rank, world, (kw / world as u64).max(1)));
        }
        Ok(BatchByDuration { batcher })
    }
}

impl Stage for BatchByDuration {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(f) = io.recv::<Features>(0)? {
            for b in self.batcher.push(f) {
                io.send(0, b)?;
            }
        }
        for b in self.batcher.flush() {
            io.send(0, b)?;
        }
        if self.batcher.dropped > 0 {
            io.count("dropped_short", self.batcher.dropped);
            io.note(format!(
                "dropped {} utterances shorter than min_utt_seconds",
                self.batcher.dropped
            ));
        }
        Ok(())
    }
}
