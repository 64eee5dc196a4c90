//! `ehmam query`: one read-only DataFusion session over the tables of one or more run directories.
//!
//! Each `NAME.parquet` at the top of a run directory is table `NAME` (`utterances`, `rejects`,
//! `stages`, …), and each sub-directory of Arrow IPC files (`frames/`, `steps/`, `inputs/`) is a
//! table of that name. With several run directories a table is the union of theirs (columns
//! missing from some files read as NULL); every table has a `run` column that tells them apart
//! (filled from the run directory's spec name for files that lack one).
//!
//! Read-only: each statement is checked before planning (one statement; SELECT, WITH, VALUES,
//! EXPLAIN, SHOW and DESCRIBE only), and planning refuses DDL, DML, COPY and SET as a second
//! guard. No other file can be read: URL tables (`SELECT * FROM 'file.csv'`) are off, no table
//! function reads files, and CREATE EXTERNAL TABLE is refused. Files are read lazily, with only
//! the columns a query needs.
//!
//! Damage: every Arrow log part is verified against its checksum (`ehmam.blake3`, see
//! [`stages::logs::check_part`]) before it is registered; a part that fails (flipped bytes, cut
//! off by a crash) is skipped with a warning naming it. Parts written before parts carried a
//! checksum (`ehmam-log/1`) are read unverified, with one note per table. A panic anywhere while
//! tables are read or a query runs is caught and becomes [`SqlError::Internal`].
//!
//! Memory: the session's memory pool is limited (`--memory`; [`default_memory`], a quarter of
//! physical memory) and nothing spills to disk (`ehmam query` writes no file): a query that needs
//! more fails with "resources exhausted". [`Session::query_to`] streams the result: CSV and JSON
//! are written batch by batch as they come; the aligned table holds the whole result (to align its
//! columns) against the same limit.
//!
//! Object storage: a run directory may be a URL (`s3://bucket/runs/x`; `gs://`, `az://`). Its
//! bucket is registered with DataFusion (a client of its own, see
//! [`pipeline::storage::bucket_store`]) and the tables' objects are listed and read where they
//! are, by ranged reads, with nothing copied. Log parts there are not hashed first (that would
//! download each whole): an object is put whole from a sealed part, so none is cut off by a
//! crash; one that does not parse is skipped with a warning.
//!
//! JSON: NaN and the infinities are written as the strings `"NaN"`, `"Infinity"` and
//! `"-Infinity"` (JSON has no numbers for them), SQL NULL as `null`.

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::datatypes::{Float32Type, Float64Type};
use arrow::json::writer::{Encoder, EncoderFactory, EncoderOptions, NullableEncoder};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::object_store::ObjectStoreExt;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use futures::StreamExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use stages::logs::PartCheck;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use pipeline::storage;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    Input(String),
    #[error(
        "query refused: {0} — `ehmam query` only reads (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE)"
    )]
    Refused(String),
    #[error("query failed: {0}")]
    Query(String),
    /// A panic inside DataFusion or Arrow (a damaged file they trusted, or a bug), caught.
    #[error("query failed: internal error while {what}: {message}")]
    Internal { what: String, message: String },
}

/// Runs `f`, turning a panic inside it into [`SqlError::Internal`] (`what`: what was going on).
fn guard<T>(
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> Result<T, SqlError>,
) -> Result<T, SqlError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into());
            Err(SqlError::Internal {
                what: what(),
                message,
            })
        }
    }
}

/// The memory limit of a session unless told otherwise: a quarter of physical memory
/// (`MemTotal` of /proc/meminfo), 2 GiB where that cannot be read.
pub fn default_memory() -> usize {
    physical_memory().map_or(2 << 30, |m| m / 4)
}

fn physical_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A memory limit as given to `--memory`: a size (`512M`, `2G`, `1.5G`, `64K`, `1T`; binary
/// units, an optional trailing `B` or `iB`; a bare number is bytes) or a share of physical memory
/// (`25%`).
pub fn parse_memory(text: &str) -> Result<usize, SqlError> {
    let bad = |why: &str| {
        SqlError::Input(format!(
            "--memory `{text}`: {why} (give a size such as 512M or 2G, or a share of RAM such as 25%)"
        ))
    };
    let t = text.trim();
    if let Some(pct) = t.strip_suffix('%') {
        let p: f64 = pct.trim().parse().map_err(|_| bad("not a percentage"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(bad("a share must lie in (0, 100]%"));
        }
        let total = physical_memory().ok_or_else(|| bad("physical memory unknown here"))?;
        return Ok((total as f64 * p / 100.0) as usize);
    }
    let upper = t.to_ascii_uppercase();
    let num = upper
        .trim_end_matches("IB")
        .trim_end_matches('B')
        .trim_end();
    let (digits, unit) = match num.chars().last() {
        Some(c @ ('K' | 'M' | 'G' | 'T')) => (&num[..num.len() - 1], c),
        _ => (num, ' '),
    };
    let v: f64 = digits.trim().parse().map_err(|_| bad("not a size"))?;
    let scale = match unit {
        'K' => 1u64 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => 1,
    };
    let bytes = v * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < usize::MAX as f64) {
        return Err(bad("must be at least one byte"));
    }
    Ok(bytes as usize)
}

/// A size for messages: `16 MiB`.
fn size(bytes: usize) -> String {
    let b = bytes as f64;
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1048575 => format!("{:.0} KiB", b / 1024.0),
        1048576..=1073741823 => format!("{:.0} MiB", b / 1048576.0),
        _ => format!("{:.1} GiB", b / 1073741824.0),
    }
}

