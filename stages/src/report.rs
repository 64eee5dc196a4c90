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

use crate::fbank::Features;
use crate::model::{Model, ModelConfig, Noise, Weights};
use crate::sql::{Session, SqlError};
use crate::train;
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Device, Tensor};
use plotters::prelude::*;
use rand::SeedableRng;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Sql(#[from] SqlError),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Model(String),
}

fn me(e: candle_core::Error) -> ReportError {
    ReportError::Model(e.to_string())
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
        ReportOptions { out: PathBuf::from("report"), probe: true, masking: true, tail: 0.1 }
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
}

fn f64s(batches: &[RecordBatch], name: &str) -> Result<Vec<f64>, ReportError> {
    crate::plot::column_f64(batches, name).map_err(ReportError::Input)
}

use crate::plot::lit;

fn spec_of(dir: &Path) -> Option<Value> {
    serde_yaml::from_str(&std::fs::read_to_string(dir.join("spec.yaml")).ok()?).ok()
}

/// Stages of a resolved spec by name.
fn stages_of(spec: &Value) -> BTreeMap<String, Value> {
    spec.get("stages").and_then(|s| s.as_mapping()).map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.clone()))).collect()).unwrap_or_default()
}

fn kind_of(st: &Value) -> &str {
    st.get("kind").and_then(|k| k.as_str()).unwrap_or("")
}

