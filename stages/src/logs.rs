//! `log.frames` and `log.steps`: the student's records as Arrow IPC tables in the run directory,
//! for `ehmam query` and `ehmam plot`.
//!
//! Layout: `<run_dir>/steps/part-NNNNNNNNN.arrow` (one row per update), `<run_dir>/frames/…` (one
//! row per logged frame) and `<run_dir>/inputs/…` (the student's input features of the logged
//! frames, for the fbank image in plots). A part holds the rows of at most `rotate_every`
//! consecutive steps, aligned to multiples of it, and is named by the first step it holds.
//!
//! Atomic: a part is written as `part-NNNNNNNNN.arrow.tmp` and renamed when complete (after
//! fsync), and a complete part is never overwritten by a new one, so a crash loses at most the
//! part being written and never leaves a `.arrow` file a reader chokes on. A stop (Ctrl-C, or
//! another stage failing) finishes the open part first.
//!
//! Resume: the first record a sink receives tells where this attempt starts (step `k`, the
//! student's checkpoint). Rows of steps ≥ `k` left by an earlier attempt are *replaced*: parts
//! whose first step is ≥ `k` are deleted and the one part that straddles `k` is rewritten without
//! those rows (atomically), so the tables hold each step once, as an uninterrupted run would.
//! Leftover `*.tmp` files of a crashed attempt are removed.
//!
//! Sampling (`log.frames`): only steps divisible by `every` are logged, and of each such batch
//! only the utterances whose hash of (stage seed, step, utt_id) falls below `utterances`
//! ([`utterance_sampled`]), so a long run's logs stay small and a rerun logs the same frames.

use crate::types::{FrameRecord, StepRecord};
use arrow::array::{Array, ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int64Array, Int64Builder, ListBuilder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::writer::{FileWriter, IpcWriteOptions};
use arrow::ipc::CompressionType;
use arrow::record_batch::RecordBatch;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Written into every part's footer (`ehmam.format`), with `ehmam.first_step` / `ehmam.last_step`.
pub const LOG_FORMAT: &str = "ehmam-log/1";
/// Rows buffered before they go to the open part as one record batch.
const BATCH_ROWS: usize = 32 * 1024;
/// Names a log table may not take: the run directory's other tables.
const RESERVED: [&str; 5] = ["utterances", "rejects", "stages", "checkpoints", "information_schema"];

/// Columns of the `frames` table.
pub fn frames_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("step", DataType::Int64, false),
        Field::new("epoch", DataType::Int32, false),
        Field::new("utt_id", DataType::Utf8, false),
        Field::new("member", DataType::Int32, false),
        Field::new("frame", DataType::Int32, false),
        Field::new("time_s", DataType::Float64, false),
        Field::new("masked", DataType::Boolean, false),
        Field::new("hard", DataType::Boolean, false),
        Field::new("teacher_pred", DataType::Float32, false),
        // NULL when the run trains no loss predictor (α = 0).
        Field::new("student_pred", DataType::Float32, true),
        Field::new("recon_loss", DataType::Float32, true),
        Field::new("hard_ratio", DataType::Float32, false),
    ]))
}

/// Columns of the `inputs` table (`features`: the student's input at that frame).
pub fn inputs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("step", DataType::Int64, false),
        Field::new("utt_id", DataType::Utf8, false),
        Field::new("frame", DataType::Int32, false),
        Field::new("feature_dim", DataType::Int32, false),
        Field::new("features", DataType::List(Arc::new(Field::new("item", DataType::Float32, false))), false),
    ]))
}

