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

use arrow::array::{Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::writer::{FileWriter, IpcWriteOptions};
use arrow::ipc::CompressionType;
use arrow::record_batch::RecordBatch;
use pipeline::{Link, Linker, ParamError, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Written into every part's footer (`ehmam.format`), with `ehmam.first_step` / `ehmam.last_step`.
pub const LOG_FORMAT: &str = "ehmam-log/1";
/// Rows buffered before they go to the open part as one record batch.
const BATCH_ROWS: usize = 32 * 1024;
/// Names a log table may not take: the run directory's other tables.
pub(crate) const RESERVED: [&str; 5] = [
    "utterances",
    "rejects",
    "stages",
    "checkpoints",
    "information_schema",
];

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
        Field::new(
            "features",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
            false,
        ),
    ]))
}

/// Columns of the `steps` table: every [`StepRecord`] field, after `run`.
pub fn steps_schema() -> SchemaRef {
    let f64s = [
        "lr",
        "loss",
        "loss_rec",
        "loss_aux",
        "tau",
        "hard_ratio",
        "masked_frac",
    ];
    let mut fields = vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("step", DataType::Int64, false),
        Field::new("epoch", DataType::Int32, false),
    ];
    fields.extend(
        f64s.iter()
            .map(|n| Field::new(*n, DataType::Float64, false)),
    );
    fields.push(Field::new("frames", DataType::Int64, false));
    fields.push(Field::new("utterances", DataType::Int64, false));
    for n in [
        "audio_s",
        "step_ms",
        "target_std",
        "pred_std",
        "rank_agreement",
        "teacher_rank_agreement",
        "grad_norm",
    ] {
        // The predictor's metrics are NULL where they do not exist (α = 0: no student predictor;
        // no pair of distinct losses), so avg() over a union of runs stays meaningful.
        let nullable = matches!(n, "pred_std" | "rank_agreement" | "teacher_rank_agreement");
        fields.push(Field::new(n, DataType::Float64, nullable));
    }
    fields.push(Field::new("teacher_version", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

pub(crate) fn check_table_name(field: &str, name: &str) -> Option<ParamError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Some(ParamError::new(field, format!("`{name}` is not a table name (lower-case letters, digits and `_`, not starting with a digit)")));
    }
    if RESERVED.contains(&name) {
        return Some(ParamError::new(
            field,
            format!("`{name}` is another table of the run directory; choose another name"),
        ));
    }
    None
}

