//! What the `teacher` and `student` stages share: the versioned weight cell through which the
//! student publishes new EMA teacher weights (architecture: "a shared, versioned cell"), devices,
//! the model block's validation, and checkpoints (safetensors plus a JSON sidecar).

use crate::batch::DataPosition;
use crate::model::{ModelConfig, Weights};
use candle_core::{Device, Tensor};
use pipeline::{ParamError, StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Teacher weights of one version: the EMA'd teacher parameters (method §3) plus the student's
/// current front-end (the teacher reads the student's front-end output, §1.2).
pub struct TeacherWeights {
    /// Completed student updates these weights include.
    pub version: u64,
    pub weights: Weights,
}

#[derive(Default)]
struct CellState {
    /// The last few versions, oldest first.
    history: VecDeque<Arc<TeacherWeights>>,
    /// The first version published in this run (the step the student starts or resumes at).
    first: Option<u64>,
    closed: bool,
}

/// The student → teacher channel for weights: versions in order, the last few kept so that a
/// teacher allowed to run `staleness` steps ahead still gets an exact, reproducible version.
#[derive(Default)]
pub struct WeightCell {
    state: Mutex<CellState>,
    cv: Condvar,
}

/// What a teacher waiting for weights gets.
pub enum Wait {
    Weights(Arc<TeacherWeights>),
    /// The student has finished: nothing more will come.
    Closed,
}

impl WeightCell {
    /// The cell of a plan (one per run).
    pub fn of(ctx: &StageContext) -> Result<Arc<WeightCell>, StageError> {
        ctx.shared.get_or_insert("ehmam.teacher_weights", WeightCell::default).ok_or_else(|| StageError::failed("internal: weight cell has another type"))
    }

    pub fn publish(&self, w: TeacherWeights) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.first.is_none() {
            s.first = Some(w.version);
        }
        s.history.push_back(Arc::new(w));
        while s.history.len() > 3 {
            s.history.pop_front();
        }
        self.cv.notify_all();
    }

    pub fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = true;
        self.cv.notify_all();
    }

    /// The first version published (waits for it).
    pub fn first(&self, cancelled: &dyn Fn() -> bool) -> Result<Option<u64>, StageError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = s.first {
                return Ok(Some(f));
            }
            if s.closed {
                return Ok(None);
            }
            if cancelled() {
                return Err(StageError::Cancelled);
            }
            s = self.cv.wait_timeout(s, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits until version `v` is published and returns it.
    pub fn wait_for(&self, v: u64, cancelled: &dyn Fn() -> bool) -> Result<Wait, StageError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(w) = s.history.iter().find(|w| w.version == v) {
                return Ok(Wait::Weights(w.clone()));
            }
            if s.history.back().is_some_and(|w| w.version > v) {
                return Err(StageError::failed(format!("internal: teacher weights of version {v} are no longer kept")));
            }
            if s.closed {
                return Ok(Wait::Closed);
            }
            if cancelled() {
                return Err(StageError::Cancelled);
            }
            s = self.cv.wait_timeout(s, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Closes the cell when the student stops for any reason, so the teacher never waits forever.
pub struct CloseOnDrop(pub Arc<WeightCell>);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Resuming the data stream with the student
// ---------------------------------------------------------------------------------------------

/// What one plan knows about resuming its data stream from a training checkpoint.
#[derive(Default)]
struct ResumeState {
    /// `position.after()` of the checkpoint the student will resume from.
    position: Option<DataPosition>,
    /// Readers in the plan that can start inside their stream (`shards.read`, `features.read`).
    readers: usize,
}

fn resume_state(ctx: &StageContext) -> Option<Arc<Mutex<ResumeState>>> {
    ctx.shared.get_or_insert("ehmam.resume", || Mutex::new(ResumeState::default()))
}

/// Called by the student at validation: the length of its schedule, the default ramp of the
/// easy-to-hard curriculum.
pub fn set_total_updates(ctx: &StageContext, n: u64) {
    if let Some(s) = ctx.shared.get_or_insert("ehmam.total_updates", || Mutex::new(None::<u64>)) {
        *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }
}

/// The student's schedule length, when the plan has a student (after validation).
pub fn total_updates(ctx: &StageContext) -> Option<u64> {
    let s = ctx.shared.get_or_insert("ehmam.total_updates", || Mutex::new(None::<u64>))?;
    let v = *s.lock().unwrap_or_else(|e| e.into_inner());
    v
}

/// Called by readers at validation: they will start at the student's data position.
pub fn register_resumable_reader(ctx: &StageContext) {
    if let Some(s) = resume_state(ctx) {
        s.lock().unwrap_or_else(|e| e.into_inner()).readers += 1;
    }
}

/// Called by the student at validation with the position its checkpoint continues from.
pub fn set_resume_position(ctx: &StageContext, pos: DataPosition) {
    if let Some(s) = resume_state(ctx) {
        s.lock().unwrap_or_else(|e| e.into_inner()).position = Some(pos);
    }
}

/// The position the student announced at validation, whatever the readers (for its own check
/// at start that the checkpoint it resumes from is still the one validation saw).
pub fn announced_resume_position(ctx: &StageContext) -> Option<DataPosition> {
    let s = resume_state(ctx)?;
    let s = s.lock().unwrap_or_else(|e| e.into_inner());
    s.position
}

/// Where the data stages of this plan start: the position after the student's checkpoint, when
/// the student resumes and exactly one reader can start there (with several readers, or none,
/// the stream starts from the top and the teacher skips the batches already learned from).
/// Only meaningful once validation is over (in `create`).
pub fn resume_position(ctx: &StageContext) -> Option<DataPosition> {
    let s = resume_state(ctx)?;
    let s = s.lock().unwrap_or_else(|e| e.into_inner());
    if s.readers == 1 {
        s.position
    } else {
        None
    }
}

/// Where a reader of `epochs` passes starts when the plan resumes a training run: `(epoch,
/// index in that epoch's order)`, announced on stderr; `None` to start from the top.
pub fn reader_start(ctx: &StageContext, epochs: u32) -> Option<(u32, u64)> {
    let pos = resume_position(ctx)?;
    if pos.epoch >= epochs {
        return None;
    }
    eprintln!("{}: resuming the data stream at epoch {}, utterance {} (the student's checkpoint)", ctx.stage, pos.epoch, pos.start);
    Some((pos.epoch, pos.start))
}

/// candle device of a spec's `device` string.
pub fn device(name: &str) -> Result<Device, String> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = name.strip_prefix("cuda:") {
        let n: usize = n.parse().map_err(|_| format!("`{name}`: expected cuda:N with N a GPU index"))?;
        return Device::new_cuda(n).map_err(|e| format!("cannot open {name}: {e}"));
    }
    Err(format!("unknown device `{name}` (cpu or cuda:N)"))
}

/// The model block and device, checked at validation; errors carry spec-top paths.
pub fn validate_model(ctx: &StageContext) -> Vec<ParamError> {
    let mut e = Vec::new();
    if let Err(errs) = ModelConfig::from_spec(ctx.model.as_ref()) {
        e.extend(errs.into_iter().map(|(p, m)| ParamError::new(format!("/{p}"), m)));
    }
    // Unknown device names are the spec's own check (`device`); not repeated here.
    e
}

pub fn model_config(ctx: &StageContext) -> Result<ModelConfig, StageError> {
    ModelConfig::from_spec(ctx.model.as_ref()).map_err(|e| StageError::failed(e.into_iter().map(|(p, m)| format!("{p}: {m}")).collect::<Vec<_>>().join("; ")))
}

pub fn stage_err(what: &str) -> impl Fn(candle_core::Error) -> StageError + '_ {
    move |e| StageError::failed(format!("{what}: {e}"))
}

