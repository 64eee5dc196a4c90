//! `ehmam report RUN_DIR... --out DIR`: an ablation's comparison, built on the SQL tables and
//! on the runs' last checkpoints.
//!
//! - **Summary** per run (from `steps`, `frames`, `run.json` and the resolved spec): masking
//!   stage and α, updates, final L_rec, rank agreement, masked fraction and hard share (means over
//!   the last 10 % of updates), wall time.
//! - **Curves**: the reconstruction loss of each run in its own panel, side by side on shared axes
//!   (`rec_loss.png`).
//! - **Probe** of representation quality: the run's data stages (its own reader and features,
//!   one pass, no shuffling) give every utterance's features; the frozen student encoder's last
//!   block, mean-pooled over time, is the representation; a multinomial logistic regression
//!   (standardised inputs, L2) is tested on every 4th utterance of each class (hashed order) and
//!   trained on the others, for speaker and for phrase (the transcript, when utterances share it). The same probe
//!   on the same architecture at its random initialisation is the baseline.
//! - **Masking analysis** (the paper's Fig. 5): on each trained model, hide the top X % of each
//!   held-out utterance's frames by the teacher's predicted loss, or X % at random, X = 10…50 %; compare
//!   the student's reconstruction loss on the hidden frames and the probes' accuracy on the
//!   held-out utterances encoded with those frames hidden (`masking.png`).

use crate::probe::{probe_run, ProbeError, ProbeResult};
use crate::runinfo::{kind_of, spec_of, stages_of};
use crate::sql::{Session, SqlError};
use arrow::record_batch::RecordBatch;
use plotters::prelude::*;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Sql(#[from] SqlError),
    #[error("{0}")]
    Probe(#[from] ProbeError),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Model(String),
}

/// What to compute.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub out: PathBuf,
    /// Run the probe (and the masking analysis, which needs it).
    pub probe: bool,
    pub masking: bool,
    /// Share of the steps at the end over which the final figures are averaged.
    pub tail: f64,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            out: PathBuf::from("report"),
            probe: true,
            masking: true,
            tail: 0.1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Summary from the tables
// ---------------------------------------------------------------------------------------------

/// One run's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRow {
    pub run: String,
    pub dir: PathBuf,
    /// `mask.easy_to_hard (linear)`, `mask.random`, …
    pub masking: String,
    pub alpha: f64,
    pub status: String,
    pub steps: u64,
    pub loss_rec: f64,
    pub rank_agreement: f64,
    pub masked_frac: f64,
    /// Share of logged masked frames that were chosen by predicted hardness.
    pub hard_share: f64,
    pub hard_ratio: f64,
    pub wall_s: f64,
    /// The fine-tuning runs among the compared ones that start from this run: their final
    /// (set, WER, CER), WER and CER as fractions.
    pub finetuned: Vec<(String, f64, f64)>,
}

fn f64s(batches: &[RecordBatch], name: &str) -> Result<Vec<f64>, ReportError> {
    Ok(crate::plot::column_f64(batches, name)?)
}

use crate::plot::lit;

fn strings(batches: &[RecordBatch], name: &str) -> Result<Vec<String>, ReportError> {
    use arrow::array::{Array, AsArray};
    let mut out = Vec::new();
    for b in batches {
        let c = b
            .column_by_name(name)
            .ok_or_else(|| ReportError::Input(format!("no column `{name}`")))?;
        let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8)
            .map_err(|e| ReportError::Input(format!("column `{name}`: {e}")))?;
        let a = c.as_string::<i32>();
        out.extend((0..a.len()).map(|i| a.value(i).to_string()));
    }
    Ok(out)
}