/// Columns of the `steps` table: every [`StepRecord`] field, after `run`.
pub fn steps_schema() -> SchemaRef {
    let f64s = ["lr", "loss", "loss_rec", "loss_aux", "tau", "hard_ratio", "masked_frac"];
    let mut fields = vec![Field::new("run", DataType::Utf8, false), Field::new("step", DataType::Int64, false), Field::new("epoch", DataType::Int32, false)];
    fields.extend(f64s.iter().map(|n| Field::new(*n, DataType::Float64, false)));
    fields.push(Field::new("frames", DataType::Int64, false));
    fields.push(Field::new("utterances", DataType::Int64, false));
    for n in ["audio_s", "step_ms", "target_std", "pred_std", "rank_agreement", "teacher_rank_agreement"] {
        // The predictor's metrics are NULL where they do not exist (α = 0: no student predictor;
        // no pair of distinct losses), so avg() over a union of runs stays meaningful.
        let nullable = matches!(n, "pred_std" | "rank_agreement" | "teacher_rank_agreement");
        fields.push(Field::new(n, DataType::Float64, nullable));
    }
    fields.push(Field::new("teacher_version", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

/// Whether `log.frames` keeps utterance `utt_id` of step `step`: BLAKE3 of (seed, step, utt_id)
/// read as a number in [0, 1) is below `fraction`. Deterministic, so reruns log the same frames.
pub fn utterance_sampled(seed: u64, step: u64, utt_id: &str, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&step.to_le_bytes());
    h.update(utt_id.as_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    let x = (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    x < fraction
}

fn check_table_name(field: &str, name: &str) -> Option<ParamError> {
    let ok = !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_') && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Some(ParamError::new(field, format!("`{name}` is not a table name (lower-case letters, digits and `_`, not starting with a digit)")));
    }
    if RESERVED.contains(&name) {
        return Some(ParamError::new(field, format!("`{name}` is another table of the run directory; choose another name")));
    }
    None
}

/// Two log stages of one spec must not write into the same table directory.
fn claim_tables(ctx: &StageContext, tables: &[(&str, &str)]) -> Vec<ParamError> {
    let mut errors = Vec::new();
    let Some(claims) = ctx.shared.get_or_insert::<Mutex<BTreeMap<String, String>>>("logs.tables", Default::default) else {
        return errors;
    };
    let mut claims = claims.lock().unwrap_or_else(|e| e.into_inner());
    for (field, table) in tables {
        match claims.get(*table) {
            Some(other) if other != &ctx.stage => {
                errors.push(ParamError::new(*field, format!("table `{table}` is already written by stage `{other}`; give one of them another `{field}`")));
            }
            _ => {
                claims.insert(table.to_string(), ctx.stage.clone());
            }
        }
    }
    errors
}

/// Compression of the record batches inside a log part (Arrow IPC's own buffer compression,
/// which DataFusion, pyarrow and DuckDB read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogCompression {
    /// zstd (the default: about a quarter of the plain size for frame rows).
    #[default]
    Zstd,
    Lz4,
    None,
}

fn ipc_options(c: LogCompression) -> Result<IpcWriteOptions, ArrowError> {
    let kind = match c {
        LogCompression::Zstd => Some(CompressionType::ZSTD),
        LogCompression::Lz4 => Some(CompressionType::LZ4_FRAME),
        LogCompression::None => None,
    };
    IpcWriteOptions::default().try_with_compression(kind)
}

/// Rows buffered for one table.
pub trait Rows: Send {
    fn len(&self) -> usize;
    /// The buffered rows as one batch; the buffer is left empty.
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError>;
}

/// What a table writer did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableSummary {
    pub parts: u64,
    pub rows: u64,
    pub bytes: u64,
}

struct OpenPart {
    first: u64,
    last: u64,
    tmp: PathBuf,
    path: PathBuf,
    writer: FileWriter<BufWriter<File>>,
}

/// Writes one table as rotated Arrow IPC parts (see the module doc).
pub struct TableWriter<R: Rows> {
    who: String,
    dir: PathBuf,
    schema: SchemaRef,
    rotate_every: u64,
    pub rows: R,
    pending_first: Option<u64>,
    pending_last: u64,
    part: Option<OpenPart>,
    prepared: bool,
    summary: TableSummary,
    /// Buffer compression of the parts written.
    pub compression: LogCompression,
    /// Every step has rows (the `steps` table): on resume, steps missing before the resume
    /// point (rows lost with a part that a crash left unfinished) are reported.
    pub every_step: bool,
}

fn part_name(first: u64) -> String {
    format!("part-{first:09}.arrow")
}

/// The last step a complete part holds (its `ehmam.last_step` metadata); None if unreadable.
fn part_last_step(path: &Path) -> Option<u64> {
    let reader = arrow::ipc::reader::FileReader::try_new(File::open(path).ok()?, None).ok()?;
    reader.custom_metadata().get("ehmam.last_step").and_then(|v| v.parse::<u64>().ok())
}

/// Complete parts of a table directory, by first step.
pub fn list_parts(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StageError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StageError::io(format!("cannot list {}", dir.display()), e)),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(first) = name.strip_prefix("part-").and_then(|n| n.strip_suffix(".arrow")).and_then(|n| n.parse::<u64>().ok()) {
            out.push((first, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn ioe(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> StageError {
    let ctx = format!("cannot {what} {}", path.display());
    move |e| StageError::io(ctx, e)
}

fn arrow_err(path: &Path) -> impl FnOnce(ArrowError) -> StageError {
    let p = path.display().to_string();
    move |e| StageError::failed(format!("{p}: {e}"))
}

/// Writes `batches` to `path` via a temporary file; `replace` allows an existing file to go.
fn write_part_file(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], meta: &[(&str, String)], replace: bool, compression: LogCompression) -> Result<u64, StageError> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let file = File::create(&tmp).map_err(ioe(&tmp, "create"))?;
    let opts = ipc_options(compression).map_err(arrow_err(&tmp))?;
    let mut w = FileWriter::try_new_with_options(BufWriter::new(file), schema, opts).map_err(arrow_err(&tmp))?;
    for b in batches {
        w.write(b).map_err(arrow_err(&tmp))?;
    }
    for (k, v) in meta {
        w.write_metadata(*k, v.clone());
    }
    w.finish().map_err(arrow_err(&tmp))?;
    let buf = w.into_inner().map_err(arrow_err(&tmp))?;
    let file = buf.into_inner().map_err(|e| StageError::io(format!("cannot write {}", tmp.display()), e.into_error()))?;
    file.sync_all().map_err(ioe(&tmp, "write"))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    publish(&tmp, path, replace)?;
    Ok(bytes)
}

/// Renames a finished temporary file to its final name; never over a complete part unless
/// `replace`.
fn publish(tmp: &Path, path: &Path, replace: bool) -> Result<(), StageError> {
    if !replace && path.exists() {
        let _ = std::fs::remove_file(tmp);
        return Err(StageError::failed(format!("{} exists already: refusing to overwrite a complete log part", path.display())));
    }
    std::fs::rename(tmp, path).map_err(ioe(path, "write"))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl<R: Rows> TableWriter<R> {
    /// A writer into `dir`; nothing is touched there before the first step arrives.
    pub fn new(who: &str, dir: PathBuf, schema: SchemaRef, rotate_every: u64, rows: R) -> Self {
        TableWriter {
            who: who.to_string(),
            dir,
            schema,
            rotate_every: rotate_every.max(1),
            rows,
            pending_first: None,
            pending_last: 0,
            part: None,
            prepared: false,
            summary: TableSummary::default(),
            compression: LogCompression::default(),
            every_step: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn window_end(&self, first: u64) -> u64 {
        (first / self.rotate_every).saturating_add(1).saturating_mul(self.rotate_every)
    }

    /// Call before adding the rows of `step`: the first call prepares the directory (resume), a
    /// step past the open part's window closes it.
    pub fn start_step(&mut self, step: u64) -> Result<(), StageError> {
        if !self.prepared {
            self.prepare(step)?;
            self.prepared = true;
        }
        let first = self.part.as_ref().map(|p| p.first).or(self.pending_first);
        if let Some(first) = first {
            if step >= self.window_end(first) {
                self.close()?;
            }
        }
        Ok(())
    }

    /// Call after adding the rows of `step`.
    pub fn end_step(&mut self, step: u64) -> Result<(), StageError> {
        if self.rows.len() > 0 {
            self.pending_first.get_or_insert(step);
            self.pending_last = step;
            if self.rows.len() >= BATCH_ROWS {
                self.flush_rows()?;
            }
        }
        Ok(())
    }

    fn flush_rows(&mut self) -> Result<(), StageError> {
        let n = self.rows.len();
        if n == 0 {
            return Ok(());
        }
        let first = self.pending_first.unwrap_or(self.pending_last);
        if self.part.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(ioe(&self.dir, "create"))?;
            let path = self.dir.join(part_name(first));
            let tmp = PathBuf::from(format!("{}.tmp", path.display()));
            let file = File::create(&tmp).map_err(ioe(&tmp, "create"))?;
            let opts = ipc_options(self.compression).map_err(arrow_err(&tmp))?;
            let writer = FileWriter::try_new_with_options(BufWriter::with_capacity(1 << 20, file), &self.schema, opts).map_err(arrow_err(&tmp))?;
            self.part = Some(OpenPart { first, last: first, tmp, path, writer });
        }
        let batch = self.rows.finish(&self.schema).map_err(|e| StageError::failed(format!("{}: {e}", self.dir.display())))?;
        let Some(part) = self.part.as_mut() else { return Ok(()) };
        part.writer.write(&batch).map_err(arrow_err(&part.tmp))?;
        part.last = part.last.max(self.pending_last);
        self.summary.rows += n as u64;
        self.pending_first = None;
        Ok(())
    }

    /// Finishes the open part (if any): footer, fsync, rename to its final name.
    pub fn close(&mut self) -> Result<(), StageError> {
        self.flush_rows()?;
        let Some(mut part) = self.part.take() else { return Ok(()) };
        part.writer.write_metadata("ehmam.format", LOG_FORMAT);
        part.writer.write_metadata("ehmam.first_step", part.first.to_string());
        part.writer.write_metadata("ehmam.last_step", part.last.to_string());
        part.writer.finish().map_err(arrow_err(&part.tmp))?;
        let buf = part.writer.into_inner().map_err(arrow_err(&part.tmp))?;
        let file = buf.into_inner().map_err(|e| StageError::io(format!("cannot write {}", part.tmp.display()), e.into_error()))?;
        file.sync_all().map_err(ioe(&part.tmp, "write"))?;
        self.summary.bytes += file.metadata().map(|m| m.len()).unwrap_or(0);
        drop(file);
        publish(&part.tmp, &part.path, false)?;
        self.summary.parts += 1;
        Ok(())
    }

    /// Closes the open part and reports what was written.
    pub fn finish(&mut self) -> Result<TableSummary, StageError> {
        self.close()?;
        Ok(self.summary.clone())
    }

    /// Resume at step `k`: removes unfinished parts, deletes parts of steps ≥ `k` and cuts the
    /// part that straddles `k`.
    fn prepare(&mut self, k: u64) -> Result<(), StageError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StageError::io(format!("cannot list {}", self.dir.display()), e)),
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                eprintln!("{}: removing {}, left unfinished by an earlier attempt", self.who, e.path().display());
                std::fs::remove_file(e.path()).map_err(ioe(&e.path(), "remove"))?;
            }
        }
        let parts = list_parts(&self.dir)?;
        let mut dropped = 0;
        for (first, path) in &parts {
            if *first >= k {
                std::fs::remove_file(path).map_err(ioe(path, "remove"))?;
                dropped += 1;
            }
        }
        let cut = match parts.iter().filter(|(f, _)| *f < k).last() {
            Some((_, path)) => self.cut_part(path, k)?,
            None => 0,
        };
        if dropped > 0 || cut > 0 {
            eprintln!(
                "{}: resuming at step {k}: replaced {} of an earlier attempt's rows from step {k} on in {} ({dropped} parts deleted)",
                self.who,
                if cut > 0 { format!("{cut}+") } else { "those".to_string() },
                self.dir.display()
            );
        }
        if self.every_step && k > 0 {
            // The newest step still on disk; the rows after it, up to the resume point, went with
            // the part a crash left unfinished (the run resumes from its last checkpoint, which
            // may lie after them).
            let last = list_parts(&self.dir)?.last().and_then(|(_, p)| part_last_step(p));
            let next = last.map_or(0, |l| l + 1);
            if next < k {
                eprintln!(
                    "{}: warning: steps {next}..{} have no rows in {}: they were in a part left unfinished by an earlier attempt, and the run resumes at step {k}",
                    self.who,
                    k - 1,
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Rewrites `path` without its rows of steps ≥ `k`; returns how many rows went.
    fn cut_part(&self, path: &Path, k: u64) -> Result<u64, StageError> {
        let damaged = |why: String| -> Result<u64, StageError> {
            let aside = PathBuf::from(format!("{}.damaged", path.display()));
            eprintln!("{}: warning: {} is damaged ({why}); moved to {}", self.who, path.display(), aside.display());
            std::fs::rename(path, &aside).map_err(ioe(path, "rename"))?;
            Ok(0)
        };
        let file = File::open(path).map_err(ioe(path, "open"))?;
        let reader = match arrow::ipc::reader::FileReader::try_new(file, None) {
            Ok(r) => r,
            Err(e) => return damaged(e.to_string()),
        };
        if let Some(last) = reader.custom_metadata().get("ehmam.last_step").and_then(|v| v.parse::<u64>().ok()) {
            if last < k {
                return Ok(0);
            }
        }
        let meta: Vec<(String, String)> = reader.custom_metadata().iter().map(|(a, b)| (a.clone(), b.clone())).collect();
        let schema = reader.schema();
        let mut kept = Vec::new();
        let (mut gone, mut last_kept) = (0u64, None::<u64>);
        for b in reader {
            let b = match b {
                Ok(b) => b,
                Err(e) => return damaged(e.to_string()),
            };
            let Some(steps) = b.column_by_name("step").and_then(|c| c.as_any().downcast_ref::<Int64Array>()) else {
                return damaged("no Int64 `step` column".into());
            };
            let keep = arrow::compute::kernels::cmp::lt(steps, &Int64Array::new_scalar(k as i64)).map_err(arrow_err(path))?;
            let kb = arrow::compute::filter_record_batch(&b, &keep).map_err(arrow_err(path))?;
            gone += (b.num_rows() - kb.num_rows()) as u64;
            if let Some(s) = kb.column_by_name("step").and_then(|c| c.as_any().downcast_ref::<Int64Array>()) {
                if let Some(m) = arrow::compute::max(s) {
                    last_kept = Some(last_kept.map_or(m as u64, |l: u64| l.max(m as u64)));
                }
            }
            if kb.num_rows() > 0 {
                kept.push(kb);
            }
        }
        if gone == 0 {
            return Ok(0);
        }
        if kept.is_empty() {
            std::fs::remove_file(path).map_err(ioe(path, "remove"))?;
            return Ok(gone);
        }
        let mut meta: Vec<(&str, String)> = meta.iter().filter(|(a, _)| a != "ehmam.last_step").map(|(a, b)| (a.as_str(), b.clone())).collect();
        meta.push(("ehmam.last_step", last_kept.unwrap_or(0).to_string()));
        write_part_file(path, &schema, &kept, &meta, true, self.compression)?;
        Ok(gone)
    }
}

// ---------------------------------------------------------------------------------------------
// log.frames

/// Parameters of `log.frames`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FramesLogParams {
    /// Log the frames of every `every`-th step (steps divisible by it); 1 logs every step.
    pub every: u64,
    /// Fraction of each logged batch's utterances whose frames are kept, in (0, 1]; chosen by a
    /// hash of the stage seed, the step and the utt_id (reproducible).
    pub utterances: f64,
    /// Start a new part file every this many steps (parts are named by their first step).
    pub rotate_every: u64,
    /// Table (sub-directory of the run directory) of the frame rows.
    pub table: String,
    /// Table of the student's input features at the logged frames (one `features` list per
    /// frame, for the fbank image of `ehmam plot`); null to store none.
    pub inputs_table: Option<String>,
    /// Log the input features only at steps divisible by this (they are ~40× the bytes of a
    /// frame row); 0 logs them whenever frames are logged.
    pub inputs_every: u64,
    /// Buffer compression inside the parts: zstd, lz4 or none.
    pub compression: LogCompression,
}

impl Default for FramesLogParams {
    fn default() -> Self {
        FramesLogParams { every: 10, utterances: 0.25, rotate_every: 100, table: "frames".into(), inputs_table: Some("inputs".into()), inputs_every: 100, compression: LogCompression::Zstd }
    }
}

impl Params for FramesLogParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.every == 0 {
            e.push(ParamError::new("every", "must be at least 1"));
        }
        if !(self.utterances > 0.0 && self.utterances <= 1.0) {
            e.push(ParamError::new("utterances", format!("must be in (0, 1], got {}", self.utterances)));
        }
        if self.rotate_every == 0 {
            e.push(ParamError::new("rotate_every", "must be at least 1"));
        }
        e.extend(check_table_name("table", &self.table));
        if let Some(t) = &self.inputs_table {
            e.extend(check_table_name("inputs_table", t));
            if t == &self.table {
                e.push(ParamError::new("inputs_table", format!("must differ from `table` ({t})")));
            }
        }
        e
    }
}

/// Buffered rows of the `frames` table.
#[derive(Default)]
pub struct FrameRows {
    run: StringBuilder,
    step: Int64Builder,
    epoch: Int32Builder,
    utt_id: StringBuilder,
    member: Int32Builder,
    frame: Int32Builder,
    time_s: Float64Builder,
    masked: BooleanBuilder,
    hard: BooleanBuilder,
    teacher_pred: Float32Builder,
    student_pred: Float32Builder,
    recon_loss: Float32Builder,
    hard_ratio: Float32Builder,
    n: usize,
}

impl Rows for FrameRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.run.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.epoch.finish()),
            Arc::new(self.utt_id.finish()),
            Arc::new(self.member.finish()),
            Arc::new(self.frame.finish()),
            Arc::new(self.time_s.finish()),
            Arc::new(self.masked.finish()),
            Arc::new(self.hard.finish()),
            Arc::new(self.teacher_pred.finish()),
            Arc::new(self.student_pred.finish()),
            Arc::new(self.recon_loss.finish()),
            Arc::new(self.hard_ratio.finish()),
        ];
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// Buffered rows of the `inputs` table.
pub struct InputRows {
    run: StringBuilder,
    step: Int64Builder,
    utt_id: StringBuilder,
    frame: Int32Builder,
    feature_dim: Int32Builder,
    features: ListBuilder<Float32Builder>,
    n: usize,
}