/// Mixes a seed with a step into an independent stream seed.
pub fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

/// The JSON beside a checkpoint's tensors; its presence marks the checkpoint complete.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub format: u32,
    /// Completed updates.
    pub step: u64,
    pub epoch: u32,
    /// Position of the last batch consumed; the data stream continues at `position.after()`.
    pub position: Option<DataPosition>,
    /// Randomness: every stream is derived from `seed` and the step (nothing else to restore).
    pub seed: u64,
    pub rng: String,
    pub adam_t: u64,
    pub model: ModelConfig,
    /// File of the tensors, relative to the checkpoint directory.
    pub tensors: String,
    /// The encoder's output frames per second on the training data (absent before the first
    /// update).
    #[serde(default)]
    pub frame_rate: Option<f64>,
}

pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The newest complete checkpoint (its JSON and tensors both present).
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(CheckpointMeta, PathBuf)>, StageError> {
    let dir = checkpoint_dir(run_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(None) };
    let mut metas: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json") && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-"))).collect();
    metas.sort();
    while let Some(p) = metas.pop() {
        let text = std::fs::read_to_string(&p).map_err(|e| StageError::failed(format!("cannot read {}: {e}", p.display())))?;
        let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| StageError::failed(format!("{}: not a checkpoint description: {e}", p.display())))?;
        let t = dir.join(&meta.tensors);
        if t.is_file() {
            return Ok(Some((meta, t)));
        }
        eprintln!("warning: {} has no tensors file {}; trying an older checkpoint", p.display(), t.display());
    }
    Ok(None)
}