/// Output format of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl std::str::FromStr for Format {
    type Err = SqlError;
    fn from_str(s: &str) -> Result<Self, SqlError> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(SqlError::Input(format!(
                "unknown format `{other}` (table, csv or json)"
            ))),
        }
    }
}

/// Files that make up each table, across the run directories: `NAME.parquet` at a run
/// directory's top, and every `*.arrow` file of a sub-directory (names starting with `.` and
/// unfinished parts, which never end in `.arrow`, are left out).
pub fn discover(run_dirs: &[PathBuf]) -> Result<BTreeMap<String, Vec<PathBuf>>, SqlError> {
    Ok(discover_with_runs(run_dirs)?
        .into_iter()
        .map(|(name, files)| (name, files.into_iter().map(|(f, _)| f).collect()))
        .collect())
}

/// Like [`discover`], with the index of the run directory each file belongs to. A run directory
/// on object storage (`s3://…`) is listed by its prefix and each table's, with the same rules.
fn discover_with_runs(
    run_dirs: &[PathBuf],
) -> Result<BTreeMap<String, Vec<(PathBuf, usize)>>, SqlError> {
    let list = |d: &Path| {
        storage::list(d).map_err(|e| SqlError::Input(format!("cannot list {}: {e}", d.display())))
    };
    let mut tables: BTreeMap<String, Vec<(PathBuf, usize)>> = BTreeMap::new();
    for (ri, dir) in run_dirs.iter().enumerate() {
        let remote = storage::is_remote(dir);
        if !remote && !dir.is_dir() {
            return Err(SqlError::Input(format!(
                "{} is not a run directory",
                dir.display()
            )));
        }
        let (files, dirs) = list(dir)?;
        if remote && files.is_empty() && dirs.is_empty() {
            return Err(SqlError::Input(format!(
                "{} is not a run directory (no object under it)",
                dir.display()
            )));
        }
        let mut entries: Vec<(String, bool)> = files
            .into_iter()
            .map(|f| (f, false))
            .chain(dirs.into_iter().map(|d| (d, true)))
            .collect();
        entries.sort();
        for (name, is_dir) in entries {
            if name.starts_with('.') {
                continue;
            }
            let p = storage::join(dir, &name);
            if !is_dir && name.ends_with(".parquet") && (remote || p.is_file()) {
                let table = name.trim_end_matches(".parquet");
                if is_table_name(table) {
                    tables.entry(table.to_string()).or_default().push((p, ri));
                }
            } else if is_dir && is_table_name(&name) {
                let (mut parts, _) = list(&p)?;
                parts.retain(|n| n.ends_with(".arrow") && !n.starts_with('.'));
                parts.sort();
                if !parts.is_empty() {
                    tables
                        .entry(name)
                        .or_default()
                        .extend(parts.iter().map(|n| (storage::join(&p, n), ri)));
                }
            }
        }
    }
    Ok(tables)
}

/// Only plain identifiers become tables: a stray `frames.bak/` or `x.v2.parquet` in a run
/// directory is not a table (DataFusion would read the dot as a schema) and is left alone.
fn is_table_name(name: &str) -> bool {
    let mut c = name.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// The run name of a run directory: `name` in its `spec.yaml`, else the directory's name.
pub fn run_name(dir: &Path) -> String {
    let from_spec = storage::read_opt(&storage::join(dir, "spec.yaml"))
        .ok()
        .flatten()
        .and_then(|t| serde_yaml::from_slice::<serde_yaml::Value>(&t).ok())
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string));
    from_spec.unwrap_or_else(|| {
        if storage::is_remote(dir) {
            let text = dir.to_string_lossy();
            let last = text
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default();
            return last.to_string();
        }
        let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        abs.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string())
    })
}

fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "parquet")
}

/// The schema of a Parquet or Arrow IPC file, read from its footer. `None` (with a warning) for
/// a damaged file.
fn file_schema(path: &Path) -> Result<Option<SchemaRef>, SqlError> {
    let file = File::open(path)
        .map_err(|e| SqlError::Input(format!("cannot open {}: {e}", path.display())))?;
    let schema = if is_parquet(path) {
        ParquetRecordBatchReaderBuilder::try_new(file)
            .map(|b| b.schema().clone())
            .map_err(|e| e.to_string())
    } else {
        arrow::ipc::reader::FileReader::try_new(file, None)
            .map(|r| r.schema())
            .map_err(|e| e.to_string())
    };
    match schema {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            eprintln!(
                "warning: skipping {} (unreadable, probably cut off by a crash): {e}",
                path.display()
            );
            Ok(None)
        }
    }
}

