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
//! another stage failing) finishes the open part first. The sinks also close the open part
//! after a record that says a checkpoint follows (`checkpoint_follows`), so no part is open
//! across a checkpoint: a run killed after it and resumed from it loses no row before it.
//!
//! Checksum: a part's footer holds `ehmam.blake3`, the BLAKE3 hash of the whole file (its own 64
//! hex digits read as `0`s), so the part stays one self-contained file that pyarrow or DuckDB read
//! as it is. Readers ([`check_part`]: `ehmam query`, `plot`, `report`, and the resume below) verify
//! it before they parse anything; a part that fails is skipped (or, on resume, moved aside as
//! `*.damaged`) with a warning that names it. Parts of earlier versions (`ehmam-log/1`, no
//! checksum) are still read, unverified; any other file without a checksum is not trusted.
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
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Written into every part's footer (`ehmam.format`), with `ehmam.first_step` / `ehmam.last_step`
/// and the checksum ([`CHECKSUM_KEY`]). `ehmam-log/1` parts (earlier versions) have no checksum.
pub const LOG_FORMAT: &str = "ehmam-log/2";
/// The format of parts written before parts carried a checksum; they are read unverified.
pub const LOG_FORMAT_UNCHECKED: &str = "ehmam-log/1";
/// Footer key of a part's checksum: the BLAKE3 hash (64 hex digits) of the whole file, taken
/// with this value's own 64 bytes read as ASCII `0`s (see [`check_part`]).
pub const CHECKSUM_KEY: &str = "ehmam.blake3";
/// The checksum's value while the file is hashed.
const CHECKSUM_PLACEHOLDER: [u8; 64] = [b'0'; 64];
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
    /// This writer's parts are `part-TAG-…` (one of several writers of one table); its resume
    /// touches only its own parts.
    pub tag: Option<String>,
    /// What the writer has to tell the person running the pipeline (a leftover removed, a
    /// damaged part moved aside); the stage hands them to `StageIo::note`.
    notes: std::sync::Mutex<Vec<String>>,
}

#[cfg(test)]
pub(crate) fn part_name(first: u64) -> String {
    part_name_tagged(first, None)
}

/// A part's file name; a tagged writer (one of several stages writing one table, each its own
/// rows: `eval.ctc`'s sets) names its parts `part-TAG-NNNNNNNNN.arrow`.
pub(crate) fn part_name_tagged(first: u64, tag: Option<&str>) -> String {
    match tag {
        Some(t) => format!("part-{t}-{first:09}.arrow"),
        None => format!("part-{first:09}.arrow"),
    }
}

/// The last step a complete part holds (its `ehmam.last_step` metadata); None if unreadable.
pub(crate) fn part_last_step(path: &Path) -> Option<u64> {
    let reader = arrow::ipc::reader::FileReader::try_new(File::open(path).ok()?, None).ok()?;
    reader
        .custom_metadata()
        .get("ehmam.last_step")
        .and_then(|v| v.parse::<u64>().ok())
}

/// What [`check_part`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartCheck {
    /// The checksum matches: the file is byte for byte as it was written.
    Verified,
    /// The part carries no checksum (an `ehmam-log/1` part of an earlier version): nothing to
    /// verify it against.
    Unverified,
    /// The file is not as it was written (why).
    Damaged(String),
}

/// The footer of an Arrow IPC file (its offset, its bytes); Err: why the file is not one.
///
/// An Arrow IPC file is `ARROW1`, padding, the messages, the footer, the footer's length (i32,
/// little-endian) and `ARROW1` again.
fn read_footer(file: &mut File, len: u64) -> Result<(u64, Vec<u8>), String> {
    if len < 18 {
        return Err(format!("{len} bytes are too few for an Arrow file"));
    }
    let mut tail = [0u8; 10];
    file.seek(SeekFrom::Start(len - 10))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| format!("cannot read its end: {e}"))?;
    if &tail[4..] != b"ARROW1" {
        return Err("no Arrow file trailer (cut off?)".into());
    }
    let flen = i32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if flen <= 0 || flen as u64 > len - 18 {
        return Err(format!(
            "footer length {flen} does not fit a file of {len} bytes"
        ));
    }
    let start = len - 10 - flen as u64;
    let mut footer = vec![0u8; flen as usize];
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_exact(&mut footer))
        .map_err(|e| format!("cannot read its footer: {e}"))?;
    Ok((start, footer))
}

