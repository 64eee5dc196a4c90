//! The stage contract: a kind's name, typed parameters, declared ports and a run method; and the
//! registry of kinds (an explicit table, filled by the binary).

use crate::error::StageError;
use crate::params::{param_docs, ParamDoc, ParamError, Params};
use crate::runtime::StageIo;
use serde_yaml::Value;
use std::any::{Any, TypeId};
use std::path::PathBuf;

pub(crate) type Item = Box<dyn Any + Send>;
pub(crate) type CloneFn = fn(&Item) -> Option<Item>;

/// The Rust type carried by a port: connections are checked by `TypeId`.
#[derive(Clone, Copy)]
pub struct PortType {
    pub name: &'static str,
    pub(crate) id: TypeId,
    /// Present when items can be copied to several consumers (fan-out).
    pub(crate) clone: Option<CloneFn>,
}

impl std::fmt::Debug for PortType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    // "stages::audio::Decoded" → "Decoded"; generic arguments kept whole.
    match full.find('<') {
        Some(_) => full,
        None => full.rsplit("::").next().unwrap_or(full),
    }
}

fn clone_item<T: Clone + Send + 'static>(item: &Item) -> Option<Item> {
    item.downcast_ref::<T>().map(|t| Box::new(t.clone()) as Item)
}

/// A named input or output of a stage kind.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: &'static str,
    pub ty: PortType,
    pub doc: &'static str,
}

impl Port {
    /// A port whose items go to at most one consumer.
    pub fn of<T: Send + 'static>(name: &'static str, doc: &'static str) -> Port {
        Port { name, doc, ty: PortType { name: short_type_name::<T>(), id: TypeId::of::<T>(), clone: None } }
    }
    /// A port whose items may be copied to several consumers.
    pub fn cloneable<T: Clone + Send + 'static>(name: &'static str, doc: &'static str) -> Port {
        Port { name, doc, ty: PortType { name: short_type_name::<T>(), id: TypeId::of::<T>(), clone: Some(clone_item::<T>) } }
    }
}

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
    /// State shared by the stages of one plan (one per validated spec), for stages that must meet
    /// outside the channels (a learner publishing weights to the stage that uses them).
    pub shared: Shared,
}

/// A type map shared by all stages of one plan: `get_or_insert` hands every caller the same value
/// for a key. A new plan starts empty, so nothing leaks between runs in one process.
#[derive(Clone, Default)]
pub struct Shared(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<dyn Any + Send + Sync>>>>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl Shared {
    /// The value under `key`, made by `make` on first use. `None` if the key holds another type.
    pub fn get_or_insert<T: Any + Send + Sync>(&self, key: &str, make: impl FnOnce() -> T) -> Option<std::sync::Arc<T>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.entry(key.to_string()).or_insert_with(|| std::sync::Arc::new(make())).clone();
        v.downcast::<T>().ok()
    }
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
    fn configure(&self, with: &Value, ctx: &StageContext) -> Result<Box<dyn Configured>, Vec<ParamError>>;
}

/// A stage whose parameters passed validation.
pub trait Configured: Send + Sync {
    /// Leading items of the (single) input that an earlier run already consumed for good.
    fn resume_skip(&self) -> Result<u64, StageError>;
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
    /// Checks that need the context (paths exist, device, model block); every error reported.
    fn validate(_params: &Self::Params, _ctx: &StageContext) -> Vec<ParamError> {
        Vec::new()
    }
    fn create(params: &Self::Params, ctx: &StageContext, worker: usize) -> Result<Self, StageError>;
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
    fn resume_skip(&self) -> Result<u64, StageError> {
        D::resume_skip(&self.params, &self.ctx)
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
    fn configure(&self, with: &Value, ctx: &StageContext) -> Result<Box<dyn Configured>, Vec<ParamError>> {
        let (params, mut errors) = crate::params::parse_params_partial::<D::Params>(with);
        let Some(params) = params else { return Err(errors) };
        // The stage's own checks run over what is well typed, except on a field that already has
        // an error (its default stands in for it, so a check on it would mislead).
        let top = |f: &str| f.trim_start_matches('/').split(['.', '[', '/']).next().unwrap_or("").to_string();
        let bad: Vec<String> = errors.iter().map(|e| top(&e.field)).collect();
        errors.extend(D::validate(&params, ctx).into_iter().filter(|e| !bad.contains(&top(&e.field))));
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Box::new(ConfiguredOf::<D> { params, ctx: ctx.clone() }))
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
        self.kinds.iter().find(|k| k.name() == name).map(|k| k.as_ref())
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
            out.push_str(&format!("{}{}\n", k.name(), if k.parallel() { "  [parallel: workers: N]" } else { "" }));
            for line in k.doc().lines() {
                out.push_str(&format!("    {line}\n"));
            }
            let ports = |ps: Vec<Port>| -> String {
                if ps.is_empty() {
                    "none".to_string()
                } else {
                    ps.iter().map(|p| format!("{} ({})", p.name, p.ty.name)).collect::<Vec<_>>().join(", ")
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
                    out.push_str(&format!("    {:w$}  {} = {}  {}\n", p.name, p.ty, p.default, p.doc, w = w));
                }
            }
            out.push('\n');
        }
        out
    }
}
