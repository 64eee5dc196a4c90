//! Checkpoints (safetensors plus a JSON sidecar, written atomically) and the export of a trained
//! encoder for downstream use.

use crate::items::DataPosition;
use crate::model::ModelConfig;
use candle_core::{Device, Tensor};
use pipeline::atomic::write_atomic;
use pipeline::StageError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// Saves tensors as safetensors at `path`, atomically.
fn save_safetensors(
    map: &std::collections::HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), StageError> {
    pipeline::atomic::commit_atomic(path, |tmp| {
        candle_core::safetensors::save(map, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))
}

pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The newest complete checkpoint (its JSON and tensors both present).
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(CheckpointMeta, PathBuf)>, StageError> {
    let dir = checkpoint_dir(run_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut metas: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    metas.sort();
    while let Some(p) = metas.pop() {
        let text = std::fs::read_to_string(&p)
            .map_err(|e| StageError::failed(format!("cannot read {}: {e}", p.display())))?;
        let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| {
            StageError::failed(format!(
                "{}: not a checkpoint description: {e}",
                p.display()
            ))
        })?;
        let t = dir.join(&meta.tensors);
        if t.is_file() {
            return Ok(Some((meta, t)));
        }
        eprintln!(
            "warning: {} has no tensors file {}; trying an older checkpoint",
            p.display(),
            t.display()
        );
    }
    Ok(None)
}

/// Writes tensors then the JSON, each atomically (temp name, then rename); removes the oldest
/// checkpoints beyond `keep`.
pub fn save_checkpoint(
    run_dir: &Path,
    meta: &CheckpointMeta,
    tensors: &BTreeMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf, StageError> {
    let dir = checkpoint_dir(run_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| StageError::failed(format!("cannot create {}: {e}", dir.display())))?;
    let tpath = dir.join(&meta.tensors);
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    save_safetensors(&map, &tpath)?;
    let jpath = dir.join(format!("step-{:08}.json", meta.step));
    let text = serde_json::to_string_pretty(meta).map_err(|e| StageError::failed(e.to_string()))?;
    write_atomic(&jpath, text.as_bytes())
        .map_err(|e| StageError::io(format!("cannot write {}", jpath.display()), e))?;
    // Prune.
    if keep > 0 {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut metas: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "json")
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                })
                .collect();
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
    let m = candle_core::safetensors::load(path, device).map_err(|e| {
        StageError::failed(format!("cannot read checkpoint {}: {e}", path.display()))
    })?;
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
        return Err(StageError::failed(format!(
            "{}: no checkpoint (train first: ehmam run SPEC)",
            checkpoint_dir(run_dir).display()
        )));
    };
    let all = load_tensors(&path, &Device::Cpu)?;
    let mut w: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, v) in &all {
        let Some(name) = k.strip_prefix("student.") else {
            continue;
        };
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
    std::fs::create_dir_all(out)
        .map_err(|e| StageError::io(format!("cannot create {}", out.display()), e))?;
    let input = match meta.model.frontend.kind {
        crate::model::FrontendKind::Fbank => format!("{}-dim features as features.fbank makes them (80 bins stacked by 2, per-utterance normalised, 50 Hz)", meta.model.frontend.input_dim),
        crate::model::FrontendKind::Cnn => "16 kHz waveform, zero mean and unit variance per utterance (features.waveform)".to_string(),
    };
    let cfg = ExportConfig {
        format: "ehmam-encoder-1".into(),
        model: meta.model.clone(),
        weights: if teacher {
            "teacher".into()
        } else {
            "student".into()
        },
        step: meta.step,
        source: path.display().to_string(),
        frame_rate: meta.frame_rate.unwrap_or(50.0),
        input,
        tensors: w.keys().cloned().collect(),
    };
    let map: std::collections::HashMap<String, Tensor> = w.into_iter().collect();
    save_safetensors(&map, &out.join("encoder.safetensors"))?;
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| StageError::failed(e.to_string()))?;
    let cpath = out.join("config.json");
    write_atomic(&cpath, text.as_bytes())
        .map_err(|e| StageError::io(format!("cannot write {}", cpath.display()), e))?;
    Ok(cfg)
}

/// Loads an exported encoder (`export`'s output directory).
pub fn load_encoder(
    dir: &Path,
    device: &Device,
) -> Result<(ExportConfig, crate::model::Weights), StageError> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p)
        .map_err(|e| StageError::io(format!("cannot read {}", p.display()), e))?;
    let cfg: ExportConfig = serde_json::from_str(&text)
        .map_err(|e| StageError::failed(format!("{}: {e}", p.display())))?;
    let w = load_tensors(&dir.join("encoder.safetensors"), device)?;
    Ok((cfg, w))
}
