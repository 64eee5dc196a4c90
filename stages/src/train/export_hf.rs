//! `ehmam export --format hf`: the encoder as a directory that Hugging Face's
//! `AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads with torch and transformers
//! alone, and that s3prl takes as an upstream (issue 18):
//!
//! - `model.safetensors`: the front-end and encoder under PyTorch names, wav2vec 2.0's where the
//!   module is the same (`feature_extractor.conv_layers.N.conv.weight`,
//!   `encoder.layers.N.attention.q_proj.weight`, …; ehmam's fused `qkv` split into q, k, v);
//! - `config.json`: an `EhmamConfig` (`model_type`, `architectures`, `auto_map`), every field of
//!   the model block (and the block itself under `ehmam_model`), the step, the frame rate, and
//!   what the input must be (for fbank models: the run's `features.fbank` options);
//! - `configuration_ehmam.py`, `modeling_ehmam.py`: the encoder in PyTorch (`stages/assets/hf/`);
//! - `preprocessor_config.json`: a `Wav2Vec2FeatureExtractor` that pads 16 kHz waveforms and
//!   returns the attention mask (the module normalises, or computes fbank, itself);
//! - `s3prl_upstream.py`: s3prl's `UpstreamExpert` over the module.
//!
//! `config.json` is written last: a directory without it is an export that did not finish.

use super::checkpoint::{export_weights, save_safetensors, write_atomic, ExportConfig, Exported};
use crate::data::fbank::{FbankParams, Normalize};
use crate::model::{FrontendKind, ModelConfig};
use candle_core::Tensor;
use pipeline::StageError;
use std::collections::BTreeMap;
use std::path::Path;

const CONFIGURATION: &str = include_str!("../../assets/hf/configuration_ehmam.py");
const MODELING: &str = include_str!("../../assets/hf/modeling_ehmam.py");
const S3PRL: &str = include_str!("../../assets/hf/s3prl_upstream.py");

/// The PyTorch name(s) of an ehmam encoder tensor: one, or three for the fused `qkv` (q, k, v).
pub fn hf_names(name: &str) -> Option<Vec<String>> {
    let one = |s: String| Some(vec![s]);
    if let Some(rest) = name.strip_prefix("frontend.conv.") {
        let (i, tail) = rest.split_once('.')?;
        return match tail {
            "weight" => one(format!("feature_extractor.conv_layers.{i}.conv.weight")),
            "ln.weight" | "ln.bias" => one(format!(
                "feature_extractor.conv_layers.{i}.layer_norm.{}",
                &tail[3..]
            )),
            _ => None,
        };
    }
    if let Some(t) = name.strip_prefix("frontend.ln.") {
        return one(format!("feature_projection.layer_norm.{t}"));
    }
    if let Some(t) = name.strip_prefix("frontend.proj.") {
        return one(format!("feature_projection.projection.{t}"));
    }
    if let Some(rest) = name.strip_prefix("encoder.pos_conv.") {
        let (l, t) = rest.split_once('.')?;
        return one(format!("encoder.pos_conv_embed.layers.{l}.conv.{t}"));
    }
    if let Some(t) = name.strip_prefix("encoder.ln_in.") {
        return one(format!("encoder.layer_norm.{t}"));
    }
    if name == "encoder.alibi_scale" {
        return one(name.to_string());
    }
    let rest = name.strip_prefix("encoder.blocks.")?;
    let (l, rest) = rest.split_once('.')?;
    let (module, t) = rest.rsplit_once('.')?;
    let p = format!("encoder.layers.{l}");
    match module {
        "attn.qkv" => Some(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|m| format!("{p}.attention.{m}.{t}"))
                .collect(),
        ),
        "attn.proj" => one(format!("{p}.attention.out_proj.{t}")),
        "ln1" => one(format!("{p}.layer_norm.{t}")),
        "fc1" => one(format!("{p}.feed_forward.intermediate_dense.{t}")),
        "fc2" => one(format!("{p}.feed_forward.output_dense.{t}")),
        "ln2" => one(format!("{p}.final_layer_norm.{t}")),
        _ => None,
    }
}

