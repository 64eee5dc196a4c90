//! Typed stage parameters: every field documented (the docs `ehmam stages` prints come from the
//! doc comments through `schemars`), unknown fields refused, every error reported with its path.

use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Serialize};
use serde_yaml::{Mapping, Value};

/// An error in one parameter; `field` is the path inside the stage's `with:` block, or a path from
/// the spec's top when it starts with `/` (`/model.encoder.dim`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub field: String,
    pub message: String,
}

impl ParamError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A stage's parameter struct. Derive `Deserialize, Serialize, Default, JsonSchema` with
/// `#[serde(default, deny_unknown_fields)]`; `check` adds range and cross-field checks.
pub trait Params:
    DeserializeOwned + Serialize + Default + JsonSchema + Send + Sync + 'static
{
    /// Range and consistency checks, every problem reported.
    fn check(&self) -> Vec<ParamError> {
        Vec::new()
    }
}

/// Parameters of a stage kind that takes none.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NoParams {}
impl Params for NoParams {}

/// Deserializes `with` into `P`, reporting every unknown or mistyped field and every failed check.
pub fn parse_params<P: Params>(with: &Value) -> Result<P, Vec<ParamError>> {
    match parse_params_partial::<P>(with) {
        (Some(p), errors) if errors.is_empty() => Ok(p),
        (_, errors) => Err(errors),
    }
}

/// [`parse_params`] that also returns the parameters it could build when some are wrong: every
/// mistyped or unknown field left at its default, every well-typed one as given (range errors
/// included). Validation uses them to run a stage's own checks (files, the machine) alongside
/// the parameter errors, so that one run of `validate` reports both.
pub fn parse_params_partial<P: Params>(with: &Value) -> (Option<P>, Vec<ParamError>) {
    let defaults = match serde_yaml::to_value(P::default()) {
        Ok(Value::Mapping(m)) => m,
        _ => Mapping::new(),
    };
    let given = match with {
        Value::Null => Mapping::new(),
        Value::Mapping(m) => m.clone(),
        _ => {
            return (
                None,
                vec![ParamError::new("", "parameters must be a mapping")],
            )
        }
    };
    let mut errors = Vec::new();
    let known: Vec<String> = defaults
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    let mut all = defaults.clone();
    for (k, v) in &given {
        let Some(name) = k.as_str() else {
            errors.push(ParamError::new("", "parameter names must be strings"));
            continue;
        };
        if !defaults.contains_key(k) {
            let hint = crate::spec::suggest(name, known.iter().map(String::as_str));
            let list = if hint.is_empty() {
                format!(" (known: {})", known.join(", "))
            } else {
                hint
            };
            errors.push(ParamError::new(name, format!("unknown parameter{list}")));
            continue;
        }
        // Check this field alone over the defaults, so that each mistyped field is reported.
        let mut one = defaults.clone();
        one.insert(k.clone(), v.clone());
        match serde_path_to_error::deserialize::<_, P>(Value::Mapping(one)) {
            Ok(_) => {
                all.insert(k.clone(), v.clone());
            }
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." || path.is_empty() {
                    name.to_string()
                } else {
                    path
                };
                errors.push(ParamError::new(
                    field,
                    clean_message(&e.inner().to_string()),
                ));
            }
        }
    }
    // Range checks over the well-typed fields, so that they are reported alongside.
    match serde_path_to_error::deserialize::<_, P>(Value::Mapping(all)) {
        Ok(p) => {
            errors.extend(p.check());
            (Some(p), errors)
        }
        Err(e) => {
            errors.push(ParamError::new(
                e.path().to_string(),
                clean_message(&e.inner().to_string()),
            ));
            (None, errors)
        }
    }
}

fn clean_message(m: &str) -> String {
    // serde_yaml appends " at line 1 column 1" for values that came from a Value, which is noise.
    match m.find(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m.to_string(),
    }
}

/// One parameter as `ehmam stages` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDoc {
    pub name: String,
    pub ty: String,
    pub default: String,
    pub doc: String,
}

