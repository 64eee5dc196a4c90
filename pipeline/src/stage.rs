//! The stage contract: a kind's name, typed parameters, declared ports and a run method; and the
//! registry of kinds (an explicit table, filled by the binary).

use crate::error::StageError;
use crate::io::{Port, StageIo};
use crate::links::{Linker, Links};
use crate::params::{param_docs, ParamDoc, ParamError, Params};
use serde_yaml::Value;
use std::path::PathBuf;

/// What a stage knows about where it runs.
#[derive(Clone, Debug)]
pub struct StageContext {
    /// The stage's name in the spec.
    pub stage: String,
    pub kind: String,
    /// The run's name and directory.
    pub run: String,
    pub run_dir: PathBuf,
    /// This stage's own random seed, derived from the spec seed and the stage name.
    pub seed: u64,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The spec's `model:` block, shared by the model stages.
    pub model: Option<Value>,
    pub workers: usize,
    /// The values stages of this plan hand each other outside the channels (filled by the link
    /// step after validation, before any stage is built; see [`crate::links`]).
    pub links: Links,
    /// Which stage feeds which: the plan's connections, for a stage that must know whether
    /// another lies downstream of it (a reader resumes only a stream that reaches the learner).
    pub graph: Graph,
}

/// The plan's connections as stage names: each stage and the stages that read its outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph(std::sync::Arc<std::collections::BTreeMap<String, Vec<String>>>);

impl Graph {
    /// From (producer, consumer) pairs.
    pub fn from_edges<'a>(edges: impl IntoIterator<Item = (&'a str, &'a str)>) -> Graph {
        let mut m: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (a, b) in edges {
            let v = m.entry(a.to_string()).or_default();
            if !v.iter().any(|x| x == b) {
                v.push(b.to_string());
            }
        }
        Graph(std::sync::Arc::new(m))
    }
    /// Whether `to` reads, directly or through other stages, what `from` sends.
    pub fn reaches(&self, from: &str, to: &str) -> bool {
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(s) = todo.pop() {
            for n in self.0.get(&s).into_iter().flatten() {
                if n == to {
                    return true;
                }
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        false
    }
}

/// The directories (or files) a stage reads and writes outside the run directory: the engine
/// locks every directory written for the run's lifetime, and `--force` never moves a run
/// directory that holds something a spec reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StagePaths {
    pub reads: Vec<PathBuf>,
    /// Directories this stage writes (each locked while the run lasts).
    pub writes: Vec<PathBuf>,
    /// Stores among `reads` (directories an ehmam writer locks): held with a shared lock while
    /// the run lasts, so that no writer replaces them underneath the reader, and refused while
    /// one writes them.
    pub stores: Vec<PathBuf>,
}

/// A running instance of a stage (one per worker).
pub trait Stage: Send {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError>;
}

/// A stage kind as the registry holds it. Implemented for every [`StageDef`] by [`kind`].
pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    fn doc(&self) -> &'static str;
    fn inputs(&self) -> Vec<Port>;
    fn outputs(&self) -> Vec<Port>;
    /// Stateless: may run as several workers.
    fn parallel(&self) -> bool;
    /// A source that skips the leading items its consumer already holds (resume).
    fn honors_skip(&self) -> bool;
    /// Parameters whose change continues a run instead of making it another one.
    fn continuable(&self) -> &'static [&'static str];
    fn params(&self) -> Vec<ParamDoc>;
    /// Checks parameters (every error, paths relative to `with`) and returns the configured stage.
    fn configure(
        &self,
        with: &Value,
        ctx: &StageContext,
    ) -> Result<Box<dyn Configured>, Vec<ParamError>>;
}

/// A stage whose parameters passed validation.
pub trait Configured: Send + Sync {
    /// Declares the links this stage provides and reads (the link step, after validation).
    fn link(&self, linker: &mut Linker) -> Vec<ParamError>;
    /// Checks against the values other stages provide (after the link step).
    fn check_links(&self) -> Vec<ParamError>;
    /// Leading items of the (single) input that an earlier run already consumed for good.
    fn resume_skip(&self) -> Result<u64, StageError>;
    /// What this stage reads and writes outside the run directory.
    fn paths(&self) -> StagePaths;
    /// Builds the instance for worker `worker` (0-based).
    fn instance(&self, worker: usize) -> Result<Box<dyn Stage>, StageError>;
}

