//! `log.tensorboard`: the step records as TensorBoard scalars, for watching a run while it
//! trains (`tensorboard --logdir runs/`). The Arrow `steps` table stays the record to query; this
//! is a live view beside it.
//!
//! Format: TensorBoard's own event files, `<run_dir>/<dir>/events.out.tfevents.<unix time>.<host>`.
//! Each is a sequence of TFRecords (u64 LE length, u32 LE masked CRC32C of the length bytes, the
//! data, u32 LE masked CRC32C of the data) holding serialized `Event` protobufs: first one with
//! `file_version: "brain.Event:2"`, then one per logged update with a `Summary` of
//! `{tag, simple_value}` pairs (f32). Each point is written with one `write` call as it comes, so a
//! reader sees it at once; the file is synced at the end.
//!
//! Tags (see [`TAGS`]): `train/*` from the record's fields under their `steps` table names, and
//! `perf/*`, the throughput. `train/pred_std`, `train/rank_agreement` and
//! `train/teacher_rank_agreement` are left out of a point where they are not finite (undefined:
//! α = 0, or no pair of distinct losses), as the `steps` table stores NULL for them; every other
//! value is written as it is (TensorBoard shows a NaN as a gap). `perf/updates_per_s` and
//! `perf/audio_s_per_s` are measured on this stage's wall clock between two written points
//! (updates received and the `audio_s` they carry, over the seconds between them), so they
//! include every wait of the pipeline; the first point of an attempt has none. The student
//! computes no gradient norm, so there is no tag for it (nor WER/CER: no fine-tuning yet).
//!
//! Resume: a resumed run restarts at its last checkpoint, so steps the earlier attempt had
//! already logged come again. Before writing, the stage reads every event file in its directory
//! (complete records only: a record cut short by a crash, or one whose CRC fails, ends the scan of
//! that file, as it ends TensorBoard's reading) and from then on skips every record whose step is
//! at most the last step found: the earlier attempt's values are kept for those steps. On CPU a
//! resumed run repeats them exactly (tested), so nothing is lost. New points go to a new file;
//! the files of earlier attempts are never modified. So each step appears once across files, and
//! steps only grow from one file to the next, which TensorBoard needs to draw one curve.

use crate::items::StepRecord;
use crate::logs::table::{RecordSink, RESERVED};
use pipeline::{
    Linker, ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo,
};
use prost::Message;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The `file_version` of the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";
/// Event files are named `events.out.tfevents.<unix seconds>.<host>`.
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// Every tag a point may carry, with what it shows.
pub const TAGS: [(&str, &str); 15] = [
    ("train/loss", "the joint loss L as optimised"),
    ("train/loss_rec", "L_rec, the masked reconstruction loss"),
    (
        "train/loss_aux",
        "L_aux, the loss predictor's loss, as normalised in L",
    ),
    ("train/lr", "the learning rate of this update"),
    ("train/tau", "the EMA decay τ applied after this update"),
    (
        "train/hard_ratio",
        "r, the share of spans started at hard frames",
    ),
    ("train/masked_frac", "the share of frames masked"),
    (
        "train/grad_norm",
        "the global L2 norm of the update's gradients, before the optimiser step",
    ),
    (
        "train/rank_agreement",
        "the student predictor's rank agreement with the losses",
    ),
    (
        "train/teacher_rank_agreement",
        "the teacher's rank agreement with the losses",
    ),
    (
        "train/target_std",
        "mean per-channel std of the targets (collapse watch)",
    ),
    (
        "train/pred_std",
        "mean per-channel std of the reconstructions",
    ),
    ("perf/step_ms", "the student's compute time of this update"),
    (
        "perf/updates_per_s",
        "updates per wall-clock second since the previous point",
    ),
    (
        "perf/audio_s_per_s",
        "seconds of audio trained on per wall-clock second, likewise",
    ),
];