/// [`file_schema`] of an object, read where it is (ranged reads of its footer, not the whole
/// object: DataFusion's for Parquet, [`arrow_footer_schema`] for Arrow). `None` (with a warning)
/// for a damaged one; an object that cannot be fetched is an error.
fn remote_schema(
    ctx: &SessionContext,
    rt: &tokio::runtime::Runtime,
    path: &Path,
) -> Result<Option<SchemaRef>, SqlError> {
    let shown = path.display();
    let url = ListingTableUrl::parse(path.to_string_lossy())
        .map_err(|e| SqlError::Input(format!("{shown}: {e}")))?;
    let store = ctx
        .runtime_env()
        .object_store(url.object_store())
        .map_err(|e| SqlError::Input(format!("{shown}: {e}")))?;
    let meta = rt
        .block_on(store.head(url.prefix()))
        .map_err(|e| SqlError::Input(format!("cannot read {shown}: {e}")))?;
    let skip = |why: String| {
        eprintln!("warning: skipping {shown} (unreadable: {why})");
        Ok(None)
    };
    if !is_parquet(path) {
        // Not DataFusion's schema inference: it reads an Arrow object as a stream from its
        // start, which failed on some of ours ("Unable to read IPC message schema").
        return match rt.block_on(arrow_footer_schema(&store, &meta)) {
            Ok(Ok(s)) => Ok(Some(s)),
            Ok(Err(why)) => skip(why),
            Err(e) => Err(SqlError::Input(format!("cannot read {shown}: {e}"))),
        };
    }
    // The file's own types (Utf8, not DataFusion's view types), as for a local file.
    let format = ParquetFormat::default().with_force_view_types(false);
    match rt.block_on(format.infer_schema(&ctx.state(), &store, &[meta])) {
        Ok(s) => Ok(Some(s)),
        Err(e) if matches!(e.find_root(), DataFusionError::ObjectStore(_)) => {
            Err(SqlError::Input(format!("cannot read {shown}: {e}")))
        }
        Err(e) => skip(e.to_string()),
    }
}

/// The schema of an Arrow IPC file on object storage, from its footer (two ranged reads: the
/// last 10 bytes, then the footer they give the length of). `Ok(Err(why))` for a damaged file,
/// `Err` when the object cannot be fetched.
async fn arrow_footer_schema(
    store: &Arc<dyn datafusion::object_store::ObjectStore>,
    meta: &datafusion::object_store::ObjectMeta,
) -> Result<Result<SchemaRef, String>, datafusion::object_store::Error> {
    let size = meta.size;
    if size < 10 + 8 {
        return Ok(Err(format!("{size} bytes: too short for an Arrow file")));
    }
    let tail = store.get_range(&meta.location, size - 10..size).await?;
    let Ok(tail) = <[u8; 10]>::try_from(tail.as_ref()) else {
        return Ok(Err("the store answered another range".into()));
    };
    let footer_len = match arrow::ipc::reader::read_footer_length(tail) {
        Ok(n) => n as u64,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if footer_len + 10 + 8 > size {
        return Ok(Err(format!(
            "a footer of {footer_len} bytes in a file of {size}"
        )));
    }
    let footer = store
        .get_range(&meta.location, size - 10 - footer_len..size - 10)
        .await?;
    let footer = match arrow::ipc::root_as_footer(&footer) {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("a damaged footer: {e}"))),
    };
    let Some(schema) = footer.schema() else {
        return Ok(Err("no schema in its footer".into()));
    };
    Ok(Ok(Arc::new(arrow::ipc::convert::fb_to_schema(schema))))
}

/// Reads a whole Parquet or Arrow IPC file; `None` (with a warning) for a damaged one.
fn read_file(path: &Path) -> Result<Option<Vec<RecordBatch>>, SqlError> {
    // An object is fetched whole (these are the few small tables without a `run` column).
    let bytes = storage::read(path)
        .map_err(|e| SqlError::Input(format!("cannot open {}: {e}", path.display())))?;
    let batches: Result<Vec<RecordBatch>, arrow::error::ArrowError> = if is_parquet(path) {
        ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(arrow::error::ArrowError::from)
            .and_then(|r| r.collect::<Result<Vec<_>, _>>())
    } else {
        arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)
            .and_then(|r| r.collect::<Result<Vec<_>, _>>())
    };
    match batches {
        Ok(b) => Ok(Some(b)),
        Err(e) => {
            eprintln!("warning: skipping {} (damaged: {e})", path.display());
            Ok(None)
        }
    }
}

/// Fields without metadata, so that files written with different key-value metadata merge.
fn plain(schema: &Schema) -> Schema {
    Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_metadata(Default::default()))
            .collect::<Vec<Field>>(),
    )
}

