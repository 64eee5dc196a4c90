//! The readers of a part directory: `shards.read` and `features.read` are one stage,
//! [`ReadStage`], over a [`PartSource`] that says how the store lists and reads its parts.

use crate::stream::{epoch_order, reader_start, READER_START};
use pipeline::{
    Linker, ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// Parameters of a store reader (`shards.read`, `features.read`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ReaderParams {
    /// The store's directory (written by `shards.write` or `features.write`).
    pub dir: PathBuf,
    /// Passes over the data.
    pub epochs: u32,
    /// Shuffle part order and the rows within each part, per epoch, from the stage's seed.
    pub shuffle: bool,
    /// Start at this epoch (resuming a run; earlier epochs are not read).
    pub start_epoch: u32,
    /// Start at this index of `start_epoch`'s order (resuming inside an epoch: the parts
    /// before it are not read).
    pub start_index: u64,
    /// Only the utterances of these speakers (empty: every speaker). A subset of a corpus (the
    /// speakers to train on, or a held-out few) without writing another store.
    pub speakers: Vec<SpeakerId>,
    /// Leave out the utterances of these speakers.
    pub exclude_speakers: Vec<SpeakerId>,
    /// Parts fetched ahead (and checked against their BLAKE3) by a thread while the current one
    /// is consumed: memory holds at most this many parts' files more. 0 reads each part when it
    /// is reached. For a store on object storage, where a part's download takes longer than
    /// reading it from disk.
    pub prefetch: usize,
}

/// A speaker id as a spec writes it: `1001` or `"1001"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum SpeakerId {
    Text(String),
    Number(u64),
}

impl SpeakerId {
    pub fn as_string(&self) -> String {
        match self {
            SpeakerId::Text(s) => s.clone(),
            SpeakerId::Number(n) => n.to_string(),
        }
    }
}

impl ReaderParams {
    /// Whether a row of `speaker` passes the speaker filter; `None` when nothing is filtered.
    pub fn speaker_filter(&self) -> Option<SpeakerFilter> {
        if self.speakers.is_empty() && self.exclude_speakers.is_empty() {
            return None;
        }
        Some(SpeakerFilter {
            only: self.speakers.iter().map(SpeakerId::as_string).collect(),
            except: self
                .exclude_speakers
                .iter()
                .map(SpeakerId::as_string)
                .collect(),
        })
    }
}

/// The speakers a reader keeps (`speakers`) and leaves out (`exclude_speakers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerFilter {
    pub only: std::collections::BTreeSet<String>,
    pub except: std::collections::BTreeSet<String>,
}

impl SpeakerFilter {
    /// An utterance without a speaker passes only an `exclude_speakers`-only filter.
    pub fn keeps(&self, speaker: Option<&str>) -> bool {
        match speaker {
            Some(s) => (self.only.is_empty() || self.only.contains(s)) && !self.except.contains(s),
            None => self.only.is_empty(),
        }
    }
}

impl Default for ReaderParams {
    fn default() -> Self {
        ReaderParams {
            dir: PathBuf::new(),
            epochs: 1,
            shuffle: false,
            start_epoch: 0,
            start_index: 0,
            speakers: Vec::new(),
            exclude_speakers: Vec::new(),
            prefetch: 2,
        }
    }
}

impl Params for ReaderParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.dir.as_os_str().is_empty() {
            e.push(ParamError::new(
                "dir",
                "required: a store directory (shards.write, features.write)",
            ));
        }
        if let Some(m) = pipeline::storage::unsupported_url(&self.dir) {
            e.push(ParamError::new("dir", m));
        }
        if self.epochs == 0 {
            e.push(ParamError::new("epochs", "must be at least 1"));
        }
        if self.prefetch > 64 {
            e.push(ParamError::new(
                "prefetch",
                format!("at most 64 parts ahead, got {}", self.prefetch),
            ));
        }
        if self.start_epoch >= self.epochs.max(1) {
            e.push(ParamError::new(
                "start_epoch",
                format!(
                    "must be below epochs ({}), got {}",
                    self.epochs, self.start_epoch
                ),
            ));
        }
        e
    }
}