/// The link step of a log stage: it owns its tables (a link per table name, one provider), so
/// two log stages of one spec never write into the same table directory.
pub(crate) fn claim_tables(linker: &mut Linker, tables: &[(&str, &str)]) -> Vec<ParamError> {
    let mut errors = Vec::new();
    for (field, table) in tables {
        let link: Link<()> = Link::named(format!("logs.table.{table}"));
        if let Err(other) = linker.provide(&link, ()) {
            errors.push(ParamError::new(*field, format!("table `{table}` is already written by stage `{}`; give one of them another `{field}`", other.by)));
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
    /// What the writer has to tell the person running the pipeline (a leftover removed, a
    /// damaged part moved aside); the stage hands them to `StageIo::note`.
    notes: std::sync::Mutex<Vec<String>>,
}

pub(crate) fn part_name(first: u64) -> String {
    format!("part-{first:09}.arrow")
}

/// The last step a complete part holds (its `ehmam.last_step` metadata); None if unreadable.
pub(crate) fn part_last_step(path: &Path) -> Option<u64> {
    let reader = arrow::ipc::reader::FileReader::try_new(File::open(path).ok()?, None).ok()?;
    reader
        .custom_metadata()
        .get("ehmam.last_step")
        .and_then(|v| v.parse::<u64>().ok())
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
        if let Some(first) = name
            .strip_prefix("part-")
            .and_then(|n| n.strip_suffix(".arrow"))
            .and_then(|n| n.parse::<u64>().ok())
        {
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
fn write_part_file(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    meta: &[(&str, String)],
    replace: bool,
    compression: LogCompression,
) -> Result<u64, StageError> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let file = File::create(&tmp).map_err(ioe(&tmp, "create"))?;
    let opts = ipc_options(compression).map_err(arrow_err(&tmp))?;
    let mut w = FileWriter::try_new_with_options(BufWriter::new(file), schema, opts)
        .map_err(arrow_err(&tmp))?;
    for b in batches {
        w.write(b).map_err(arrow_err(&tmp))?;
    }
    for (k, v) in meta {
        w.write_metadata(*k, v.clone());
    }
    w.finish().map_err(arrow_err(&tmp))?;
    let buf = w.into_inner().map_err(arrow_err(&tmp))?;
    let file = buf
        .into_inner()
        .map_err(|e| StageError::io(format!("cannot write {}", tmp.display()), e.into_error()))?;
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
        return Err(StageError::failed(format!(
            "{} exists already: refusing to overwrite a complete log part",
            path.display()
        )));
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
    fn say(&self, line: String) {
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    /// The notes gathered since the last call.
    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A writer into `dir`; nothing is touched there before the first step arrives.
    pub fn new(dir: PathBuf, schema: SchemaRef, rotate_every: u64, rows: R) -> Self {
        TableWriter {
            notes: Default::default(),
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
        (first / self.rotate_every)
            .saturating_add(1)
            .saturating_mul(self.rotate_every)
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
            let writer = FileWriter::try_new_with_options(
                BufWriter::with_capacity(1 << 20, file),
                &self.schema,
                opts,
            )
            .map_err(arrow_err(&tmp))?;
            self.part = Some(OpenPart {
                first,
                last: first,
                tmp,
                path,
                writer,
            });
        }
        let batch = self
            .rows
            .finish(&self.schema)
            .map_err(|e| StageError::failed(format!("{}: {e}", self.dir.display())))?;
        let Some(part) = self.part.as_mut() else {
            return Ok(());
        };
        part.writer.write(&batch).map_err(arrow_err(&part.tmp))?;
        part.last = part.last.max(self.pending_last);
        self.summary.rows += n as u64;
        self.pending_first = None;
        Ok(())
    }

    /// Finishes the open part (if any): footer, fsync, rename to its final name.
    pub fn close(&mut self) -> Result<(), StageError> {
        self.flush_rows()?;
        let Some(mut part) = self.part.take() else {
            return Ok(());
        };
        part.writer.write_metadata("ehmam.format", LOG_FORMAT);
        part.writer
            .write_metadata("ehmam.first_step", part.first.to_string());
        part.writer
            .write_metadata("ehmam.last_step", part.last.to_string());
        part.writer.finish().map_err(arrow_err(&part.tmp))?;
        let buf = part.writer.into_inner().map_err(arrow_err(&part.tmp))?;
        let file = buf.into_inner().map_err(|e| {
            StageError::io(
                format!("cannot write {}", part.tmp.display()),
                e.into_error(),
            )
        })?;
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
            Err(e) => {
                return Err(StageError::io(
                    format!("cannot list {}", self.dir.display()),
                    e,
                ))
            }
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                self.say(format!(
                    "removing {}, left unfinished by an earlier attempt",
                    e.path().display()
                ));
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
            self.say(format!(
                "resuming at step {k}: replaced {} of an earlier attempt's rows from step {k} on in {} ({dropped} parts deleted)",
                if cut > 0 { format!("{cut}+") } else { "those".to_string() },
                self.dir.display()
            ));
        }
        if self.every_step && k > 0 {
            // The newest step still on disk; the rows after it, up to the resume point, went with
            // the part a crash left unfinished (the run resumes from its last checkpoint, which
            // may lie after them).
            let last = list_parts(&self.dir)?
                .last()
                .and_then(|(_, p)| part_last_step(p));
            let next = last.map_or(0, |l| l + 1);
            if next < k {
                self.say(format!(
                    "warning: steps {next}..{} have no rows in {}: they were in a part left unfinished by an earlier attempt, and the run resumes at step {k}",
                    k - 1,
                    self.dir.display()
                ));
            }
        }
        Ok(())
    }

    /// Rewrites `path` without its rows of steps ≥ `k`; returns how many rows went.
    fn cut_part(&self, path: &Path, k: u64) -> Result<u64, StageError> {
        let damaged = |why: String| -> Result<u64, StageError> {
            let aside = PathBuf::from(format!("{}.damaged", path.display()));
            self.say(format!(
                "warning: {} is damaged ({why}); moved to {}",
                path.display(),
                aside.display()
            ));
            std::fs::rename(path, &aside).map_err(ioe(path, "rename"))?;
            Ok(0)
        };
        let file = File::open(path).map_err(ioe(path, "open"))?;
        let reader = match arrow::ipc::reader::FileReader::try_new(file, None) {
            Ok(r) => r,
            Err(e) => return damaged(e.to_string()),
        };
        if let Some(last) = reader
            .custom_metadata()
            .get("ehmam.last_step")
            .and_then(|v| v.parse::<u64>().ok())
        {
            if last < k {
                return Ok(0);
            }
        }
        let meta: Vec<(String, String)> = reader
            .custom_metadata()
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
        let schema = reader.schema();
        let mut kept = Vec::new();
        let (mut gone, mut last_kept) = (0u64, None::<u64>);
        for b in reader {
            let b = match b {
                Ok(b) => b,
                Err(e) => return damaged(e.to_string()),
            };
            let Some(steps) = b
                .column_by_name("step")
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            else {
                return damaged("no Int64 `step` column".into());
            };
            let keep = arrow::compute::kernels::cmp::lt(steps, &Int64Array::new_scalar(k as i64))
                .map_err(arrow_err(path))?;
            let kb = arrow::compute::filter_record_batch(&b, &keep).map_err(arrow_err(path))?;
            gone += (b.num_rows() - kb.num_rows()) as u64;
            if let Some(s) = kb
                .column_by_name("step")
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            {
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
        let mut meta: Vec<(&str, String)> = meta
            .iter()
            .filter(|(a, _)| a != "ehmam.last_step")
            .map(|(a, b)| (a.as_str(), b.clone()))
            .collect();
        meta.push(("ehmam.last_step", last_kept.unwrap_or(0).to_string()));
        write_part_file(path, &schema, &kept, &meta, true, self.compression)?;
        Ok(gone)
    }
}

/// Receives records until the input ends. A stop (Ctrl-C, another stage failing) still finishes
/// the open parts, then reports `Cancelled`.
/// A log that takes records and may have something to say (see [`TableWriter::take_notes`]).
pub(crate) trait RecordSink<T> {
    fn write(&mut self, r: &T) -> Result<(), StageError>;
    fn take_notes(&mut self) -> Vec<String>;
}

/// Writes every record of input 0 to `sink`, passing its notes on as they come.
pub(crate) fn drain<T: 'static>(
    io: &mut StageIo,
    sink: &mut impl RecordSink<T>,
) -> Result<(), StageError> {
    let result = loop {
        match io.recv::<T>(0) {
            Ok(Some(r)) => {
                if let Err(e) = sink.write(&r) {
                    break Err(e);
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
        for n in sink.take_notes() {
            io.note(n);
        }
    };
    for n in sink.take_notes() {
        io.note(n);
    }
    result
}