/// The masking stage and α of a run, from its spec.
fn masking_of(spec: &Value) -> (String, f64) {
    let stages = stages_of(spec);
    let mut masking = "?".to_string();
    let mut alpha = stages::train::student::StudentParams::default().alpha;
    for st in stages.values() {
        let k = kind_of(st);
        let with = st.get("with");
        if k.starts_with("mask.") {
            let mut extra = Vec::new();
            if with.and_then(|w| w.get("unit")).and_then(|u| u.as_str()) == Some("frame") {
                extra.push("frames".to_string());
            }
            if k == "mask.easy_to_hard" {
                match with.and_then(|w| w.get("curriculum")) {
                    Some(Value::String(s)) => extra.push(s.clone()),
                    Some(Value::Mapping(m)) => {
                        extra.extend(m.keys().filter_map(|k| k.as_str().map(str::to_string)))
                    }
                    _ => extra.push("linear".into()),
                }
            }
            masking = if extra.is_empty() {
                k.to_string()
            } else {
                format!("{k} ({})", extra.join(", "))
            };
        }
        if k == "student" {
            if let Some(a) = with.and_then(|w| w.get("alpha")).and_then(|a| a.as_f64()) {
                alpha = a;
            }
        }
    }
    (masking, alpha)
}

/// How each run is named in the report: its spec's name, or its directory where several runs
/// share a name.
pub fn run_labels(run_dirs: &[PathBuf]) -> Vec<String> {
    let names: Vec<String> = run_dirs.iter().map(|d| crate::sql::run_name(d)).collect();
    names
        .iter()
        .zip(run_dirs)
        .map(|(n, d)| {
            if names.iter().filter(|m| *m == n).count() > 1 {
                d.display().to_string()
            } else {
                n.clone()
            }
        })
        .collect()
}