/// Every encoder tensor under its PyTorch name (`qkv` split along its first axis).
pub fn hf_tensors(w: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, StageError> {
    let mut out = BTreeMap::new();
    let e = |x: candle_core::Error| StageError::failed(format!("export: {x}"));
    for (k, v) in w {
        let names = hf_names(k).ok_or_else(|| {
            StageError::failed(format!(
                "export: no PyTorch name for the tensor `{k}` (not an encoder tensor)"
            ))
        })?;
        if names.len() == 1 {
            out.insert(names[0].clone(), v.contiguous().map_err(e)?);
        } else {
            let d = v.dim(0).map_err(e)? / 3;
            for (i, n) in names.into_iter().enumerate() {
                out.insert(
                    n,
                    v.narrow(0, i * d, d)
                        .and_then(|x| x.contiguous())
                        .map_err(e)?,
                );
            }
        }
    }
    Ok(out)
}

/// The `features.fbank` options of the run (its `spec.yaml`, or `fbank_spec` when given: the spec
/// of the stage that made the features it read).
pub fn fbank_params(run_dir: &Path, fbank_spec: Option<&Path>) -> Result<FbankParams, StageError> {
    let spec = fbank_spec
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run_dir.join("spec.yaml"));
    let text = std::fs::read_to_string(&spec).map_err(|e| {
        StageError::io(
            format!(
                "cannot read {} (an fbank model's export takes the fbank options from the spec that trained it; pass --fbank-spec SPEC, or --format native)",
                spec.display()
            ),
            e,
        )
    })?;
    let v: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| StageError::failed(format!("{}: {e}", spec.display())))?;
    let stages = v.get("stages").and_then(|s| s.as_mapping());
    let found = stages.and_then(|m| {
        m.values()
            .find(|st| st.get("kind").and_then(|k| k.as_str()) == Some("features.fbank"))
    });
    let Some(stage) = found else {
        return Err(StageError::failed(format!(
            "{}: no features.fbank stage, so the export cannot tell which fbank the model was trained on (a run that reads stored features: pass --fbank-spec with the spec that computed them, e.g. specs/features.yaml)",
            spec.display()
        )));
    };
    let with = stage
        .get("with")
        .cloned()
        .unwrap_or(serde_yaml::Value::Mapping(Default::default()));
    let (p, errors) = pipeline::params::parse_params_partial::<FbankParams>(&with);
    match p {
        Some(p) if errors.is_empty() => Ok(p),
        _ => Err(StageError::failed(format!(
            "{}: the features.fbank parameters do not read: {}",
            spec.display(),
            errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
    }
}

/// The `fbank` block of config.json: torchaudio.compliance.kaldi.fbank's options, then
/// `input_scale`, `normalize`, `stack`.
fn fbank_json(p: &FbankParams) -> Result<serde_json::Value, StageError> {
    let o = p.options();
    if p.normalize == Normalize::Global {
        return Err(StageError::failed(
            "export --format hf: the model was trained on globally normalised fbank (normalize: global), which the exported module does not compute; retrain with normalize: utterance or none, or use --format native",
        ));
    }
    if (o.log_floor - f32::EPSILON).abs() > 0.0 {
        return Err(StageError::failed(format!(
            "export --format hf: fbank log_floor {} differs from Kaldi's (and torchaudio's) f32 epsilon; use --format native",
            o.log_floor
        )));
    }
    let window =
        serde_json::to_value(o.window_type).map_err(|e| StageError::failed(e.to_string()))?;
    Ok(serde_json::json!({
        "num_mel_bins": o.num_mel_bins,
        "frame_length": o.frame_length_ms,
        "frame_shift": o.frame_shift_ms,
        "window_type": window,
        "preemphasis_coefficient": o.preemphasis_coefficient,
        "remove_dc_offset": o.remove_dc_offset,
        "snip_edges": o.snip_edges,
        "use_power": o.use_power,
        "low_freq": o.low_freq,
        "high_freq": o.high_freq,
        "round_to_power_of_two": o.round_to_power_of_two,
        "use_log_fbank": o.use_log_fbank,
        "dither": 0.0,
        "input_scale": o.input_scale,
        "normalize": match p.normalize { Normalize::Utterance => "utterance", _ => "none" },
        "stack": p.stack,
    }))
}

/// The Hugging Face `config.json`.
fn hf_config(
    cfg: &ModelConfig,
    meta: &ExportConfig,
    fbank: Option<serde_json::Value>,
) -> serde_json::Value {
    let e = &cfg.encoder;
    let kind = match cfg.frontend.kind {
        FrontendKind::Cnn => "cnn",
        FrontendKind::Fbank => "fbank",
    };
    serde_json::json!({
        "model_type": "ehmam",
        "architectures": ["EhmamModel"],
        "auto_map": {
            "AutoConfig": "configuration_ehmam.EhmamConfig",
            "AutoModel": "modeling_ehmam.EhmamModel"
        },
        "torch_dtype": "float32",
        "frontend": kind,
        "input_dim": cfg.frontend.input_dim,
        "conv_layers": cfg.frontend.conv_layers,
        "hidden_size": e.dim,
        "num_hidden_layers": e.layers,
        "num_attention_heads": e.heads,
        "intermediate_size": e.ffn,
        "pos_conv_depth": e.pos_conv_depth,
        "pos_conv_kernel": e.pos_conv_kernel,
        "pos_conv_groups": e.pos_conv_groups,
        "layer_norm_eps": 1e-5,
        "sampling_rate": 16000,
        "waveform_norm_eps": 1e-5,
        "fbank": fbank,
        "frame_rate": meta.frame_rate,
        "input": format!("16 kHz mono waveforms in [-1, 1] (input_values, with attention_mask when padded); {}", meta.input),
        "ehmam_model": cfg,
        "ehmam_step": meta.step,
        "ehmam_weights": meta.weights,
        "ehmam_source": meta.source,
    })
}

/// Writes the Hugging Face export of the run's newest complete checkpoint (see the module
/// documentation). `out` must be new or empty unless `force` (which replaces the export's own
/// files and touches nothing else).
pub fn export_hf(
    run_dir: &Path,
    out: &Path,
    teacher: bool,
    force: bool,
    fbank_spec: Option<&Path>,
) -> Result<Exported, StageError> {
    let (meta, w, notes) = export_weights(
        run_dir,
        out,
        teacher,
        force,
        "the Hugging Face export's files",
    )?;
    let fbank = match meta.model.frontend.kind {
        FrontendKind::Fbank => {
            let p = fbank_params(run_dir, fbank_spec)?;
            let stacked = p.options().num_mel_bins * p.stack;
            if stacked != meta.model.frontend.input_dim {
                return Err(StageError::failed(format!(
                    "export: the fbank stage makes {stacked}-dim features ({} bins × stack {}), the model reads {} (model.frontend.input_dim)",
                    p.options().num_mel_bins, p.stack, meta.model.frontend.input_dim
                )));
            }
            Some(fbank_json(&p)?)
        }
        FrontendKind::Cnn => None,
    };
    let tensors = hf_tensors(&w)?;
    std::fs::create_dir_all(out)
        .map_err(|e| StageError::io(format!("cannot create {}", out.display()), e))?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), StageError> {
        let p = out.join(name);
        write_atomic(&p, bytes)
            .map_err(|e| StageError::io(format!("cannot write {}", p.display()), e))
    };
    // A re-export must not leave a stale config.json beside new weights.
    let cfg_path = out.join("config.json");
    if cfg_path.exists() {
        std::fs::remove_file(&cfg_path)
            .map_err(|e| StageError::io(format!("cannot replace {}", cfg_path.display()), e))?;
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    save_safetensors(&map, &out.join("model.safetensors"))?;
    write("configuration_ehmam.py", CONFIGURATION.as_bytes())?;
    write("modeling_ehmam.py", MODELING.as_bytes())?;
    write("s3prl_upstream.py", S3PRL.as_bytes())?;
    let pre = serde_json::json!({
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": false,
        "return_attention_mask": true,
        "ehmam_note": "the model normalises each utterance (or computes its fbank) itself: pass raw 16 kHz waveforms and the attention mask"
    });
    write(
        "preprocessor_config.json",
        serde_json::to_string_pretty(&pre)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let cfg = hf_config(&meta.model, &meta, fbank);
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(Exported {
        config: meta,
        notes,
    })
}
