//! `ehmam sweep SPEC... [--grid PATH=[V1, V2, …]]... [--set PATH=VALUE]... [--out DIR]`: a grid of
//! runs, each into its own run directory, finished ones skipped on a rerun, a summary at the end.
//!
//! Every spec is combined with every point of the grid (the Cartesian product of the `--grid`
//! axes). A run is named `<spec name>` followed by `-<key>=<value>` for each axis (`key` is the
//! last component of the axis's path: `alpha=0.5`), and lives in `OUT/<run name>`. A run whose
//! `run.json` says complete and whose resolved spec is unchanged is skipped; any other (new,
//! stopped, failed) is run, resuming from its last checkpoint. A failing run does not stop the
//! sweep: it is reported, and the sweep exits non-zero at the end.

use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// A grid or spec list that cannot make a sweep (the message says why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SweepError(pub String);

impl From<String> for SweepError {
    fn from(s: String) -> Self {
        SweepError(s)
    }
}

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRun {
    pub spec: PathBuf,
    pub name: String,
    pub run_dir: PathBuf,
    /// `--set` overrides of this run (the user's, then the grid point's, then name and run_dir).
    pub sets: Vec<String>,
    /// A fine-tuning run chained to a pre-training run of the sweep (`--finetune`): that run's
    /// index in the plan and the path of the `init` parameter it fills.
    pub after: Option<(usize, String)>,
}

/// The `finetune.ctc` stage of a fine-tuning spec (the one `--finetune` chains).
pub fn finetune_stage(spec: &Path, sets: &[String]) -> Result<String, SweepError> {
    let loaded = pipeline::load(spec, sets).map_err(|e| format!("{}: {e}", spec.display()))?;
    let names: Vec<&str> = loaded
        .stages
        .iter()
        .filter(|st| st.kind == "finetune.ctc")
        .map(|st| st.id.as_str())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(SweepError::from(format!(
            "--finetune {}: the spec needs exactly one finetune.ctc stage, it has {}",
            spec.display(),
            names.len()
        ))),
    }
}

/// Adds after each run of `runs` its fine-tuning with `spec` (`--finetune`): named `<run>-<spec
/// name>`, into `OUT/<that>`, `init` pointing at the run's directory, with `sets` (the
/// fine-tuning spec's own `--finetune-set`s). Each fine-tuning follows its pre-training.
pub fn chain_finetune(
    runs: Vec<SweepRun>,
    spec: &Path,
    sets: &[String],
    out: &Path,
) -> Result<Vec<SweepRun>, SweepError> {
    let stage = finetune_stage(spec, sets)?;
    let loaded = pipeline::load(spec, sets).map_err(|e| format!("{}: {e}", spec.display()))?;
    let init = format!("stages.{stage}.with.init");
    let mut plan = Vec::new();
    for r in runs {
        let name = safe(&format!("{}-{}", r.name, loaded.name));
        let run_dir = out.join(&name);
        let mut s: Vec<String> = sets.to_vec();
        s.push(format!(
            "{init}={}",
            flow(&Value::String(r.run_dir.display().to_string()))
        ));
        s.push(format!("name={name}"));
        s.push(format!("run_dir={}", run_dir.display()));
        let pre = plan.len();
        plan.push(r);
        plan.push(SweepRun {
            spec: spec.to_path_buf(),
            name,
            run_dir,
            sets: s,
            after: Some((pre, init.clone())),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in &plan {
        if !seen.insert(r.name.clone()) {
            return Err(SweepError::from(format!(
                "two runs of the sweep are both named `{}` (give the specs different names)",
                r.name
            )));
        }
    }
    Ok(plan)
}

/// A grid axis: the path and its values (YAML, as `--set` reads them).
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub path: String,
    pub values: Vec<Value>,
}

/// Parses `PATH=[v1, v2, …]` (a YAML flow sequence; a single value is an axis of one).
pub fn parse_axis(s: &str) -> Result<Axis, SweepError> {
    let (path, vals) = s
        .split_once('=')
        .ok_or_else(|| format!("--grid `{s}`: expected PATH=[V1, V2, …]"))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(|p| p.is_empty()) {
        return Err(SweepError::from(format!(
            "--grid `{s}`: `{path}` is not a dotted path"
        )));
    }
    let v: Value = serde_yaml::from_str(vals)
        .map_err(|e| format!("--grid `{s}`: the values are not YAML: {e}"))?;
    let values = match v {
        Value::Sequence(seq) => seq,
        other => vec![other],
    };
    if values.is_empty() {
        return Err(SweepError::from(format!("--grid `{s}`: no values")));
    }
    Ok(Axis {
        path: path.to_string(),
        values,
    })
}

/// A value as it appears in a run name and in a `--set` override.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|t| t.trim().to_string())
            .unwrap_or_default(),
    }
}

fn flow(v: &Value) -> String {
    match v {
        Value::Mapping(_) | Value::Sequence(_) => serde_json::to_string(v).unwrap_or_default(),
        other => scalar_text(other),
    }
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.=+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The runs of a sweep, in order (specs outermost, then the axes as given).
pub fn plan(
    specs: &[PathBuf],
    axes: &[Axis],
    sets: &[String],
    out: &Path,
) -> Result<Vec<SweepRun>, SweepError> {
    let mut points: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for a in axes {
        let mut next = Vec::new();
        for p in &points {
            for v in &a.values {
                let mut q = p.clone();
                q.push((a.path.clone(), v.clone()));
                next.push(q);
            }
        }
        points = next;
    }
    let mut runs = Vec::new();
    for spec in specs {
        let loaded = pipeline::load(spec, sets).map_err(|e| format!("{}: {e}", spec.display()))?;
        for p in &points {
            let mut name = loaded.name.clone();
            for (path, v) in p {
                let key = path.rsplit('.').next().unwrap_or(path);
                name.push_str(&format!("-{key}={}", scalar_text(v)));
            }
            let name = safe(&name);
            let run_dir = out.join(&name);
            let mut s: Vec<String> = sets.to_vec();
            s.extend(p.iter().map(|(path, v)| format!("{path}={}", flow(v))));
            s.push(format!("name={name}"));
            s.push(format!("run_dir={}", run_dir.display()));
            runs.push(SweepRun {
                spec: spec.clone(),
                name,
                run_dir,
                sets: s,
                after: None,
            });
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in &runs {
        if !seen.insert(r.name.clone()) {
            return Err(SweepError::from(format!(
                "two runs of the sweep are both named `{}` (give the specs different names)",
                r.name
            )));
        }
    }
    Ok(runs)
}

/// Whether a run is finished: `run.json` complete and the resolved spec as this sweep makes it.
pub fn is_finished(run: &SweepRun, resolved: &Value) -> bool {
    let Some(st) = pipeline::RunStatus::read(&run.run_dir) else {
        return false;
    };
    if !st.is_complete() {
        return false;
    }
    let Ok(old) = std::fs::read_to_string(run.run_dir.join("spec.yaml")) else {
        return false;
    };
    let Ok(old) = serde_yaml::from_str::<Value>(&old) else {
        return false;
    };
    pipeline::run_spec_changes(&old, resolved).is_empty()
}