/// The masking stage and α of a run, from its spec.
fn masking_of(spec: &Value) -> (String, f64) {
    let stages = stages_of(spec);
    let mut masking = "?".to_string();
    let mut alpha = crate::student::StudentParams::default().alpha;
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
                    Some(Value::Mapping(m)) => extra.extend(m.keys().filter_map(|k| k.as_str().map(str::to_string))),
                    _ => extra.push("linear".into()),
                }
            }
            masking = if extra.is_empty() { k.to_string() } else { format!("{k} ({})", extra.join(", ")) };
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
    names.iter().zip(run_dirs).map(|(n, d)| if names.iter().filter(|m| *m == n).count() > 1 { d.display().to_string() } else { n.clone() }).collect()
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
            status: status.as_ref().map_or("unknown".into(), |s| s.status.clone()),
            wall_s: status.as_ref().map_or(f64::NAN, |s| s.wall_s),
            loss_rec: f64::NAN,
            rank_agreement: f64::NAN,
            masked_frac: f64::NAN,
            hard_share: f64::NAN,
            hard_ratio: f64::NAN,
            steps: 0,
        };
        if session.has_table("steps") {
            let r = lit(&run);
            let b = session.query(&format!("SELECT count(*) AS n, max(step) AS last FROM steps WHERE run = {r}"))?;
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

/// The summary as a Markdown table.
pub fn summary_markdown(rows: &[RunRow]) -> String {
    let mut s = String::from("| run | masking | α | status | updates | L_rec | rank agreement | masked fraction | hard share | hard ratio r | wall s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
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
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Probe
// ---------------------------------------------------------------------------------------------

/// A multinomial logistic regression on standardised inputs (softmax cross-entropy + L2/2·|W|²),
/// fitted by full-batch gradient descent with Nesterov momentum.
#[derive(Debug, Clone)]
pub struct LinearProbe {
    pub classes: usize,
    pub dim: usize,
    /// `classes × dim`, row-major.
    pub w: Vec<f64>,
    pub b: Vec<f64>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

impl LinearProbe {
    fn standardise(&self, x: &[f32]) -> Vec<f64> {
        x.iter().zip(&self.mean).zip(&self.inv_std).map(|((&v, m), s)| (v as f64 - m) * s).collect()
    }

    /// Class scores of one input.
    pub fn logits(&self, x: &[f32]) -> Vec<f64> {
        let z = self.standardise(x);
        (0..self.classes).map(|c| self.b[c] + self.w[c * self.dim..(c + 1) * self.dim].iter().zip(&z).map(|(a, b)| a * b).sum::<f64>()).collect()
    }

    pub fn predict(&self, x: &[f32]) -> usize {
        let l = self.logits(x);
        (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap_or(0)
    }

    /// Share of `xs` classified as `ys`.
    pub fn accuracy(&self, xs: &[Vec<f32>], ys: &[usize]) -> f64 {
        if xs.is_empty() {
            return f64::NAN;
        }
        xs.iter().zip(ys).filter(|(x, y)| self.predict(x) == **y).count() as f64 / xs.len() as f64
    }

    /// Mean cross-entropy + l2/2·|W|² and its gradient, on standardised inputs `z`.
    pub fn loss_and_grad(w: &[f64], b: &[f64], z: &[Vec<f64>], ys: &[usize], classes: usize, l2: f64) -> (f64, Vec<f64>, Vec<f64>) {
        let dim = z.first().map_or(0, |r| r.len());
        let n = z.len().max(1) as f64;
        let mut gw = vec![0.0; classes * dim];
        let mut gb = vec![0.0; classes];
        let mut loss = 0.0;
        for (x, &y) in z.iter().zip(ys) {
            let logits: Vec<f64> = (0..classes).map(|c| b[c] + w[c * dim..(c + 1) * dim].iter().zip(x).map(|(a, b)| a * b).sum::<f64>()).collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            loss += -(e[y] / sum).ln();
            for c in 0..classes {
                let g = e[c] / sum - if c == y { 1.0 } else { 0.0 };
                gb[c] += g / n;
                for (k, xv) in x.iter().enumerate() {
                    gw[c * dim + k] += g * xv / n;
                }
            }
        }
        loss /= n;
        loss += 0.5 * l2 * w.iter().map(|v| v * v).sum::<f64>();
        for (g, v) in gw.iter_mut().zip(w) {
            *g += l2 * v;
        }
        (loss, gw, gb)
    }

    /// Fits on `xs` (each of the same length) with labels in `0..classes`.
    pub fn fit(xs: &[Vec<f32>], ys: &[usize], classes: usize, l2: f64, iters: usize) -> LinearProbe {
        let dim = xs.first().map_or(0, |r| r.len());
        let n = xs.len().max(1) as f64;
        let mut mean = vec![0.0; dim];
        for x in xs {
            for (m, &v) in mean.iter_mut().zip(x) {
                *m += v as f64 / n;
            }
        }
        let mut var = vec![0.0; dim];
        for x in xs {
            for ((s, &v), m) in var.iter_mut().zip(x).zip(&mean) {
                *s += (v as f64 - m).powi(2) / n;
            }
        }
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v.sqrt() + 1e-6)).collect();
        let mut p = LinearProbe { classes, dim, w: vec![0.0; classes * dim], b: vec![0.0; classes], mean, inv_std };
        let z: Vec<Vec<f64>> = xs.iter().map(|x| p.standardise(x)).collect();
        // The loss is (1 + l2)-smooth-ish on standardised inputs; a step of 1/(1 + dim/… ) is
        // conservative, momentum makes up for it.
        let lr = 1.0 / (1.0 + 0.25 * dim as f64).sqrt();
        let (mut vw, mut vb) = (vec![0.0; classes * dim], vec![0.0; classes]);
        for _ in 0..iters {
            let look_w: Vec<f64> = p.w.iter().zip(&vw).map(|(w, v)| w + 0.9 * v).collect();
            let look_b: Vec<f64> = p.b.iter().zip(&vb).map(|(b, v)| b + 0.9 * v).collect();
            let (_, gw, gb) = Self::loss_and_grad(&look_w, &look_b, &z, ys, classes, l2);
            for ((w, v), g) in p.w.iter_mut().zip(vw.iter_mut()).zip(&gw) {
                *v = 0.9 * *v - lr * g;
                *w += *v;
            }
            for ((b, v), g) in p.b.iter_mut().zip(vb.iter_mut()).zip(&gb) {
                *v = 0.9 * *v - lr * g;
                *b += *v;
            }
        }
        p
    }
}

/// A probe task: label of each utterance and the train/test split.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub classes: Vec<String>,
    /// Per utterance (index into the features): its class, if it takes part.
    pub labels: Vec<Option<usize>>,
    pub test: Vec<bool>,
}

fn hash(s: &str) -> u64 {
    let h = blake3::hash(s.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Builds a task from labels: classes with at least 2 utterances take part; in each, every 4th
/// utterance (in an order fixed by a hash of its id) is held out for testing, at least one.
pub fn task(name: &str, utt_ids: &[String], labels: &[Option<String>]) -> Option<Task> {
    let mut by: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        if let Some(l) = l {
            by.entry(l.as_str()).or_default().push(i);
        }
    }
    by.retain(|_, v| v.len() >= 2);
    if by.len() < 2 {
        return None;
    }
    let classes: Vec<String> = by.keys().map(|k| k.to_string()).collect();
    let mut lab = vec![None; utt_ids.len()];
    let mut test = vec![false; utt_ids.len()];
    for (c, (_, members)) in by.iter_mut().enumerate() {
        members.sort_by_key(|&i| (hash(&format!("{name}/{}", utt_ids[i])), i));
        for (k, &i) in members.iter().enumerate() {
            lab[i] = Some(c);
            test[i] = k % 4 == 3 || (members.len() < 4 && k == members.len() - 1);
        }
    }
    Some(Task { name: name.into(), classes, labels: lab, test })
}

/// Fits on the training utterances; returns the probe and its test accuracy.
pub fn run_task(t: &Task, emb: &[Vec<f32>]) -> (LinearProbe, f64) {
    let (mut xs, mut ys, mut tx, mut ty) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, l) in t.labels.iter().enumerate() {
        if let Some(c) = l {
            if t.test[i] {
                tx.push(emb[i].clone());
                ty.push(*c);
            } else {
                xs.push(emb[i].clone());
                ys.push(*c);
            }
        }
    }
    let p = LinearProbe::fit(&xs, &ys, t.classes.len(), 1e-2, 400);
    let acc = p.accuracy(&tx, &ty);
    (p, acc)
}

/// Every utterance's features as the run's own data stages make them: its reader (one pass, in
/// order) and the features stage that feeds its batcher, into a temporary `features.write`.
pub fn run_features(run_dir: &Path, work: &Path) -> Result<Vec<Features>, ReportError> {
    let spec = spec_of(run_dir).ok_or_else(|| ReportError::Input(format!("{}: no spec.yaml (not a run directory)", run_dir.display())))?;
    let stages = stages_of(&spec);
    let from_names = |st: &Value| -> Vec<String> {
        let one = |v: &Value| v.as_str().map(|s| s.split('.').next().unwrap_or(s).to_string());
        match st.get("from") {
            Some(Value::String(_)) => st.get("from").and_then(one).into_iter().collect(),
            Some(Value::Sequence(s)) => s.iter().filter_map(one).collect(),
            Some(Value::Mapping(m)) => m.values().filter_map(one).collect(),
            _ => Vec::new(),
        }
    };
    let batcher = stages.iter().find(|(_, st)| kind_of(st) == "batch.by_duration").map(|(n, _)| n.clone());
    let features = batcher
        .as_ref()
        .and_then(|b| from_names(&stages[b]).into_iter().next())
        .ok_or_else(|| ReportError::Input(format!("{}: the spec has no batch.by_duration stage fed by a features stage", run_dir.display())))?;
    // The features stage and everything upstream of it.
    let mut keep = vec![features.clone()];
    let mut i = 0;
    while i < keep.len() {
        if let Some(st) = stages.get(&keep[i]) {
            for f in from_names(st) {
                if !keep.contains(&f) {
                    keep.push(f);
                }
            }
        }
        i += 1;
    }
    let mut out = serde_yaml::Mapping::new();
    for name in &keep {
        let Some(st) = stages.get(name) else { return Err(ReportError::Input(format!("stage `{name}` is missing from the spec"))) };
        let mut st = st.clone();
        if matches!(kind_of(&st), "shards.read" | "features.read") {
            if let Some(Value::Mapping(w)) = st.get_mut("with") {
                w.insert("epochs".into(), 1.into());
                w.insert("shuffle".into(), false.into());
                w.insert("start_epoch".into(), 0.into());
                w.insert("start_index".into(), 0.into());
            }
        }
        out.insert(name.as_str().into(), st);
    }
    let feat_dir = work.join("features");
    let _ = std::fs::remove_dir_all(&feat_dir);
    let store: Value = serde_yaml::from_str(&format!("{{ kind: features.write, from: {features}, with: {{ dir: {} }} }}", serde_json::to_string(&feat_dir.display().to_string()).unwrap_or_default()))
        .map_err(|e| ReportError::Input(e.to_string()))?;
    out.insert("probe_store".into(), store);
    let mut top = serde_yaml::Mapping::new();
    top.insert("name".into(), "probe-features".into());
    top.insert("run_dir".into(), work.join("run").display().to_string().into());
    if let Some(seed) = spec.get("seed") {
        top.insert("seed".into(), seed.clone());
    }
    top.insert("stages".into(), Value::Mapping(out));
    let text = serde_yaml::to_string(&Value::Mapping(top)).map_err(|e| ReportError::Input(e.to_string()))?;
    let loaded = pipeline::load_str(&text, "probe-features.yaml", &[]).map_err(|e| ReportError::Input(format!("{}: the data stages of its spec: {e}", run_dir.display())))?;
    let plan = pipeline::validate(loaded, &crate::registry()).map_err(|e| ReportError::Input(format!("{}: the data stages of its spec: {e}", run_dir.display())))?;
    pipeline::run(plan, &pipeline::RunOptions { force: true, quiet: true }, &pipeline::CancelToken::new()).map_err(|e| ReportError::Input(format!("computing the probe's features: {e}")))?;
    let index = crate::features_io::FeatureIndex::load(&feat_dir).map_err(ReportError::Input)?.ok_or_else(|| ReportError::Input("no features written".into()))?;
    let mut all = Vec::new();
    for p in &index.parts {
        all.extend(crate::features_io::read_features(&feat_dir.join(&p.file), None).map_err(ReportError::Input)?);
    }
    Ok(all)
}

/// A run's trained model: its config, the student's weights and the teacher's (EMA parameters
/// with the student's front-end), from the last checkpoint.
pub struct Trained {
    pub cfg: ModelConfig,
    pub step: u64,
    pub student: Weights,
    pub teacher: Weights,
}

pub fn load_trained(run_dir: &Path) -> Result<Trained, ReportError> {
    let (meta, path) =
        train::latest_checkpoint(run_dir).map_err(|e| ReportError::Input(e.to_string()))?.ok_or_else(|| ReportError::Input(format!("{}: no checkpoint (train first)", run_dir.display())))?;
    let all = train::load_tensors(&path, &Device::Cpu).map_err(|e| ReportError::Input(e.to_string()))?;
    let mut student = Weights::new();
    let mut teacher = Weights::new();
    for (k, v) in all {
        if let Some(n) = k.strip_prefix("student.") {
            if n.starts_with("frontend.") {
                teacher.insert(n.to_string(), v.clone());
            }
            student.insert(n.to_string(), v);
        } else if let Some(n) = k.strip_prefix("teacher.") {
            teacher.insert(n.to_string(), v);
        }
    }
    Ok(Trained { cfg: meta.model, step: meta.step, student, teacher })
}

fn input(f: &Features) -> Result<Tensor, ReportError> {
    Tensor::from_slice(&f.data, (1, f.num_frames, f.dim), &Device::Cpu).map_err(me)
}

fn mean_time(h: &Tensor) -> Result<Vec<f32>, ReportError> {
    h.mean(1).map_err(me)?.flatten_all().map_err(me)?.to_dtype(DType::F32).map_err(me)?.to_vec1::<f32>().map_err(me)
}

/// Mean-pooled output of the student's last block, every frame visible.
pub fn embed(m: &Trained, f: &Features) -> Result<Vec<f32>, ReportError> {
    let model = Model::new(&m.cfg, &m.student);
    let z = model.frontend(&input(f)?).map_err(me)?;
    let outs = model.encode(&z).map_err(me)?;
    mean_time(outs.last().ok_or_else(|| ReportError::Model("no blocks".into()))?)
}

/// Mean-pooled input features (the probe's baseline).
pub fn embed_input(f: &Features) -> Vec<f32> {
    let mut v = vec![0f32; f.dim];
    for row in f.data.chunks(f.dim.max(1)) {
        for (a, b) in v.iter_mut().zip(row) {
            *a += b / f.num_frames.max(1) as f32;
        }
    }
    v
}

/// One utterance with frames hidden: the student's reconstruction loss on them (method §1.7,
/// eval mode) and its mean-pooled representation of the visible frames.
fn masked_pass(m: &Trained, z: &Tensor, y: &Tensor, mask: &[bool], seed: u64) -> Result<(f64, Vec<f32>), ReportError> {
    let model = Model::new(&m.cfg, &m.student);
    let t = mask.len();
    let (h, pos) = model.student_encoder(z, mask, &mut None).map_err(me)?;
    let mut noise = Noise::new(seed);
    let u = model.fill(&h, &pos, t, h.clone(), &mut noise).map_err(me)?;
    let yhat = model.head("decoder", &u, &m.cfg.decoder, false).map_err(me)?;
    let idx: Vec<u32> = (0..t).filter(|&i| mask[i]).map(|i| i as u32).collect();
    let k = idx.len();
    let idx = Tensor::from_vec(idx, k, &Device::Cpu).map_err(me)?;
    let d = y.dim(2).map_err(me)?;
    let yh = yhat.reshape((t, d)).map_err(me)?.index_select(&idx, 0).map_err(me)?.unsqueeze(0).map_err(me)?;
    let yt = y.reshape((t, d)).map_err(me)?.index_select(&idx, 0).map_err(me)?.unsqueeze(0).map_err(me)?;
    let ell = crate::losses::recon_per_frame(&yh, &yt).map_err(me)?.mean_all().map_err(me)?.to_dtype(DType::F64).map_err(me)?.to_scalar::<f64>().map_err(me)?;
    Ok((ell, mean_time(&h)?))
}

/// Probe and masking-analysis results of one run.
#[derive(Debug, Clone, Default)]
pub struct ProbeResult {
    pub run: String,
    pub step: u64,
    /// (task, accuracy of the student's representation, accuracy at initialisation, classes, test utterances)
    pub accuracy: Vec<(String, f64, f64, usize, usize)>,
    /// (X, ℓ on the top-X % frames, ℓ on X % random frames, per task: (accuracy hard, accuracy random))
    pub masking: Vec<(f64, f64, f64, Vec<(f64, f64)>)>,
}

pub const MASK_SHARES: [f64; 5] = [0.1, 0.2, 0.3, 0.4, 0.5];

/// Probe (and masking analysis) of one run.
pub fn probe_run(run_dir: &Path, work: &Path, masking: bool) -> Result<ProbeResult, ReportError> {
    let trained = load_trained(run_dir)?;
    let mut feats = run_features(run_dir, work)?;
    // One row per utterance: a reader over a store written for several epochs gives each
    // utterance more than once, and a copy on each side of the split would leak.
    let mut seen = std::collections::HashSet::new();
    feats.retain(|f| seen.insert(f.utt_id.clone()));
    if feats.is_empty() {
        return Err(ReportError::Input(format!("{}: its data stages gave no utterances", run_dir.display())));
    }
    let ids: Vec<String> = feats.iter().map(|f| f.utt_id.clone()).collect();
    let mut tasks = Vec::new();
    if let Some(t) = task("speaker", &ids, &feats.iter().map(|f| f.speaker.clone()).collect::<Vec<_>>()) {
        tasks.push(t);
    }
    if let Some(t) = task("phrase", &ids, &feats.iter().map(|f| f.transcript.clone()).collect::<Vec<_>>()) {
        tasks.push(t);
    }
    if tasks.is_empty() {
        return Err(ReportError::Input(format!("{}: no probe labels (utterances need speakers, or transcripts that repeat)", run_dir.display())));
    }
    let emb: Vec<Vec<f32>> = feats.iter().map(|f| embed(&trained, f)).collect::<Result<_, _>>()?;
    // Baseline: the same architecture at its initialisation (what training adds).
    let init = Trained { cfg: trained.cfg.clone(), step: 0, student: crate::model::init_weights(&trained.cfg, 0x1417, &Device::Cpu, DType::F32).map_err(me)?, teacher: Weights::new() };
    let base: Vec<Vec<f32>> = feats.iter().map(|f| embed(&init, f)).collect::<Result<_, _>>()?;
    let mut res = ProbeResult { run: crate::sql::run_name(run_dir), step: trained.step, ..Default::default() };
    let mut probes = Vec::new();
    for t in &tasks {
        let (p, acc) = run_task(t, &emb);
        let (_, acc_base) = run_task(t, &base);
        let n_test = t.test.iter().zip(&t.labels).filter(|(te, l)| **te && l.is_some()).count();
        res.accuracy.push((t.name.clone(), acc, acc_base, t.classes.len(), n_test));
        probes.push(p);
    }
    if !masking {
        return Ok(res);
    }
    // Fig. 5: per utterance, the teacher's predicted losses pick the frames to hide.
    let teacher = Model::new(&trained.cfg, &trained.teacher);
    let student = Model::new(&trained.cfg, &trained.student);
    let mut acc_rows: Vec<(f64, f64, f64, Vec<(u64, u64, u64)>)> = MASK_SHARES.iter().map(|&x| (x, 0.0, 0.0, vec![(0, 0, 0); tasks.len()])).collect();
    let mut counted = 0usize;
    // The held-out utterances of any task (the probes' test sets).
    let held_out: Vec<bool> = (0..feats.len()).map(|i| tasks.iter().any(|t| t.test[i] && t.labels[i].is_some())).collect();
    for (i, f) in feats.iter().enumerate() {
        if !held_out[i] {
            continue;
        }
        let z = student.frontend(&input(f)?).map_err(me)?;
        let t = z.dim(1).map_err(me)?;
        if t < 4 {
            continue;
        }
        let out = teacher.teacher(&z).map_err(me)?;
        let lp = out.pred_loss.flatten_all().map_err(me)?.to_vec1::<f32>().map_err(me)?;
        counted += 1;
        for (ri, &x) in MASK_SHARES.iter().enumerate() {
            let k = ((x * t as f64).round() as usize).clamp(1, t - 1);
            let mut hard = vec![false; t];
            for j in crate::mask::top_k(&lp, k) {
                hard[j] = true;
            }
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hash(&format!("{}/{x}", f.utt_id)));
            let mut rand_mask = vec![false; t];
            for j in rand::seq::index::sample(&mut rng, t, k) {
                rand_mask[j] = true;
            }
            let seed = hash(&f.utt_id);
            let (lh, eh) = masked_pass(&trained, &z, &out.targets, &hard, seed)?;
            let (lr, er) = masked_pass(&trained, &z, &out.targets, &rand_mask, seed)?;
            acc_rows[ri].1 += lh;
            acc_rows[ri].2 += lr;
            for (ti, t) in tasks.iter().enumerate() {
                if let (true, Some(c)) = (t.test[i], t.labels[i]) {
                    let a = &mut acc_rows[ri].3[ti];
                    a.0 += (probes[ti].predict(&eh) == c) as u64;
                    a.1 += (probes[ti].predict(&er) == c) as u64;
                    a.2 += 1;
                }
            }
        }
    }
    res.masking = acc_rows
        .into_iter()
        .map(|(x, lh, lr, accs)| (x, lh / counted.max(1) as f64, lr / counted.max(1) as f64, accs.into_iter().map(|(h, r, n)| (h as f64 / n.max(1) as f64, r as f64 / n.max(1) as f64)).collect()))
        .collect();
    Ok(res)
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
        let b = session.query(&format!("SELECT step, loss_rec FROM steps WHERE run = {} ORDER BY step", lit(&crate::sql::run_name(dir))))?;
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
    let root = BitMapBackend::new(path, (420 * cols as u32, 40 + 320 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let root = root.titled("Reconstruction loss L_rec per run (shared axes; thick: moving average)", ("sans-serif", 20)).map_err(draw_err(path))?;
    let areas = root.split_evenly((rows, cols));
    for (area, (run, s, v)) in areas.iter().zip(&series) {
        let mut chart = ChartBuilder::on(area).caption(run, ("sans-serif", 16)).margin(8).x_label_area_size(30).y_label_area_size(45).build_cartesian_2d(0.0..x1, y0..y1).map_err(draw_err(path))?;
        chart.configure_mesh().x_desc("update").label_style(("sans-serif", 11)).draw().map_err(draw_err(path))?;
        let pts: Vec<(f64, f64)> = s.iter().zip(v).filter(|(_, y)| y.is_finite()).map(|(x, y)| (*x, *y)).collect();
        chart.draw_series(LineSeries::new(pts.clone(), RGBColor(31, 119, 180).mix(0.3))).map_err(draw_err(path))?;
        let w = (pts.len() / 30).max(1);
        let avg: Vec<(f64, f64)> = (0..pts.len())
            .map(|i| {
                let lo = i.saturating_sub(w - 1);
                (pts[i].0, pts[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64)
            })
            .collect();
        chart.draw_series(LineSeries::new(avg, RGBColor(31, 119, 180).stroke_width(2))).map_err(draw_err(path))?;
        if pts.len() <= 60 {
            // Short runs: the points themselves (a single update draws no line).
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, RGBColor(31, 119, 180).filled()))).map_err(draw_err(path))?;
        }
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// ℓ on hidden frames against the share hidden: top-X % by predicted loss (solid) vs random (dashed).
fn masking_figure(path: &Path, results: &[ProbeResult]) -> Result<(), ReportError> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let vals = results.iter().flat_map(|r| r.masking.iter().flat_map(|m| [m.1, m.2])).filter(|v| v.is_finite());
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
    chart.configure_mesh().x_desc("frames hidden (%)").y_desc("mean per-frame loss ℓ").label_style(("sans-serif", 13)).draw().map_err(draw_err(path))?;
    let palette = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(255, 127, 14), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];
    for (i, r) in results.iter().enumerate() {
        let c = palette[i % palette.len()];
        let hard: Vec<(f64, f64)> = r.masking.iter().map(|m| (m.0 * 100.0, m.1)).collect();
        let rand: Vec<(f64, f64)> = r.masking.iter().map(|m| (m.0 * 100.0, m.2)).collect();
        chart.draw_series(LineSeries::new(hard, c.stroke_width(2))).map_err(draw_err(path))?.label(r.run.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(DashedLineSeries::new(rand, 6, 4, c.stroke_width(2))).map_err(draw_err(path))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK.mix(0.3)).label_font(("sans-serif", 13)).draw().map_err(draw_err(path))?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// Writes `report.md`, `rec_loss.png` and (with the probe) `masking.png` into `opts.out`.
pub fn report(run_dirs: &[PathBuf], opts: &ReportOptions) -> Result<Vec<PathBuf>, ReportError> {
    crate::plot::register_font();
    std::fs::create_dir_all(&opts.out).map_err(|e| ReportError::Input(format!("cannot create {}: {e}", opts.out.display())))?;
    let rows = summarize(run_dirs, opts.tail)?;
    let session = Session::open(run_dirs)?;
    if !session.has_table("steps") {
        return Err(ReportError::Input("no `steps` table: a report needs training runs with a log.steps stage".into()));
    }
    let mut md = String::from("# EH-MAM runs compared\n\n");
    md.push_str(&format!(
        "Runs: {}. Figures over the last {:.0} % of each run's updates; hard share = masked frames chosen by predicted hardness among the logged masked frames; wall time over all attempts (`run.json`).\n\n",
        run_dirs.iter().map(|d| format!("`{}`", d.display())).collect::<Vec<_>>().join(", "),
        opts.tail * 100.0
    ));
    md.push_str(&summary_markdown(&rows));
    let mut files = Vec::new();
    let rec = opts.out.join("rec_loss.png");
    rec_curves(&rec, run_dirs, &rows.iter().map(|r| r.run.clone()).collect::<Vec<_>>())?;
    md.push_str("\n![L_rec per run](rec_loss.png)\n");
    files.push(rec);
    if opts.probe {
        let work = tempfile::tempdir().map_err(|e| ReportError::Input(format!("temporary directory: {e}")))?;
        let mut results = Vec::new();
        let mut skipped = Vec::new();
        for (i, d) in run_dirs.iter().enumerate() {
            eprintln!("report: probing {} ({}/{})", d.display(), i + 1, run_dirs.len());
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
        let names: Vec<String> = results.first().map(|r| r.accuracy.iter().map(|a| a.0.clone()).collect()).unwrap_or_default();
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
            md.push_str(&format!("\n{}\n", r.accuracy.iter().map(|a| format!("{}: {} classes, {} test utterances.", a.0, a.3, a.4)).collect::<Vec<_>>().join(" ")));
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
                    md.push_str(&format!("| {} | {:.0} % | {:.3} | {:.3} | {:.2} |", r.run, m.0 * 100.0, m.1, m.2, m.1 / m.2));
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
    std::fs::write(&path, md).map_err(|e| ReportError::Input(format!("cannot write {}: {e}", path.display())))?;
    files.insert(0, path);
    Ok(files)
}