/// One part of a store as its index lists it: the file, its rows, and the size and BLAKE3 it
/// was written with (checked when the part is opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
    /// Absent only in an index that recorded none (then the size alone is checked).
    pub blake3: Option<String>,
}

impl Part {
    /// Checks the part's bytes against the index: a part that changed since it was written (a
    /// flipped bit, a truncation, another file copied over it) is an error naming the file,
    /// never data.
    pub fn verify_bytes(&self, bytes: &[u8]) -> crate::Result<()> {
        if bytes.len() as u64 != self.bytes {
            return Err(crate::Error::damaged(
                &self.path,
                format!(
                    "{} bytes, the index says {}: the file changed after it was written",
                    bytes.len(),
                    self.bytes
                ),
            ));
        }
        let Some(want) = &self.blake3 else {
            return Ok(());
        };
        let got = blake3::hash(bytes).to_hex();
        if !got.as_str().eq_ignore_ascii_case(want) {
            return Err(crate::Error::damaged(
                &self.path,
                format!(
                    "BLAKE3 {}, the index says {}: the file changed after it was written",
                    got, want
                ),
            ));
        }
        Ok(())
    }
    /// Reads the part (a file or an object) and checks it against the index.
    pub fn fetch(&self) -> crate::Result<bytes::Bytes> {
        let b = pipeline::storage::read(&self.path)
            .map_err(crate::Error::io("cannot read", &self.path))?;
        self.verify_bytes(&b)?;
        Ok(b)
    }
    /// Reads the part and checks it (the bytes are dropped).
    pub fn verify(&self) -> crate::Result<()> {
        self.fetch().map(|_| ())
    }
}

/// A store read back by [`ReadStage`].
pub trait PartSource: Send + Sync + 'static {
    /// What one row becomes.
    type Item: Clone + Send + 'static;
    const KIND: &'static str;
    const DOC: &'static str;
    /// The output port's description.
    const OUT_DOC: &'static str;
    /// What the progress line counts (`shards`, `parts`).
    const UNIT: &'static str;
    /// The parts of a finished store as its index lists them, or why it cannot be read.
    fn parts(dir: &Path) -> crate::Result<Vec<Part>>;
    /// The rows of one part (its file's bytes; `path` for messages), in stored order, as items
    /// of `epoch`.
    fn decode(bytes: bytes::Bytes, path: &Path, epoch: u32) -> crate::Result<Vec<Self::Item>>;
    /// The speaker of an item (for `speakers` / `exclude_speakers`).
    fn speaker(item: &Self::Item) -> Option<&str>;
}

/// Streams a store's rows for `epochs` passes in [`epoch_order`], one part in memory at a
/// time; when the plan resumes a training run, it starts at the student's data position.
pub struct ReadStage<S> {
    reader: EpochReader,
    /// The start came from the student's checkpoint (said when the stage runs).
    resumed: bool,
    _source: PhantomData<fn() -> S>,
}

impl<S: PartSource> StageDef for ReadStage<S> {
    type Params = ReaderParams;
    const KIND: &'static str = S::KIND;
    const DOC: &'static str = S::DOC;
    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<S::Item>("out", S::OUT_DOC)]
    }
    fn paths(p: &ReaderParams, _ctx: &StageContext) -> pipeline::StagePaths {
        pipeline::StagePaths {
            reads: vec![p.dir.clone()],
            writes: vec![],
            stores: vec![p.dir.clone()],
        }
    }
    fn link(_: &ReaderParams, _: &StageContext, linker: &mut Linker) -> Vec<ParamError> {
        linker.read(&READER_START);
        Vec::new()
    }
    fn validate(p: &ReaderParams, _ctx: &StageContext) -> Vec<ParamError> {
        let mut e = match S::parts(&p.dir) {
            Ok(_) => vec![],
            Err(e) => vec![ParamError::new("dir", e.to_string())],
        };
        if let Some(f) = p.speaker_filter() {
            if let Some(s) = f.only.intersection(&f.except).next() {
                e.push(ParamError::new(
                    "exclude_speakers",
                    format!("speaker {s} is both kept (speakers) and left out"),
                ));
            }
        }
        e
    }
    fn create(p: &ReaderParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        let parts = S::parts(&p.dir)?;
        let start = reader_start(ctx, p.epochs);
        let (start_epoch, start_index) = start.unwrap_or((p.start_epoch, p.start_index));
        let reader = EpochReader {
            seed: ctx.seed,
            epochs: p.epochs,
            shuffle: p.shuffle,
            start_epoch,
            start_index,
            parts,
            filter: p.speaker_filter(),
            split: crate::dist::stream_split(ctx),
            prefetch: p.prefetch,
        };
        Ok(ReadStage {
            reader,
            resumed: start.is_some(),
            _source: PhantomData,
        })
    }
}

