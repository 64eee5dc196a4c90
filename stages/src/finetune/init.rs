//! Where fine-tuning starts: the pre-trained front-end and encoder, from a pre-training run
//! directory (its newest complete checkpoint, the student's weights, as data2vec 2.0 fine-tunes),
//! or from a directory `ehmam export` wrote (`--format native`: `encoder.safetensors`; `--format
//! hf`: `model.safetensors` under PyTorch names, read back through the same name map).

use crate::model::{shapes_of, ModelConfig, Weights};
use crate::train::{
    check_safetensors, checkpoint_dir, export_hf::hf_names, find_checkpoint, load_tensors,
};
use candle_core::{Device, Tensor};
use pipeline::StageError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `init` points at.
#[derive(Debug, Clone, PartialEq)]
pub enum InitSource {
    /// A pre-training run directory and its newest complete checkpoint (tensors file).
    Run {
        dir: PathBuf,
        checkpoint: PathBuf,
        step: u64,
    },
    /// `ehmam export --format native`.
    Native { dir: PathBuf },
    /// `ehmam export --format hf`.
    Hf { dir: PathBuf },
}

impl std::fmt::Display for InitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitSource::Run {
                checkpoint, step, ..
            } => write!(f, "{} (step {step})", checkpoint.display()),
            InitSource::Native { dir } => write!(f, "{} (native export)", dir.display()),
            InitSource::Hf { dir } => write!(f, "{} (Hugging Face export)", dir.display()),
        }
    }
}

/// The pre-trained model.
#[derive(Debug, Clone)]
pub struct Pretrained {
    pub cfg: ModelConfig,
    /// `frontend.*` and `encoder.*` tensors under ehmam's names.
    pub weights: Weights,
    pub source: InitSource,
}