/// Documentation of `P`'s fields: name, type, default and the field's doc comment.
pub fn param_docs<P: Params>() -> Vec<ParamDoc> {
    let schema = schemars::schema_for!(P);
    let root = schema.as_value();
    let defaults = serde_json::to_value(P::default()).unwrap_or(serde_json::Value::Null);
    let mut out = Vec::new();
    let Some(props) = root.get("properties").and_then(|p| p.as_object()) else {
        return out;
    };
    for (name, prop) in props {
        let ty = type_of(prop, root);
        let doc = prop
            .get("description")
            .and_then(|d| d.as_str())
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let default = match defaults.get(name) {
            Some(serde_json::Value::String(s)) if s.is_empty() => "(required)".to_string(),
            Some(serde_json::Value::Null) | None => "none".to_string(),
            Some(v) => v.to_string(),
        };
        out.push(ParamDoc {
            name: name.clone(),
            ty,
            default,
            doc,
        });
    }
    out
}

fn type_of(prop: &serde_json::Value, root: &serde_json::Value) -> String {
    if let Some(r) = prop.get("$ref").and_then(|r| r.as_str()) {
        let name = r.rsplit('/').next().unwrap_or(r);
        if let Some(def) = root.get("$defs").and_then(|d| d.get(name)) {
            return type_of(def, root);
        }
        return name.to_string();
    }
    if let Some(values) = prop.get("enum").and_then(|e| e.as_array()) {
        return values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join("|");
    }
    if let Some(one_of) = prop
        .get("oneOf")
        .or_else(|| prop.get("anyOf"))
        .and_then(|e| e.as_array())
    {
        let parts: Vec<String> = one_of
            .iter()
            .map(|p| {
                if let Some(c) = p.get("const") {
                    c.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| c.to_string())
                } else {
                    type_of(p, root)
                }
            })
            .filter(|s| s != "null")
            .collect();
        return parts.join("|");
    }
    match prop.get("type") {
        Some(serde_json::Value::String(t)) => {
            if t == "array" {
                let item = prop
                    .get("items")
                    .map(|i| type_of(i, root))
                    .unwrap_or_default();
                format!("list of {item}")
            } else {
                t.clone()
            }
        }
        Some(serde_json::Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str())
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join("|"),
        _ => "any".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize, JsonSchema)]
    #[serde(default, deny_unknown_fields)]
    struct P {
        /// A probability.
        prob: f64,
        /// A count.
        count: u32,
        name: String,
    }
    impl Default for P {
        fn default() -> Self {
            P {
                prob: 0.5,
                count: 3,
                name: String::new(),
            }
        }
    }
    impl Params for P {
        fn check(&self) -> Vec<ParamError> {
            let mut e = vec![];
            if !(0.0..=1.0).contains(&self.prob) {
                e.push(ParamError::new(
                    "prob",
                    format!("must be in [0, 1], got {}", self.prob),
                ));
            }
            e
        }
    }

    #[test]
    fn every_bad_field_is_reported() {
        let with: Value = serde_yaml::from_str("{ prob: high, count: -1, nmae: x }").unwrap();
        let errs = parse_params::<P>(&with).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().any(|e| e.field == "prob"));
        assert!(errs.iter().any(|e| e.field == "count"));
        assert!(errs
            .iter()
            .any(|e| e.field == "nmae" && e.message.contains("`name`")));
    }

    #[test]
    fn range_checks_run_after_types() {
        let with: Value = serde_yaml::from_str("{ prob: 1.5 }").unwrap();
        let errs = parse_params::<P>(&with).unwrap_err();
        assert_eq!(
            errs,
            vec![ParamError::new("prob", "must be in [0, 1], got 1.5")]
        );
        let ok = parse_params::<P>(&serde_yaml::from_str("{ count: 7 }").unwrap()).unwrap();
        assert_eq!((ok.prob, ok.count), (0.5, 7));
    }

    #[test]
    fn docs_come_from_doc_comments() {
        let docs = param_docs::<P>();
        let prob = docs.iter().find(|d| d.name == "prob").unwrap();
        assert_eq!(prob.doc, "A probability.");
        assert_eq!(prob.ty, "number");
        assert_eq!(prob.default, "0.5");
        assert_eq!(
            docs.iter().find(|d| d.name == "name").unwrap().default,
            "(required)"
        );
    }
}