/// What a part's footer says of its checksum.
struct FooterInfo {
    /// The checksum's offset in the file and its value.
    checksum: Option<(u64, String)>,
    /// `ehmam.format`.
    format: Option<String>,
}

fn footer_info(start: u64, footer: &[u8]) -> Result<FooterInfo, String> {
    let f = arrow::ipc::root_as_footer(footer).map_err(|e| format!("unreadable footer: {e}"))?;
    let mut info = FooterInfo {
        checksum: None,
        format: None,
    };
    for kv in f.custom_metadata().iter().flat_map(|m| m.iter()) {
        match (kv.key(), kv.value()) {
            (Some(CHECKSUM_KEY), Some(v)) => {
                // The value is a slice of `footer`: its place in the file.
                let at = (v.as_ptr() as usize)
                    .checked_sub(footer.as_ptr() as usize)
                    .filter(|a| a + v.len() <= footer.len() && v.len() == 64)
                    .ok_or_else(|| format!("`{CHECKSUM_KEY}` is not 64 hex digits"))?;
                info.checksum = Some((start + at as u64, v.to_string()));
            }
            (Some("ehmam.format"), Some(v)) => info.format = Some(v.to_string()),
            _ => {}
        }
    }
    Ok(info)
}

/// BLAKE3 of the file with the 64 bytes at `hole` read as ASCII `0`s.
fn hash_file(file: &mut File, len: u64, hole: u64) -> std::io::Result<blake3::Hash> {
    file.seek(SeekFrom::Start(0))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &mut buf[..n];
        let (a, b) = (hole.max(pos), (hole + 64).min(pos + n as u64));
        if a < b {
            chunk[(a - pos) as usize..(b - pos) as usize].fill(b'0');
        }
        h.update(chunk);
        pos += n as u64;
    }
    if pos != len {
        return Err(std::io::Error::other(format!(
            "changed while read ({pos} bytes, {len} before)"
        )));
    }
    Ok(h.finalize())
}

/// Verifies a log part against its checksum before anything parses its data; cheap next to a
/// query (one read of the file, BLAKE3). An error: the file cannot be opened or read.
pub fn check_part(path: &Path) -> std::io::Result<PartCheck> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let (start, footer) = match read_footer(&mut file, len) {
        Ok(f) => f,
        Err(why) => return Ok(PartCheck::Damaged(why)),
    };
    let info = match footer_info(start, &footer) {
        Ok(i) => i,
        Err(why) => return Ok(PartCheck::Damaged(why)),
    };
    let Some((at, want)) = info.checksum else {
        // Only the parts of earlier versions lack it. A footer without `ehmam.format` either
        // (a flipped byte in its table of fields can hide all of its metadata) is not trusted.
        return Ok(match info.format.as_deref() {
            Some(LOG_FORMAT_UNCHECKED) => PartCheck::Unverified,
            Some(f) => PartCheck::Damaged(format!("an `{f}` part without its checksum")),
            None => PartCheck::Damaged(
                "no checksum and no `ehmam.format` in its footer: a damaged footer, or not a log part of ehmam".into(),
            ),
        });
    };
    let got = hash_file(&mut file, len, at)?;
    Ok(if got.to_hex().as_str() == want {
        PartCheck::Verified
    } else {
        PartCheck::Damaged("checksum mismatch: the file is not as it was written".into())
    })
}