/// The typed way to write a stage kind: parameters, ports, and how to build an instance.
pub trait StageDef: Stage + Sized + 'static {
    type Params: Params + Clone;
    const KIND: &'static str;
    const DOC: &'static str;
    /// Stateless stages may run with `workers: N`; sources that set this split their work units
    /// among workers through [`StageIo::claim`].
    const PARALLEL: bool = false;
    /// Sources that honour [`StageIo::skip_leading`].
    const HONORS_SKIP: bool = false;
    /// Parameters that may change between attempts of one run without making it another run
    /// (e.g. a trainer's `max_steps`: a rerun with a larger one trains on from the checkpoint).
    const CONTINUABLE: &'static [&'static str] = &[];
    fn inputs() -> Vec<Port>;
    fn outputs() -> Vec<Port>;
    /// Parameter defaults that depend on the context (a trainer's schedule on the model block's
    /// preset, say): a mapping of parameter names to values, laid under the spec's `with:` (what
    /// the spec gives wins), in place of the parameters' own defaults.
    fn context_defaults(_ctx: &StageContext) -> Option<Value> {
        None
    }
    /// Checks that need the context (paths exist, device, model block); every error reported.
    fn validate(_params: &Self::Params, _ctx: &StageContext) -> Vec<ParamError> {
        Vec::new()
    }
    /// The link step: values this stage provides to others and links it reads (errors name a
    /// parameter, as in `validate`). Runs after every stage validated, before any is created.
    fn link(_params: &Self::Params, _ctx: &StageContext, _linker: &mut Linker) -> Vec<ParamError> {
        Vec::new()
    }
    /// The paths this stage reads and the directories it writes outside the run directory
    /// (stores, corpora): the engine locks what is written, `--force` never moves what is read.
    fn paths(_params: &Self::Params, _ctx: &StageContext) -> StagePaths {
        StagePaths::default()
    }
    /// Checks that need values other stages provide: runs once every stage has linked (so the
    /// order of the stages in the spec does not matter), before any is created, with the links
    /// readable through `ctx.links`; errors name a parameter, as in `validate`.
    fn check_links(_params: &Self::Params, _ctx: &StageContext) -> Vec<ParamError> {
        Vec::new()
    }
    fn create(params: &Self::Params, ctx: &StageContext, worker: usize)
        -> Result<Self, StageError>;
    fn resume_skip(_params: &Self::Params, _ctx: &StageContext) -> Result<u64, StageError> {
        Ok(0)
    }
}

struct KindOf<D>(std::marker::PhantomData<fn() -> D>);

struct ConfiguredOf<D: StageDef> {
    params: D::Params,
    ctx: StageContext,
}

impl<D: StageDef> Configured for ConfiguredOf<D> {
    fn link(&self, linker: &mut Linker) -> Vec<ParamError> {
        D::link(&self.params, &self.ctx, linker)
    }
    fn check_links(&self) -> Vec<ParamError> {
        D::check_links(&self.params, &self.ctx)
    }
    fn resume_skip(&self) -> Result<u64, StageError> {
        D::resume_skip(&self.params, &self.ctx)
    }
    fn paths(&self) -> StagePaths {
        D::paths(&self.params, &self.ctx)
    }
    fn instance(&self, worker: usize) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(D::create(&self.params, &self.ctx, worker)?))
    }
}