impl<S: PartSource> Stage for ReadStage<S> {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        if self.resumed {
            let (epoch, index) = (self.reader.start_epoch, self.reader.start_index);
            io.note(format!(
                "resuming the data stream at epoch {epoch}, utterance {index} (the student's checkpoint)"
            ));
        }
        let filter = self.reader.filter.clone();
        let passed = self.reader.run(
            io,
            S::UNIT,
            |part| Ok(part.fetch()?),
            |part, bytes, epoch| Ok(S::decode(bytes, &part.path, epoch)?),
            |item| filter.as_ref().is_none_or(|f| f.keeps(S::speaker(item))),
        )?;
        if self.reader.filter.is_some() && passed == 0 {
            return Err(StageError::failed(
                "no utterance of the store is of the speakers asked for (speakers / exclude_speakers)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod split_tests {
    #[test]
    fn ours_counts_a_ranks_indices() {
        for w in 1..5usize {
            for r in 0..w {
                for lo in 0..12u64 {
                    for hi in lo..20u64 {
                        let want = (lo..hi).filter(|x| x % w as u64 == r as u64).count() as u64;
                        assert_eq!(super::ours(lo, hi, r, w), want, "{lo}..{hi} r{r} w{w}");
                    }
                }
            }
        }
    }
}

/// Streams the rows of a part directory for `epochs` passes in [`epoch_order`], one part in
/// memory at a time; parts wholly before the start are not opened.
pub struct EpochReader {
    pub seed: u64,
    pub epochs: u32,
    pub shuffle: bool,
    pub start_epoch: u32,
    pub start_index: u64,
    /// Each part as the index lists it.
    pub parts: Vec<Part>,
    /// The speakers kept. Positions (`start_index`) then count the rows that pass it, and a
    /// resume reads the parts before its start to count them.
    pub filter: Option<SpeakerFilter>,
    /// Data parallel `(rank, world)`: only the rows whose index in the epoch's order (among the
    /// rows the filter keeps) is `rank` modulo `world`; positions (`start_index`) count this
    /// rank's rows.
    pub split: Option<(usize, usize)>,
    /// Parts fetched ahead by a thread (0: none).
    pub prefetch: usize,
}

/// Of the indices `lo..hi`, how many are `rank` modulo `world`.
fn ours(lo: u64, hi: u64, rank: usize, world: usize) -> u64 {
    let (r, w) = (rank as u64, world.max(1) as u64);
    let below = |n: u64| if n > r { (n - r).div_ceil(w) } else { 0 };
    below(hi) - below(lo)
}

impl EpochReader {
    /// The parts of `epoch` that [`EpochReader::run`] opens, in order: those wholly before the
    /// start are not (without a speaker filter, whose kept rows are not known before reading).
    fn opened(&self, epoch: u32, rows: &[u64]) -> Vec<usize> {
        let (rank, world) = self.split.unwrap_or((0, 1));
        let mut skip = if epoch == self.start_epoch {
            self.start_index
        } else {
            0
        };
        let mut g = 0u64;
        let mut out = Vec::new();
        for (k, perm) in epoch_order(self.seed, epoch, rows, self.shuffle) {
            let n = perm.len() as u64;
            let mine = ours(g, g + n, rank, world);
            g += n;
            if self.filter.is_none() && skip >= mine {
                skip -= mine;
                continue;
            }
            skip -= skip.min(mine);
            out.push(k);
        }
        out
    }

    /// Sends every row that `keep` passes on output 0. `fetch` reads one part's bytes (and
    /// checks them), on a thread `prefetch` parts ahead when `prefetch` > 0; `decode` makes its
    /// rows (in stored order) for an epoch; `unit` names the parts in the progress line.
    /// Returns the rows sent.
    pub fn run<T: Send + 'static>(
        &self,
        io: &mut StageIo,
        unit: &str,
        fetch: impl Fn(&Part) -> Result<bytes::Bytes, StageError> + Sync,
        decode: impl Fn(&Part, bytes::Bytes, u32) -> Result<Vec<T>, StageError>,
        keep: impl Fn(&T) -> bool,
    ) -> Result<u64, StageError> {
        if self.prefetch == 0 {
            return self.run_with(io, unit, &mut |k| fetch(&self.parts[k]), &decode, &keep);
        }
        let rows: Vec<u64> = self.parts.iter().map(|p| p.rows).collect();
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<bytes::Bytes, StageError>)>(
            self.prefetch - 1,
        );
        std::thread::scope(|scope| {
            let fetch = &fetch;
            let rows = &rows;
            std::thread::Builder::new()
                .name("prefetch".into())
                .spawn_scoped(scope, move || {
                    for epoch in self.start_epoch..self.epochs {
                        for k in self.opened(epoch, rows) {
                            let r = fetch(&self.parts[k]);
                            let failed = r.is_err();
                            // The reader stopped (an error, the run cancelled): so do we.
                            if tx.send((k, r)).is_err() || failed {
                                return;
                            }
                        }
                    }
                })
                .map_err(|e| {
                    StageError::failed(format!("cannot start the prefetch thread: {e}"))
                })?;
            let mut next = |k: usize| match rx.recv() {
                Ok((got, r)) if got == k => r,
                Ok((got, _)) => Err(StageError::failed(format!(
                    "internal: prefetched part {got} where part {k} comes next"
                ))),
                Err(_) => Err(StageError::failed(
                    "internal: the prefetch thread ended early",
                )),
            };
            let out = self.run_with(io, unit, &mut next, &decode, &keep);
            drop(rx);
            out
        })
    }

    fn run_with<T: Send + 'static>(
        &self,
        io: &mut StageIo,
        unit: &str,
        fetch: &mut dyn FnMut(usize) -> Result<bytes::Bytes, StageError>,
        decode: &dyn Fn(&Part, bytes::Bytes, u32) -> Result<Vec<T>, StageError>,
        keep: &dyn Fn(&T) -> bool,
    ) -> Result<u64, StageError> {
        let rows: Vec<u64> = self.parts.iter().map(|p| p.rows).collect();
        let filtered = self.filter.is_some();
        let mut sent = 0u64;
        io.progress().set_length(
            self.parts.len() as u64 * (self.epochs - self.start_epoch) as u64,
            unit,
        );
        let (rank, world) = self.split.unwrap_or((0, 1));
        for epoch in self.start_epoch..self.epochs {
            let mut skip = if epoch == self.start_epoch {
                self.start_index
            } else {
                0
            };
            // Index of the next kept row in the epoch's order (over every rank).
            let mut g = 0u64;
            for (k, perm) in epoch_order(self.seed, epoch, &rows, self.shuffle) {
                let mine = ours(g, g + perm.len() as u64, rank, world);
                if !filtered && skip >= mine {
                    // Resuming: this whole part lies before the start; not even opened.
                    skip -= mine;
                    g += perm.len() as u64;
                    io.progress().inc(1);
                    continue;
                }
                let part = &self.parts[k];
                let path = &part.path;
                let items = decode(part, fetch(k)?, epoch)?;
                if items.len() != perm.len() {
                    return Err(StageError::failed(format!(
                        "{}: {} rows, the index says {}",
                        path.display(),
                        items.len(),
                        perm.len()
                    )));
                }
                let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
                for &r in &perm {
                    let Some(u) = slots[r].take() else { continue };
                    if !keep(&u) {
                        continue;
                    }
                    g += 1;
                    if (g - 1) % world as u64 != rank as u64 {
                        continue;
                    }
                    if skip > 0 {
                        skip -= 1;
                        continue;
                    }
                    io.send(0, u)?;
                    sent += 1;
                }
                io.progress().inc(1);
            }
        }
        Ok(sent)
    }
}