/// Writes the checksum of a finished part file (footer with [`CHECKSUM_PLACEHOLDER`]) into it
/// and syncs it; returns its size.
fn seal(path: &Path) -> Result<u64, StageError> {
    let fail = |why: String| StageError::failed(format!("{}: {why}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(ioe(path, "open"))?;
    let len = file.metadata().map_err(ioe(path, "read"))?.len();
    let (start, footer) = read_footer(&mut file, len).map_err(fail)?;
    let at = match footer_info(start, &footer).map_err(fail)?.checksum {
        Some((at, v)) if v.as_bytes() == CHECKSUM_PLACEHOLDER => at,
        _ => return Err(fail("no checksum placeholder in the footer".into())),
    };
    let hash = hash_file(&mut file, len, at).map_err(ioe(path, "read"))?;
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.write_all(hash.to_hex().as_bytes()))
        .map_err(ioe(path, "write"))?;
    file.sync_all().map_err(ioe(path, "write"))?;
    Ok(len)
}

fn placeholder() -> String {
    String::from_utf8_lossy(&CHECKSUM_PLACEHOLDER).into_owned()
}

/// Complete parts of a table directory, by first step (untagged parts only).
pub fn list_parts(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StageError> {
    list_parts_tagged(dir, None)
}

/// Complete parts of a table directory written under `tag` (see [`part_name_tagged`]).
pub fn list_parts_tagged(dir: &Path, tag: Option<&str>) -> Result<Vec<(u64, PathBuf)>, StageError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StageError::io(format!("cannot list {}", dir.display()), e)),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let prefix = match tag {
            Some(t) => format!("part-{t}-"),
            None => "part-".to_string(),
        };
        if let Some(first) = name
            .strip_prefix(prefix.as_str())
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
    w.write_metadata(CHECKSUM_KEY, placeholder());
    w.finish().map_err(arrow_err(&tmp))?;
    let buf = w.into_inner().map_err(arrow_err(&tmp))?;
    let file = buf
        .into_inner()
        .map_err(|e| StageError::io(format!("cannot write {}", tmp.display()), e.into_error()))?;
    drop(file);
    let bytes = seal(&tmp)?;
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
            tag: None,
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
            let path = self.dir.join(part_name_tagged(first, self.tag.as_deref()));
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
        part.writer.write_metadata(CHECKSUM_KEY, placeholder());
        part.writer.finish().map_err(arrow_err(&part.tmp))?;
        let buf = part.writer.into_inner().map_err(arrow_err(&part.tmp))?;
        let file = buf.into_inner().map_err(|e| {
            StageError::io(
                format!("cannot write {}", part.tmp.display()),
                e.into_error(),
            )
        })?;
        drop(file);
        self.summary.bytes += seal(&part.tmp)?;
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
        // No directory yet (no part was ever completed, whatever `rotate_every`): nothing to
        // clean, but the steps before `k` are still missing (below).
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(StageError::io(
                    format!("cannot list {}", self.dir.display()),
                    e,
                ))
            }
        };
        // Only this writer's leftovers: another writer of the table may be writing its part.
        let mine = |name: &str| -> bool {
            let Some(stem) = name.strip_suffix(".arrow.tmp") else {
                return name.ends_with(".tmp") && self.tag.is_none() && !name.starts_with("part-");
            };
            let digits = match &self.tag {
                Some(t) => stem.strip_prefix(&format!("part-{t}-")),
                None => stem.strip_prefix("part-"),
            };
            digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        };
        for e in rd.into_iter().flatten().flatten() {
            if mine(&e.file_name().to_string_lossy()) {
                self.say(format!(
                    "removing {}, left unfinished by an earlier attempt",
                    e.path().display()
                ));
                std::fs::remove_file(e.path()).map_err(ioe(&e.path(), "remove"))?;
            }
        }
        let parts = list_parts_tagged(&self.dir, self.tag.as_deref())?;
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
            let last = list_parts_tagged(&self.dir, self.tag.as_deref())?
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
        // Verified first: a damaged part is never parsed, nor rewritten under a fresh checksum.
        match check_part(path) {
            Ok(PartCheck::Damaged(why)) => return damaged(why),
            Ok(_) => {}
            Err(e) => return damaged(e.to_string()),
        }
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
            .filter(|(a, _)| {
                !["ehmam.last_step", "ehmam.format", CHECKSUM_KEY].contains(&a.as_str())
            })
            .map(|(a, b)| (a.as_str(), b.clone()))
            .collect();
        meta.push(("ehmam.format", LOG_FORMAT.to_string()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Float64Builder, Int64Builder};

    /// One `step` and one `value` per step.
    #[derive(Default)]
    struct Vals {
        step: Int64Builder,
        value: Float64Builder,
        n: usize,
    }

    impl Rows for Vals {
        fn len(&self) -> usize {
            self.n
        }
        fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
            self.n = 0;
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(self.step.finish()), Arc::new(self.value.finish())],
            )
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("step", DataType::Int64, false),
            Field::new("value", DataType::Float64, false),
        ]))
    }

    fn value_of(step: u64) -> f64 {
        1000.0 + step as f64 * 0.125
    }

    /// Writes `steps` into `dir` as one attempt; returns its notes.
    fn attempt(
        dir: &Path,
        rotate: u64,
        steps: std::ops::Range<u64>,
        every_step: bool,
        compression: LogCompression,
    ) -> Vec<String> {
        let mut w = TableWriter::new(dir.to_path_buf(), schema(), rotate, Vals::default());
        w.every_step = every_step;
        w.compression = compression;
        for s in steps {
            w.start_step(s).unwrap();
            w.rows.step.append_value(s as i64);
            w.rows.value.append_value(value_of(s));
            w.rows.n += 1;
            w.end_step(s).unwrap();
        }
        w.finish().unwrap();
        w.take_notes()
    }

    fn values(dir: &Path) -> Vec<(i64, f64)> {
        let mut out = Vec::new();
        for (_, p) in list_parts(dir).unwrap() {
            for b in arrow::ipc::reader::FileReader::try_new(File::open(&p).unwrap(), None).unwrap()
            {
                let b = b.unwrap();
                let s = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                let v = b.column(1).as_any().downcast_ref::<Float64Array>().unwrap();
                out.extend((0..b.num_rows()).map(|i| (s.value(i), v.value(i))));
            }
        }
        out
    }

    /// A part carries the BLAKE3 of its bytes and still reads as a plain Arrow file; flipping any
    /// one bit of it, data, footer or checksum, is caught before anything parses it.
    #[test]
    fn every_flipped_byte_of_a_part_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t");
        attempt(&dir, 10, 0..5, true, LogCompression::None);
        let parts = list_parts(&dir).unwrap();
        assert_eq!(parts.len(), 1);
        let path = &parts[0].1;
        assert_eq!(check_part(path).unwrap(), PartCheck::Verified);
        let r = arrow::ipc::reader::FileReader::try_new(File::open(path).unwrap(), None).unwrap();
        let sum = r.custom_metadata()[CHECKSUM_KEY].clone();
        assert_eq!(r.custom_metadata()["ehmam.format"], LOG_FORMAT);
        assert!(
            sum.len() == 64 && sum.bytes().all(|c| c.is_ascii_hexdigit()) && sum != placeholder()
        );
        assert_eq!(part_last_step(path), Some(4));
        assert_eq!(values(&dir).len(), 5);
        let bytes = std::fs::read(path).unwrap();
        let bad = tmp.path().join("bad.arrow");
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= mask;
                std::fs::write(&bad, &b).unwrap();
                let got = check_part(&bad).unwrap();
                assert!(
                    matches!(got, PartCheck::Damaged(_)),
                    "byte {i} of {} flipped ({mask:#x}): {got:?}",
                    bytes.len()
                );
            }
        }
        // Cut short, as by a crash mid-copy.
        std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(check_part(&bad).unwrap(), PartCheck::Damaged(_)));
    }

    /// Parts of earlier versions (no checksum) are read unverified; a part that claims the
    /// current format but lost its checksum, or a footer without ehmam's metadata, is not.
    #[test]
    fn parts_without_a_checksum_are_unverified_unless_they_claim_one() {
        let tmp = tempfile::tempdir().unwrap();
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(vec![0, 1])),
                Arc::new(Float64Array::from(vec![1.0, 2.0])),
            ],
        )
        .unwrap();
        for (format, want_damaged) in [
            (Some(LOG_FORMAT_UNCHECKED), false),
            (None, true),
            (Some(LOG_FORMAT), true),
        ] {
            let p = tmp.path().join("old.arrow");
            let mut w = FileWriter::try_new(File::create(&p).unwrap(), &schema()).unwrap();
            w.write(&batch).unwrap();
            if let Some(f) = format {
                w.write_metadata("ehmam.format", f);
            }
            w.finish().unwrap();
            drop(w);
            let got = check_part(&p).unwrap();
            if want_damaged {
                assert!(matches!(got, PartCheck::Damaged(_)), "{format:?}: {got:?}");
            } else {
                assert_eq!(got, PartCheck::Unverified, "{format:?}");
            }
        }
    }

    /// On resume, the part that straddles the resume point is verified before it is cut: a
    /// damaged one is moved aside with a warning, never rewritten (which would give its damaged
    /// rows a fresh checksum). A sound one is cut and sealed again.
    #[test]
    fn resume_moves_a_damaged_part_aside_instead_of_rewriting_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t");
        attempt(&dir, 100, 0..10, false, LogCompression::None);
        let part = dir.join(part_name(0));
        // Flip one bit of step 3's value: without compression the part still parses, with a
        // wrong number in it.
        let mut bytes = std::fs::read(&part).unwrap();
        let needle = value_of(3).to_le_bytes();
        let at: Vec<usize> = (0..bytes.len() - 8)
            .filter(|&i| bytes[i..i + 8] == needle)
            .collect();
        assert_eq!(at.len(), 1);
        bytes[at[0]] ^= 0x04;
        std::fs::write(&part, &bytes).unwrap();
        let notes = attempt(&dir, 100, 6..9, false, LogCompression::None);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("damaged") && n.contains("part-000000000.arrow")),
            "{notes:?}"
        );
        assert!(dir.join("part-000000000.arrow.damaged").exists());
        let rows = values(&dir);
        assert!(
            rows.iter().all(|(s, v)| *v == value_of(*s as u64)),
            "no damaged value read back: {rows:?}"
        );
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![6, 7, 8]);
        // A sound straddling part is cut and carries a valid checksum again.
        let dir = tmp.path().join("u");
        attempt(&dir, 100, 0..10, false, LogCompression::Zstd);
        attempt(&dir, 100, 4..6, false, LogCompression::Zstd);
        assert_eq!(
            values(&dir).iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 5]
        );
        for (_, p) in list_parts(&dir).unwrap() {
            assert_eq!(
                check_part(&p).unwrap(),
                PartCheck::Verified,
                "{}",
                p.display()
            );
        }
    }

    /// A resume at step k warns of the steps before k that have no rows, whether the table
    /// directory exists (parts were completed) or not (the crash came before the first part
    /// was complete), whatever `rotate_every`; and only then.
    #[test]
    fn resume_warns_of_steps_without_rows_whatever_rotate_every() {
        let warned = |notes: &[String], what: &str| {
            notes
                .iter()
                .any(|n| n.starts_with("warning") && n.contains(what))
        };
        for rotate in [1, 4, 100, 1_000_000] {
            let tmp = tempfile::tempdir().unwrap();
            // Crash before any part was complete: no directory; resume from a checkpoint at 7.
            let dir = tmp.path().join("steps");
            let notes = attempt(&dir, rotate, 7..9, true, LogCompression::Zstd);
            assert!(
                warned(&notes, "steps 0..6 have no rows"),
                "rotate_every {rotate}: {notes:?}"
            );
            // Steps 0..4 on disk, resume at 9: steps 5..8 are missing.
            let dir = tmp.path().join("steps2");
            attempt(&dir, rotate, 0..5, true, LogCompression::Zstd);
            let notes = attempt(&dir, rotate, 9..10, true, LogCompression::Zstd);
            assert!(
                warned(&notes, "steps 5..8 have no rows"),
                "rotate_every {rotate}: {notes:?}"
            );
            // Nothing missing: no warning (a resume right after the last step, or before it).
            for k in [10, 3] {
                let notes = attempt(&dir, rotate, k..k + 1, true, LogCompression::Zstd);
                assert!(
                    !notes.iter().any(|n| n.starts_with("warning")),
                    "rotate_every {rotate}, resume at {k}: {notes:?}"
                );
            }
            // A table that is not written every step (frames) never warns.
            let dir = tmp.path().join("frames");
            let notes = attempt(&dir, rotate, 7..9, false, LogCompression::Zstd);
            assert!(notes.is_empty(), "{notes:?}");
        }
    }
}
