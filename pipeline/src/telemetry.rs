//! Per-stage telemetry: items in and out, time busy, starved (waiting for input) and
//! back-pressured (waiting to send). Printed as a table and saved as the `stages` table.

use arrow::array::{
    Array, ArrayRef, Float64Array, MapBuilder, StringArray, StringBuilder, UInt64Array,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of one stage, summed over its workers.
#[derive(Default, Debug)]
pub struct Stats {
    pub items_in: AtomicU64,
    pub items_out: AtomicU64,
    pub starved_ns: AtomicU64,
    pub blocked_ns: AtomicU64,
    pub wall_ns: AtomicU64,
    /// What the stage counted through `StageIo::count`.
    pub counts: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Ordering::Relaxed);
    }
    pub(crate) fn count(&self, name: &str, n: u64) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(name.to_string()).or_insert(0) += n;
    }
}

/// The telemetry of one stage after a run.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub stage: String,
    pub kind: String,
    pub workers: u64,
    pub items_in: u64,
    pub items_out: u64,
    /// Wall time summed over workers.
    pub wall_s: f64,
    pub busy_s: f64,
    pub starved_s: f64,
    pub backpressured_s: f64,
    /// The stage's own counts (`StageIo::count`), by name.
    pub counts: BTreeMap<String, u64>,
}

impl StageReport {
    pub(crate) fn from_stats(stage: &str, kind: &str, workers: usize, s: &Stats) -> Self {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let wall = get(&s.wall_ns) as f64 * 1e-9;
        let starved = get(&s.starved_ns) as f64 * 1e-9;
        let blocked = get(&s.blocked_ns) as f64 * 1e-9;
        StageReport {
            stage: stage.into(),
            kind: kind.into(),
            workers: workers as u64,
            items_in: get(&s.items_in),
            items_out: get(&s.items_out),
            wall_s: wall,
            busy_s: (wall - starved - blocked).max(0.0),
            starved_s: starved,
            backpressured_s: blocked,
            counts: s.counts.lock().map(|c| c.clone()).unwrap_or_default(),
        }
    }

    /// Share of the stage's wall time spent working.
    pub fn busy_frac(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.busy_s / self.wall_s
        } else {
            0.0
        }
    }
}

/// An aligned text table of the reports.
pub fn format_table(reports: &[StageReport]) -> String {
    let header = [
        "stage",
        "kind",
        "workers",
        "in",
        "out",
        "busy s",
        "starved s",
        "backpressured s",
        "busy %",
    ];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.stage.clone(),
                r.kind.clone(),
                r.workers.to_string(),
                r.items_in.to_string(),
                r.items_out.to_string(),
                format!("{:.2}", r.busy_s),
                format!("{:.2}", r.starved_s),
                format!("{:.2}", r.backpressured_s),
                format!("{:.1}", 100.0 * r.busy_frac()),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let fmt_row = |cells: Vec<String>, out: &mut String| {
        let line: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < 2 {
                    format!("{:<w$}", c, w = widths[i])
                } else {
                    format!("{:>w$}", c, w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    };
    fmt_row(header.iter().map(|s| s.to_string()).collect(), &mut out);
    fmt_row(widths.iter().map(|w| "-".repeat(*w)).collect(), &mut out);
    for row in rows {
        fmt_row(row, &mut out);
    }
    for r in reports.iter().filter(|r| !r.counts.is_empty()) {
        let counts: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.push_str(&format!("{}: {}\n", r.stage, counts.join(", ")));
    }
    out
}

/// The reports as an Arrow batch (the `stages` table).
pub fn to_batch(
    run: &str,
    reports: &[StageReport],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    // `counts` is a map column: `SELECT stage, counts['rejected'] FROM stages`.
    let mut counts = MapBuilder::new(None, StringBuilder::new(), UInt64Builder::new());
    for r in reports {
        for (k, v) in &r.counts {
            counts.keys().append_value(k);
            counts.values().append_value(*v);
        }
        counts.append(true)?;
    }
    let counts = counts.finish();
    let schema = Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("workers", DataType::UInt64, false),
        Field::new("items_in", DataType::UInt64, false),
        Field::new("items_out", DataType::UInt64, false),
        Field::new("wall_s", DataType::Float64, false),
        Field::new("busy_s", DataType::Float64, false),
        Field::new("starved_s", DataType::Float64, false),
        Field::new("backpressured_s", DataType::Float64, false),
        Field::new("counts", counts.data_type().clone(), false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![run; reports.len()])),
        Arc::new(StringArray::from_iter_values(
            reports.iter().map(|r| r.stage.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            reports.iter().map(|r| r.kind.as_str()),
        )),
        Arc::new(UInt64Array::from_iter_values(
            reports.iter().map(|r| r.workers),
        )),
        Arc::new(UInt64Array::from_iter_values(
            reports.iter().map(|r| r.items_in),
        )),
        Arc::new(UInt64Array::from_iter_values(
            reports.iter().map(|r| r.items_out),
        )),
        Arc::new(Float64Array::from_iter_values(
            reports.iter().map(|r| r.wall_s),
        )),
        Arc::new(Float64Array::from_iter_values(
            reports.iter().map(|r| r.busy_s),
        )),
        Arc::new(Float64Array::from_iter_values(
            reports.iter().map(|r| r.starved_s),
        )),
        Arc::new(Float64Array::from_iter_values(
            reports.iter().map(|r| r.backpressured_s),
        )),
        Arc::new(counts),
    ];
    RecordBatch::try_new(schema, cols)
}

/// Writes `batch` to `path` as Parquet, atomically (temporary file, then rename).
pub fn write_parquet_atomic(path: &Path, batch: &RecordBatch) -> std::io::Result<()> {
    crate::atomic::write_atomic_with(path, |file| {
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)
            .map_err(std::io::Error::other)?;
        w.write(batch).map_err(std::io::Error::other)?;
        w.finish().map_err(std::io::Error::other)?;
        Ok(())
    })
}