/// Registers one table: lazily (a listing over its files, columns read on demand) when every
/// file has a `run` column, else in memory with `run` filled in.
fn register(
    ctx: &SessionContext,
    rt: &tokio::runtime::Runtime,
    name: &str,
    files: &[(PathBuf, usize)],
    runs: &[String],
) -> Result<bool, SqlError> {
    let mut good: Vec<(PathBuf, usize, SchemaRef)> = Vec::new();
    let mut unverified = 0;
    // A log part is verified before anything parses it (a flipped byte can make Arrow panic or
    // read wrong numbers); the parts are hashed on every core, then taken in order.
    let checks: Vec<Option<std::io::Result<PartCheck>>> = {
        use rayon::prelude::*;
        files
            .par_iter()
            .map(|(f, _)| {
                (!is_parquet(f) && !storage::is_remote(f)).then(|| stages::logs::check_part(f))
            })
            .collect()
    };
    for ((f, ri), check) in files.iter().zip(checks) {
        if let Some(check) = check {
            match check {
                Ok(PartCheck::Verified) => {}
                Ok(PartCheck::Unverified) => unverified += 1,
                Ok(PartCheck::Damaged(why)) => {
                    eprintln!("warning: skipping {} (damaged: {why})", f.display());
                    continue;
                }
                Err(e) => return Err(SqlError::Input(format!("cannot read {}: {e}", f.display()))),
            }
        }
        let schema = if storage::is_remote(f) {
            remote_schema(ctx, rt, f)?
        } else {
            file_schema(f)?
        };
        if let Some(s) = schema {
            good.push((f.clone(), *ri, s));
        }
    }
    if unverified > 0 {
        eprintln!("note: {unverified} file(s) of table `{name}` carry no checksum (log parts of an earlier ehmam): read unverified");
    }
    if good.is_empty() {
        return Ok(false);
    }
    // The union of the files' columns; a column some file lacks reads as NULL there.
    let mut merged = plain(&good[0].2);
    for (f, _, s) in &good[1..] {
        merged = Schema::try_merge(vec![merged, plain(s)]).map_err(|e| {
            SqlError::Input(format!(
                "{}: its columns do not fit the other `{name}` files: {e}",
                f.display()
            ))
        })?;
    }
    let everywhere: BTreeSet<String> = merged
        .fields()
        .iter()
        .filter(|fl| {
            good.iter()
                .all(|(_, _, s)| s.field_with_name(fl.name()).is_ok())
        })
        .map(|fl| fl.name().clone())
        .collect();
    let mut fields: Vec<Field> = merged
        .fields()
        .iter()
        .map(|fl| {
            let f = fl.as_ref().clone();
            if everywhere.contains(fl.name()) {
                f
            } else {
                f.with_nullable(true)
            }
        })
        .collect();
    let has_run = everywhere.contains("run");
    if has_run {
        if let Some(run) = merged
            .field_with_name("run")
            .ok()
            .filter(|f| f.data_type() != &DataType::Utf8)
        {
            return Err(SqlError::Input(format!(
                "table `{name}`: its `run` column is {} (expected a string)",
                run.data_type()
            )));
        }
    } else {
        fields.retain(|f| f.name() != "run");
        fields.insert(0, Field::new("run", DataType::Utf8, false));
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let globby = |p: &Path| p.to_string_lossy().contains(['*', '?', '[']);
    if has_run && !good.iter().any(|(f, _, _)| globby(f)) {
        let mut urls = Vec::new();
        for (f, _, _) in &good {
            let abs = if storage::is_remote(f) {
                f.clone()
            } else {
                std::fs::canonicalize(f)
                    .map_err(|e| SqlError::Input(format!("cannot open {}: {e}", f.display())))?
            };
            urls.push(
                ListingTableUrl::parse(abs.to_string_lossy())
                    .map_err(|e| SqlError::Input(format!("{}: {e}", f.display())))?,
            );
        }
        let parquet = is_parquet(&good[0].0);
        if good.iter().any(|(f, _, _)| is_parquet(f) != parquet) {
            return Err(SqlError::Input(format!(
                "table `{name}` mixes Parquet and Arrow files"
            )));
        }
        let (format, ext): (Arc<dyn FileFormat>, &str) = if parquet {
            (Arc::new(ParquetFormat::default()), ".parquet")
        } else {
            (Arc::new(ArrowFormat), ".arrow")
        };
        let options = ListingOptions::new(format).with_file_extension(ext);
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema);
        let table = ListingTable::try_new(config)
            .map_err(|e| SqlError::Input(format!("table `{name}`: {e}")))?;
        ctx.register_table(name, Arc::new(table))
            .map_err(|e| SqlError::Input(e.to_string()))?;
        return Ok(true);
    }
    // In memory: a few small tables written without a `run` column.
    let mut parts = Vec::new();
    for (f, ri, _) in &good {
        let Some(batches) = read_file(f)? else {
            continue;
        };
        for b in batches {
            let n = b.num_rows();
            let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
            for field in schema.fields() {
                let col = match b.column_by_name(field.name()) {
                    Some(c) => c.clone(),
                    None if field.name() == "run" => {
                        Arc::new(StringArray::from(vec![runs[*ri].as_str(); n]))
                    }
                    None => new_null_array(field.data_type(), n),
                };
                cols.push(col);
            }
            parts.push(
                RecordBatch::try_new(schema.clone(), cols)
                    .map_err(|e| SqlError::Input(format!("{}: {e}", f.display())))?,
            );
        }
    }
    let table =
        MemTable::try_new(schema, vec![parts]).map_err(|e| SqlError::Input(e.to_string()))?;
    ctx.register_table(name, Arc::new(table))
        .map_err(|e| SqlError::Input(e.to_string()))?;
    Ok(true)
}

/// A context with every table of the run directories registered, and the table names, with a
/// memory limit of `memory` bytes and no spilling to disk. A run directory on object storage
/// (`s3://…`) is read where it is: its bucket is registered with DataFusion, which reads the
/// Parquet and Arrow files there (`rt` runs those requests).
fn session_with(
    run_dirs: &[PathBuf],
    memory: usize,
    rt: &tokio::runtime::Runtime,
) -> Result<(SessionContext, Vec<String>), SqlError> {
    let config = SessionConfig::new().with_information_schema(true);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(memory, 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| SqlError::Query(format!("cannot set up the query engine: {e}")))?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    for dir in run_dirs {
        if let Some(why) = storage::unsupported_url(dir) {
            return Err(SqlError::Input(why));
        }
        if !storage::is_remote(dir) {
            continue;
        }
        let (bucket, store) = storage::bucket_store(dir)
            .map_err(|e| SqlError::Input(format!("cannot read {}: {e}", dir.display())))?;
        ctx.register_object_store(&bucket, store);
    }
    let runs: Vec<String> = run_dirs.iter().map(|d| run_name(d)).collect();
    for (i, r) in runs.iter().enumerate() {
        if let Some(j) = runs[..i].iter().position(|o| o == r) {
            eprintln!("warning: {} and {} both hold run `{r}`: the `run` column cannot tell their rows apart (give runs different `name`s)", run_dirs[j].display(), run_dirs[i].display());
        }
    }
    let tables = discover_with_runs(run_dirs)?;
    let mut names = Vec::new();
    for (name, files) in tables {
        if name == "information_schema" {
            continue;
        }
        if register(&ctx, rt, &name, &files, &runs)? {
            names.push(name);
        }
    }
    Ok((ctx, names))
}

