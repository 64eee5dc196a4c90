//! What a run directory says about itself: its resolved spec and the stages in it.

use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The resolved spec saved in a run directory.
pub fn spec_of(dir: &Path) -> Option<Value> {
    serde_yaml::from_str(&std::fs::read_to_string(dir.join("spec.yaml")).ok()?).ok()
}

/// Stages of a resolved spec by name.
pub fn stages_of(spec: &Value) -> BTreeMap<String, Value> {
    spec.get("stages")
        .and_then(|s| s.as_mapping())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.clone())))
                .collect()
        })
        .unwrap_or_default()
}

/// A stage's kind.
pub fn kind_of(st: &Value) -> &str {
    st.get("kind").and_then(|k| k.as_str()).unwrap_or("")
}
