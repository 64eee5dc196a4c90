//! Spec loading: YAML text → value (with `extends:` and `--set` overrides) → structural spec.
//!
//! Stage parameters stay as YAML values here; each stage kind deserializes its own `with:` block
//! during validation (see `plan`), so errors carry the full path `stages.<id>.with.<field>`.

use crate::error::{SpecError, SpecErrors};
use serde_yaml::{Mapping, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Keys allowed at the top of a spec.
pub const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "extends",
    "run_dir",
    "seed",
    "device",
    "channel_capacity",
    "model",
    "distributed",
    "stages",
];
/// Keys allowed in a stage entry.
pub const STAGE_KEYS: &[&str] = &["kind", "from", "with", "workers", "capacity"];

/// A reference to an output port: `stage` or `stage.port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub stage: String,
    pub port: Option<String>,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.port {
            Some(p) => write!(f, "{}.{}", self.stage, p),
            None => write!(f, "{}", self.stage),
        }
    }
}

/// One input connection: which input port (by name, or by position when `None`) reads which output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub input: Option<String>,
    pub from: Endpoint,
}

/// One stage as the spec declares it.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub id: String,
    pub kind: String,
    pub from: Vec<Connection>,
    pub with: Value,
    pub workers: usize,
    pub capacity: Option<usize>,
}

/// A loaded spec: top-level settings, stages in file order, and the resolved YAML.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub description: Option<String>,
    pub run_dir: PathBuf,
    pub seed: u64,
    pub device: String,
    pub channel_capacity: usize,
    pub model: Option<Value>,
    /// The data-parallel settings (a mapping; the stages crate reads it).
    pub distributed: Option<Value>,
    pub stages: Vec<StageSpec>,
    /// The spec after `extends` and overrides: what is saved in the run directory.
    pub resolved: Value,
    /// Where errors point to.
    pub locator: Locator,
    /// Structural errors found while loading; `validate` reports them with its own.
    pub errors: Vec<SpecError>,
}

/// Finds the line of a YAML path in the spec file(s), for error messages.
#[derive(Debug, Clone, Default)]
pub struct Locator {
    /// (file name, path → line) for the spec itself, then the specs it extends.
    files: Vec<(String, HashMap<String, usize>)>,
    /// Paths set on the command line.
    overridden: Vec<String>,
}

impl Locator {
    /// An error at `path`, located in the file that defines it (or at `--set`).
    pub fn error(&self, path: &str, message: impl Into<String>) -> SpecError {
        let message = message.into();
        if self
            .overridden
            .iter()
            .any(|o| path == o || path.starts_with(&format!("{o}.")))
        {
            return SpecError {
                file: "--set".into(),
                path: path.into(),
                line: None,
                message,
            };
        }
        // A path no file defines, created by an override below it (`--set x.y=1` makes `x`).
        let known = |p: &str| self.files.iter().any(|(_, lines)| lines.contains_key(p));
        if !known(path)
            && !path.is_empty()
            && self
                .overridden
                .iter()
                .any(|o| o.starts_with(&format!("{path}.")))
        {
            return SpecError {
                file: "--set".into(),
                path: path.into(),
                line: None,
                message,
            };
        }
        // Longest prefix of the path that some file knows.
        let mut p = path.to_string();
        loop {
            for (file, lines) in &self.files {
                if let Some(&line) = lines.get(&p) {
                    return SpecError {
                        file: file.clone(),
                        path: path.into(),
                        line: Some(line),
                        message,
                    };
                }
            }
            match p.rfind('.') {
                Some(i) => p.truncate(i),
                None => break,
            }
        }
        let file = self.files.first().map(|f| f.0.clone()).unwrap_or_default();
        SpecError {
            file,
            path: path.into(),
            line: None,
            message,
        }
    }
}

/// Names the nearest candidates to `word` ("did you mean …?"), or an empty string.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    // Also against the part after the last dot, so `fbank` finds `features.fbank`.
    let score = |c: &str| {
        let tail = c.rsplit('.').next().unwrap_or(c);
        strsim::jaro_winkler(word, c).max(if tail.len() < c.len() {
            strsim::jaro_winkler(word, tail)
        } else {
            0.0
        })
    };
    let mut scored: Vec<(f64, &str)> = candidates
        .into_iter()
        .map(|c| (score(c), c))
        .filter(|(s, _)| *s >= 0.75)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    let names: Vec<String> = scored
        .iter()
        .take(3)
        .map(|(_, c)| format!("`{c}`"))
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", names.join(" or "))
    }
}