/// The leading keywords of a statement, to name it in a refusal (`CREATE TABLE`, `INSERT INTO`).
fn statement_kind(text: &str) -> String {
    let words: Vec<&str> = text
        .split_whitespace()
        .take_while(|w| w.chars().all(|c| c.is_ascii_uppercase()))
        .take(3)
        .collect();
    if words.is_empty() {
        text.split_whitespace()
            .next()
            .unwrap_or("statement")
            .to_string()
    } else {
        words.join(" ")
    }
}

fn check_sql_statement(s: &SqlStatement) -> Result<(), SqlError> {
    match s {
        SqlStatement::Query(_)
        | SqlStatement::ShowTables { .. }
        | SqlStatement::ShowColumns { .. }
        | SqlStatement::ShowVariable { .. }
        | SqlStatement::ShowFunctions { .. }
        | SqlStatement::ExplainTable { .. } => Ok(()),
        SqlStatement::Explain { statement, .. } => check_sql_statement(statement),
        other => Err(SqlError::Refused(statement_kind(&other.to_string()))),
    }
}

/// Refuses anything but one reading statement, before it is planned.
pub fn check_read_only(sql: &str) -> Result<(), SqlError> {
    let statements = DFParser::parse_sql(sql).map_err(|e| SqlError::Query(e.to_string()))?;
    if statements.len() != 1 {
        return Err(SqlError::Query(format!(
            "give exactly one statement (found {})",
            statements.len()
        )));
    }
    fn check(s: &DfStatement) -> Result<(), SqlError> {
        match s {
            DfStatement::Statement(st) => check_sql_statement(st),
            DfStatement::Explain(e) => check(&e.statement),
            DfStatement::CreateExternalTable(_) => {
                Err(SqlError::Refused("CREATE EXTERNAL TABLE".into()))
            }
            DfStatement::CopyTo(_) => Err(SqlError::Refused("COPY".into())),
            DfStatement::Reset(_) => Err(SqlError::Refused("RESET".into())),
        }
    }
    check(&statements[0])
}

/// A read-only SQL session over run directories, for several queries (`ehmam plot`).
pub struct Session {
    rt: tokio::runtime::Runtime,
    ctx: SessionContext,
    tables: Vec<String>,
    memory: usize,
}

impl Session {
    /// A session with the [`default_memory`] limit.
    pub fn open(run_dirs: &[PathBuf]) -> Result<Session, SqlError> {
        Session::open_with(run_dirs, default_memory())
    }