impl Default for InputRows {
    fn default() -> Self {
        InputRows {
            run: StringBuilder::new(),
            step: Int64Builder::new(),
            utt_id: StringBuilder::new(),
            frame: Int32Builder::new(),
            feature_dim: Int32Builder::new(),
            features: ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new("item", DataType::Float32, false))),
            n: 0,
        }
    }
}

impl Rows for InputRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.run.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.utt_id.finish()),
            Arc::new(self.frame.finish()),
            Arc::new(self.feature_dim.finish()),
            Arc::new(self.features.finish()),
        ];
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// What a frame log wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrameLogSummary {
    pub frames: TableSummary,
    pub inputs: Option<TableSummary>,
    /// Records received (every step, logged or not).
    pub records: u64,
}

/// The `log.frames` logic without the engine (tests and benchmarks drive it directly).
pub struct FrameLog {
    p: FramesLogParams,
    run: String,
    seed: u64,
    frames: TableWriter<FrameRows>,
    inputs: Option<TableWriter<InputRows>>,
    records: u64,
    warned_features: bool,
}

impl FrameLog {
    /// A frame log into `run_dir` for run `run`; `seed` drives the utterance sampling.
    pub fn new(p: &FramesLogParams, who: &str, run: &str, run_dir: &Path, seed: u64) -> FrameLog {
        let mut frames = TableWriter::new(who, run_dir.join(&p.table), frames_schema(), p.rotate_every, FrameRows::default());
        frames.compression = p.compression;
        let inputs = p.inputs_table.as_ref().map(|t| {
            let mut w = TableWriter::new(who, run_dir.join(t), inputs_schema(), p.rotate_every, InputRows::default());
            w.compression = p.compression;
            w
        });
        FrameLog { p: p.clone(), run: run.to_string(), seed, frames, inputs, records: 0, warned_features: false }
    }

