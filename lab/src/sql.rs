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
//! the columns a query needs; a damaged file (an Arrow part cut off by a crash) is skipped with a
//! warning.

use arrow::array::{new_null_array, ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Like [`discover`], with the index of the run directory each file belongs to.
fn discover_with_runs(
    run_dirs: &[PathBuf],
) -> Result<BTreeMap<String, Vec<(PathBuf, usize)>>, SqlError> {
    let mut tables: BTreeMap<String, Vec<(PathBuf, usize)>> = BTreeMap::new();
    for (ri, dir) in run_dirs.iter().enumerate() {
        if !dir.is_dir() {
            return Err(SqlError::Input(format!(
                "{} is not a run directory",
                dir.display()
            )));
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| SqlError::Input(format!("cannot list {}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            if p.is_file() && name.ends_with(".parquet") {
                let table = name.trim_end_matches(".parquet");
                if is_table_name(table) {
                    tables.entry(table.to_string()).or_default().push((p, ri));
                }
            } else if p.is_dir() && is_table_name(&name) {
                let mut parts: Vec<PathBuf> = std::fs::read_dir(&p)
                    .map_err(|e| SqlError::Input(format!("cannot list {}: {e}", p.display())))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| {
                        f.extension().is_some_and(|x| x == "arrow")
                            && !f
                                .file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect();
                parts.sort();
                if !parts.is_empty() {
                    tables
                        .entry(name)
                        .or_default()
                        .extend(parts.into_iter().map(|f| (f, ri)));
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
    let from_spec = std::fs::read_to_string(dir.join("spec.yaml"))
        .ok()
        .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok())
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string));
    from_spec.unwrap_or_else(|| {
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

/// Reads a whole Parquet or Arrow IPC file; `None` (with a warning) for a damaged one.
fn read_file(path: &Path) -> Result<Option<Vec<RecordBatch>>, SqlError> {
    let file = File::open(path)
        .map_err(|e| SqlError::Input(format!("cannot open {}: {e}", path.display())))?;
    let batches: Result<Vec<RecordBatch>, arrow::error::ArrowError> = if is_parquet(path) {
        ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(arrow::error::ArrowError::from)
            .and_then(|r| r.collect::<Result<Vec<_>, _>>())
    } else {
        arrow::ipc::reader::FileReader::try_new(file, None)
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
    name: &str,
    files: &[(PathBuf, usize)],
    runs: &[String],
) -> Result<bool, SqlError> {
    let mut good: Vec<(PathBuf, usize, SchemaRef)> = Vec::new();
    for (f, ri) in files {
        if let Some(s) = file_schema(f)? {
            good.push((f.clone(), *ri, s));
        }
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
            let abs = std::fs::canonicalize(f)
                .map_err(|e| SqlError::Input(format!("cannot open {}: {e}", f.display())))?;
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

/// A context with every table of the run directories registered, and the table names.
pub fn session(run_dirs: &[PathBuf]) -> Result<(SessionContext, Vec<String>), SqlError> {
    let config = SessionConfig::new().with_information_schema(true);
    let ctx = SessionContext::new_with_config(config);
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
        if register(&ctx, &name, &files, &runs)? {
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
}

impl Session {
    pub fn open(run_dirs: &[PathBuf]) -> Result<Session, SqlError> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .map_err(|e| SqlError::Query(format!("cannot start the query runtime: {e}")))?;
        let (ctx, tables) = session(run_dirs)?;
        Ok(Session { rt, ctx, tables })
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

    /// Runs one read-only statement and returns the result batches.
    pub fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
        check_read_only(sql)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        self.check_tables(sql)?;
        self.rt.block_on(async {
            let df = self
                .ctx
                .sql_with_options(sql, options)
                .await
                .map_err(|e| SqlError::Query(e.to_string()))?;
            df.collect()
                .await
                .map_err(|e| SqlError::Query(e.to_string()))
        })
    }
}

/// Runs one read-only SQL statement over the run directories and returns the result batches.
pub fn query_batches(run_dirs: &[PathBuf], sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    check_read_only(sql)?;
    Session::open(run_dirs)?.query(sql)
}

/// Formats result batches as an aligned table, CSV (with header) or a JSON array of objects
/// (NULLs written as `null`).
pub fn format_batches(batches: &[RecordBatch], format: Format) -> Result<String, SqlError> {
    match format {
        Format::Table => arrow::util::pretty::pretty_format_batches(batches)
            .map(|t| format!("{t}\n"))
            .map_err(|e| SqlError::Query(e.to_string())),
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    w.write(b).map_err(|e| {
                        SqlError::Query(format!(
                            "{e} (list columns have no CSV form: use --format json or table)"
                        ))
                    })?;
                }
            }
            String::from_utf8(buf).map_err(|e| SqlError::Query(e.to_string()))
        }
        Format::Json => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::JsonArray>(&mut buf);
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