/// Reads a spec file, resolves `extends:`, applies `--set PATH=VALUE` overrides and checks its
/// structure. Every error found is returned, not just the first.
pub fn load(path: &Path, overrides: &[String]) -> Result<Spec, SpecErrors> {
    let mut locator = Locator::default();
    let mut value = load_with_extends(path, &mut locator, &mut Vec::new())?;
    let mut errors = Vec::new();
    for o in overrides {
        if o.split_once('=')
            .is_some_and(|(p, _)| p.trim() == "extends" || p.trim().starts_with("extends."))
        {
            errors.push(SpecError {
                file: "--set".into(),
                path: "extends".into(),
                line: None,
                message: format!("`{o}`: `extends` cannot be overridden (it is read before any --set); edit the spec or run the other spec"),
            });
            continue;
        }
        match apply_override(&mut value, o) {
            Ok(p) => locator.overridden.push(p),
            Err(msg) => errors.push(SpecError {
                file: "--set".into(),
                path: String::new(),
                line: None,
                message: msg,
            }),
        }
    }
    if let Value::Mapping(m) = &mut value {
        m.remove("extends");
    }
    if !errors.is_empty() {
        return Err(SpecErrors(errors));
    }
    from_value(value, locator)
}

/// Parses spec text (no `extends`, no file), for tests and tools.
pub fn load_str(text: &str, file: &str, overrides: &[String]) -> Result<Spec, SpecErrors> {
    let mut locator = Locator::default();
    let mut value = parse_text(text, file)?;
    locator.files.push((file.to_string(), line_index(text)));
    let mut errors = Vec::new();
    for o in overrides {
        match apply_override(&mut value, o) {
            Ok(p) => locator.overridden.push(p),
            Err(msg) => errors.push(SpecError {
                file: "--set".into(),
                path: String::new(),
                line: None,
                message: msg,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(SpecErrors(errors));
    }
    from_value(value, locator)
}

/// The largest spec file read (a spec is a few kB; this refuses a corpus or a device named by
/// mistake before reading it).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// How deeply a spec's YAML may nest (a spec needs about 6 levels).
pub const MAX_SPEC_DEPTH: usize = 64;

/// Reads a spec file: a regular file (after symbolic links) of at most [`MAX_SPEC_BYTES`], in
/// UTF-8. `/dev/zero`, a fifo or a directory is refused before anything is read from it.
fn read_spec_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the spec: {e}"))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, fifo or socket)"
        };
        return Err(format!("cannot read the spec: {kind}"));
    }
    if meta.len() > MAX_SPEC_BYTES {
        return Err(format!(
            "cannot read the spec: {} bytes, more than a spec may be ({} bytes)",
            meta.len(),
            MAX_SPEC_BYTES
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the spec: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the spec: {e}"))?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!(
            "cannot read the spec: more than a spec may be ({MAX_SPEC_BYTES} bytes)"
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("cannot read the spec: not UTF-8 text ({e})"))
}

/// The deepest nesting of a YAML text, counted without parsing it: flow brackets, block
/// indentation levels and `- ` sequence entries. Linear in the text, so a hostile spec of
/// thousands of levels is refused at once instead of being parsed and indexed.
fn nesting_depth(text: &str) -> usize {
    let mut deepest = 0;
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for line in text.lines() {
        let body = line.trim_start_matches([' ', '\t']);
        if flow == 0 {
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let indent = line.len() - body.len();
            while indents.last().is_some_and(|&i| i > indent) {
                indents.pop();
            }
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
        }
        // `- - - x` nests a sequence per dash.
        let mut dashes = 0;
        let mut rest = body;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("-\t")) {
            dashes += 1;
            rest = r.trim_start();
        }
        let mut quote: Option<char> = None;
        let mut line_flow = flow;
        let mut deepest_flow = flow;
        for c in rest.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    line_flow += 1;
                    deepest_flow = deepest_flow.max(line_flow);
                }
                (None, ']' | '}') => line_flow = line_flow.saturating_sub(1),
                _ => {}
            }
        }
        flow = line_flow;
        deepest = deepest.max(indents.len() + dashes + deepest_flow);
    }
    deepest
}

