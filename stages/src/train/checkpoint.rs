//! Checkpoints (safetensors plus a JSON sidecar, written atomically) and the export of a trained
//! encoder for downstream use.

use crate::items::DataPosition;
use crate::model::ModelConfig;
use candle_core::{Device, Tensor};
pub(crate) use pipeline::atomic::write_atomic;
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
    /// `model.dtype: f16`: the dynamic loss scale and the overflow-free updates since it last
    /// changed (absent for f32 and bf16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp16_scale: Option<(f64, u64)>,
    /// A fine-tuning checkpoint (`finetune.ctc`): its vocabulary and where it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneMeta>,
    /// A data-parallel run (see `dist`): the data position of every rank, in rank order (rank
    /// `r` resumes after `ranks[r]`; the checkpoint resumes only on as many ranks). Absent for a
    /// run of one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<Vec<Option<DataPosition>>>,
}

impl CheckpointMeta {
    /// Where rank `rank` of `world` continues after this checkpoint (`position.after()` of its
    /// last batch); an error when the checkpoint was written by another number of ranks.
    pub fn rank_position(&self, rank: usize, world: usize) -> Result<Option<DataPosition>, String> {
        let written = self.ranks.as_ref().map_or(1, |r| r.len());
        if written != world {
            let by = |n: usize| {
                if n == 1 {
                    "one process".to_string()
                } else {
                    format!("{n} ranks")
                }
            };
            return Err(format!(
                "the checkpoint of step {} was written by {} and this run has {}: each rank's place in the data is only known for the same number of ranks (run it with {}, or set student.with.resume: false to start afresh)",
                self.step,
                by(written),
                by(world),
                by(written)
            ));
        }
        let pos = match &self.ranks {
            Some(r) => r[rank],
            None => self.position,
        };
        Ok(pos.map(|p| p.after()))
    }
}

/// What a fine-tuning checkpoint adds to [`CheckpointMeta`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneMeta {
    /// The CTC head's symbols by index (index 0 the blank).
    pub vocab: Vec<String>,
    /// The pre-trained model it started from.
    pub init: String,
}

/// Saves tensors as safetensors at `path`, atomically, readable as the other files a run
/// writes (the safetensors writer creates its file private).
pub(crate) fn save_safetensors(
    map: &std::collections::HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), StageError> {
    pipeline::atomic::commit_atomic(path, |tmp| {
        candle_core::safetensors::save(map, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644));
    }
    Ok(())
}

pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// A checkpoint passed over: its file and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedCheckpoint {
    /// The file that is cut short, damaged or missing (the JSON or its tensors).
    pub file: PathBuf,
    pub why: String,
}

/// The newest complete checkpoint of a run, and the newer ones passed over.
#[derive(Debug, Clone)]
pub struct FoundCheckpoint {
    pub meta: CheckpointMeta,
    /// Its tensors (safetensors).
    pub path: PathBuf,
    /// Its JSON.
    pub json: PathBuf,
    /// Newer checkpoints that are incomplete or damaged, newest first.
    pub skipped: Vec<SkippedCheckpoint>,
}

impl FoundCheckpoint {
    /// One line per checkpoint passed over, for the person running (names the file to remove).
    pub fn fallback_notes(&self) -> Vec<String> {
        self.skipped
            .iter()
            .map(|s| {
                format!(
                    "checkpoint {} is unusable ({}); using the older {} (step {}) instead (remove the bad file to silence this)",
                    s.file.display(),
                    s.why,
                    self.json.display(),
                    self.meta.step
                )
            })
            .collect()
    }
}

/// The checkpoint JSONs of a run directory, oldest first (names sort by step).
fn checkpoint_jsons(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
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
    metas
}