    /// A session whose queries may hold at most `memory` bytes (DataFusion's memory pool).
    pub fn open_with(run_dirs: &[PathBuf], memory: usize) -> Result<Session, SqlError> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .map_err(|e| SqlError::Query(format!("cannot start the query runtime: {e}")))?;
        let what = || {
            let dirs: Vec<String> = run_dirs.iter().map(|d| d.display().to_string()).collect();
            format!("reading the tables of {}", dirs.join(", "))
        };
        let (ctx, tables) = guard(what, || session_with(run_dirs, memory, &rt))?;
        Ok(Session {
            rt,
            ctx,
            tables,
            memory,
        })
    }

    /// A DataFusion error as a [`SqlError`]; running out of the memory pool says how to go on.
    fn df_err(&self, e: DataFusionError) -> SqlError {
        if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) {
            SqlError::Query(format!(
                "{e}\n  the query needs more memory than its limit of {} (--memory): raise it, or narrow the query (WHERE, LIMIT, fewer columns)",
                size(self.memory)
            ))
        } else {
            SqlError::Query(e.to_string())
        }
    }

    /// Names of the tables found.
    pub fn tables(&self) -> &[String] {
        &self.tables
    }

    pub fn has_table(&self, name: &str) -> bool {
        self.tables.iter().any(|t| t == name)
    }

    /// Every table the statement reads must be one of the session's (or of its catalog's
    /// `information_schema`): an unknown name is answered with the tables there are.
    fn check_tables(&self, sql: &str) -> Result<(), SqlError> {
        let statements = DFParser::parse_sql(sql).map_err(|e| SqlError::Query(e.to_string()))?;
        let state = self.ctx.state();
        for st in &statements {
            let refs = state
                .resolve_table_references(st)
                .map_err(|e| SqlError::Query(e.to_string()))?;
            for r in refs {
                let qualified = r.schema().is_some() || r.catalog().is_some();
                if !qualified && !self.has_table(r.table()) {
                    let here = if self.tables.is_empty() {
                        "none".to_string()
                    } else {
                        self.tables.join(", ")
                    };
                    return Err(SqlError::Query(format!(
                        "table '{}' not found\n  tables here: {here}",
                        r.table()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks a statement and plans it into a stream of result batches (inside the runtime).
    async fn stream(
        &self,
        sql: &str,
    ) -> Result<datafusion::execution::SendableRecordBatchStream, SqlError> {
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let df = self
            .ctx
            .sql_with_options(sql, options)
            .await
            .map_err(|e| self.df_err(e))?;
        df.execute_stream().await.map_err(|e| self.df_err(e))
    }

    /// Runs one read-only statement and returns the result batches (held within the memory
    /// limit).
    pub fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
        check_read_only(sql)?;
        self.check_tables(sql)?;
        guard(
            || format!("running `{sql}`"),
            || {
                self.rt.block_on(async {
                    let mut stream = self.stream(sql).await?;
                    let held = MemoryConsumer::new("ehmam query result")
                        .register(&self.ctx.runtime_env().memory_pool);
                    let mut out = Vec::new();
                    while let Some(b) = stream.next().await {
                        let b = b.map_err(|e| self.df_err(e))?;
                        held.try_grow(b.get_array_memory_size())
                            .map_err(|e| self.df_err(e))?;
                        out.push(b);
                    }
                    Ok(out)
                })
            },
        )
    }

    /// Runs one read-only statement and writes its result to `out` as it comes (CSV and JSON
    /// batch by batch; the aligned table once whole, held within the memory limit). Returns the
    /// number of rows. A reader that goes away (a closed pipe: `| head`) ends the query quietly.
    pub fn query_to(
        &self,
        sql: &str,
        format: Format,
        out: &mut dyn Write,
    ) -> Result<u64, SqlError> {
        check_read_only(sql)?;
        self.check_tables(sql)?;
        guard(
            || format!("running `{sql}`"),
            || {
                self.rt.block_on(async {
                    let mut stream = self.stream(sql).await?;
                    let held = MemoryConsumer::new("ehmam query table output")
                        .register(&self.ctx.runtime_env().memory_pool);
                    let schema = stream.schema();
                    let mut sink = Sink::new(format, out);
                    let mut rows = 0u64;
                    while let Some(b) = stream.next().await {
                        let b = b.map_err(|e| self.df_err(e))?;
                        rows += b.num_rows() as u64;
                        if format == Format::Table {
                            held.try_grow(b.get_array_memory_size()).map_err(|e| {
                                let e = self.df_err(e);
                                SqlError::Query(format!("{e}\n  (the table format holds the whole result to align it; --format csv or json streams it)"))
                            })?;
                        }
                        if let Err(e) = sink.write(b) {
                            return if sink.gone() { Ok(rows) } else { Err(write_err(e)) };
                        }
                    }
                    let gone = sink.gone.clone();
                    match sink.finish(Some(&schema)) {
                        Ok(()) => Ok(rows),
                        Err(_) if gone.get() => Ok(rows),
                        Err(e) => Err(write_err(e)),
                    }
                })
            },
        )
    }
}

/// Output that remembers whether its reader went away (`ehmam query … | head`): the CSV writer
/// hands on I/O errors as text only.
struct Tracked<'a> {
    out: &'a mut dyn Write,
    gone: Rc<Cell<bool>>,
}

impl Write for Tracked<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.out.write(buf);
        self.note(r)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.out.flush();
        self.note(r)
    }
}

impl Tracked<'_> {
    fn note<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                self.gone.set(true);
            }
        }
        r
    }
}

fn write_err(e: arrow::error::ArrowError) -> SqlError {
    match e {
        arrow::error::ArrowError::CsvError(m) if m.contains("Nested type") => SqlError::Query(
            format!("{m} (list columns have no CSV form: use --format json or table)"),
        ),
        e => SqlError::Query(format!("cannot write the result: {e}")),
    }
}

/// Writes result batches in one format as they come.
struct Sink<'a> {
    to: SinkTo<'a>,
    gone: Rc<Cell<bool>>,
}