fn parse_text(text: &str, file: &str) -> Result<Value, SpecErrors> {
    let depth = nesting_depth(text);
    if depth > MAX_SPEC_DEPTH {
        return Err(SpecErrors(vec![SpecError {
            file: file.into(),
            path: String::new(),
            line: None,
            message: format!(
                "the YAML nests {depth} levels deep, more than a spec may ({MAX_SPEC_DEPTH})"
            ),
        }]));
    }
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(SpecErrors(vec![SpecError {
            file: file.into(),
            path: String::new(),
            line: None,
            message: "the spec is empty".into(),
        }]));
    }
    serde_yaml::from_str::<Value>(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        SpecErrors(vec![SpecError {
            file: file.into(),
            path: String::new(),
            line,
            message: format!("invalid YAML: {e}"),
        }])
    })
}

fn load_with_extends(
    path: &Path,
    locator: &mut Locator,
    chain: &mut Vec<PathBuf>,
) -> Result<Value, SpecErrors> {
    let file = path.display().to_string();
    let text = read_spec_file(path).map_err(|message| {
        SpecErrors(vec![SpecError {
            file: file.clone(),
            path: String::new(),
            line: None,
            message,
        }])
    })?;
    let value = parse_text(&text, &file)?;
    if !matches!(value, Value::Mapping(_)) {
        return Err(SpecErrors(vec![SpecError {
            file,
            path: String::new(),
            line: None,
            message: format!(
                "not a spec: a spec is a YAML mapping (name:, stages:, …), this file holds {}",
                type_name(&value)
            ),
        }]));
    }
    let index = line_index(&text);
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if chain.contains(&canonical) {
        return Err(SpecErrors(vec![SpecError {
            file,
            path: "extends".into(),
            line: index.get("extends").copied(),
            message: "`extends` forms a cycle".into(),
        }]));
    }
    chain.push(canonical);
    locator.files.push((file.clone(), index.clone()));
    let parent = match &value {
        Value::Mapping(m) => m.get("extends").cloned(),
        _ => None,
    };
    let value = match parent {
        None => value,
        Some(Value::String(rel)) => {
            let base = path.parent().unwrap_or(Path::new("."));
            let parent_path = base.join(&rel);
            let parent_value = load_with_extends(&parent_path, locator, chain)?;
            merge(parent_value, value)
        }
        Some(_) => {
            return Err(SpecErrors(vec![SpecError {
                file,
                path: "extends".into(),
                line: index.get("extends").copied(),
                message: "`extends` must be a path to another spec, relative to this one".into(),
            }]))
        }
    };
    chain.pop();
    Ok(value)
}

/// Deep merge: mappings merge key by key, anything else in `child` replaces `parent`.
/// A `null` in the child removes the key (so an ablation can drop a stage).
pub fn merge(parent: Value, child: Value) -> Value {
    match (parent, child) {
        (Value::Mapping(mut p), Value::Mapping(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    p.remove(&k);
                    continue;
                }
                let merged = match p.remove(&k) {
                    Some(old) => merge(old, v),
                    None => v,
                };
                p.insert(k, merged);
            }
            Value::Mapping(p)
        }
        (_, c) => c,
    }
}

/// Deepest `--set` path accepted (specs are a few levels deep; this keeps nesting bounded).
pub const MAX_OVERRIDE_DEPTH: usize = 64;