/// The summary rows of the runs (each from its own run directory's tables).
pub fn summarize(run_dirs: &[PathBuf], tail: f64) -> Result<Vec<RunRow>, ReportError> {
    let mut rows = Vec::new();
    let labels = run_labels(run_dirs);
    for (dir, label) in run_dirs.iter().zip(labels) {
        // One session per run directory: two runs of the same name (seed replicates in two
        // sweeps) never mix.
        let session = Session::open(std::slice::from_ref(dir))?;
        let run = crate::sql::run_name(dir);
        let spec = spec_of(dir).unwrap_or(Value::Null);
        let (masking, alpha) = masking_of(&spec);
        let status = pipeline::RunStatus::read(dir);
        let mut row = RunRow {
            run: label,
            dir: dir.clone(),
            masking,
            alpha,
            status: status
                .as_ref()
                .map_or("unknown".into(), |s| s.status.clone()),
            wall_s: status.as_ref().map_or(f64::NAN, |s| s.wall_s),
            loss_rec: f64::NAN,
            rank_agreement: f64::NAN,
            masked_frac: f64::NAN,
            hard_share: f64::NAN,
            hard_ratio: f64::NAN,
            steps: 0,
            finetuned: Vec::new(),
        };
        if session.has_table("steps") {
            let r = lit(&run);
            let b = session.query(&format!(
                "SELECT count(*) AS n, max(step) AS last FROM steps WHERE run = {r}"
            ))?;
            let n = f64s(&b, "n")?.first().copied().unwrap_or(0.0);
            let last = f64s(&b, "last")?.first().copied().unwrap_or(f64::NAN);
            if n > 0.0 && last.is_finite() {
                // Updates = the last step + 1 (rows lost to a crash do not shorten the run).
                let updates = last + 1.0;
                row.steps = updates as u64;
                let from = (updates - (updates * tail).ceil().max(1.0)).max(0.0) as i64;
                let b =
                    session.query(&format!("SELECT avg(loss_rec) AS rec, avg(rank_agreement) AS ra, avg(masked_frac) AS mf, avg(hard_ratio) AS hr FROM steps WHERE run = {r} AND step >= {from}"))?;
                row.loss_rec = f64s(&b, "rec")?[0];
                row.rank_agreement = f64s(&b, "ra")?[0];
                row.masked_frac = f64s(&b, "mf")?[0];
                row.hard_ratio = f64s(&b, "hr")?[0];
                if session.has_table("frames") {
                    // The same window; no figure ("–") when no frames were logged in it.
                    let b = session.query(&format!(
                        "SELECT CAST(sum(CASE WHEN hard THEN 1 ELSE 0 END) AS DOUBLE) / CAST(sum(CASE WHEN masked THEN 1 ELSE 0 END) AS DOUBLE) AS hs FROM frames WHERE run = {r} AND step >= {from}"
                    ))?;
                    row.hard_share = f64s(&b, "hs")?.first().copied().unwrap_or(f64::NAN);
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn fmt(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "–".into()
    }
}

/// The summary as a Markdown table (with the fine-tuned WER/CER where a compared run was
/// fine-tuned).
pub fn summary_markdown(rows: &[RunRow]) -> String {
    let ft = rows.iter().any(|r| !r.finetuned.is_empty());
    let mut s = String::from("| run | masking | α | status | updates | L_rec | rank agreement | masked fraction | hard share | hard ratio r | wall s |");
    if ft {
        s.push_str(" fine-tuned WER / CER % |");
    }
    s.push_str("\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    if ft {
        s.push_str(" --- |");
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.run,
            r.masking,
            r.alpha,
            r.status,
            r.steps,
            fmt(r.loss_rec, 3),
            fmt(r.rank_agreement, 3),
            fmt(r.masked_frac, 3),
            fmt(r.hard_share, 3),
            fmt(r.hard_ratio, 2),
            fmt(r.wall_s, 0)
        ));
        if ft {
            let cells: Vec<String> = r
                .finetuned
                .iter()
                .map(|(set, w, c)| format!("{set} {} / {}", fmt(100.0 * w, 2), fmt(100.0 * c, 2)))
                .collect();
            s.push_str(&format!(
                " {} |",
                if cells.is_empty() {
                    "–".to_string()
                } else {
                    cells.join("; ")
                }
            ));
        }
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Fine-tuning runs: WER and CER
// ---------------------------------------------------------------------------------------------

/// One scored set of a fine-tuning run.
#[derive(Debug, Clone, PartialEq)]
pub struct SetScore {
    pub set: String,
    /// The last evaluation's step and figures (fractions).
    pub step: u64,
    pub utterances: u64,
    pub words: u64,
    pub wer: f64,
    pub cer: f64,
    /// The lowest WER of any evaluation, and its step.
    pub best_wer: f64,
    pub best_step: u64,
}

/// A fine-tuning run (a `finetune.ctc` stage, or a `wer` table).
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneRow {
    pub run: String,
    pub dir: PathBuf,
    /// The pre-trained model it started from (`init`, as its spec gives it).
    pub init: Option<PathBuf>,
    pub sets: Vec<SetScore>,
}

/// Whether a run directory holds a fine-tuning run.
pub fn is_finetune(dir: &Path) -> bool {
    let in_spec = spec_of(dir).is_some_and(|spec| {
        stages_of(&spec)
            .values()
            .any(|st| kind_of(st) == "finetune.ctc")
    });
    in_spec || dir.join("wer").is_dir()
}

/// The `init` of a fine-tuning run's `finetune.ctc` stage.
fn init_of(dir: &Path) -> Option<PathBuf> {
    let spec = spec_of(dir)?;
    stages_of(&spec)
        .values()
        .find(|st| kind_of(st) == "finetune.ctc")
        .and_then(|st| st.get("with")?.get("init")?.as_str().map(PathBuf::from))
}

/// The same directory, however written.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Each fine-tuning run's scores per set, from its `wer` table.
pub fn finetune_rows(
    run_dirs: &[PathBuf],
    labels: &[String],
) -> Result<Vec<FinetuneRow>, ReportError> {
    let mut out = Vec::new();
    for (dir, label) in run_dirs.iter().zip(labels) {
        let session = Session::open(std::slice::from_ref(dir))?;
        let mut row = FinetuneRow {
            run: label.clone(),
            dir: dir.clone(),
            init: init_of(dir),
            sets: Vec::new(),
        };
        if session.has_table("wer") {
            let r = lit(&crate::sql::run_name(dir));
            let b = session.query(&format!(
                "SELECT w.\"set\" AS set_name, w.step AS step, w.utterances AS utterances, w.words AS words, w.wer AS wer, w.cer AS cer, b.best_wer AS best_wer, b.best_step AS best_step \
                 FROM wer w \
                 JOIN (SELECT \"set\" AS s, max(step) AS last FROM wer WHERE run = {r} GROUP BY \"set\") l ON w.\"set\" = l.s AND w.step = l.last \
                 JOIN (SELECT x.\"set\" AS s, min(x.wer) AS best_wer, min(x.step) AS best_step FROM wer x \
                       JOIN (SELECT \"set\" AS s, min(wer) AS m FROM wer WHERE run = {r} GROUP BY \"set\") y ON x.\"set\" = y.s AND x.wer = y.m \
                       WHERE x.run = {r} GROUP BY x.\"set\") b ON w.\"set\" = b.s \
                 WHERE w.run = {r} ORDER BY w.\"set\""
            ))?;
            let sets = strings(&b, "set_name")?;
            let v = |n: &str| f64s(&b, n);
            let (step, utts, words, wer, cer, bw, bs) = (
                v("step")?,
                v("utterances")?,
                v("words")?,
                v("wer")?,
                v("cer")?,
                v("best_wer")?,
                v("best_step")?,
            );
            for (i, set) in sets.into_iter().enumerate() {
                row.sets.push(SetScore {
                    set,
                    step: step[i] as u64,
                    utterances: utts[i] as u64,
                    words: words[i] as u64,
                    wer: wer[i],
                    cer: cer[i],
                    best_wer: bw[i],
                    best_step: bs[i] as u64,
                });
            }
        }
        out.push(row);
    }
    Ok(out)
}

/// Runs split into pre-training runs (their summary rows, with the WER of the compared runs
/// fine-tuned from them) and fine-tuning runs (their scores).
pub struct SplitRuns {
    pub rows: Vec<RunRow>,
    pub finetune: Vec<FinetuneRow>,
    pub ft_dirs: Vec<PathBuf>,
    pub ft_labels: Vec<String>,
    pub pre_dirs: Vec<PathBuf>,
}

/// See [`SplitRuns`].
pub fn split_runs(
    run_dirs: &[PathBuf],
    labels: &[String],
    tail: f64,
) -> Result<SplitRuns, ReportError> {
    let (mut ft_dirs, mut ft_labels, mut pre_dirs) = (Vec::new(), Vec::new(), Vec::new());
    for (d, l) in run_dirs.iter().zip(labels) {
        if is_finetune(d) {
            ft_dirs.push(d.clone());
            ft_labels.push(l.clone());
        } else {
            pre_dirs.push(d.clone());
        }
    }
    let ft_rows = finetune_rows(&ft_dirs, &ft_labels)?;
    let mut rows = summarize(&pre_dirs, tail)?;
    for r in &mut rows {
        let children: Vec<&FinetuneRow> = ft_rows
            .iter()
            .filter(|f| f.init.as_deref().is_some_and(|i| same_dir(&r.dir, i)))
            .collect();
        for f in &children {
            // With several fine-tunings of one run, each figure names its run.
            let name = |set: &str| {
                if children.len() > 1 {
                    format!("{} {set}", f.run)
                } else {
                    set.to_string()
                }
            };
            r.finetuned
                .extend(f.sets.iter().map(|x| (name(&x.set), x.wer, x.cer)));
        }
    }
    Ok(SplitRuns {
        rows,
        finetune: ft_rows,
        ft_dirs,
        ft_labels,
        pre_dirs,
    })
}

/// The fine-tuning section of a report.
pub fn finetune_markdown(rows: &[FinetuneRow], pre: &[RunRow]) -> String {
    let mut s = String::from("\n## Fine-tuning: WER and CER\n\nGreedy CTC decoding (no language model) of each held-out set at the last evaluation; WER and CER in percent (errors / reference words or characters). The paper's figures (method §9) decode with the official 4-gram LM, which lowers WER substantially; compare runs with each other here, not with those figures.\n\n| run | pre-trained | set | update | utterances | words | WER % | CER % | best WER % (update) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        let from = match &r.init {
            Some(i) => pre
                .iter()
                .find(|p| same_dir(&p.dir, i))
                .map(|p| p.run.clone())
                .unwrap_or_else(|| format!("`{}`", i.display())),
            None => "–".into(),
        };
        if r.sets.is_empty() {
            s.push_str(&format!(
                "| {} | {from} | – | – | – | – | – | – | – |\n",
                r.run
            ));
        }
        for x in &r.sets {
            s.push_str(&format!(
                "| {} | {from} | {} | {} | {} | {} | {} | {} | {} ({}) |\n",
                r.run,
                x.set,
                x.step,
                x.utterances,
                x.words,
                fmt(100.0 * x.wer, 2),
                fmt(100.0 * x.cer, 2),
                fmt(100.0 * x.best_wer, 2),
                x.best_step
            ));
        }
    }
    s
}

/// WER against updates, one line per run and set (`wer.png`).
fn wer_curves(path: &Path, run_dirs: &[PathBuf], labels: &[String]) -> Result<(), ReportError> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (dir, label) in run_dirs.iter().zip(labels) {
        let session = Session::open(std::slice::from_ref(dir))?;
        if !session.has_table("wer") {
            continue;
        }
        let b = session.query(&format!(
            "SELECT \"set\" AS set_name, step, wer FROM wer WHERE run = {} ORDER BY \"set\", step",
            lit(&crate::sql::run_name(dir))
        ))?;
        let sets = strings(&b, "set_name")?;
        let (st, w) = (f64s(&b, "step")?, f64s(&b, "wer")?);
        for (i, set) in sets.iter().enumerate() {
            let name = format!("{label} · {set}");
            if series.last().is_none_or(|(n, _)| *n != name) {
                series.push((name, Vec::new()));
            }
            if let Some(last) = series.last_mut() {
                last.1.push((st[i], 100.0 * w[i]));
            }
        }
    }
    let x1 = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y1 = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "WER (greedy CTC) per fine-tuning run and set",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x1 * 1.02, 0.0..y1 * 1.05)
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc("update")
        .y_desc("WER %")
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(draw_err(path))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(draw_err(path))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(draw_err(path))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(draw_err(path))?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figures and the report
// ---------------------------------------------------------------------------------------------

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> ReportError + '_ {
    move |e| ReportError::Input(format!("drawing {}: {e}", path.display()))
}

/// L_rec curves, one panel per run, shared axes.
fn rec_curves(path: &Path, run_dirs: &[PathBuf], labels: &[String]) -> Result<(), ReportError> {
    let mut series = Vec::new();
    for (dir, label) in run_dirs.iter().zip(labels) {
        let session = Session::open(std::slice::from_ref(dir))?;
        if !session.has_table("steps") {
            series.push((label.clone(), Vec::new(), Vec::new()));
            continue;
        }
        let b = session.query(&format!(
            "SELECT step, loss_rec FROM steps WHERE run = {} ORDER BY step",
            lit(&crate::sql::run_name(dir))
        ))?;
        series.push((label.clone(), f64s(&b, "step")?, f64s(&b, "loss_rec")?));
    }
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for (_, s, v) in &series {
        x1 = x1.max(s.iter().copied().fold(0.0, f64::max));
        for &y in v.iter().filter(|y| y.is_finite()) {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let cols = series.len().clamp(1, 3);
    let rows = series.len().div_ceil(cols).max(1);
    let root =
        BitMapBackend::new(path, (420 * cols as u32, 40 + 320 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let root = root
        .titled(
            "Reconstruction loss L_rec per run (shared axes; thick: moving average)",
            ("sans-serif", 20),
        )
        .map_err(draw_err(path))?;
    let areas = root.split_evenly((rows, cols));
    for (area, (run, s, v)) in areas.iter().zip(&series) {
        let mut chart = ChartBuilder::on(area)
            .caption(run, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..x1, y0..y1)
            .map_err(draw_err(path))?;
        chart
            .configure_mesh()
            .x_desc("update")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(draw_err(path))?;
        let pts: Vec<(f64, f64)> = s
            .iter()
            .zip(v)
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| (*x, *y))
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.clone(),
                RGBColor(31, 119, 180).mix(0.3),
            ))
            .map_err(draw_err(path))?;
        let w = (pts.len() / 30).max(1);
        let avg: Vec<(f64, f64)> = (0..pts.len())
            .map(|i| {
                let lo = i.saturating_sub(w - 1);
                (
                    pts[i].0,
                    pts[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64,
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(avg, RGBColor(31, 119, 180).stroke_width(2)))
            .map_err(draw_err(path))?;
        if pts.len() <= 60 {
            // Short runs: the points themselves (a single update draws no line).
            chart
                .draw_series(
                    pts.iter()
                        .map(|&p| Circle::new(p, 3, RGBColor(31, 119, 180).filled())),
                )
                .map_err(draw_err(path))?;
        }
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// ℓ on hidden frames against the share hidden: top-X % by predicted loss (solid) vs random (dashed).
fn masking_figure(path: &Path, results: &[ProbeResult]) -> Result<(), ReportError> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let vals = results
        .iter()
        .flat_map(|r| r.masking.iter().flat_map(|m| [m.1, m.2]))
        .filter(|v| v.is_finite());
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = (hi - lo).max(1e-6) * 0.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Masking analysis: student loss on hidden frames (solid: top-X % by predicted loss, dashed: random)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(5.0..55.0, (lo - pad)..(hi + pad))
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc("frames hidden (%)")
        .y_desc("mean per-frame loss ℓ")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(draw_err(path))?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    for (i, r) in results.iter().enumerate() {
        let c = palette[i % palette.len()];
        let hard: Vec<(f64, f64)> = r.masking.iter().map(|m| (m.0 * 100.0, m.1)).collect();
        let rand: Vec<(f64, f64)> = r.masking.iter().map(|m| (m.0 * 100.0, m.2)).collect();
        chart
            .draw_series(LineSeries::new(hard, c.stroke_width(2)))
            .map_err(draw_err(path))?
            .label(r.run.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(rand, 6, 4, c.stroke_width(2)))
            .map_err(draw_err(path))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(draw_err(path))?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// Writes `report.md`, `rec_loss.png` and (with the probe) `masking.png` into `opts.out`.
pub fn report(run_dirs: &[PathBuf], opts: &ReportOptions) -> Result<Vec<PathBuf>, ReportError> {
    crate::plot::register_font();
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| ReportError::Input(format!("cannot create {}: {e}", opts.out.display())))?;
    let labels_all = run_labels(run_dirs);
    let split = split_runs(run_dirs, &labels_all, opts.tail)?;
    let (rows, ft_rows, ft_dirs, ft_labels, pre_dirs) = (
        split.rows,
        split.finetune,
        split.ft_dirs,
        split.ft_labels,
        split.pre_dirs,
    );
    if pre_dirs.is_empty() {
        let mut md = String::from("# Fine-tuning runs compared\n");
        md.push_str(&finetune_markdown(&ft_rows, &rows));
        let mut files = Vec::new();
        let p = opts.out.join("wer.png");
        wer_curves(&p, &ft_dirs, &ft_labels)?;
        md.push_str("\n![WER per fine-tuning run](wer.png)\n");
        let path = opts.out.join("report.md");
        std::fs::write(&path, md)
            .map_err(|e| ReportError::Input(format!("cannot write {}: {e}", path.display())))?;
        files.push(path);
        files.push(p);
        return Ok(files);
    }
    let run_dirs: &[PathBuf] = &pre_dirs;
    let session = Session::open(run_dirs)?;
    if !session.has_table("steps") {
        return Err(ReportError::Input(
            "no `steps` table: a report needs training runs with a log.steps stage".into(),
        ));
    }
    let mut md = String::from("# EH-MAM runs compared\n\n");
    md.push_str(&format!(
        "Runs: {}. Figures over the last {:.0} % of each run's updates; hard share = masked frames chosen by predicted hardness among the logged masked frames; wall time over all attempts (`run.json`).\n\n",
        run_dirs.iter().map(|d| format!("`{}`", d.display())).collect::<Vec<_>>().join(", "),
        opts.tail * 100.0
    ));
    md.push_str(&summary_markdown(&rows));
    let mut files = Vec::new();
    if !ft_rows.is_empty() {
        md.push_str(&finetune_markdown(&ft_rows, &rows));
        let p = opts.out.join("wer.png");
        wer_curves(&p, &ft_dirs, &ft_labels)?;
        md.push_str("\n![WER per fine-tuning run](wer.png)\n");
        files.push(p);
    }
    let rec = opts.out.join("rec_loss.png");
    rec_curves(
        &rec,
        run_dirs,
        &rows.iter().map(|r| r.run.clone()).collect::<Vec<_>>(),
    )?;
    md.push_str("\n![L_rec per run](rec_loss.png)\n");
    files.push(rec);
    if opts.probe {
        let work = tempfile::tempdir()
            .map_err(|e| ReportError::Input(format!("temporary directory: {e}")))?;
        let mut results = Vec::new();
        let mut skipped = Vec::new();
        for (i, d) in run_dirs.iter().enumerate() {
            eprintln!(
                "report: probing {} ({}/{})",
                d.display(),
                i + 1,
                run_dirs.len()
            );
            // A run that cannot be probed (no checkpoint yet, no labels) is named, not fatal.
            match probe_run(d, &work.path().join(format!("{i}")), opts.masking) {
                Ok(mut r) => {
                    r.run = rows[i].run.clone();
                    results.push(r);
                }
                Err(e) => {
                    eprintln!("report: no probe for {}: {e}", d.display());
                    skipped.push(format!("`{}`: {e}", rows[i].run));
                }
            }
        }
        md.push_str("\n## Linear probe on frozen representations\n\nMean-pooled output of the student's last block (all frames visible), multinomial logistic regression on standardised features (L2 0.01); tested on every 4th utterance of each class (in an order fixed by a hash of its id, at least one), trained on the others; the test utterances are held out from the probe, not from pre-training. Baseline: the same probe on the same architecture at its random initialisation (what training adds; the mean-pooled input features themselves carry nothing once normalised per utterance).\n\n");
        let names: Vec<String> = results
            .first()
            .map(|r| r.accuracy.iter().map(|a| a.0.clone()).collect())
            .unwrap_or_default();
        md.push_str("| run | update |");
        for n in &names {
            md.push_str(&format!(" {n} accuracy | {n} at initialisation |"));
        }
        md.push_str("\n| --- | --- |");
        for _ in &names {
            md.push_str(" --- | --- |");
        }
        md.push('\n');
        for r in &results {
            md.push_str(&format!("| {} | {} |", r.run, r.step));
            for a in &r.accuracy {
                md.push_str(&format!(" {:.3} | {:.3} |", a.1, a.2));
            }
            md.push('\n');
        }
        if let Some(r) = results.first() {
            md.push_str(&format!(
                "\n{}\n",
                r.accuracy
                    .iter()
                    .map(|a| format!("{}: {} classes, {} test utterances.", a.0, a.3, a.4))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        if !skipped.is_empty() {
            md.push_str(&format!("\nNot probed: {}.\n", skipped.join("; ")));
        }
        if opts.masking {
            md.push_str("\n## Masking analysis (the paper's Fig. 5)\n\nEach held-out utterance's top-X % frames by the teacher's predicted loss are hidden (hard), or X % chosen at random; the student (eval mode) reconstructs the teacher's targets there. ℓ is the mean per-frame loss on the hidden frames; the probes (trained on unmasked representations) classify the held-out utterances encoded with those frames hidden.\n\n");
            md.push_str("| run | hidden | ℓ hard | ℓ random | hard / random |");
            for n in &names {
                md.push_str(&format!(" {n} acc. hard | {n} acc. random |"));
            }
            md.push_str("\n| --- | --- | --- | --- | --- |");
            for _ in &names {
                md.push_str(" --- | --- |");
            }
            md.push('\n');
            for r in &results {
                for m in &r.masking {
                    md.push_str(&format!(
                        "| {} | {:.0} % | {:.3} | {:.3} | {:.2} |",
                        r.run,
                        m.0 * 100.0,
                        m.1,
                        m.2,
                        m.1 / m.2
                    ));
                    for a in &m.3 {
                        md.push_str(&format!(" {:.3} | {:.3} |", a.0, a.1));
                    }
                    md.push('\n');
                }
            }
            let p = opts.out.join("masking.png");
            if results.is_empty() {
                md.push_str("\nNo run could be probed, so there is no masking analysis.\n");
            } else {
                masking_figure(&p, &results)?;
                md.push_str("\n![masking analysis](masking.png)\n");
                files.push(p);
            }
        }
    }
    let path = opts.out.join("report.md");
    std::fs::write(&path, md)
        .map_err(|e| ReportError::Input(format!("cannot write {}: {e}", path.display())))?;
    files.insert(0, path);
    Ok(files)
}
