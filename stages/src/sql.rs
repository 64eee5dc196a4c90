//! `ehmam query`: one read-only DataFusion session over the tables of one or more run directories.
//!
//! Each `NAME.parquet` at the top of a run directory is table `NAME` (`utterances`, `rejects`,
//! `stages`, …), and each sub-directory of Arrow IPC files (`frames/`, `steps/`) is a table of that
//! name. With several run directories a table is the union of theirs; every table has a `run`
//! column that tells them apart. Statements that write (DDL, DML, COPY, SET …) are refused, and
//! no other file can be read (URL tables are off).

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SQLOptions, SessionContext};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    Input(String),
    #[error("query refused: {0} — `ehmam query` only reads (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE)")]
    Refused(String),
    #[error("query failed: {0}")]
    Query(String),
}

/// Output format of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown format `{other}` (table, csv or json)")),
        }
    }
}

/// Files that make up each table, across the run directories.
pub fn discover(run_dirs: &[PathBuf]) -> Result<BTreeMap<String, Vec<PathBuf>>, SqlError> {
    let mut tables: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for dir in run_dirs {
        if !dir.is_dir() {
            return Err(SqlError::Input(format!("{} is not a run directory", dir.display())));
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| SqlError::Input(format!("cannot list {}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            if p.is_file() && name.ends_with(".parquet") {
                tables.entry(name.trim_end_matches(".parquet").to_string()).or_default().push(p);
            } else if p.is_dir() {
                let mut parts: Vec<PathBuf> = std::fs::read_dir(&p)
                    .map_err(|e| SqlError::Input(format!("cannot list {}: {e}", p.display())))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| f.extension().is_some_and(|x| x == "arrow"))
                    .collect();
                parts.sort();
                if !parts.is_empty() {
                    tables.entry(name).or_default().extend(parts);
                }
            }
        }
    }
    Ok(tables)
}

/// Reads a Parquet or Arrow IPC file. A damaged Arrow IPC part (a crash while writing) is skipped
/// with a warning: the caller gets `Ok(None)`.
fn read_table_file(path: &Path) -> Result<Option<(SchemaRef, Vec<RecordBatch>)>, SqlError> {
    let file = File::open(path).map_err(|e| SqlError::Input(format!("cannot open {}: {e}", path.display())))?;
    if path.extension().is_some_and(|x| x == "parquet") {
        let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| SqlError::Input(format!("{}: {e}", path.display())))?;
        let schema = b.schema().clone();
        let reader = b.build().map_err(|e| SqlError::Input(format!("{}: {e}", path.display())))?;
        let batches: Result<Vec<_>, _> = reader.collect();
        let batches = batches.map_err(|e| SqlError::Input(format!("{}: {e}", path.display())))?;
        return Ok(Some((schema, batches)));
    }
    let reader = match arrow::ipc::reader::FileReader::try_new(file, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warning: skipping {} (unreadable, probably cut off by a crash): {e}", path.display());
            return Ok(None);
        }
    };
    let schema = reader.schema();
    let mut batches = Vec::new();
    for b in reader {
        match b {
            Ok(b) => batches.push(b),
            Err(e) => {
                eprintln!("warning: skipping {} (damaged: {e})", path.display());
                return Ok(None);
            }
        }
    }
    Ok(Some((schema, batches)))
}

/// A session with every table of the run directories registered.
pub fn session(run_dirs: &[PathBuf]) -> Result<(SessionContext, Vec<String>), SqlError> {
    let ctx = SessionContext::new();
    let tables = discover(run_dirs)?;
    let mut names = Vec::new();
    for (name, files) in tables {
        let mut schema: Option<SchemaRef> = None;
        let mut parts = Vec::new();
        for f in &files {
            let Some((s, batches)) = read_table_file(f)? else { continue };
            match &schema {
                None => schema = Some(s),
                Some(first) if first.fields() != s.fields() => {
                    return Err(SqlError::Input(format!("{}: its columns differ from the other `{name}` files", f.display())));
                }
                _ => {}
            }
            parts.extend(batches);
        }
        let Some(schema) = schema else { continue };
        let table = MemTable::try_new(schema, vec![parts]).map_err(|e| SqlError::Input(e.to_string()))?;
        ctx.register_table(name.as_str(), Arc::new(table)).map_err(|e| SqlError::Input(e.to_string()))?;
        names.push(name);
    }
    Ok((ctx, names))
}

/// Runs one read-only SQL statement over the run directories and returns the result batches.
pub fn query_batches(run_dirs: &[PathBuf], sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| SqlError::Query(e.to_string()))?;
    rt.block_on(async {
        let (ctx, names) = session(run_dirs)?;
        let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
        let df = match ctx.sql_with_options(sql, options).await {
            Ok(df) => df,
            Err(e) => {
                let msg = e.to_string();
                if msg.contains("not supported: ") && (msg.contains("DDL") || msg.contains("DML") || msg.contains("Statement")) {
                    return Err(SqlError::Refused(msg.lines().next().unwrap_or("").to_string()));
                }
                if msg.contains("table") && msg.contains("not found") {
                    return Err(SqlError::Query(format!("{msg}\n  tables here: {}", if names.is_empty() { "none".to_string() } else { names.join(", ") })));
                }
                return Err(SqlError::Query(msg));
            }
        };
        df.collect().await.map_err(|e| SqlError::Query(e.to_string()))
    })
}

/// Formats result batches as an aligned table, CSV (with header) or a JSON array of objects.
pub fn format_batches(batches: &[RecordBatch], format: Format) -> Result<String, SqlError> {
    match format {
        Format::Table => arrow::util::pretty::pretty_format_batches(batches).map(|t| format!("{t}\n")).map_err(|e| SqlError::Query(e.to_string())),
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut buf);
                for b in batches {
                    w.write(b).map_err(|e| SqlError::Query(e.to_string()))?;
                }
            }
            String::from_utf8(buf).map_err(|e| SqlError::Query(e.to_string()))
        }
        Format::Json => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::ArrayWriter::new(&mut buf);
                for b in batches {
                    w.write(b).map_err(|e| SqlError::Query(e.to_string()))?;
                }
                w.finish().map_err(|e| SqlError::Query(e.to_string()))?;
            }
            let mut s = String::from_utf8(buf).map_err(|e| SqlError::Query(e.to_string()))?;
            if s.is_empty() {
                s.push_str("[]");
            }
            s.push('\n');
            Ok(s)
        }
    }
}

/// `ehmam query`.
pub fn query(run_dirs: &[PathBuf], sql: &str, format: Format) -> Result<String, SqlError> {
    let batches = query_batches(run_dirs, sql)?;
    format_batches(&batches, format)
}