/// Applies `a.b.c=VALUE` (VALUE read as a YAML scalar or flow value). Returns the path set.
pub fn apply_override(root: &mut Value, o: &str) -> Result<String, String> {
    let (path, raw) = o.split_once('=').ok_or_else(|| {
        format!("`{o}`: an override is PATH=VALUE, e.g. stages.mask.with.mask_prob=0.6")
    })?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(|s| s.is_empty()) {
        return Err(format!(
            "`{o}`: the path `{path}` is empty or has an empty segment"
        ));
    }
    if path.split('.').count() > MAX_OVERRIDE_DEPTH {
        return Err(format!(
            "`{}…`: the path has more than {MAX_OVERRIDE_DEPTH} segments",
            o.chars().take(60).collect::<String>()
        ));
    }
    let value: Value = if raw.trim().is_empty() {
        Value::String(String::new())
    } else {
        serde_yaml::from_str(raw).map_err(|e| format!("`{o}`: the value is not YAML: {e}"))?
    };
    let segs: Vec<&str> = path.split('.').collect();
    let mut cur = root;
    for (i, seg) in segs.iter().enumerate() {
        if cur.is_null() {
            *cur = Value::Mapping(Mapping::new());
        }
        let m = match cur {
            Value::Mapping(m) => m,
            _ => {
                return Err(format!(
                    "`{o}`: `{}` is not a mapping, so `{seg}` cannot be set in it",
                    segs[..i].join(".")
                ));
            }
        };
        let key = Value::String(seg.to_string());
        if i + 1 == segs.len() {
            m.insert(key, value);
            return Ok(path.to_string());
        }
        if !m.contains_key(&key) {
            m.insert(key.clone(), Value::Mapping(Mapping::new()));
        }
        cur = m
            .get_mut(&key)
            .ok_or_else(|| format!("`{o}`: cannot set `{seg}`"))?;
    }
    Ok(path.to_string())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Checks the structure of a spec value and builds the `Spec`; every error is collected.
pub fn from_value(value: Value, locator: Locator) -> Result<Spec, SpecErrors> {
    let mut errs = Vec::new();
    let top = match &value {
        Value::Mapping(m) => m.clone(),
        other => {
            return Err(SpecErrors(vec![locator.error(
                "",
                format!("the spec must be a mapping, found {}", type_name(other)),
            )]));
        }
    };
    for k in top.keys() {
        match k.as_str() {
            Some(name) if TOP_KEYS.contains(&name) => {}
            Some(name) => errs.push(locator.error(
                name,
                format!(
                    "unknown top-level key{}",
                    suggest(name, TOP_KEYS.iter().copied())
                ),
            )),
            None => errs.push(locator.error("", "top-level keys must be strings")),
        }
    }
    let get_str = |key: &str, errs: &mut Vec<SpecError>| -> Option<String> {
        match top.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                errs.push(
                    locator.error(key, format!("must be a string, found {}", type_name(other))),
                );
                None
            }
        }
    };
    let name = get_str("name", &mut errs);
    let name = check_name(name, top.contains_key("name"), &locator, &mut errs);
    let description = get_str("description", &mut errs);
    let run_dir = match get_str("run_dir", &mut errs) {
        Some(d) if d.trim().is_empty() => {
            errs.push(locator.error(
                "run_dir",
                "must not be empty (leave it out for runs/<name>)",
            ));
            PathBuf::from("runs").join(&name)
        }
        // On object storage: a URL, kept as written (less a trailing slash); `ehmam run`
        // works in a local copy and puts what it writes there.
        Some(d) if crate::storage::is_remote(std::path::Path::new(&d)) => {
            PathBuf::from(d.trim_end_matches('/'))
        }
        Some(d) if crate::storage::unsupported_url(std::path::Path::new(&d)).is_some() => {
            let m = crate::storage::unsupported_url(std::path::Path::new(&d)).unwrap_or_default();
            errs.push(locator.error("run_dir", m));
            PathBuf::from("runs").join(&name)
        }
        // `runs/x/` and `runs/x` are one directory (a trailing slash must not make
        // `runs/x/.replaced-1` of a moved run).
        Some(d) => PathBuf::from(d).components().collect(),
        None => PathBuf::from("runs").join(&name),
    };
    let seed = match top.get("seed") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
        Some(other) => {
            errs.push(locator.error(
                "seed",
                format!("must be a non-negative integer, found {}", describe(other)),
            ));
            0
        }
    };
    let device = get_str("device", &mut errs).unwrap_or_else(|| "cpu".into());
    if let Err(msg) = check_device(&device) {
        errs.push(locator.error("device", msg));
    }
    let channel_capacity = match top.get("channel_capacity") {
        None | Some(Value::Null) => 8,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n as usize,
            _ => {
                errs.push(locator.error(
                    "channel_capacity",
                    format!("must be an integer ≥ 1, found {}", describe(v)),
                ));
                8
            }
        },
    };
    let model = match top.get("model") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Mapping(_)) => Some(v.clone()),
        Some(other) => {
            errs.push(locator.error(
                "model",
                format!("must be a mapping, found {}", type_name(other)),
            ));
            None
        }
    };
    let distributed = match top.get("distributed") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Mapping(_)) => Some(v.clone()),
        Some(other) => {
            errs.push(locator.error(
                "distributed",
                format!("must be a mapping, found {}", type_name(other)),
            ));
            None
        }
    };
    let stages = stages_from_value(top.get("stages"), &locator, &mut errs);
    Ok(Spec {
        name,
        description,
        run_dir,
        seed,
        device,
        channel_capacity,
        model,
        distributed,
        stages,
        resolved: value,
        locator,
        errors: errs,
    })
}