/// Finds what `path` holds without reading any tensor (validation): a run directory with a
/// checkpoint, or an export directory. Errors say what is missing.
pub fn locate(path: &Path) -> Result<InitSource, String> {
    if !path.is_dir() {
        return Err(format!(
            "{}: no such directory (a pre-training run directory or an `ehmam export` directory)",
            path.display()
        ));
    }
    let cfg = path.join("config.json");
    if cfg.is_file() {
        let text = std::fs::read_to_string(&cfg)
            .map_err(|e| format!("cannot read {}: {e}", cfg.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", cfg.display()))?;
        if v.get("ehmam_model").is_some() {
            let w = path.join("model.safetensors");
            check_safetensors(&w).map_err(|e| format!("{}: {e}", w.display()))?;
            return Ok(InitSource::Hf {
                dir: path.to_path_buf(),
            });
        }
        if v.get("format").and_then(|f| f.as_str()) == Some("ehmam-encoder-1") {
            let w = path.join("encoder.safetensors");
            check_safetensors(&w).map_err(|e| format!("{}: {e}", w.display()))?;
            return Ok(InitSource::Native {
                dir: path.to_path_buf(),
            });
        }
        return Err(format!(
            "{}: not an ehmam export (no `ehmam_model`, no `format: ehmam-encoder-1`)",
            cfg.display()
        ));
    }
    let found = find_checkpoint(path).map_err(|e| e.to_string())?;
    match found {
        Some(f) => {
            if f.meta.finetune.is_some() {
                return Err(format!(
                    "{}: a fine-tuning checkpoint; `init` takes a pre-training run or an export",
                    f.json.display()
                ));
            }
            Ok(InitSource::Run {
                dir: path.to_path_buf(),
                checkpoint: f.path,
                step: f.meta.step,
            })
        }
        None => Err(format!(
            "{}: no complete checkpoint in {} (pre-train first: ehmam run SPEC), and no export's config.json",
            path.display(),
            checkpoint_dir(path).display()
        )),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, StageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| StageError::failed(format!("{}: {e}", path.display())))
}

fn model_of(v: &serde_json::Value, path: &Path) -> Result<ModelConfig, StageError> {
    serde_json::from_value(v.clone()).map_err(|e| {
        StageError::failed(format!(
            "{}: its model block does not parse: {e}",
            path.display()
        ))
    })
}

/// Loads the pre-trained front-end and encoder onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Pretrained, StageError> {
    let source = locate(path).map_err(StageError::failed)?;
    let (cfg, weights) = match &source {
        InitSource::Run { dir, .. } => {
            let found = find_checkpoint(dir)?.ok_or_else(|| {
                StageError::failed(format!("{}: the checkpoint went away", dir.display()))
            })?;
            let all = load_tensors(&found.path, device)?;
            let w: Weights = all
                .into_iter()
                .filter_map(|(k, v)| {
                    let name = k.strip_prefix("student.")?;
                    (name.starts_with("frontend.") || name.starts_with("encoder."))
                        .then(|| (name.to_string(), v))
                })
                .collect();
            (found.meta.model.clone(), w)
        }
        InitSource::Native { dir } => {
            let p = dir.join("config.json");
            let v = read_json(&p)?;
            let cfg = model_of(v.get("model").unwrap_or(&serde_json::Value::Null), &p)?;
            (cfg, load_tensors(&dir.join("encoder.safetensors"), device)?)
        }
        InitSource::Hf { dir } => {
            let p = dir.join("config.json");
            let v = read_json(&p)?;
            let cfg = model_of(v.get("ehmam_model").unwrap_or(&serde_json::Value::Null), &p)?;
            let hf = load_tensors(&dir.join("model.safetensors"), device)?;
            let w = from_hf(&cfg, &hf).map_err(|e| {
                StageError::failed(format!("{}: {e}", dir.join("model.safetensors").display()))
            })?;
            (cfg, w)
        }
    };
    check_shapes(&cfg, &weights).map_err(|e| StageError::failed(format!("{source}: {e}")))?;
    Ok(Pretrained {
        cfg,
        weights,
        source,
    })
}

/// ehmam's front-end and encoder tensors back from the PyTorch names of the hf export (q, k and
/// v joined into `qkv` again).
pub fn from_hf(cfg: &ModelConfig, hf: &BTreeMap<String, Tensor>) -> Result<Weights, String> {
    let mut w = Weights::new();
    for (name, _) in shapes_of(cfg) {
        if !(name.starts_with("frontend.") || name.starts_with("encoder.")) {
            continue;
        }
        let names = hf_names(&name).ok_or_else(|| format!("no PyTorch name for `{name}`"))?;
        let parts: Vec<Tensor> = names
            .iter()
            .map(|n| {
                hf.get(n)
                    .cloned()
                    .ok_or_else(|| format!("lacks `{n}` (ehmam's `{name}`)"))
            })
            .collect::<Result<_, _>>()?;
        let t = if parts.len() == 1 {
            parts.into_iter().next().ok_or("empty")?
        } else {
            Tensor::cat(&parts, 0).map_err(|e| format!("`{name}`: {e}"))?
        };
        w.insert(name, t);
    }
    Ok(w)
}

/// Every front-end and encoder tensor of the model block is there, with its shape.
fn check_shapes(cfg: &ModelConfig, w: &Weights) -> Result<(), String> {
    for (name, shape) in shapes_of(cfg) {
        if !(name.starts_with("frontend.") || name.starts_with("encoder.")) {
            continue;
        }
        let t = w
            .get(&name)
            .ok_or_else(|| format!("lacks the tensor `{name}`"))?;
        if t.dims() != shape.as_slice() {
            return Err(format!(
                "`{name}` has shape {:?}, its model block says {shape:?}",
                t.dims()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::export_hf::hf_tensors;
    use candle_core::DType;

    /// The hf export's PyTorch names read back give ehmam's tensors exactly (qkv joined again);
    /// a missing tensor is named.
    #[test]
    fn hf_names_round_trip() {
        let v: serde_yaml::Value = serde_yaml::from_str(
            "{frontend: {input_dim: 6}, encoder: {dim: 8, heads: 2, ffn: 12, layers: 2, top_k: 1, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}}",
        )
        .unwrap();
        let cfg = ModelConfig::from_spec(Some(&v)).unwrap();
        let all = crate::model::init_weights(&cfg, 4, &Device::Cpu, DType::F32).unwrap();
        let enc: BTreeMap<String, Tensor> = all
            .iter()
            .filter(|(k, _)| k.starts_with("frontend.") || k.starts_with("encoder."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let hf = hf_tensors(&enc).unwrap();
        assert!(hf.contains_key("encoder.layers.1.attention.k_proj.weight"));
        let back = from_hf(&cfg, &hf).unwrap();
        assert_eq!(back.len(), enc.len());
        for (k, t) in &enc {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = back[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{k}");
        }
        check_shapes(&cfg, &back).unwrap();
        let mut less = hf.clone();
        less.remove("encoder.layers.0.attention.v_proj.bias");
        let e = from_hf(&cfg, &less).unwrap_err();
        assert!(e.contains("encoder.layers.0.attention.v_proj.bias"), "{e}");
    }
}