/// Checks that a safetensors file is whole: its header parses and the file is exactly as long as
/// the header's tensors say (a file cut short anywhere fails). Reads the header only.
pub fn check_safetensors(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot read its size: {e}"))?
        .len();
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8)
        .map_err(|_| format!("cut short: {len} bytes, not even a header"))?;
    let n = u64::from_le_bytes(n8);
    if n > len.saturating_sub(8) {
        return Err(format!(
            "cut short: {len} bytes, its header alone needs {}",
            n.saturating_add(8)
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| format!("cannot read its header: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("damaged header: {e}"))?;
    let Some(entries) = v.as_object() else {
        return Err("damaged header: not a JSON object".into());
    };
    let mut end = 0u64;
    for (name, e) in entries {
        if name == "__metadata__" {
            continue;
        }
        let off = e
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.get(1))
            .and_then(|o| o.as_u64())
            .ok_or_else(|| format!("damaged header: tensor `{name}` has no data_offsets"))?;
        end = end.max(off);
    }
    let want = 8 + n + end;
    if len != want {
        return Err(format!(
            "cut short: {len} bytes where its header says {want}"
        ));
    }
    Ok(())
}

/// The newest complete checkpoint: its JSON reads and its tensors file is whole. Newer ones that
/// are not (a disk that filled up, a copy cut short) are passed over and listed in `skipped`.
/// When there are checkpoints but none is complete, the error names every file to remove.
pub fn find_checkpoint(run_dir: &Path) -> Result<Option<FoundCheckpoint>, StageError> {
    let dir = checkpoint_dir(run_dir);
    let mut metas = checkpoint_jsons(&dir);
    let mut skipped = Vec::new();
    while let Some(p) = metas.pop() {
        let meta = match std::fs::read_to_string(&p)
            .map_err(|e| format!("cannot read it: {e}"))
            .and_then(|text| {
                serde_json::from_str::<CheckpointMeta>(&text)
                    .map_err(|e| format!("not a checkpoint description: {e}"))
            }) {
            Ok(m) => m,
            Err(why) => {
                skipped.push(SkippedCheckpoint { file: p, why });
                continue;
            }
        };
        let t = dir.join(&meta.tensors);
        if !t.is_file() {
            skipped.push(SkippedCheckpoint {
                file: p.clone(),
                why: format!("its tensors file {} is missing", t.display()),
            });
            continue;
        }
        if let Err(why) = check_safetensors(&t) {
            skipped.push(SkippedCheckpoint { file: t, why });
            continue;
        }
        return Ok(Some(FoundCheckpoint {
            meta,
            path: t,
            json: p,
            skipped,
        }));
    }
    if skipped.is_empty() {
        return Ok(None);
    }
    Err(StageError::failed(format!(
        "{}: no complete checkpoint to continue from: {}. Remove these files (or the directory) to start afresh",
        dir.display(),
        skipped
            .iter()
            .map(|s| format!("{} ({})", s.file.display(), s.why))
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

/// The newest complete checkpoint (see [`find_checkpoint`]); the checkpoints passed over are
/// reported on stderr.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(CheckpointMeta, PathBuf)>, StageError> {
    Ok(find_checkpoint(run_dir)?.map(|f| {
        for n in f.fallback_notes() {
            eprintln!("warning: {n}");
        }
        (f.meta, f.path)
    }))
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

/// What [`export`] wrote, and the checkpoints it passed over.
#[derive(Debug, Clone)]
pub struct Exported {
    pub config: ExportConfig,
    /// One line per newer checkpoint that was incomplete (the export used an older one).
    pub notes: Vec<String>,
}

/// Writes the front-end and encoder of the run's newest complete checkpoint (student weights
/// unless `teacher`) as `DIR/encoder.safetensors` with `DIR/config.json`. A directory `out`
/// that exists and is not empty is refused unless `force` (then the two files are replaced and
/// nothing else in it is touched).
pub fn export(
    run_dir: &Path,
    out: &Path,
    teacher: bool,
    force: bool,
) -> Result<Exported, StageError> {
    let (cfg, w, notes) = export_weights(
        run_dir,
        out,
        teacher,
        force,
        "encoder.safetensors and config.json",
    )?;
    std::fs::create_dir_all(out)
        .map_err(|e| StageError::io(format!("cannot create {}", out.display()), e))?;
    let map: std::collections::HashMap<String, Tensor> = w.into_iter().collect();
    save_safetensors(&map, &out.join("encoder.safetensors"))?;
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| StageError::failed(e.to_string()))?;
    let cpath = out.join("config.json");
    write_atomic(&cpath, text.as_bytes())
        .map_err(|e| StageError::io(format!("cannot write {}", cpath.display()), e))?;
    Ok(Exported { config: cfg, notes })
}

/// What every export format starts from: `out` checked (new or empty unless `force`; `files`
/// names what `force` replaces), the run's newest complete checkpoint found, and its front-end
/// and encoder tensors (the student's, or with `teacher` the EMA encoder and the student's
/// front-end) with the native `ExportConfig` that describes them.
pub fn export_weights(
    run_dir: &Path,
    out: &Path,
    teacher: bool,
    force: bool,
    files: &str,
) -> Result<(ExportConfig, BTreeMap<String, Tensor>, Vec<String>), StageError> {
    if out.exists() && !out.is_dir() {
        return Err(StageError::failed(format!(
            "--out {}: exists and is not a directory",
            out.display()
        )));
    }
    if !force {
        let entries = std::fs::read_dir(out).map(|d| d.count()).unwrap_or(0);
        if entries > 0 {
            return Err(StageError::failed(format!(
                "--out {}: the directory is not empty ({entries} entries); choose an empty or new directory, or pass --force to write {files} into it",
                out.display()
            )));
        }
    }
    let Some(found) = find_checkpoint(run_dir)? else {
        return Err(StageError::failed(format!(
            "{}: no checkpoint (train first: ehmam run SPEC)",
            checkpoint_dir(run_dir).display()
        )));
    };
    let notes = found.fallback_notes();
    let (meta, path) = (found.meta, found.path);
    let all = load_tensors(&path, &Device::Cpu)?;
    let mut w: BTreeMap<String, Tensor> = BTreeMap::new();
    // A fine-tuning run's checkpoint holds the fine-tuned model under `model.` (its CTC head and
    // mask embedding are not part of the encoder).
    let prefix = if meta.finetune.is_some() {
        if teacher {
            return Err(StageError::failed(format!(
                "{}: a fine-tuning run has no EMA teacher; export it without --teacher",
                path.display()
            )));
        }
        "model."
    } else {
        "student."
    };
    for (k, v) in &all {
        let Some(name) = k.strip_prefix(prefix) else {
            continue;
        };
        if name == "encoder.mask_emb" {
            continue;
        }
        if name.starts_with("frontend.") || (!teacher && name.starts_with("encoder.")) {
            w.insert(name.to_string(), v.clone());
        }
    }
    if w.is_empty() {
        return Err(StageError::failed(format!(
            "{}: no front-end or encoder tensors (`{prefix}*`) in the checkpoint",
            path.display()
        )));
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
    let input = match meta.model.frontend.kind {
        crate::model::FrontendKind::Fbank => format!("{}-dim features as features.fbank makes them (80 bins stacked by 2, per-utterance normalised, 50 Hz)", meta.model.frontend.input_dim),
        crate::model::FrontendKind::Cnn => "16 kHz waveform, zero mean and unit variance per utterance (features.waveform)".to_string(),
    };
    let cfg = ExportConfig {
        format: "ehmam-encoder-1".into(),
        model: meta.model.clone(),
        weights: if teacher {
            "teacher".into()
        } else if meta.finetune.is_some() {
            "fine-tuned".into()
        } else {
            "student".into()
        },
        step: meta.step,
        source: path.display().to_string(),
        frame_rate: meta.frame_rate.unwrap_or(50.0),
        input,
        tensors: w.keys().cloned().collect(),
    };
    Ok((cfg, w, notes))
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