/// The run's name: present, not empty, no path separators.
fn check_name(
    name: Option<String>,
    present: bool,
    locator: &Locator,
    errs: &mut Vec<SpecError>,
) -> String {
    match name {
        Some(n) if n.trim().is_empty() => {
            errs.push(locator.error("name", "must not be empty"));
            String::new()
        }
        Some(n) => {
            if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                errs.push(locator.error(
                    "name",
                    format!("`{n}` must not contain path separators or start with '.'"),
                ));
            }
            n
        }
        None => {
            if present {
                errs.push(locator.error("name", "must be the run's name, found null"));
            } else {
                errs.push(locator.error("", "missing `name` (the run's name)"));
            }
            String::new()
        }
    }
}

/// The `stages:` mapping, each stage read with its errors.
fn stages_from_value(
    v: Option<&Value>,
    locator: &Locator,
    errs: &mut Vec<SpecError>,
) -> Vec<StageSpec> {
    let mut stages = Vec::new();
    match v {
        None | Some(Value::Null) => {
            errs.push(locator.error("stages", "missing: a spec needs at least one stage"))
        }
        Some(Value::Mapping(m)) => {
            if m.is_empty() {
                errs.push(locator.error("stages", "a spec needs at least one stage"));
            }
            for (k, v) in m {
                let Some(id) = k.as_str() else {
                    errs.push(locator.error("stages", "stage names must be strings"));
                    continue;
                };
                if let Some(s) = stage_from_value(id, v, locator, errs) {
                    stages.push(s);
                }
            }
        }
        Some(other) => errs.push(locator.error(
            "stages",
            format!(
                "must be a mapping of stage name → stage, found {}",
                type_name(other)
            ),
        )),
    }
    stages
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("`{n}`"),
        Value::String(s) => format!("\"{s}\""),
        Value::Bool(b) => format!("`{b}`"),
        other => type_name(other).to_string(),
    }
}