    /// Logs one update's frames (if its step and utterances are sampled).
    pub fn write(&mut self, r: &FrameRecord) -> Result<(), StageError> {
        let n = r.utt_ids.len();
        let t = r.frames;
        let cells = n * t;
        let bad = |what: &str, got: usize, want: usize| StageError::failed(format!("frame record of step {}: `{what}` has {got} values, expected {want} ({n} utterances × {t} frames)", r.step,));
        for (what, got) in [("mask", r.mask.len()), ("hard", r.hard.len()), ("teacher_pred", r.teacher_pred.len()), ("student_pred", r.student_pred.len()), ("recon_loss", r.recon_loss.len())] {
            if got != cells {
                return Err(bad(what, got, cells));
            }
        }
        if r.offsets_s.len() != n {
            return Err(StageError::failed(format!("frame record of step {}: {} offsets for {n} utterances", r.step, r.offsets_s.len())));
        }
        if !(r.frame_rate > 0.0 && r.frame_rate.is_finite()) {
            return Err(StageError::failed(format!("frame record of step {}: frame rate {} Hz", r.step, r.frame_rate)));
        }
        self.records += 1;
        self.frames.start_step(r.step)?;
        if let Some(w) = self.inputs.as_mut() {
            w.start_step(r.step)?;
        }
        if r.step % self.p.every != 0 {
            return Ok(());
        }
        // Features per frame: `feature_dim` values for fbank; a frame's share of the samples
        // (its stride) for waveform input.
        let per_member = if n > 0 && r.features.len() % n == 0 { r.features.len() / n } else { 0 };
        let per_frame = if t > 0 { per_member / t } else { 0 };
        if self.inputs.is_some() && per_frame == 0 && cells > 0 && !self.warned_features {
            eprintln!("{}: warning: step {}: {} feature values do not cover {n} utterances × {t} frames; no inputs logged", self.frames.who, r.step, r.features.len());
            self.warned_features = true;
        }
        let step = r.step as i64;
        for (i, utt) in r.utt_ids.iter().enumerate() {
            if !utterance_sampled(self.seed, r.step, utt, self.p.utterances) {
                continue;
            }
            let rows = &mut self.frames.rows;
            let base = i * t;
            for f in 0..t {
                let c = base + f;
                rows.run.append_value(&self.run);
                rows.step.append_value(step);
                rows.epoch.append_value(r.epoch as i32);
                rows.utt_id.append_value(utt);
                rows.member.append_value(i as i32);
                rows.frame.append_value(f as i32);
                rows.time_s.append_value(r.offsets_s[i] + f as f64 / r.frame_rate);
                rows.masked.append_value(r.mask[c]);
                rows.hard.append_value(r.hard[c]);
                rows.teacher_pred.append_value(r.teacher_pred[c]);
                let sp = r.student_pred[c];
                rows.student_pred.append_option(sp.is_finite().then_some(sp));
                rows.recon_loss.append_option(r.mask[c].then_some(r.recon_loss[c]));
                rows.hard_ratio.append_value(r.hard_ratio);
            }
            rows.n += t;
            let inputs_due = self.p.inputs_every == 0 || r.step % self.p.inputs_every == 0;
            if let (Some(w), true) = (self.inputs.as_mut(), per_frame > 0 && inputs_due) {
                let rows = &mut w.rows;
                for f in 0..t {
                    let at = i * per_member + f * per_frame;
                    rows.run.append_value(&self.run);
                    rows.step.append_value(step);
                    rows.utt_id.append_value(utt);
                    rows.frame.append_value(f as i32);
                    rows.feature_dim.append_value(r.feature_dim as i32);
                    rows.features.values().append_slice(&r.features[at..at + per_frame]);
                    rows.features.append(true);
                }
                rows.n += t;
            }
        }
        self.frames.end_step(r.step)?;
        if let Some(w) = self.inputs.as_mut() {
            w.end_step(r.step)?;
        }
        Ok(())
    }