enum SinkTo<'a> {
    Table(Tracked<'a>, Vec<RecordBatch>),
    /// The CSV writer flushes its writer after every batch; whether a batch was written.
    Csv(Box<arrow::csv::Writer<Tracked<'a>>>, bool),
    Json(arrow::json::writer::Writer<Tracked<'a>, arrow::json::writer::JsonArray>),
}

impl<'a> Sink<'a> {
    fn new(format: Format, out: &'a mut dyn Write) -> Sink<'a> {
        let gone = Rc::new(Cell::new(false));
        let out = Tracked {
            out,
            gone: gone.clone(),
        };
        let to = match format {
            Format::Table => SinkTo::Table(out, Vec::new()),
            Format::Csv => SinkTo::Csv(
                Box::new(
                    arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(out),
                ),
                false,
            ),
            Format::Json => SinkTo::Json(json_writer(out)),
        };
        Sink { to, gone }
    }

    /// The reader of the output went away.
    fn gone(&self) -> bool {
        self.gone.get()
    }

    fn write(&mut self, b: RecordBatch) -> Result<(), arrow::error::ArrowError> {
        match &mut self.to {
            SinkTo::Table(_, held) => held.push(b),
            SinkTo::Csv(w, any) => {
                w.write(&b)?;
                *any = true;
            }
            SinkTo::Json(w) => {
                w.write(&b)?;
                w.get_mut().flush()?;
            }
        }
        Ok(())
    }

    /// Ends the output; `schema` (when known) gives an empty CSV result its header.
    fn finish(self, schema: Option<&SchemaRef>) -> Result<(), arrow::error::ArrowError> {
        match self.to {
            SinkTo::Table(mut out, held) => {
                let t = arrow::util::pretty::pretty_format_batches(&held)?;
                writeln!(out, "{t}")?;
                out.flush()?;
            }
            SinkTo::Csv(mut w, any) => {
                if let (false, Some(schema)) = (any, schema) {
                    w.write(&RecordBatch::new_empty(schema.clone()))?;
                }
            }
            SinkTo::Json(mut w) => {
                w.finish()?;
                let out = w.get_mut();
                out.write_all(b"\n")?;
                out.flush()?;
            }
        }
        Ok(())
    }
}

/// A JSON array writer that keeps NULLs (`null`) and writes NaN and the infinities as strings.
fn json_writer<W: Write>(out: W) -> arrow::json::writer::Writer<W, arrow::json::writer::JsonArray> {
    arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .with_encoder_factory(Arc::new(NonFiniteAsStrings))
        .build::<_, arrow::json::writer::JsonArray>(out)
}

/// JSON has no numbers for NaN and ±∞, and arrow writes `null` for them, which SQL NULL also
/// gives: they are written as `"NaN"`, `"Infinity"` and `"-Infinity"` (which JavaScript's
/// `Number()` and Python's `float()` read back); finite floats as arrow writes them.
#[derive(Debug)]
struct NonFiniteAsStrings;

/// Options without the factory, for the finite values (a static: encoders borrow their options).
fn plain_json_options() -> &'static EncoderOptions {
    static PLAIN: std::sync::OnceLock<EncoderOptions> = std::sync::OnceLock::new();
    PLAIN.get_or_init(EncoderOptions::default)
}

struct Floats<'a> {
    value: Box<dyn Fn(usize) -> f64 + 'a>,
    finite: NullableEncoder<'a>,
}

impl Encoder for Floats<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let v = (self.value)(idx);
        if v.is_nan() {
            out.extend_from_slice(b"\"NaN\"");
        } else if v == f64::INFINITY {
            out.extend_from_slice(b"\"Infinity\"");
        } else if v == f64::NEG_INFINITY {
            out.extend_from_slice(b"\"-Infinity\"");
        } else {
            self.finite.encode(idx, out)
        }
    }
}

impl EncoderFactory for NonFiniteAsStrings {
    fn make_default_encoder<'a>(
        &self,
        field: &'a arrow::datatypes::FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> Result<Option<NullableEncoder<'a>>, arrow::error::ArrowError> {
        let value: Box<dyn Fn(usize) -> f64 + 'a> = match array.data_type() {
            DataType::Float64 => {
                let a = array.as_primitive::<Float64Type>();
                Box::new(move |i| a.value(i))
            }
            DataType::Float32 => {
                let a = array.as_primitive::<Float32Type>();
                Box::new(move |i| a.value(i) as f64)
            }
            _ => return Ok(None),
        };
        let finite = arrow::json::writer::make_encoder(field, array, plain_json_options())?;
        let encoder = Floats { value, finite };
        Ok(Some(NullableEncoder::new(
            Box::new(encoder),
            array.nulls().cloned(),
        )))
    }
}

/// Runs one read-only SQL statement over the run directories and returns the result batches.
pub fn query_batches(run_dirs: &[PathBuf], sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    check_read_only(sql)?;
    Session::open(run_dirs)?.query(sql)
}

/// Formats result batches as an aligned table, CSV (with header) or a JSON array of objects
/// (NULLs written as `null`, NaN and infinities as strings).
pub fn format_batches(batches: &[RecordBatch], format: Format) -> Result<String, SqlError> {
    let mut buf: Vec<u8> = Vec::new();
    {
        let mut sink = Sink::new(format, &mut buf);
        for b in batches {
            sink.write(b.clone()).map_err(write_err)?;
        }
        sink.finish(batches.first().map(|b| b.schema()).as_ref())
            .map_err(write_err)?;
    }
    String::from_utf8(buf).map_err(|e| SqlError::Query(e.to_string()))
}

/// `ehmam query`, its whole result as text.
pub fn query(run_dirs: &[PathBuf], sql: &str, format: Format) -> Result<String, SqlError> {
    let batches = query_batches(run_dirs, sql)?;
    format_batches(&batches, format)
}