/// `cpu` or `cuda:N`; CUDA only in builds with the `cuda` feature (checked by the caller's registry).
pub fn check_device(device: &str) -> Result<(), String> {
    if device == "cpu" {
        return Ok(());
    }
    if let Some(n) = device.strip_prefix("cuda:") {
        if n.parse::<usize>().is_err() {
            return Err(format!(
                "`{device}`: expected `cpu` or `cuda:N` with N a GPU index"
            ));
        }
        return Ok(());
    }
    if device == "cuda" {
        return Err("`cuda`: name the GPU, e.g. `cuda:0`".into());
    }
    Err(format!("`{device}`: expected `cpu` or `cuda:N`"))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_endpoint(s: &str) -> Option<Endpoint> {
    let s = s.trim();
    let (stage, port) = match s.split_once('.') {
        Some((a, b)) => (a, Some(b.to_string())),
        None => (s, None),
    };
    if !valid_id(stage) || port.as_deref().is_some_and(|p| !valid_id(p)) {
        return None;
    }
    Some(Endpoint {
        stage: stage.to_string(),
        port,
    })
}

fn stage_from_value(
    id: &str,
    v: &Value,
    locator: &Locator,
    errs: &mut Vec<SpecError>,
) -> Option<StageSpec> {
    let base = format!("stages.{id}");
    if !valid_id(id) {
        errs.push(locator.error(&base, "stage names use letters, digits, '_' and '-' only (a '.' separates a stage from its port)"));
    }
    let m = match v {
        Value::Mapping(m) => m,
        other => {
            errs.push(locator.error(
                &base,
                format!("must be a mapping with `kind`, found {}", type_name(other)),
            ));
            return None;
        }
    };
    let before = errs.len();
    for k in m.keys() {
        match k.as_str() {
            Some(name) if STAGE_KEYS.contains(&name) => {}
            Some(name) => errs.push(locator.error(
                &format!("{base}.{name}"),
                format!(
                    "unknown stage key{} (parameters go under `with:`)",
                    suggest(name, STAGE_KEYS.iter().copied())
                ),
            )),
            None => errs.push(locator.error(&base, "stage keys must be strings")),
        }
    }
    let kind = match m.get("kind") {
        Some(Value::String(s)) => s.clone(),
        None => {
            errs.push(locator.error(&base, "missing `kind`"));
            String::new()
        }
        Some(other) => {
            errs.push(locator.error(
                &format!("{base}.kind"),
                format!("must be a string, found {}", type_name(other)),
            ));
            String::new()
        }
    };
    let mut from = Vec::new();
    let from_path = format!("{base}.from");
    let mut push_ep =
        |input: Option<String>, v: &Value, path: &str, errs: &mut Vec<SpecError>| match v
            .as_str()
            .and_then(parse_endpoint)
        {
            Some(ep) => from.push(Connection { input, from: ep }),
            None => errs.push(locator.error(
                path,
                format!("expected `stage` or `stage.port`, found {}", describe(v)),
            )),
        };
    match m.get("from") {
        None | Some(Value::Null) => {}
        Some(v @ Value::String(_)) => push_ep(None, v, &from_path, errs),
        Some(Value::Sequence(items)) => {
            for (i, item) in items.iter().enumerate() {
                push_ep(None, item, &format!("{from_path}.{i}"), errs);
            }
        }
        Some(Value::Mapping(map)) => {
            for (k, item) in map {
                match k.as_str() {
                    Some(port) => push_ep(
                        Some(port.to_string()),
                        item,
                        &format!("{from_path}.{port}"),
                        errs,
                    ),
                    None => {
                        errs.push(locator.error(&from_path, "input port names must be strings"))
                    }
                }
            }
        }
        Some(other) => errs.push(locator.error(
            &from_path,
            format!(
                "must be a stage name, a list, or input → stage mapping; found {}",
                type_name(other)
            ),
        )),
    }
    let with = match m.get("with") {
        None | Some(Value::Null) => Value::Mapping(Mapping::new()),
        Some(v @ Value::Mapping(_)) => v.clone(),
        Some(other) => {
            errs.push(locator.error(
                &format!("{base}.with"),
                format!(
                    "must be a mapping of parameters, found {}",
                    type_name(other)
                ),
            ));
            Value::Mapping(Mapping::new())
        }
    };
    let workers = match m.get("workers") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(0) => {
                errs.push(locator.error(
                    &format!("{base}.workers"),
                    "must be at least 1 (`workers: 0` would never run the stage)",
                ));
                1
            }
            Some(n) if n <= 1024 => n as usize,
            _ => {
                errs.push(locator.error(
                    &format!("{base}.workers"),
                    format!("must be an integer from 1 to 1024, found {}", describe(v)),
                ));
                1
            }
        },
    };
    let capacity = match m.get("capacity") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n as usize),
            _ => {
                errs.push(locator.error(
                    &format!("{base}.capacity"),
                    format!("must be an integer ≥ 1, found {}", describe(v)),
                ));
                None
            }
        },
    };
    // Keep going with what is usable so that later checks still report their own errors.
    if errs.len() > before && kind.is_empty() {
        return None;
    }
    Some(StageSpec {
        id: id.to_string(),
        kind,
        from,
        with,
        workers,
        capacity,
    })
}

/// Maps each dotted key path of a YAML text to its 1-based line: block mappings by indentation,
/// flow mappings (`{ a: 1, b: { c: 2 } }`) on one line. Sequences are indexed by position.
pub fn line_index(text: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    // Stack of (indent, key path).
    let mut stack: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = strip_comment(raw);
        if line.trim().is_empty() || line.trim_start().starts_with("---") {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let body = line.trim_start();
        let Some((key, rest)) = split_key(body) else {
            continue;
        };
        while stack.last().is_some_and(|(ind, _)| *ind >= indent) {
            stack.pop();
        }
        let path = match stack.last() {
            Some((_, p)) => format!("{p}.{key}"),
            None => key.clone(),
        };
        out.entry(path.clone()).or_insert(lineno);
        let rest = rest.trim();
        if rest.starts_with('{') {
            index_flow(rest, &path, lineno, &mut out);
        } else if rest.starts_with('[') {
            // Flow list: entries by position.
            let inner = rest.trim_start_matches('[').trim_end_matches(']');
            for (j, _) in inner.split(',').enumerate() {
                out.entry(format!("{path}.{j}")).or_insert(lineno);
            }
        }
        if rest.is_empty() {
            stack.push((indent, path));
        }
    }
    out
}