    /// Closes the open parts.
    pub fn finish(&mut self) -> Result<FrameLogSummary, StageError> {
        let frames = self.frames.finish()?;
        let inputs = match self.inputs.as_mut() {
            Some(w) => Some(w.finish()?),
            None => None,
        };
        Ok(FrameLogSummary { frames, inputs, records: self.records })
    }
}

/// The `log.frames` stage.
pub struct LogFrames {
    log: FrameLog,
}

impl StageDef for LogFrames {
    type Params = FramesLogParams;
    const KIND: &'static str = "log.frames";
    const DOC: &'static str = "Logs the student's per-frame view (masked, hard, predicted and actual losses, time in the\naudio) of sampled steps and utterances as Arrow IPC parts in <run_dir>/frames/, and their input\nfeatures in <run_dir>/inputs/ (atomic parts, rotated by step; a resume replaces rows from its step on).";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<FrameRecord>("in", "frame records (student.frames)")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn validate(p: &FramesLogParams, ctx: &StageContext) -> Vec<ParamError> {
        let mut tables = vec![("table", p.table.as_str())];
        if let Some(t) = &p.inputs_table {
            tables.push(("inputs_table", t.as_str()));
        }
        claim_tables(ctx, &tables)
    }
    fn create(p: &FramesLogParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        Ok(LogFrames { log: FrameLog::new(p, &ctx.stage, &ctx.run, &ctx.run_dir, ctx.seed) })
    }
}