// ---------------------------------------------------------------------------------------------
// The protobuf messages (tensorflow/core/util/event.proto, framework/summary.proto): the fields
// scalars need, with their numbers.

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "EventWhat", tags = "3, 5")]
    pub what: Option<EventWhat>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum EventWhat {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`; `simple_value` sits in a oneof, so a 0.0 is still written (a
/// reader asks `HasField`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "ValueKind", tags = "2")]
    pub value: Option<ValueKind>,
}

/// `Summary.Value.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

// ---------------------------------------------------------------------------------------------
// TFRecord framing

/// TFRecord's masked CRC32C: the CRC rotated right by 15 bits plus a constant, so that a CRC of
/// data that itself holds CRCs stays well distributed.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends `data` to `out` as one TFRecord.
pub fn frame_record(data: &[u8], out: &mut Vec<u8>) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// How a sequence of TFRecords ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// At a record boundary.
    Clean,
    /// Inside a record (a crash mid-write): the bytes from `offset` on were left out.
    Truncated { offset: u64 },
    /// At a record whose length or data fails its CRC; it and what follows were left out.
    Corrupt { offset: u64 },
}

/// The complete, CRC-checked records of `bytes`, up to the first incomplete or damaged one.
pub fn read_records(bytes: &[u8]) -> (Vec<&[u8]>, Tail) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    while pos < bytes.len() {
        let offset = pos as u64;
        if bytes.len() - pos < 12 {
            return (out, Tail::Truncated { offset });
        }
        let len_bytes = &bytes[pos..pos + 8];
        if masked_crc(len_bytes) != u32_at(pos + 8) {
            return (out, Tail::Corrupt { offset });
        }
        let mut le = [0u8; 8];
        le.copy_from_slice(len_bytes);
        let len = u64::from_le_bytes(le);
        let start = pos + 12;
        let room = (bytes.len() - start) as u64;
        if room < 4 || len > room - 4 {
            return (out, Tail::Truncated { offset });
        }
        let end = start + len as usize;
        let data = &bytes[start..end];
        if masked_crc(data) != u32_at(end) {
            return (out, Tail::Corrupt { offset });
        }
        out.push(data);
        pos = end + 4;
    }
    (out, Tail::Clean)
}

/// The events of one event file, up to its first incomplete or damaged record.
pub fn read_events(path: &Path) -> Result<(Vec<Event>, Tail), StageError> {
    let bytes = std::fs::read(path)
        .map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
    let (records, mut tail) = read_records(&bytes);
    let mut events = Vec::with_capacity(records.len());
    let mut offset = 0u64;
    for r in records {
        match Event::decode(r) {
            Ok(e) => events.push(e),
            Err(_) => {
                // A record with good CRCs that is no Event: not ours; stop as at damage.
                tail = Tail::Corrupt { offset };
                break;
            }
        }
        offset += r.len() as u64 + 16;
    }
    Ok((events, tail))
}

