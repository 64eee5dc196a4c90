//! The linear probe of `ehmam report`: utterance embeddings of a trained encoder, a multinomial
//! logistic regression on them, and the masking analysis (method Fig. 5).

use crate::runinfo::{kind_of, spec_of, stages_of};
use crate::sql::SqlError;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use serde_yaml::Value;
use stages::items::Features;
use stages::model::{Model, ModelConfig, Noise, Weights};
use stages::train;
use std::collections::BTreeMap;
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Probe
// ---------------------------------------------------------------------------------------------

/// Errors of the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Sql(#[from] SqlError),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Model(String),
}

fn me(e: candle_core::Error) -> ProbeError {
    ProbeError::Model(e.to_string())
}

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
        x.iter()
            .zip(&self.mean)
            .zip(&self.inv_std)
            .map(|((&v, m), s)| (v as f64 - m) * s)
            .collect()
    }

    /// Class scores of one input.
    pub fn logits(&self, x: &[f32]) -> Vec<f64> {
        let z = self.standardise(x);
        (0..self.classes)
            .map(|c| {
                self.b[c]
                    + self.w[c * self.dim..(c + 1) * self.dim]
                        .iter()
                        .zip(&z)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
            })
            .collect()
    }

    pub fn predict(&self, x: &[f32]) -> usize {
        let l = self.logits(x);
        (0..l.len())
            .max_by(|&a, &b| l[a].total_cmp(&l[b]))
            .unwrap_or(0)
    }

    /// Share of `xs` classified as `ys`.
    pub fn accuracy(&self, xs: &[Vec<f32>], ys: &[usize]) -> f64 {
        if xs.is_empty() {
            return f64::NAN;
        }
        xs.iter()
            .zip(ys)
            .filter(|(x, y)| self.predict(x) == **y)
            .count() as f64
            / xs.len() as f64
    }

    /// Mean cross-entropy + l2/2·|W|² and its gradient, on standardised inputs `z`.
    pub fn loss_and_grad(
        w: &[f64],
        b: &[f64],
        z: &[Vec<f64>],
        ys: &[usize],
        classes: usize,
        l2: f64,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let dim = z.first().map_or(0, |r| r.len());
        let n = z.len().max(1) as f64;
        let mut gw = vec![0.0; classes * dim];
        let mut gb = vec![0.0; classes];
        let mut loss = 0.0;
        for (x, &y) in z.iter().zip(ys) {
            let logits: Vec<f64> = (0..classes)
                .map(|c| {
                    b[c] + w[c * dim..(c + 1) * dim]
                        .iter()
                        .zip(x)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                })
                .collect();
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
    pub fn fit(
        xs: &[Vec<f32>],
        ys: &[usize],
        classes: usize,
        l2: f64,
        iters: usize,
    ) -> LinearProbe {
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
        let mut p = LinearProbe {
            classes,
            dim,
            w: vec![0.0; classes * dim],
            b: vec![0.0; classes],
            mean,
            inv_std,
        };
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
    Some(Task {
        name: name.into(),
        classes,
        labels: lab,
        test,
    })
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
pub fn run_features(run_dir: &Path, work: &Path) -> Result<Vec<Features>, ProbeError> {
    let spec = spec_of(run_dir).ok_or_else(|| {
        ProbeError::Input(format!(
            "{}: no spec.yaml (not a run directory)",
            run_dir.display()
        ))
    })?;
    let stages = stages_of(&spec);
    let from_names = |st: &Value| -> Vec<String> {
        let one = |v: &Value| {
            v.as_str()
                .map(|s| s.split('.').next().unwrap_or(s).to_string())
        };
        match st.get("from") {
            Some(Value::String(_)) => st.get("from").and_then(one).into_iter().collect(),
            Some(Value::Sequence(s)) => s.iter().filter_map(one).collect(),
            Some(Value::Mapping(m)) => m.values().filter_map(one).collect(),
            _ => Vec::new(),
        }
    };
    let batcher = stages
        .iter()
        .find(|(_, st)| kind_of(st) == "batch.by_duration")
        .map(|(n, _)| n.clone());
    let features = batcher
        .as_ref()
        .and_then(|b| from_names(&stages[b]).into_iter().next())
        .ok_or_else(|| {
            ProbeError::Input(format!(
                "{}: the spec has no batch.by_duration stage fed by a features stage",
                run_dir.display()
            ))
        })?;
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
        let Some(st) = stages.get(name) else {
            return Err(ProbeError::Input(format!(
                "stage `{name}` is missing from the spec"
            )));
        };
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
    let store: Value = serde_yaml::from_str(&format!(
        "{{ kind: features.write, from: {features}, with: {{ dir: {} }} }}",
        serde_json::to_string(&feat_dir.display().to_string()).unwrap_or_default()
    ))
    .map_err(|e| ProbeError::Input(e.to_string()))?;
    out.insert("probe_store".into(), store);
    let mut top = serde_yaml::Mapping::new();
    top.insert("name".into(), "probe-features".into());
    top.insert(
        "run_dir".into(),
        work.join("run").display().to_string().into(),
    );
    if let Some(seed) = spec.get("seed") {
        top.insert("seed".into(), seed.clone());
    }
    top.insert("stages".into(), Value::Mapping(out));
    let text = serde_yaml::to_string(&Value::Mapping(top))
        .map_err(|e| ProbeError::Input(e.to_string()))?;
    let loaded = pipeline::load_str(&text, "probe-features.yaml", &[]).map_err(|e| {
        ProbeError::Input(format!(
            "{}: the data stages of its spec: {e}",
            run_dir.display()
        ))
    })?;
    let plan = pipeline::validate(loaded, &stages::registry()).map_err(|e| {
        ProbeError::Input(format!(
            "{}: the data stages of its spec: {e}",
            run_dir.display()
        ))
    })?;
    pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .map_err(|e| ProbeError::Input(format!("computing the probe's features: {e}")))?;
    let index = stages::data::store::FeatureIndex::load(&feat_dir)
        .map_err(|e| ProbeError::Input(e.to_string()))?
        .ok_or_else(|| ProbeError::Input("no features written".into()))?;
    let mut all = Vec::new();
    for p in &index.parts {
        all.extend(
            stages::data::store::read_features(&feat_dir.join(&p.file), None)
                .map_err(|e| ProbeError::Input(e.to_string()))?,
        );
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

pub fn load_trained(run_dir: &Path) -> Result<Trained, ProbeError> {
    let (meta, path) = train::latest_checkpoint(run_dir)
        .map_err(|e| ProbeError::Input(e.to_string()))?
        .ok_or_else(|| {
            ProbeError::Input(format!(
                "{}: no checkpoint (train first)",
                run_dir.display()
            ))
        })?;
    let all =
        train::load_tensors(&path, &Device::Cpu).map_err(|e| ProbeError::Input(e.to_string()))?;
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
    Ok(Trained {
        cfg: meta.model,
        step: meta.step,
        student,
        teacher,
    })
}

fn input(f: &Features) -> Result<Tensor, ProbeError> {
    Tensor::from_slice(&f.data, (1, f.num_frames, f.dim), &Device::Cpu).map_err(me)
}

fn mean_time(h: &Tensor) -> Result<Vec<f32>, ProbeError> {
    h.mean(1)
        .map_err(me)?
        .flatten_all()
        .map_err(me)?
        .to_dtype(DType::F32)
        .map_err(me)?
        .to_vec1::<f32>()
        .map_err(me)
}

/// Mean-pooled output of the student's last block, every frame visible.
pub fn embed(m: &Trained, f: &Features) -> Result<Vec<f32>, ProbeError> {
    let model = Model::new(&m.cfg, &m.student);
    let z = model.frontend(&input(f)?).map_err(me)?;
    let outs = model.encode(&z).map_err(me)?;
    mean_time(
        outs.last()
            .ok_or_else(|| ProbeError::Model("no blocks".into()))?,
    )
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
fn masked_pass(
    m: &Trained,
    z: &Tensor,
    y: &Tensor,
    mask: &[bool],
    seed: u64,
) -> Result<(f64, Vec<f32>), ProbeError> {
    let model = Model::new(&m.cfg, &m.student);
    let t = mask.len();
    let (h, pos) = model.student_encoder(z, mask, &mut None).map_err(me)?;
    let mut noise = Noise::new(seed);
    let u = model.fill(&h, &pos, t, h.clone(), &mut noise).map_err(me)?;
    let yhat = model
        .head("decoder", &u, &m.cfg.decoder, false)
        .map_err(me)?;
    let idx: Vec<u32> = (0..t).filter(|&i| mask[i]).map(|i| i as u32).collect();
    let k = idx.len();
    let idx = Tensor::from_vec(idx, k, &Device::Cpu).map_err(me)?;
    let d = y.dim(2).map_err(me)?;
    let yh = yhat
        .reshape((t, d))
        .map_err(me)?
        .index_select(&idx, 0)
        .map_err(me)?
        .unsqueeze(0)
        .map_err(me)?;
    let yt = y
        .reshape((t, d))
        .map_err(me)?
        .index_select(&idx, 0)
        .map_err(me)?
        .unsqueeze(0)
        .map_err(me)?;
    let ell = stages::model::losses::recon_per_frame(&yh, &yt)
        .map_err(me)?
        .mean_all()
        .map_err(me)?
        .to_dtype(DType::F64)
        .map_err(me)?
        .to_scalar::<f64>()
        .map_err(me)?;
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
pub fn probe_run(run_dir: &Path, work: &Path, masking: bool) -> Result<ProbeResult, ProbeError> {
    let trained = load_trained(run_dir)?;
    let mut feats = run_features(run_dir, work)?;
    // One row per utterance: a reader over a store written for several epochs gives each
    // utterance more than once, and a copy on each side of the split would leak.
    let mut seen = std::collections::HashSet::new();
    feats.retain(|f| seen.insert(f.utt_id.clone()));
    if feats.is_empty() {
        return Err(ProbeError::Input(format!(
            "{}: its data stages gave no utterances",
            run_dir.display()
        )));
    }
    let tasks = probe_tasks(run_dir, &feats)?;
    let emb: Vec<Vec<f32>> = feats
        .iter()
        .map(|f| embed(&trained, f))
        .collect::<Result<_, _>>()?;
    // Baseline: the same architecture at its initialisation (what training adds).
    let init = Trained {
        cfg: trained.cfg.clone(),
        step: 0,
        student: stages::model::init_weights(&trained.cfg, 0x1417, &Device::Cpu, DType::F32)
            .map_err(me)?,
        teacher: Weights::new(),
    };
    let base: Vec<Vec<f32>> = feats
        .iter()
        .map(|f| embed(&init, f))
        .collect::<Result<_, _>>()?;
    let mut res = ProbeResult {
        run: crate::sql::run_name(run_dir),
        step: trained.step,
        ..Default::default()
    };
    let mut probes = Vec::new();
    for t in &tasks {
        let (p, acc) = run_task(t, &emb);
        let (_, acc_base) = run_task(t, &base);
        let n_test = t
            .test
            .iter()
            .zip(&t.labels)
            .filter(|(te, l)| **te && l.is_some())
            .count();
        res.accuracy
            .push((t.name.clone(), acc, acc_base, t.classes.len(), n_test));
        probes.push(p);
    }
    if !masking {
        return Ok(res);
    }
    res.masking = masking_analysis(&trained, &feats, &tasks, &probes)?;
    Ok(res)
}

/// The probe's tasks: speaker identity, and the phrase where transcripts repeat.
fn probe_tasks(run_dir: &Path, feats: &[Features]) -> Result<Vec<Task>, ProbeError> {
    let ids: Vec<String> = feats.iter().map(|f| f.utt_id.clone()).collect();
    let mut tasks = Vec::new();
    if let Some(t) = task(
        "speaker",
        &ids,
        &feats.iter().map(|f| f.speaker.clone()).collect::<Vec<_>>(),
    ) {
        tasks.push(t);
    }
    if let Some(t) = task(
        "phrase",
        &ids,
        &feats
            .iter()
            .map(|f| f.transcript.clone())
            .collect::<Vec<_>>(),
    ) {
        tasks.push(t);
    }
    if tasks.is_empty() {
        return Err(ProbeError::Input(format!(
            "{}: no probe labels (utterances need speakers, or transcripts that repeat)",
            run_dir.display()
        )));
    }
    Ok(tasks)
}

/// One row of the masking analysis: mask share, mean loss with hard and with random masks,
/// probe accuracy (hard, random) per task.
type MaskingRow = (f64, f64, f64, Vec<(f64, f64)>);

/// Fig. 5: on the held-out utterances, the teacher's predicted losses pick the frames to hide
/// (`MASK_SHARES` of them), against as many random frames: reconstruction loss and probe
/// accuracy of the masked encoding.
fn masking_analysis(
    trained: &Trained,
    feats: &[Features],
    tasks: &[Task],
    probes: &[LinearProbe],
) -> Result<Vec<MaskingRow>, ProbeError> {
    // Fig. 5: per utterance, the teacher's predicted losses pick the frames to hide.
    let teacher = Model::new(&trained.cfg, &trained.teacher);
    let student = Model::new(&trained.cfg, &trained.student);
    let mut acc_rows: Vec<(f64, f64, f64, Vec<(u64, u64, u64)>)> = MASK_SHARES
        .iter()
        .map(|&x| (x, 0.0, 0.0, vec![(0, 0, 0); tasks.len()]))
        .collect();
    let mut counted = 0usize;
    // The held-out utterances of any task (the probes' test sets).
    let held_out: Vec<bool> = (0..feats.len())
        .map(|i| tasks.iter().any(|t| t.test[i] && t.labels[i].is_some()))
        .collect();
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
        let lp = out
            .pred_loss
            .flatten_all()
            .map_err(me)?
            .to_vec1::<f32>()
            .map_err(me)?;
        counted += 1;
        for (ri, &x) in MASK_SHARES.iter().enumerate() {
            let k = ((x * t as f64).round() as usize).clamp(1, t - 1);
            let mut hard = vec![false; t];
            for j in stages::train::masking::top_k(&lp, k) {
                hard[j] = true;
            }
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(hash(&format!("{}/{x}", f.utt_id)));
            let mut rand_mask = vec![false; t];
            for j in rand::seq::index::sample(&mut rng, t, k) {
                rand_mask[j] = true;
            }
            let seed = hash(&f.utt_id);
            let (lh, eh) = masked_pass(trained, &z, &out.targets, &hard, seed)?;
            let (lr, er) = masked_pass(trained, &z, &out.targets, &rand_mask, seed)?;
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
    Ok(acc_rows
        .into_iter()
        .map(|(x, lh, lr, accs)| {
            (
                x,
                lh / counted.max(1) as f64,
                lr / counted.max(1) as f64,
                accs.into_iter()
                    .map(|(h, r, n)| (h as f64 / n.max(1) as f64, r as f64 / n.max(1) as f64))
                    .collect(),
            )
        })
        .collect())
}
