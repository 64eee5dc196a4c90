//! `ehmam plot RUN_DIR... --out DIR`: PNG figures built on the SQL tables of one or more runs.
//!
//! - `losses.png`: L_rec, L_aux (as normalised in the joint loss) and the joint loss L over
//!   updates, one colour per run (thin: every update; thick: a moving average).
//! - `health.png`: the loss predictors' rank agreement with the actual per-frame losses on masked
//!   pairs (student solid, teacher dashed, chance at 0.5), the masked fraction and the hard ratio.
//! - `frames-RUN-stepN-UTT.png` for each run: one logged utterance at one step — the teacher's
//!   predicted loss over time (with the student's prediction and the actual reconstruction loss
//!   at masked frames), masked frames shaded grey and hard ones red, above the student's input
//!   (the fbank image, unstacked to 100 Hz when the run's spec stacked it; the waveform envelope
//!   for waveform input). `--utt` and `--step` choose; by default the latest logged step and its
//!   first utterance.
//!
//! Text is drawn with the bundled DejaVu Sans (no system font lookup).

use crate::sql::{Session, SqlError};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use arrow::record_batch::RecordBatch;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::{Path, PathBuf};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// What to draw.
#[derive(Debug, Clone, Default)]
pub struct PlotOptions {
    pub out: PathBuf,
    /// Utterance of the frame figure (default: the first one logged at the chosen step).
    pub utt: Option<String>,
    /// Step of the frame figure (default: the latest step with logged frames of `utt`).
    pub step: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{0}")]
    Sql(#[from] SqlError),
    #[error("{0}")]
    Input(String),
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// A column of query results as f64 (NULL → NaN).
pub(crate) fn column_f64(batches: &[RecordBatch], name: &str) -> Result<Vec<f64>, SqlError> {
    let mut out = Vec::new();
    for b in batches {
        let c = b
            .column_by_name(name)
            .ok_or_else(|| SqlError::Input(format!("no column `{name}`")))?;
        let c = arrow::compute::cast(c, &DataType::Float64)
            .map_err(|e| SqlError::Input(format!("column `{name}`: {e}")))?;
        let a = c.as_primitive::<Float64Type>();
        out.extend((0..a.len()).map(|i| if a.is_null(i) { f64::NAN } else { a.value(i) }));
    }
    Ok(out)
}

fn col_f64(batches: &[RecordBatch], name: &str) -> Result<Vec<f64>, PlotError> {
    Ok(column_f64(batches, name)?)
}

fn col_str(batches: &[RecordBatch], name: &str) -> Result<Vec<String>, PlotError> {
    let mut out = Vec::new();
    for b in batches {
        let c = b
            .column_by_name(name)
            .ok_or_else(|| PlotError::Input(format!("no column `{name}`")))?;
        let c = arrow::compute::cast(c, &DataType::Utf8)
            .map_err(|e| PlotError::Input(format!("column `{name}`: {e}")))?;
        let a = c.as_string::<i32>();
        out.extend((0..a.len()).map(|i| a.value(i).to_string()));
    }
    Ok(out)
}

fn col_bool(batches: &[RecordBatch], name: &str) -> Result<Vec<bool>, PlotError> {
    let mut out = Vec::new();
    for b in batches {
        let c = b
            .column_by_name(name)
            .ok_or_else(|| PlotError::Input(format!("no column `{name}`")))?;
        let a = c
            .as_boolean_opt()
            .ok_or_else(|| PlotError::Input(format!("column `{name}` is not boolean")))?;
        out.extend((0..a.len()).map(|i| !a.is_null(i) && a.value(i)));
    }
    Ok(out)
}

/// A string as a SQL literal.
pub(crate) fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One run's series from the `steps` table.
struct Series {
    run: String,
    step: Vec<f64>,
    values: Vec<Vec<f64>>,
}

fn moving_average(v: &[f64], w: usize) -> Vec<f64> {
    let w = w.max(1);
    let mut out = Vec::with_capacity(v.len());
    let (mut sum, mut n) = (0.0, 0usize);
    let mut q = std::collections::VecDeque::new();
    for &x in v {
        q.push_back(x);
        if x.is_finite() {
            sum += x;
            n += 1;
        }
        if q.len() > w {
            if let Some(y) = q.pop_front() {
                if y.is_finite() {
                    sum -= y;
                    n -= 1;
                }
            }
        }
        out.push(if n > 0 { sum / n as f64 } else { f64::NAN });
    }
    out
}

fn range(vs: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vs.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn palette(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    P[i % P.len()]
}

/// Draws stacked panels of per-run curves; `panels[k]` = (title, y label, index into
/// `Series::values`, optional dashed companion index, optional horizontal reference line).
fn curves(
    path: &Path,
    title: &str,
    series: &[Series],
    panels: &[(&str, &str, usize, Option<usize>, Option<f64>)],
) -> Result<(), PlotError> {
    let height = 40 + 300 * panels.len() as u32;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(draw_err(path))?;
    let areas = root.split_evenly((panels.len(), 1));
    let steps = series.iter().flat_map(|s| s.step.iter().copied());
    let (x0, x1) = range(steps);
    for (area, &(name, ylabel, k, companion, reference)) in areas.iter().zip(panels) {
        let all = series
            .iter()
            .flat_map(|s| {
                s.values[k]
                    .iter()
                    .copied()
                    .chain(companion.map(|c| s.values[c].clone()).unwrap_or_default())
            })
            .chain(reference);
        let (y0, y1) = range(all);
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)
            .map_err(draw_err(path))?;
        chart
            .configure_mesh()
            .x_desc("update")
            .y_desc(ylabel)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(draw_err(path))?;
        if let Some(r) = reference {
            chart
                .draw_series(LineSeries::new(
                    vec![(x0.max(0.0), r), (x1, r)],
                    BLACK.mix(0.4).stroke_width(1),
                ))
                .map_err(draw_err(path))?;
        }
        for (i, s) in series.iter().enumerate() {
            let c = palette(i);
            let v = &s.values[k];
            let w = (v.len() / 40).max(1);
            let pts = |v: &[f64]| -> Vec<(f64, f64)> {
                s.step
                    .iter()
                    .zip(v)
                    .filter(|(_, y)| y.is_finite())
                    .map(|(x, y)| (*x, *y))
                    .collect()
            };
            if w > 1 {
                chart
                    .draw_series(LineSeries::new(pts(v), c.mix(0.25).stroke_width(1)))
                    .map_err(draw_err(path))?;
            }
            chart
                .draw_series(LineSeries::new(
                    pts(&moving_average(v, w)),
                    c.stroke_width(2),
                ))
                .map_err(draw_err(path))?
                .label(if companion.is_some() {
                    format!("{} (student)", s.run)
                } else {
                    s.run.clone()
                })
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            if let Some(ci) = companion {
                let m = moving_average(&s.values[ci], w);
                let p = pts(&m);
                chart
                    .draw_series(DashedLineSeries::new(p, 6, 4, c.stroke_width(2)))
                    .map_err(draw_err(path))?
                    .label(format!("{} (teacher)", s.run))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.mix(0.6).stroke_width(2))
                    });
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(draw_err(path))?;
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// How the student's input of a run is laid out (from its resolved spec).
#[derive(Debug, Clone, Copy, PartialEq)]
enum InputKind {
    /// fbank: `bins` mel bins stacked `stack` times per frame.
    Fbank {
        bins: usize,
        stack: usize,
    },
    /// Waveform samples (`features.waveform`).
    Waveform,
    Unknown,
}

fn input_kind(run_dir: &Path, feature_dim: usize) -> InputKind {
    let spec = std::fs::read_to_string(run_dir.join("spec.yaml"))
        .ok()
        .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok());
    let Some(stages) = spec
        .as_ref()
        .and_then(|s| s.get("stages"))
        .and_then(|s| s.as_mapping())
    else {
        return InputKind::Unknown;
    };
    for (_, st) in stages {
        match st.get("kind").and_then(|k| k.as_str()) {
            Some("features.fbank") => {
                let with = st.get("with");
                let get = |k: &str, d: u64| {
                    with.and_then(|w| w.get(k))
                        .and_then(|v| v.as_u64())
                        .unwrap_or(d) as usize
                };
                let (bins, stack) = (get("num_mel_bins", 80), get("stack", 2).max(1));
                if bins * stack == feature_dim {
                    return InputKind::Fbank { bins, stack };
                }
            }
            Some("features.waveform") => return InputKind::Waveform,
            _ => {}
        }
    }
    InputKind::Unknown
}

/// The frame figure of one run.
fn frame_figure(
    session: &Session,
    run: &str,
    run_dir: &Path,
    opts: &PlotOptions,
) -> Result<Option<PathBuf>, PlotError> {
    if !session.has_table("frames") {
        return Ok(None);
    }
    let r = lit(run);
    let utt_filter = opts
        .utt
        .as_ref()
        .map(|u| format!(" AND utt_id = {}", lit(u)))
        .unwrap_or_default();
    let Some(step) = figure_step(session, run, &r, &utt_filter, opts)? else {
        return Ok(None);
    };
    let utt = match &opts.utt {
        Some(u) => u.clone(),
        None => {
            let b = session.query(&format!("SELECT utt_id FROM frames WHERE run = {r} AND step = {step} ORDER BY member, frame LIMIT 1"))?;
            match col_str(&b, "utt_id")?.into_iter().next() {
                Some(u) => u,
                None => return Ok(None),
            }
        }
    };
    let d = FrameData::load(session, run, &r, step, &utt)?;
    let safe = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    let path = opts.out.join(format!(
        "frames-{}-step{step}-{}.png",
        safe(run),
        safe(&utt)
    ));
    let root = BitMapBackend::new(&path, (1400, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(&path))?;
    let title = format!("{run}: {utt}, update {step} (hard ratio {:.2}): grey = masked at random, red = masked by predicted hardness", d.hard_ratio);
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(draw_err(&path))?;
    let (top, bottom) = root.split_vertically(430);
    draw_frame_losses(&top, &d, &path)?;
    draw_frame_input(&bottom, &d, run_dir, run, &path)?;
    root.present().map_err(draw_err(&path))?;
    Ok(Some(path.clone()))
}

/// The step of the frame figure: asked for, else the latest step whose input features were
/// logged too, else the latest with frames; `None` when nothing was logged.
fn figure_step(
    session: &Session,
    run: &str,
    r: &str,
    utt_filter: &str,
    opts: &PlotOptions,
) -> Result<Option<u64>, PlotError> {
    if let Some(s) = opts.step {
        return Ok(Some(s));
    }
    let table = if session.has_table("inputs")
        && !session
            .query(&format!(
                "SELECT step FROM inputs WHERE run = {r}{utt_filter} LIMIT 1"
            ))?
            .iter()
            .all(|b| b.num_rows() == 0)
    {
        "inputs"
    } else {
        "frames"
    };
    let b = session.query(&format!(
        "SELECT max(step) AS s FROM {table} WHERE run = {r}{utt_filter}"
    ))?;
    match col_f64(&b, "s")?.first() {
        Some(s) if s.is_finite() => Ok(Some(*s as u64)),
        _ => match &opts.utt {
            Some(u) => Err(PlotError::Input(format!("run `{run}`: no logged frames of utterance `{u}` (see: ehmam query RUN \"SELECT DISTINCT utt_id FROM frames\")"))),
            None => Ok(None),
        },
    }
}

/// One utterance's logged frames at one step, and the input features under them.
struct FrameData {
    time: Vec<f64>,
    masked: Vec<bool>,
    hard: Vec<bool>,
    teacher: Vec<f64>,
    student: Vec<f64>,
    recon: Vec<f64>,
    hard_ratio: f64,
    /// Seconds per frame.
    frame_s: f64,
    features: Vec<Vec<f32>>,
}

impl FrameData {
    fn load(
        session: &Session,
        run: &str,
        r: &str,
        step: u64,
        utt: &str,
    ) -> Result<FrameData, PlotError> {
        let b = session.query(&format!(
            "SELECT frame, time_s, masked, hard, teacher_pred, student_pred, recon_loss, hard_ratio FROM frames WHERE run = {r} AND step = {step} AND utt_id = {} ORDER BY frame",
            lit(utt)
        ))?;
        let time = col_f64(&b, "time_s")?;
        if time.is_empty() {
            return Err(PlotError::Input(format!("run `{run}`: no logged frames of utterance `{utt}` at step {step} (see: ehmam query RUN \"SELECT DISTINCT step, utt_id FROM frames\")")));
        }
        let masked = col_bool(&b, "masked")?;
        let hard = col_bool(&b, "hard")?;
        let teacher = col_f64(&b, "teacher_pred")?;
        let student = col_f64(&b, "student_pred")?;
        let recon = col_f64(&b, "recon_loss")?;
        let hard_ratio = col_f64(&b, "hard_ratio")?
            .first()
            .copied()
            .unwrap_or(f64::NAN);
        let frame_s = if time.len() > 1 {
            (time[time.len() - 1] - time[0]) / (time.len() - 1) as f64
        } else {
            0.02
        };
        // The student's input under it.
        let mut features: Vec<Vec<f32>> = Vec::new();
        if session.has_table("inputs") {
            let b = session.query(&format!("SELECT frame, features FROM inputs WHERE run = {r} AND step = {step} AND utt_id = {} ORDER BY frame", lit(utt)))?;
            for batch in &b {
                if let Some(l) = batch
                    .column_by_name("features")
                    .and_then(|c| c.as_list_opt::<i32>())
                {
                    for i in 0..l.len() {
                        let v = l.value(i);
                        let v = arrow::compute::cast(&v, &DataType::Float64)
                            .map_err(|e| PlotError::Input(e.to_string()))?;
                        let a = v.as_primitive::<Float64Type>();
                        features.push(a.values().iter().map(|&x| x as f32).collect());
                    }
                }
            }
        }
        Ok(FrameData {
            time,
            masked,
            hard,
            teacher,
            student,
            recon,
            hard_ratio,
            frame_s,
            features,
        })
    }
}

/// Top half: predicted and actual losses over the masked frames.
fn draw_frame_losses(
    top: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    d: &FrameData,
    path: &Path,
) -> Result<(), PlotError> {
    let FrameData {
        time,
        masked,
        hard,
        teacher,
        student,
        recon,
        frame_s,
        ..
    } = d;
    let frame_s = *frame_s;
    let (t0, t1) = (time[0], time[time.len() - 1] + frame_s);
    let (y0, y1) = range(
        teacher
            .iter()
            .chain(student.iter())
            .chain(recon.iter())
            .copied(),
    );
    let mut chart = ChartBuilder::on(top)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(t0..t1, y0..y1)
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc("time in the utterance (s)")
        .y_desc("loss")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(draw_err(path))?;
    let shade = |on: &[bool], color: RGBAColor| -> Vec<Rectangle<(f64, f64)>> {
        time.iter()
            .zip(on)
            .filter(|(_, m)| **m)
            .map(|(t, _)| Rectangle::new([(*t, y0), (*t + frame_s, y1)], color.filled()))
            .collect()
    };
    let random: Vec<bool> = masked.iter().zip(hard).map(|(m, h)| *m && !*h).collect();
    chart
        .draw_series(shade(&random, RGBColor(120, 120, 120).mix(0.3)))
        .map_err(draw_err(path))?;
    chart
        .draw_series(shade(hard, RGBColor(214, 39, 40).mix(0.25)))
        .map_err(draw_err(path))?;
    let mid = |i: usize| time[i] + frame_s / 2.0;
    let line = |v: &[f64]| -> Vec<(f64, f64)> {
        (0..v.len())
            .filter(|&i| v[i].is_finite())
            .map(|i| (mid(i), v[i]))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(line(teacher), palette(0).stroke_width(2)))
        .map_err(draw_err(path))?
        .label("teacher's predicted loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], palette(0).stroke_width(2)));
    if student.iter().any(|v| v.is_finite()) {
        chart
            .draw_series(LineSeries::new(line(student), palette(3).stroke_width(1)))
            .map_err(draw_err(path))?
            .label("student's predicted loss")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], palette(3).stroke_width(1))
            });
    }
    chart
        .draw_series(
            (0..recon.len())
                .filter(|&i| recon[i].is_finite())
                .map(|i| Circle::new((mid(i), recon[i]), 3, BLACK.filled())),
        )
        .map_err(draw_err(path))?
        .label("actual reconstruction loss (masked frames)")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, BLACK.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_err(path))?;

    Ok(())
}