/// The event files of `dir` (every file TensorBoard would read: `tfevents` in the name), in name
/// order; empty if `dir` does not exist.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>, StageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StageError::io(format!("cannot list {}", dir.display()), e)),
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tfevents"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Every `(tag, step, value)` of the scalar events in `dir`'s event files, file by file (what a
/// reader of the directory sees; damaged tails left out).
pub fn read_scalars(dir: &Path) -> Result<Vec<(String, i64, f32)>, StageError> {
    let mut out = Vec::new();
    for f in event_files(dir)? {
        for e in read_events(&f)?.0 {
            if let Some(EventWhat::Summary(s)) = e.what {
                for v in s.value {
                    if let Some(ValueKind::SimpleValue(x)) = v.value {
                        out.push((v.tag, e.step, x));
                    }
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// log.tensorboard

/// Parameters of `log.tensorboard`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TensorBoardParams {
    /// Write a point at every step divisible by this; 1 writes every update.
    pub every: u64,
    /// Directory of the event files, relative to the run directory (`tensorboard --logdir runs/`
    /// finds it there).
    pub dir: String,
}

impl Default for TensorBoardParams {
    fn default() -> Self {
        TensorBoardParams {
            every: 1,
            dir: "tensorboard".into(),
        }
    }
}

impl Params for TensorBoardParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.every == 0 {
            e.push(ParamError::new("every", "must be at least 1"));
        }
        let path = Path::new(&self.dir);
        let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
        if self.dir.is_empty() || !normal {
            e.push(ParamError::new(
                "dir",
                format!(
                    "`{}` is not a directory inside the run directory (a relative path without `..`)",
                    self.dir
                ),
            ));
        } else if let Some(first) = path.components().next() {
            let first = first.as_os_str().to_string_lossy();
            if RESERVED.contains(&first.as_ref()) {
                e.push(ParamError::new(
                    "dir",
                    format!(
                        "`{first}` holds another part of the run directory; choose another `dir`"
                    ),
                ));
            }
        }
        e
    }
}

/// What a `log.tensorboard` writer did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorBoardSummary {
    /// Points (events with a summary) written by this attempt.
    pub points: u64,
    /// Records skipped because an earlier attempt had logged their step.
    pub skipped: u64,
    pub bytes: u64,
    /// The file this attempt wrote, if it wrote any.
    pub file: Option<PathBuf>,
}

struct OpenFile {
    path: PathBuf,
    file: File,
}

/// Throughput between two written points, on this stage's clock.
#[derive(Default)]
struct Meter {
    since: Option<Instant>,
    updates: u64,
    audio_s: f64,
}

/// The `log.tensorboard` logic without the engine.
pub struct TensorBoardLog {
    dir: PathBuf,
    every: u64,
    prepared: bool,
    /// The last step in the directory's event files (earlier attempts, then this one).
    last: Option<u64>,
    open: Option<OpenFile>,
    meter: Meter,
    buf: Vec<u8>,
    summary: TensorBoardSummary,
    notes: Vec<String>,
}

impl TensorBoardLog {
    /// A writer into `run_dir/<dir>`; nothing is read or created before the first record.
    pub fn new(p: &TensorBoardParams, run_dir: &Path) -> TensorBoardLog {
        TensorBoardLog {
            dir: run_dir.join(&p.dir),
            every: p.every.max(1),
            prepared: false,
            last: None,
            open: None,
            meter: Meter::default(),
            buf: Vec::with_capacity(1024),
            summary: TensorBoardSummary::default(),
            notes: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Logs `r` if its step is due and not logged before.
    pub fn write(&mut self, r: &StepRecord) -> Result<(), StageError> {
        if !self.prepared {
            self.prepare()?;
            self.prepared = true;
        }
        let now = Instant::now();
        let rates = match self.meter.since {
            None => {
                self.meter.since = Some(now);
                None
            }
            Some(since) => {
                self.meter.updates += 1;
                self.meter.audio_s += r.audio_s;
                let secs = now.duration_since(since).as_secs_f64();
                (secs > 0.0).then(|| (self.meter.updates as f64 / secs, self.meter.audio_s / secs))
            }
        };
        if !r.step.is_multiple_of(self.every) {
            return Ok(());
        }
        if self.last.is_some_and(|l| r.step <= l) {
            self.summary.skipped += 1;
            return Ok(());
        }
        self.meter = Meter {
            since: Some(now),
            ..Meter::default()
        };
        let mut values = scalars(r);
        if let Some((ups, aps)) = rates {
            values.push(("perf/updates_per_s", ups));
            values.push(("perf/audio_s_per_s", aps));
        }
        let event = Event {
            wall_time: wall_time(),
            step: r.step as i64,
            what: Some(EventWhat::Summary(Summary {
                value: values
                    .into_iter()
                    .map(|(tag, v)| SummaryValue {
                        tag: tag.to_string(),
                        value: Some(ValueKind::SimpleValue(v as f32)),
                    })
                    .collect(),
            })),
        };
        self.append(&event)?;
        self.summary.points += 1;
        self.last = Some(r.step);
        Ok(())
    }

    /// Syncs the file this attempt wrote and reports what was written.
    pub fn finish(&mut self) -> Result<TensorBoardSummary, StageError> {
        if let Some(o) = &self.open {
            o.file
                .sync_all()
                .map_err(|e| StageError::io(format!("cannot write {}", o.path.display()), e))?;
        }
        if self.summary.skipped > 0 {
            self.notes.push(format!(
                "{} records skipped: an earlier attempt had logged their steps in {}",
                self.summary.skipped,
                self.dir.display()
            ));
        }
        Ok(self.summary.clone())
    }

    /// The notes gathered since the last call.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// Reads the event files already in the directory: the last step they hold.
    fn prepare(&mut self) -> Result<(), StageError> {
        for path in event_files(&self.dir)? {
            let (events, tail) = read_events(&path)?;
            let last = events
                .iter()
                .filter(|e| matches!(e.what, Some(EventWhat::Summary(_))))
                .map(|e| e.step.max(0) as u64)
                .max();
            if let Some(l) = last {
                self.last = Some(self.last.map_or(l, |m| m.max(l)));
            }
            match tail {
                Tail::Clean => {}
                Tail::Truncated { offset } => self.notes.push(format!(
                    "{} ends in a record cut short at byte {offset} (a crash mid-write); TensorBoard skips it, and so does this stage",
                    path.display()
                )),
                Tail::Corrupt { offset } => self.notes.push(format!(
                    "warning: {} is damaged at byte {offset}; TensorBoard reads it only up to there, and so does this stage",
                    path.display()
                )),
            }
        }
        if let Some(l) = self.last {
            self.notes.push(format!(
                "event files in {} hold steps up to {l}: records up to that step are skipped (the earlier values stay), later ones go to a new file",
                self.dir.display()
            ));
        }
        Ok(())
    }

    /// Writes `event` as one record, opening this attempt's file first if needed.
    fn append(&mut self, event: &Event) -> Result<(), StageError> {
        if self.open.is_none() {
            self.open = Some(self.create_file()?);
        }
        self.buf.clear();
        frame_record(&event.encode_to_vec(), &mut self.buf);
        let Some(o) = self.open.as_mut() else {
            return Ok(());
        };
        o.file
            .write_all(&self.buf)
            .map_err(|e| StageError::io(format!("cannot write {}", o.path.display()), e))?;
        self.summary.bytes += self.buf.len() as u64;
        Ok(())
    }

    /// A new event file named by the time and host (a later second if the name is taken), with
    /// its `file_version` event.
    fn create_file(&mut self) -> Result<OpenFile, StageError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| StageError::io(format!("cannot create {}", self.dir.display()), e))?;
        let host = hostname();
        let mut secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (path, file) = loop {
            let path = self.dir.join(format!("{FILE_PREFIX}{secs}.{host}"));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => secs += 1,
                Err(e) => {
                    return Err(StageError::io(
                        format!("cannot create {}", path.display()),
                        e,
                    ))
                }
            }
        };
        let mut open = OpenFile { path, file };
        let version = Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(EventWhat::FileVersion(FILE_VERSION.into())),
        };
        let mut buf = Vec::new();
        frame_record(&version.encode_to_vec(), &mut buf);
        open.file
            .write_all(&buf)
            .map_err(|e| StageError::io(format!("cannot write {}", open.path.display()), e))?;
        self.summary.bytes += buf.len() as u64;
        self.summary.file = Some(open.path.clone());
        Ok(open)
    }
}