impl<D: StageDef> StageKind for KindOf<D> {
    fn name(&self) -> &'static str {
        D::KIND
    }
    fn doc(&self) -> &'static str {
        D::DOC
    }
    fn inputs(&self) -> Vec<Port> {
        D::inputs()
    }
    fn outputs(&self) -> Vec<Port> {
        D::outputs()
    }
    fn parallel(&self) -> bool {
        D::PARALLEL
    }
    fn honors_skip(&self) -> bool {
        D::HONORS_SKIP
    }
    fn continuable(&self) -> &'static [&'static str] {
        D::CONTINUABLE
    }
    fn params(&self) -> Vec<ParamDoc> {
        param_docs::<D::Params>()
    }
    fn configure(
        &self,
        with: &Value,
        ctx: &StageContext,
    ) -> Result<Box<dyn Configured>, Vec<ParamError>> {
        let merged;
        let with = match (D::context_defaults(ctx), with) {
            (Some(Value::Mapping(mut d)), Value::Mapping(w)) => {
                d.extend(w.iter().map(|(k, v)| (k.clone(), v.clone())));
                merged = Value::Mapping(d);
                &merged
            }
            (Some(d @ Value::Mapping(_)), Value::Null) => {
                merged = d;
                &merged
            }
            _ => with,
        };
        let (params, mut errors) = crate::params::parse_params_partial::<D::Params>(with);
        let Some(params) = params else {
            return Err(errors);
        };
        // The stage's own checks run over what is well typed, except on a field that already has
        // an error (its default stands in for it, so a check on it would mislead).
        let top = |f: &str| {
            f.trim_start_matches('/')
                .split(['.', '[', '/'])
                .next()
                .unwrap_or("")
                .to_string()
        };
        let bad: Vec<String> = errors.iter().map(|e| top(&e.field)).collect();
        errors.extend(
            D::validate(&params, ctx)
                .into_iter()
                .filter(|e| !bad.contains(&top(&e.field))),
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Box::new(ConfiguredOf::<D> {
            params,
            ctx: ctx.clone(),
        }))
    }
}

/// Wraps a [`StageDef`] for the registry.
pub fn kind<D: StageDef>() -> Box<dyn StageKind> {
    Box::new(KindOf::<D>(std::marker::PhantomData))
}

/// The table of stage kinds a binary offers.
#[derive(Default)]
pub struct Registry {
    kinds: Vec<Box<dyn StageKind>>,
    /// Whether this build can run on `cuda:N` devices.
    pub cuda: bool,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add(&mut self, k: Box<dyn StageKind>) -> &mut Self {
        self.kinds.push(k);
        self
    }
    pub fn with<D: StageDef>(&mut self) -> &mut Self {
        self.add(kind::<D>())
    }
    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds
            .iter()
            .find(|k| k.name() == name)
            .map(|k| k.as_ref())
    }
    pub fn kinds(&self) -> impl Iterator<Item = &dyn StageKind> {
        self.kinds.iter().map(|k| k.as_ref())
    }
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }

    /// Human-readable listing of every kind with ports and parameters (`ehmam stages`).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for k in &self.kinds {
            out.push_str(&format!(
                "{}{}\n",
                k.name(),
                if k.parallel() {
                    "  [parallel: workers: N]"
                } else {
                    ""
                }
            ));
            for line in k.doc().lines() {
                out.push_str(&format!("    {line}\n"));
            }
            let ports = |ps: Vec<Port>| -> String {
                if ps.is_empty() {
                    "none".to_string()
                } else {
                    ps.iter()
                        .map(|p| format!("{} ({})", p.name, p.ty.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            out.push_str(&format!("  inputs:  {}\n", ports(k.inputs())));
            out.push_str(&format!("  outputs: {}\n", ports(k.outputs())));
            let params = k.params();
            if params.is_empty() {
                out.push_str("  parameters: none\n");
            } else {
                out.push_str("  parameters:\n");
                let w = params.iter().map(|p| p.name.len()).max().unwrap_or(0);
                for p in params {
                    out.push_str(&format!(
                        "    {:w$}  {} = {}  {}\n",
                        p.name,
                        p.ty,
                        p.default,
                        p.doc,
                        w = w
                    ));
                }
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod graph_tests {
    use super::Graph;

    #[test]
    fn reaches_follows_connections_downstream_only() {
        // train_read → batch → learner; eval_read → eval_batch → eval; learner → log
        let g = Graph::from_edges([
            ("train_read", "batch"),
            ("batch", "learner"),
            ("eval_read", "eval_batch"),
            ("eval_batch", "eval"),
            ("learner", "log"),
        ]);
        assert!(g.reaches("train_read", "learner"));
        assert!(g.reaches("train_read", "log"));
        assert!(g.reaches("batch", "learner"));
        assert!(!g.reaches("eval_read", "learner"));
        assert!(!g.reaches("learner", "batch"), "never upstream");
        assert!(!g.reaches("learner", "learner"), "no cycle, no self");
        assert!(!g.reaches("unknown", "learner"));
    }
}