/// Bottom half: the student's input under the frames (waveform envelope or feature image).
fn draw_frame_input(
    bottom: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    d: &FrameData,
    run_dir: &Path,
    _run: &str,
    path: &Path,
) -> Result<(), PlotError> {
    let FrameData {
        time,
        features,
        frame_s,
        ..
    } = d;
    let frame_s = *frame_s;
    let (t0, t1) = (time[0], time[time.len() - 1] + frame_s);
    let kind = features
        .first()
        .map_or(InputKind::Unknown, |f| input_kind(run_dir, f.len()));
    let n = features.len();
    if n == time.len() && n > 0 {
        match kind {
            InputKind::Waveform => {
                let env: Vec<(f64, f64, f64)> = features
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let lo = f.iter().copied().fold(f32::INFINITY, f32::min) as f64;
                        let hi = f.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                        (time[i], lo, hi)
                    })
                    .collect();
                let (a0, a1) = range(env.iter().flat_map(|e| [e.1, e.2]));
                let mut c = ChartBuilder::on(bottom)
                    .margin(10)
                    .x_label_area_size(35)
                    .y_label_area_size(70)
                    .build_cartesian_2d(t0..t1, a0..a1)
                    .map_err(draw_err(path))?;
                c.configure_mesh()
                    .x_desc("time in the utterance (s)")
                    .y_desc("waveform (normalised)")
                    .label_style(("sans-serif", 13))
                    .draw()
                    .map_err(draw_err(path))?;
                c.draw_series(env.iter().map(|&(t, lo, hi)| {
                    Rectangle::new([(t, lo), (t + frame_s, hi)], palette(0).filled())
                }))
                .map_err(draw_err(path))?;
            }
            _ => {
                // Rows of the image: mel bins; stacked frames are laid out side by side in time.
                let (bins, stack) = match kind {
                    InputKind::Fbank { bins, stack } => (bins, stack),
                    _ => (features[0].len(), 1),
                };
                let (v0, v1) = range(features.iter().flat_map(|f| f.iter().map(|&x| x as f64)));
                let sub = frame_s / stack as f64;
                let ylabel = if matches!(kind, InputKind::Fbank { .. }) {
                    "mel bin"
                } else {
                    "feature"
                };
                let mut c = ChartBuilder::on(bottom)
                    .margin(10)
                    .x_label_area_size(35)
                    .y_label_area_size(70)
                    .build_cartesian_2d(t0..t1, 0.0..bins as f64)
                    .map_err(draw_err(path))?;
                c.configure_mesh()
                    .disable_mesh()
                    .x_desc("time in the utterance (s)")
                    .y_desc(ylabel)
                    .label_style(("sans-serif", 13))
                    .draw()
                    .map_err(draw_err(path))?;
                let mut cells = Vec::with_capacity(n * bins * stack);
                for (i, f) in features.iter().enumerate() {
                    for s in 0..stack {
                        for k in 0..bins {
                            let v = f.get(s * bins + k).copied().unwrap_or(f32::NAN) as f64;
                            let color = if v.is_finite() {
                                ViridisRGB::get_color_normalized(v, v0, v1)
                            } else {
                                BLACK
                            };
                            let x = time[i] + s as f64 * sub;
                            cells.push(Rectangle::new(
                                [(x, k as f64), (x + sub, k as f64 + 1.0)],
                                color.filled(),
                            ));
                        }
                    }
                }
                c.draw_series(cells).map_err(draw_err(path))?;
            }
        }
    } else {
        let style = ("sans-serif", 16).into_font().color(&BLACK.mix(0.6));
        bottom
            .draw(&Text::new(
                "no input features logged for these frames (log.frames inputs_table off)",
                (200, 150),
                style,
            ))
            .map_err(draw_err(path))?;
    }
    Ok(())
}