/// The `train/*` and `perf/step_ms` values of a record (see the module doc for what is left out).
fn scalars(r: &StepRecord) -> Vec<(&'static str, f64)> {
    let mut v = vec![
        ("train/loss", r.loss),
        ("train/loss_rec", r.loss_rec),
        ("train/loss_aux", r.loss_aux),
        ("train/lr", r.lr),
        ("train/tau", r.tau),
        ("train/hard_ratio", r.hard_ratio),
        ("train/masked_frac", r.masked_frac),
    ];
    for (tag, x) in [
        ("train/rank_agreement", r.rank_agreement),
        ("train/teacher_rank_agreement", r.teacher_rank_agreement),
    ] {
        if x.is_finite() {
            v.push((tag, x));
        }
    }
    v.push(("train/target_std", r.target_std));
    if r.pred_std.is_finite() {
        v.push(("train/pred_std", r.pred_std));
    }
    v.push(("train/grad_norm", r.grad_norm));
    v.push(("perf/step_ms", r.step_ms));
    v
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name for the file name (letters, digits, `-`, `_` and `.` kept).
fn hostname() -> String {
    let raw = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// The `log.tensorboard` stage.
pub struct LogTensorBoard {
    log: TensorBoardLog,
}

impl StageDef for LogTensorBoard {
    type Params = TensorBoardParams;
    const KIND: &'static str = "log.tensorboard";
    const DOC: &'static str = "Writes the step records as TensorBoard scalars (losses, lr, EMA decay, masking, health,\nthroughput) to <run_dir>/tensorboard/events.out.tfevents.<time>.<host>, each point as it comes,\nfor `tensorboard --logdir runs/`; a resume writes a new file and no step twice.";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<StepRecord>(
            "in",
            "step records (student.steps)",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn link(p: &TensorBoardParams, _: &StageContext, linker: &mut Linker) -> Vec<ParamError> {
        // The same namespace as the log tables: no two stages write into one directory.
        crate::logs::table::claim_tables(linker, &[("dir", p.dir.as_str())])
    }
    fn create(
        p: &TensorBoardParams,
        ctx: &StageContext,
        _worker: usize,
    ) -> Result<Self, StageError> {
        Ok(LogTensorBoard {
            log: TensorBoardLog::new(p, &ctx.run_dir),
        })
    }
}

impl RecordSink<StepRecord> for TensorBoardLog {
    fn write(&mut self, r: &StepRecord) -> Result<(), StageError> {
        TensorBoardLog::write(self, r)
    }
    fn take_notes(&mut self) -> Vec<String> {
        TensorBoardLog::take_notes(self)
    }
}

impl Stage for LogTensorBoard {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let result = crate::logs::table::drain::<StepRecord>(io, &mut self.log);
        if matches!(result, Ok(()) | Err(StageError::Cancelled)) {
            let s = self.log.finish()?;
            for n in self.log.take_notes() {
                io.note(n);
            }
            io.count("tensorboard_points", s.points);
            if let Some(f) = &s.file {
                io.note(format!("{} points in {}", s.points, f.display()));
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            epoch: 0,
            lr: 1e-3,
            loss: 10.0 / (1.0 + step as f64),
            loss_rec: 1.0,
            loss_aux: 0.0,
            tau: 0.99,
            hard_ratio: step as f64 / 100.0,
            masked_frac: 0.4,
            frames: 100,
            utterances: 2,
            audio_s: 2.0,
            step_ms: 10.0,
            target_std: 1.0,
            pred_std: f64::NAN,
            rank_agreement: f64::NAN,
            teacher_rank_agreement: 0.5,
            grad_norm: 0.5,
            teacher_version: step,
            checkpoint_follows: false,
        }
    }

    #[test]
    fn masked_crc_matches_the_known_value() {
        // CRC32C("123456789") = 0xE3069283 (the check value of CRC-32/ISCSI). Rotated right by
        // 15: (0xE3069283 >> 15) | (0xE3069283 << 17) = 0x0001C60D | 0x25060000 = 0x2507C60D;
        // plus 0xA282EAD8 = 0xC78AB0E5 (mod 2^32), what TensorBoard's own masked_crc32c gives.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
        assert_eq!(masked_crc(&5u64.to_le_bytes()), 0x3E04_B2EA);
    }

    #[test]
    fn records_round_trip_and_a_cut_or_damaged_tail_is_left_out() {
        let payloads: Vec<Vec<u8>> = vec![b"".to_vec(), b"a".to_vec(), vec![7u8; 300]];
        let mut bytes = Vec::new();
        for p in &payloads {
            frame_record(p, &mut bytes);
        }
        assert_eq!(bytes.len(), 3 * 16 + 301);
        let (got, tail) = read_records(&bytes);
        assert_eq!(tail, Tail::Clean);
        assert_eq!(got, payloads.iter().map(Vec::as_slice).collect::<Vec<_>>());
        // Cut anywhere inside the last record: the first two stay.
        let last_start = bytes.len() - (16 + 300);
        for cut in [
            last_start + 1,
            last_start + 8,
            last_start + 12,
            bytes.len() - 1,
        ] {
            let (got, tail) = read_records(&bytes[..cut]);
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(
                tail,
                Tail::Truncated {
                    offset: last_start as u64
                }
            );
        }
        // A flipped bit in the data or the length: the CRC catches it.
        for at in [last_start + 20, last_start + 2] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            let (got, tail) = read_records(&bad);
            assert_eq!(got.len(), 2);
            assert_eq!(
                tail,
                Tail::Corrupt {
                    offset: last_start as u64
                }
            );
        }
    }

    #[test]
    fn events_carry_the_version_first_and_every_value_even_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = TensorBoardLog::new(&TensorBoardParams::default(), tmp.path());
        for s in 0..3 {
            log.write(&record(s)).unwrap();
        }
        let sum = log.finish().unwrap();
        assert_eq!((sum.points, sum.skipped), (3, 0));
        let files = event_files(&tmp.path().join("tensorboard")).unwrap();
        assert_eq!(files.len(), 1);
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(FILE_PREFIX), "{name}");
        let (events, tail) = read_events(&files[0]).unwrap();
        assert_eq!(tail, Tail::Clean);
        assert_eq!(
            events[0].what,
            Some(EventWhat::FileVersion(FILE_VERSION.into()))
        );
        assert_eq!(events.len(), 4);
        let scalars = read_scalars(&tmp.path().join("tensorboard")).unwrap();
        let at = |tag: &str, step: i64| {
            scalars
                .iter()
                .find(|(t, s, _)| t == tag && *s == step)
                .map(|x| x.2)
        };
        // 0.0 is written (a oneof field), NaN metrics are left out, rates from the second point.
        assert_eq!(at("train/hard_ratio", 0), Some(0.0));
        assert_eq!(at("train/loss_aux", 2), Some(0.0));
        assert_eq!(at("train/loss", 1), Some(5.0));
        assert_eq!(at("train/rank_agreement", 1), None);
        assert_eq!(at("train/teacher_rank_agreement", 1), Some(0.5));
        assert_eq!(at("perf/updates_per_s", 0), None);
        assert!(at("perf/updates_per_s", 1).is_some_and(|v| v > 0.0));
        for (t, _, _) in &scalars {
            assert!(TAGS.iter().any(|(k, _)| k == t), "{t} not in TAGS");
        }
    }

    #[test]
    fn every_logs_only_steps_divisible_by_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = TensorBoardParams {
            every: 5,
            ..TensorBoardParams::default()
        };
        let mut log = TensorBoardLog::new(&p, tmp.path());
        for s in 0..23 {
            log.write(&record(s)).unwrap();
        }
        log.finish().unwrap();
        let mut steps: Vec<i64> = read_scalars(&tmp.path().join("tensorboard"))
            .unwrap()
            .into_iter()
            .filter(|(t, _, _)| t == "train/loss")
            .map(|x| x.1)
            .collect();
        steps.dedup();
        assert_eq!(steps, vec![0, 5, 10, 15, 20]);
        // Five updates between two points, on a clock that moved.
        let ups = read_scalars(&tmp.path().join("tensorboard"))
            .unwrap()
            .into_iter()
            .filter(|(t, _, _)| t == "perf/audio_s_per_s")
            .count();
        assert_eq!(ups, 4);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let bad = |every: u64, dir: &str| {
            TensorBoardParams {
                every,
                dir: dir.into(),
            }
            .check()
            .into_iter()
            .map(|e| e.field)
            .collect::<Vec<_>>()
        };
        assert!(bad(1, "tensorboard").is_empty());
        assert!(bad(1, "tb/live").is_empty());
        assert_eq!(bad(0, "tensorboard"), vec!["every"]);
        for d in ["", "/tmp/tb", "../tb", "a/../b", "./tb", "checkpoints"] {
            assert_eq!(bad(1, d), vec!["dir"], "{d:?}");
        }
    }
}