fn strip_comment(line: &str) -> String {
    let mut in_s = false;
    let mut in_d = false;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !in_d => in_s = !in_s,
            '"' if !in_s => in_d = !in_d,
            '#' if !in_s && !in_d && prev_space => return line[..i].to_string(),
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line.to_string()
}

fn split_key(body: &str) -> Option<(String, &str)> {
    let body = body.strip_prefix("- ").unwrap_or(body);
    let (k, rest) = if let Some(stripped) = body.strip_prefix('"') {
        let end = stripped.find('"')?;
        (
            stripped[..end].to_string(),
            stripped[end + 1..].strip_prefix(':')?,
        )
    } else {
        let idx = body.find(':')?;
        let after = &body[idx + 1..];
        if !(after.is_empty() || after.starts_with(' ') || after.starts_with('\t')) {
            return None;
        }
        let k = body[..idx].trim();
        if k.is_empty() || k.contains(['{', '[', ',', ' ']) {
            return None;
        }
        (k.to_string(), after)
    };
    Some((k, rest))
}

fn index_flow(s: &str, base: &str, lineno: usize, out: &mut HashMap<String, usize>) {
    // Stack of paths for nested mappings; `pending` is the last key read at this depth.
    let mut stack: Vec<String> = vec![];
    let mut pending: Option<String> = None;
    let mut token = String::new();
    let mut in_quote: Option<char> = None;
    for c in s.chars() {
        if let Some(q) = in_quote {
            if c == q {
                in_quote = None;
            }
            token.push(c);
            continue;
        }
        match c {
            '\'' | '"' => {
                in_quote = Some(c);
                token.push(c);
            }
            '{' => {
                let path = match (&pending, stack.last()) {
                    (Some(k), Some(p)) => format!("{p}.{k}"),
                    (Some(k), None) => format!("{base}.{k}"),
                    (None, _) => base.to_string(),
                };
                stack.push(path);
                pending = None;
                token.clear();
            }
            '}' => {
                stack.pop();
                token.clear();
            }
            ',' | '[' | ']' => token.clear(),
            ':' => {
                let k = token
                    .trim()
                    .trim_matches(|c| c == '"' || c == '\'')
                    .to_string();
                if !k.is_empty() {
                    if let Some(p) = stack.last() {
                        out.entry(format!("{p}.{k}")).or_insert(lineno);
                    }
                    pending = Some(k);
                }
                token.clear();
            }
            _ => token.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_finds_block_and_flow_keys() {
        let text = "name: t\nstages:\n  a: { kind: x, with: { p: 1, q: { r: 2 } } }\n  b:\n    kind: y\n    with:\n      depth: 3 # comment\n";
        let idx = line_index(text);
        assert_eq!(idx["name"], 1);
        assert_eq!(idx["stages.a"], 3);
        assert_eq!(idx["stages.a.with.p"], 3);
        assert_eq!(idx["stages.a.with.q.r"], 3);
        assert_eq!(idx["stages.b.kind"], 5);
        assert_eq!(idx["stages.b.with.depth"], 7);
    }

    #[test]
    fn overrides_set_nested_values_and_parse_yaml() {
        let mut v: Value = serde_yaml::from_str("a: { b: 1 }").unwrap();
        apply_override(&mut v, "a.b=2.5").unwrap();
        apply_override(&mut v, "a.c=[1, 2]").unwrap();
        apply_override(&mut v, "x.y=hello").unwrap();
        assert_eq!(v["a"]["b"].as_f64(), Some(2.5));
        assert_eq!(v["a"]["c"].as_sequence().map(|s| s.len()), Some(2));
        assert_eq!(v["x"]["y"].as_str(), Some("hello"));
        assert!(apply_override(&mut v, "a.b.c=1").is_err());
        assert!(apply_override(&mut v, "novalue").is_err());
    }

    #[test]
    fn merge_is_deep_and_null_removes() {
        let p: Value = serde_yaml::from_str("a: {b: 1, c: 2}\nd: 3").unwrap();
        let c: Value = serde_yaml::from_str("a: {b: 5}\nd: null").unwrap();
        let m = merge(p, c);
        assert_eq!(m["a"]["b"].as_i64(), Some(5));
        assert_eq!(m["a"]["c"].as_i64(), Some(2));
        assert!(m.get("d").is_none());
    }

    #[test]
    fn structural_errors_are_all_reported() {
        let text = "name: t\nseedd: 1\nstages:\n  a: { kind: x, workers: 0, wiht: {} }\n  b: 5\n";
        let errs = load_str(text, "t.yaml", &[]).unwrap().errors;
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("seedd") && m.contains("did you mean `seed`")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("stages.a.workers") && m.contains("t.yaml:4")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("stages.a.wiht") && m.contains("`with`")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("stages.b") && m.contains("mapping")),
            "{msgs:?}"
        );
        assert_eq!(errs.len(), 4, "{msgs:?}");
    }

    #[test]
    fn empty_and_invalid_yaml_are_refused() {
        assert!(load_str("", "e.yaml", &[]).unwrap_err().0[0]
            .message
            .contains("empty"));
        let e = load_str("name: a\nstages: {a: [}\n", "b.yaml", &[])
            .unwrap_err()
            .0;
        assert!(e[0].message.contains("invalid YAML"));
        assert!(e[0].line.is_some());
    }

    fn load_msg(path: &Path) -> String {
        match load(path, &[]) {
            Ok(_) => "loaded".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn extends_of_a_device_a_fifo_or_a_huge_file_is_refused_before_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = |target: &str| {
            let p = tmp.path().join("child.yaml");
            std::fs::write(&p, format!("extends: {target}\nname: c\nstages: {{}}\n")).unwrap();
            p
        };
        // Before: read_to_string of /dev/zero grew without bound.
        let m = load_msg(&spec("/dev/zero"));
        assert!(m.contains("not a regular file"), "{m}");
        // Before: opening a fifo blocked for ever (no writer).
        let fifo = tmp.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let m = load_msg(&spec(fifo.to_str().unwrap()));
            assert!(m.contains("not a regular file"), "{m}");
        }
        let big = tmp.path().join("big.yaml");
        std::fs::write(
            &big,
            format!("name: big\n# {}\n", "x".repeat(MAX_SPEC_BYTES as usize)),
        )
        .unwrap();
        let m = load_msg(&spec(big.to_str().unwrap()));
        assert!(m.contains("more than a spec may be"), "{m}");
        let m = load_msg(tmp.path());
        assert!(m.contains("a directory"), "{m}");
    }

    #[test]
    fn extends_of_a_file_that_is_not_a_mapping_is_an_error_not_an_empty_spec() {
        let tmp = tempfile::tempdir().unwrap();
        // /etc/passwd's lines parse as one YAML string.
        let passwd = tmp.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
        )
        .unwrap();
        let child = tmp.path().join("child.yaml");
        std::fs::write(
            &child,
            "extends: passwd\nname: c\nstages:\n  a: { kind: x }\n",
        )
        .unwrap();
        let m = load_msg(&child);
        assert!(m.contains("not a spec") && m.contains("passwd"), "{m}");
        let list = tmp.path().join("list.yaml");
        std::fs::write(&list, "- a\n- b\n").unwrap();
        std::fs::write(
            &child,
            "extends: list.yaml\nname: c\nstages:\n  a: { kind: x }\n",
        )
        .unwrap();
        let m = load_msg(&child);
        assert!(m.contains("not a spec") && m.contains("list.yaml"), "{m}");
    }

    #[test]
    fn deeply_nested_yaml_is_refused_by_its_depth() {
        let n = 20_000;
        let flow = format!(
            "name: d\nstages: {{}}\nx: {}1{}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        let e = load_str(&flow, "deep.yaml", &[]).unwrap_err().to_string();
        assert!(e.contains("nests") && e.contains("deep.yaml"), "{e}");
        let mut block = String::from("name: d\nstages: {}\n");
        for i in 0..200 {
            block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        let e = load_str(&block, "deep.yaml", &[]).unwrap_err().to_string();
        assert!(e.contains("nests"), "{e}");
        let dashes = format!("name: d\nstages: {{}}\nx: \n{}1\n", "- ".repeat(n));
        let e = load_str(&dashes, "deep.yaml", &[]).unwrap_err().to_string();
        assert!(e.contains("nests"), "{e}");
        // The specs of the project nest a handful of levels.
        assert!(nesting_depth("a:\n  b: { c: [1, {d: 2}] }\n  e:\n    - f: 1\n") <= 6);
    }
}