/// `ehmam query`: runs one read-only statement over the run directories with a memory limit of
/// `memory` bytes and streams its result to `out` (see [`Session::query_to`]); returns the rows.
pub fn query_to(
    run_dirs: &[PathBuf],
    sql: &str,
    format: Format,
    memory: usize,
    out: &mut dyn Write,
) -> Result<u64, SqlError> {
    check_read_only(sql)?;
    Session::open_with(run_dirs, memory)?.query_to(sql, format, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};

    /// A session over an empty run directory (queries without tables).
    fn empty(memory: usize) -> (tempfile::TempDir, Session) {
        let tmp = tempfile::tempdir().unwrap();
        let s = Session::open_with(&[tmp.path().to_path_buf()], memory).unwrap();
        (tmp, s)
    }

    /// Bytes written, not kept.
    #[derive(Default)]
    struct Count(u64, u64);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            self.1 += buf.iter().filter(|b| **b == b'\n').count() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A panic inside the query (here a function that panics, standing in for Arrow reading a
    /// damaged file) is an error naming the query, both ways of running one.
    #[test]
    fn a_panic_inside_a_query_becomes_an_error() {
        let (_tmp, s) = empty(64 << 20);
        let boom = create_udf(
            "boom",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Volatile,
            Arc::new(|_: &[ColumnarValue]| panic!("boom: index out of bounds")),
        );
        s.ctx.register_udf(boom);
        let sql = "SELECT boom(x) FROM (VALUES (1), (2)) AS t(x)";
        for r in [
            s.query(sql).map(|_| 0),
            s.query_to(sql, Format::Csv, &mut Count::default()),
        ] {
            match r {
                Err(SqlError::Internal { what, message }) => {
                    assert!(what.contains(sql), "{what}");
                    assert!(message.contains("boom: index out of bounds"), "{message}");
                }
                other => panic!("not an internal error: {other:?}"),
            }
        }
        // The session still answers.
        assert_eq!(s.query("SELECT 1").unwrap()[0].num_rows(), 1);
    }

    /// JSON tells NaN and ±∞ from NULL; finite values are written as before, in lists too.
    #[test]
    fn json_writes_nan_and_infinities_apart_from_null() {
        let (_tmp, s) = empty(64 << 20);
        let sql = "SELECT CAST('NaN' AS DOUBLE) AS a, CAST(NULL AS DOUBLE) AS b, \
                   CAST('inf' AS DOUBLE) AS c, -CAST('inf' AS DOUBLE) AS d, \
                   CAST(0.1 AS REAL) AS e, CAST('NaN' AS REAL) AS f, 2.5 AS g, \
                   1.0 / 0.0 AS h, make_array(CAST('-inf' AS REAL), CAST(1.25 AS REAL)) AS l";
        let mut out = Vec::new();
        s.query_to(sql, Format::Json, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let row = &v[0];
        assert_eq!(row["a"], "NaN", "{text}");
        assert!(row["b"].is_null(), "{text}");
        assert_eq!(row["c"], "Infinity", "{text}");
        assert_eq!(row["d"], "-Infinity", "{text}");
        assert_eq!(row["e"].as_f64(), Some(0.1), "{text}");
        assert_eq!(row["f"], "NaN", "{text}");
        assert_eq!(row["g"].as_f64(), Some(2.5), "{text}");
        assert_eq!(row["h"], "Infinity", "{text}");
        assert_eq!(row["l"], serde_json::json!(["-Infinity", 1.25]), "{text}");
        // The same through format_batches.
        let batches = s.query(sql).unwrap();
        assert_eq!(format_batches(&batches, Format::Json).unwrap(), text);
    }

    /// With a small limit, a query that must hold much (distinct values of a big input) fails
    /// with a clear error; a big result streams through CSV and JSON within the same limit,
    /// where holding it (the table format, `query`) fails.
    #[test]
    fn a_query_over_its_memory_limit_fails_and_a_big_result_streams() {
        let (_tmp, s) = empty(8 << 20);
        let e = s
            .query_to(
                "SELECT count(DISTINCT x) FROM (SELECT unnest(range(0, 4000000)) AS x)",
                Format::Csv,
                &mut Count::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Resources exhausted") && e.contains("--memory") && e.contains("8 MiB"),
            "{e}"
        );
        // 2,250,000 rows of two Int64: 36 MB of result.
        let big = "SELECT a.x AS i, b.x AS j FROM (SELECT unnest(range(0, 1500)) AS x) a \
                   CROSS JOIN (SELECT unnest(range(0, 1500)) AS x) b";
        let mut c = Count::default();
        assert_eq!(s.query_to(big, Format::Csv, &mut c).unwrap(), 2_250_000);
        assert_eq!(c.1, 2_250_001, "header and every row");
        let mut c = Count::default();
        assert_eq!(s.query_to(big, Format::Json, &mut c).unwrap(), 2_250_000);
        let held = s.query_to(big, Format::Table, &mut Count::default());
        let e = held.unwrap_err().to_string();
        assert!(
            e.contains("Resources exhausted") && e.contains("--format csv"),
            "{e}"
        );
        let e = s.query(big).unwrap_err().to_string();
        assert!(e.contains("Resources exhausted"), "{e}");
    }

    #[test]
    fn memory_limits_parse_or_say_what_is_wrong() {
        for (t, want) in [
            ("512M", 512usize << 20),
            ("2G", 2 << 30),
            ("1.5G", 3 << 29),
            ("2GiB", 2 << 30),
            ("64k", 64 << 10),
            ("16MB", 16 << 20),
            ("1000", 1000),
        ] {
            assert_eq!(parse_memory(t).unwrap(), want, "{t}");
        }
        if physical_memory().is_some() {
            let quarter = parse_memory("25%").unwrap();
            assert!(quarter > 0 && quarter.abs_diff(default_memory()) <= 1);
        }
        for t in ["0", "-1G", "abc", "150%", "0%", "", "1X", "NaNG"] {
            let e = parse_memory(t).unwrap_err().to_string();
            assert!(e.contains("--memory") && e.contains("512M"), "{t}: {e}");
        }
    }

    /// An empty CSV result still has its header.
    #[test]
    fn an_empty_csv_result_has_its_header() {
        let (_tmp, s) = empty(64 << 20);
        let mut out = Vec::new();
        let n = s
            .query_to(
                "SELECT 1 AS one, 'a' AS two WHERE false",
                Format::Csv,
                &mut out,
            )
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(String::from_utf8(out).unwrap(), "one,two\n");
    }
}