/// Draws the figures; returns the files written.
pub fn plot(run_dirs: &[PathBuf], opts: &PlotOptions) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| PlotError::Input(format!("cannot create {}: {e}", opts.out.display())))?;
    let session = Session::open(run_dirs)?;
    if !session.has_table("steps") {
        return Err(PlotError::Input(format!(
            "no `steps` table in {}: plots need a training run with a log.steps stage",
            run_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let runs: Vec<String> = run_dirs.iter().map(|d| crate::sql::run_name(d)).collect();
    let mut series = Vec::new();
    let cols = [
        "loss_rec",
        "loss_aux",
        "loss",
        "rank_agreement",
        "teacher_rank_agreement",
        "masked_frac",
        "hard_ratio",
    ];
    for run in &runs {
        let b = session.query(&format!(
            "SELECT step, {} FROM steps WHERE run = {} ORDER BY step",
            cols.join(", "),
            lit(run)
        ))?;
        let step = col_f64(&b, "step")?;
        if step.is_empty() {
            continue;
        }
        let values = cols
            .iter()
            .map(|c| col_f64(&b, c))
            .collect::<Result<Vec<_>, _>>()?;
        series.push(Series {
            run: run.clone(),
            step,
            values,
        });
    }
    if series.is_empty() {
        return Err(PlotError::Input("the `steps` tables hold no rows".into()));
    }
    let mut written = Vec::new();
    let p = opts.out.join("losses.png");
    curves(
        &p,
        "Losses",
        &series,
        &[
            (
                "L_rec (reconstruction, masked frames)",
                "L_rec",
                0,
                None,
                None,
            ),
            (
                "L_aux (pairwise ranking, as normalised in L)",
                "L_aux",
                1,
                None,
                None,
            ),
            ("L = L_rec + α·L_aux", "L", 2, None, None),
        ],
    )?;
    written.push(p);
    let p = opts.out.join("health.png");
    curves(
        &p,
        "Loss prediction and masking",
        &series,
        &[
            ("rank agreement with the actual losses on masked pairs (solid: student, dashed: teacher)", "agreement", 3, Some(4), Some(0.5)),
            ("masked fraction", "masked / frames", 5, None, None),
            ("hard ratio r", "r", 6, None, None),
        ],
    )?;
    written.push(p);
    for (dir, run) in run_dirs.iter().zip(&runs) {
        match frame_figure(&session, run, dir, opts) {
            Ok(Some(p)) => written.push(p),
            Ok(None) => {}
            Err(PlotError::Input(m)) if opts.utt.is_some() && run_dirs.len() > 1 => {
                eprintln!("warning: {m}")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}