/// Writes tensors then the JSON, each atomically (temp name, then rename); removes the oldest
/// checkpoints beyond `keep`.
pub fn save_checkpoint(run_dir: &Path, meta: &CheckpointMeta, tensors: &BTreeMap<String, Tensor>, keep: usize) -> Result<PathBuf, StageError> {
    let dir = checkpoint_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(|e| StageError::failed(format!("cannot create {}: {e}", dir.display())))?;
    let tpath = dir.join(&meta.tensors);
    let tmp = dir.join(format!(".{}.tmp", meta.tensors));
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    candle_core::safetensors::save(&map, &tmp).map_err(|e| StageError::failed(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &tpath).map_err(|e| StageError::failed(format!("cannot rename {}: {e}", tmp.display())))?;
    let jpath = dir.join(format!("step-{:08}.json", meta.step));
    let jtmp = dir.join(format!(".step-{:08}.json.tmp", meta.step));
    let text = serde_json::to_string_pretty(meta).map_err(|e| StageError::failed(e.to_string()))?;
    std::fs::write(&jtmp, text).map_err(|e| StageError::failed(format!("cannot write {}: {e}", jtmp.display())))?;
    std::fs::rename(&jtmp, &jpath).map_err(|e| StageError::failed(format!("cannot rename {}: {e}", jtmp.display())))?;
    // Prune.
    if keep > 0 {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut metas: Vec<PathBuf> =
                entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json") && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-"))).collect();
            metas.sort();
            let n = metas.len();
            for old in metas.into_iter().take(n.saturating_sub(keep)) {
                if let Ok(text) = std::fs::read_to_string(&old) {
                    if let Ok(m) = serde_json::from_str::<CheckpointMeta>(&text) {
                        let _ = std::fs::remove_file(dir.join(&m.tensors));
                    }
                }
                let _ = std::fs::remove_file(&old);
            }
        }
    }
    Ok(jpath)
}

/// Loads a checkpoint's tensors onto `device`.
pub fn load_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>, StageError> {
    let m = candle_core::safetensors::load(path, device).map_err(|e| StageError::failed(format!("cannot read checkpoint {}: {e}", path.display())))?;
    Ok(m.into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// Export for downstream use
// ---------------------------------------------------------------------------------------------

/// `config.json` of an exported encoder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportConfig {
    pub format: String,
    pub model: ModelConfig,
    /// Which weights: `student` (default) or `teacher` (the EMA encoder; front-end from the student).
    pub weights: String,
    /// Update the checkpoint was taken at.
    pub step: u64,
    pub source: String,
    /// Output frames per second of the encoder and what its input must be.
    pub frame_rate: f64,
    pub input: String,
    pub tensors: Vec<String>,
}

/// Writes the front-end and encoder of the run's last checkpoint (student weights unless
/// `teacher`) as `DIR/encoder.safetensors` with `DIR/config.json`. Returns the config.
pub fn export(run_dir: &Path, out: &Path, teacher: bool) -> Result<ExportConfig, StageError> {
    let Some((meta, path)) = latest_checkpoint(run_dir)? else {
        return Err(StageError::failed(format!("{}: no checkpoint (train first: ehmam run SPEC)", checkpoint_dir(run_dir).display())));
    };
    let all = load_tensors(&path, &Device::Cpu)?;
    let mut w: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, v) in &all {
        let Some(name) = k.strip_prefix("student.") else { continue };
        if name.starts_with("frontend.") || (!teacher && name.starts_with("encoder.")) {
            w.insert(name.to_string(), v.clone());
        }
    }
    if teacher {
        for (k, v) in &all {
            if let Some(name) = k.strip_prefix("teacher.") {
                if name.starts_with("encoder.") {
                    w.insert(name.to_string(), v.clone());
                }
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| StageError::io(format!("cannot create {}", out.display()), e))?;
    let input = match meta.model.frontend.kind {
        crate::model::FrontendKind::Fbank => format!("{}-dim features as features.fbank makes them (80 bins stacked by 2, per-utterance normalised, 50 Hz)", meta.model.frontend.input_dim),
        crate::model::FrontendKind::Cnn => "16 kHz waveform, zero mean and unit variance per utterance (features.waveform)".to_string(),
    };
    let cfg = ExportConfig {
        format: "ehmam-encoder-1".into(),
        model: meta.model.clone(),
        weights: if teacher { "teacher".into() } else { "student".into() },
        step: meta.step,
        source: path.display().to_string(),
        frame_rate: meta.frame_rate.unwrap_or(50.0),
        input,
        tensors: w.keys().cloned().collect(),
    };
    let tmp = out.join(".encoder.safetensors.tmp");
    let map: std::collections::HashMap<String, Tensor> = w.into_iter().collect();
    candle_core::safetensors::save(&map, &tmp).map_err(|e| StageError::failed(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out.join("encoder.safetensors")).map_err(|e| StageError::io("cannot rename the exported weights", e))?;
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| StageError::failed(e.to_string()))?;
    std::fs::write(out.join("config.json"), text).map_err(|e| StageError::io(format!("cannot write {}", out.join("config.json").display()), e))?;
    Ok(cfg)
}

/// Loads an exported encoder (`export`'s output directory).
pub fn load_encoder(dir: &Path, device: &Device) -> Result<(ExportConfig, crate::model::Weights), StageError> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| StageError::io(format!("cannot read {}", p.display()), e))?;
    let cfg: ExportConfig = serde_json::from_str(&text).map_err(|e| StageError::failed(format!("{}: {e}", p.display())))?;
    let w = load_tensors(&dir.join("encoder.safetensors"), device)?;
    Ok((cfg, w))
}