/// Receives records until the input ends. A stop (Ctrl-C, another stage failing) still finishes
/// the open parts, then reports `Cancelled`.
fn drain<T: 'static>(io: &mut StageIo, mut write: impl FnMut(&T) -> Result<(), StageError>) -> Result<(), StageError> {
    loop {
        match io.recv::<T>(0) {
            Ok(Some(r)) => write(&r)?,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

impl Stage for LogFrames {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let result = drain::<FrameRecord>(io, |r| self.log.write(r));
        if matches!(result, Ok(()) | Err(StageError::Cancelled)) {
            let s = self.log.finish()?;
            let per_row = if s.frames.rows > 0 { s.frames.bytes as f64 / s.frames.rows as f64 } else { 0.0 };
            eprintln!("{}: {} frames of {} steps logged in {} parts ({per_row:.0} bytes/frame)", io.stage(), s.frames.rows, s.records, s.frames.parts);
        }
        result
    }
}

// ---------------------------------------------------------------------------------------------
// log.steps

/// Parameters of `log.steps`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StepsLogParams {
    /// Start a new part file every this many steps (parts are named by their first step).
    pub rotate_every: u64,
    /// Table (sub-directory of the run directory) of the step rows.
    pub table: String,
    /// Buffer compression inside the parts: zstd, lz4 or none.
    pub compression: LogCompression,
}

impl Default for StepsLogParams {
    fn default() -> Self {
        StepsLogParams { rotate_every: 100, table: "steps".into(), compression: LogCompression::Zstd }
    }
}

impl Params for StepsLogParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.rotate_every == 0 {
            e.push(ParamError::new("rotate_every", "must be at least 1"));
        }
        e.extend(check_table_name("table", &self.table));
        e
    }
}

/// Buffered rows of the `steps` table.
#[derive(Default)]
pub struct StepRows {
    run: StringBuilder,
    step: Int64Builder,
    epoch: Int32Builder,
    f64s: [Float64Builder; 7],
    frames: Int64Builder,
    utterances: Int64Builder,
    more: [Float64Builder; 6],
    teacher_version: Int64Builder,
    n: usize,
}

impl Rows for StepRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let mut cols: Vec<ArrayRef> = vec![Arc::new(self.run.finish()), Arc::new(self.step.finish()), Arc::new(self.epoch.finish())];
        cols.extend(self.f64s.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        cols.push(Arc::new(self.frames.finish()));
        cols.push(Arc::new(self.utterances.finish()));
        cols.extend(self.more.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        cols.push(Arc::new(self.teacher_version.finish()));
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// The `log.steps` logic without the engine.
pub struct StepLog {
    run: String,
    steps: TableWriter<StepRows>,
}

impl StepLog {
    pub fn new(p: &StepsLogParams, who: &str, run: &str, run_dir: &Path) -> StepLog {
        let mut steps = TableWriter::new(who, run_dir.join(&p.table), steps_schema(), p.rotate_every, StepRows::default());
        steps.compression = p.compression;
        steps.every_step = true;
        StepLog { run: run.to_string(), steps }
    }

    pub fn write(&mut self, r: &StepRecord) -> Result<(), StageError> {
        self.steps.start_step(r.step)?;
        let rows = &mut self.steps.rows;
        rows.run.append_value(&self.run);
        rows.step.append_value(r.step as i64);
        rows.epoch.append_value(r.epoch as i32);
        for (b, v) in rows.f64s.iter_mut().zip([r.lr, r.loss, r.loss_rec, r.loss_aux, r.tau, r.hard_ratio, r.masked_frac]) {
            b.append_value(v);
        }
        rows.frames.append_value(r.frames as i64);
        rows.utterances.append_value(r.utterances as i64);
        for (i, (b, v)) in rows.more.iter_mut().zip([r.audio_s, r.step_ms, r.target_std, r.pred_std, r.rank_agreement, r.teacher_rank_agreement]).enumerate() {
            if i >= 3 && !v.is_finite() {
                b.append_null();
            } else {
                b.append_value(v);
            }
        }
        rows.teacher_version.append_value(r.teacher_version as i64);
        rows.n += 1;
        self.steps.end_step(r.step)
    }

    pub fn finish(&mut self) -> Result<TableSummary, StageError> {
        self.steps.finish()
    }
}

/// The `log.steps` stage.
pub struct LogSteps {
    log: StepLog,
}

impl StageDef for LogSteps {
    type Params = StepsLogParams;
    const KIND: &'static str = "log.steps";
    const DOC: &'static str = "Logs one row per student update (losses, lr, EMA decay, masking, health metrics) as Arrow IPC\nparts in <run_dir>/steps/ (atomic parts, rotated by step; a resume replaces rows from its step on).";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<StepRecord>("in", "step records (student.steps)")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn validate(p: &StepsLogParams, ctx: &StageContext) -> Vec<ParamError> {
        claim_tables(ctx, &[("table", p.table.as_str())])
    }
    fn create(p: &StepsLogParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        Ok(LogSteps { log: StepLog::new(p, &ctx.stage, &ctx.run, &ctx.run_dir) })
    }
}

impl Stage for LogSteps {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let result = drain::<StepRecord>(io, |r| self.log.write(r));
        if matches!(result, Ok(()) | Err(StageError::Cancelled)) {
            self.log.finish()?;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            epoch: 0,
            lr: 1e-3,
            loss: step as f64,
            loss_rec: 1.0,
            loss_aux: 0.0,
            tau: 0.99,
            hard_ratio: 0.0,
            masked_frac: 0.4,
            frames: 100,
            utterances: 2,
            audio_s: 2.0,
            step_ms: 10.0,
            target_std: 1.0,
            pred_std: f64::NAN,
            rank_agreement: f64::NAN,
            teacher_rank_agreement: 0.5,
            teacher_version: step,
        }
    }

    /// (step, loss) of every row in the table's complete parts, by part order.
    fn rows(dir: &Path) -> Vec<(i64, f64)> {
        let mut out = Vec::new();
        for (_, p) in list_parts(dir).unwrap() {
            for b in arrow::ipc::reader::FileReader::try_new(File::open(&p).unwrap(), None).unwrap() {
                let b = b.unwrap();
                let s = b.column_by_name("step").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
                let l = b.column_by_name("loss").unwrap().as_any().downcast_ref::<arrow::array::Float64Array>().unwrap().clone();
                // The predictor's metrics are NULL where they are not defined, never NaN.
                assert_eq!(b.column_by_name("rank_agreement").unwrap().null_count(), b.num_rows());
                out.extend((0..b.num_rows()).map(|i| (s.value(i), l.value(i))));
            }
        }
        out
    }

    /// A resumed run replaces the rows of the steps it repeats: parts from the resume step on are
    /// deleted, the part that straddles it is cut, unfinished parts are removed, and each step
    /// ends up in the table once.
    #[test]
    fn resume_replaces_repeated_steps_and_removes_unfinished_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let p = StepsLogParams { rotate_every: 10, ..StepsLogParams::default() };
        let mut log = StepLog::new(&p, "t", "run", tmp.path());
        for s in 0..27 {
            log.write(&record(s)).unwrap();
        }
        log.finish().unwrap();
        let dir = tmp.path().join("steps");
        assert_eq!(list_parts(&dir).unwrap().len(), 3);
        // A part an earlier attempt never finished.
        std::fs::write(dir.join("part-000000030.arrow.tmp"), b"half").unwrap();
        // Resume at 14 (as from a checkpoint at step 14): steps 14.. are written again, with
        // other values.
        let mut log = StepLog::new(&p, "t", "run", tmp.path());
        for s in 14..22 {
            let mut r = record(s);
            r.loss = 1000.0 + s as f64;
            log.write(&r).unwrap();
        }
        log.finish().unwrap();
        assert!(!dir.join("part-000000030.arrow.tmp").exists());
        let got = rows(&dir);
        let steps: Vec<i64> = got.iter().map(|r| r.0).collect();
        assert_eq!(steps, (0..22).collect::<Vec<i64>>(), "each step once, in order");
        for (s, l) in got {
            let want = if s >= 14 { 1000.0 + s as f64 } else { s as f64 };
            assert_eq!(l, want, "step {s}");
        }
        // The cut part says where it ends now.
        assert_eq!(part_last_step(&dir.join(part_name(10))), Some(13));
    }
}
