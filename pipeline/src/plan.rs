//! Validation: a spec and a registry become a plan (kinds resolved, parameters typed, ports
//! connected and type-checked, no cycles), or every error found.

use crate::error::{SpecError, SpecErrors};
use crate::io::Port;
use crate::links::{LinkInfo, LinkTable, Linker, Links};
use crate::params::ParamError;
use crate::spec::Locator;
use crate::spec::{suggest, Spec};
use crate::stage::{Configured, Registry, StageContext};
use std::collections::HashMap;
use std::sync::Arc;

/// One stage of a validated plan.
pub struct Node {
    pub id: String,
    pub kind: String,
    pub workers: usize,
    pub capacity: usize,
    pub parallel: bool,
    pub honors_skip: bool,
    /// Parameters whose change between attempts continues the run (see `StageDef::CONTINUABLE`).
    pub continuable: &'static [&'static str],
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    /// For each input port: (producer node, producer output port).
    pub sources: Vec<(usize, usize)>,
    pub configured: Arc<dyn Configured>,
    pub ctx: StageContext,
}

/// A validated graph, ready to run.
pub struct Plan {
    pub spec: Spec,
    pub nodes: Vec<Node>,
    /// Node indices in dependency order.
    pub order: Vec<usize>,
    /// The values stages hand each other outside the channels.
    pub links: Links,
}

impl Plan {
    /// Every link of the plan: its value type, who provides it and who reads it.
    pub fn links(&self) -> Vec<LinkInfo> {
        self.links.list()
    }
    /// Consumers of output `port` of node `n`: (consumer node, its input port).
    pub fn consumers(&self, n: usize, port: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (c, node) in self.nodes.iter().enumerate() {
            for (i, &(src, sp)) in node.sources.iter().enumerate() {
                if src == n && sp == port {
                    out.push((c, i));
                }
            }
        }
        out
    }
}

/// Seed of one stage: derived from the spec seed and the stage name, so that editing one stage
/// does not shift another's randomness (SplitMix64 over an FNV-1a hash of the name).
pub fn stage_seed(seed: u64, stage: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in stage.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let mut z = seed ^ h;
    z = z.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// What configuring one stage gave: its ports, flags, the configured stage and its context.
struct Configuring {
    inputs: Vec<Port>,
    outputs: Vec<Port>,
    parallel: bool,
    honors_skip: bool,
    configured: Box<dyn Configured>,
    ctx: StageContext,
}

/// A `(producer node, producer port)` for each input port of each stage, where connected.
type Sources = Vec<Vec<Option<(usize, usize)>>>;

/// Validates a spec against the registry, then runs the link step; returns the plan or every
/// error found.
pub fn validate(spec: Spec, registry: &Registry) -> Result<Plan, SpecErrors> {
    let mut errs: Vec<SpecError> = spec.errors.clone();
    let loc = spec.locator.clone();
    if spec.device.starts_with("cuda") && !registry.cuda {
        errs.push(loc.error("device", format!("`{}` asks for a GPU, but this build has no CUDA support (rebuild with `cargo build --release --features cuda`)", spec.device)));
    }
    let links = Links::default();
    let partial = configure(&spec, registry, &links, &mut errs);
    let sources = connect(&spec, registry, &mut errs);
    check_fan_out(&spec, registry, &sources, &mut errs);
    let order = topological_order(&spec, &sources, &mut errs);
    link(&spec, &partial, &links, &mut errs);
    if !errs.is_empty() {
        return Err(SpecErrors(errs));
    }
    let mut nodes = Vec::new();
    for ((s, p), slots) in spec.stages.iter().zip(partial).zip(sources) {
        let Some(Configuring {
            inputs,
            outputs,
            parallel,
            honors_skip,
            configured,
            ctx,
        }) = p
        else {
            return Err(SpecErrors(vec![loc.error(
                &format!("stages.{}", s.id),
                "internal: stage was not configured",
            )]));
        };
        nodes.push(Node {
            id: s.id.clone(),
            kind: s.kind.clone(),
            workers: s.workers,
            capacity: s.capacity.unwrap_or(spec.channel_capacity),
            parallel,
            honors_skip,
            continuable: registry.get(&s.kind).map_or(&[], |k| k.continuable()),
            inputs,
            outputs,
            sources: slots.into_iter().flatten().collect(),
            configured: Arc::from(configured),
            ctx,
        });
    }
    Ok(Plan {
        spec,
        nodes,
        order,
        links,
    })
}

/// Resolves each stage's kind and checks its parameters (`None` where that failed).
fn configure(
    spec: &Spec,
    registry: &Registry,
    links: &Links,
    errs: &mut Vec<SpecError>,
) -> Vec<Option<Configuring>> {
    let loc = &spec.locator;
    let names: Vec<&str> = registry.names();
    let mut partial: Vec<Option<Configuring>> = Vec::new();
    let graph = crate::stage::Graph::from_edges(spec.stages.iter().flat_map(|s| {
        s.from
            .iter()
            .map(move |c| (c.from.stage.as_str(), s.id.as_str()))
    }));
    for s in &spec.stages {
        let base = format!("stages.{}", s.id);
        let Some(kind) = registry.get(&s.kind) else {
            errs.push(loc.error(
                &format!("{base}.kind"),
                format!(
                    "unknown stage kind `{}`{}",
                    s.kind,
                    suggest(&s.kind, names.iter().copied())
                ),
            ));
            partial.push(None);
            continue;
        };
        let ctx = StageContext {
            stage: s.id.clone(),
            kind: s.kind.clone(),
            run: spec.name.clone(),
            run_dir: spec.run_dir.clone(),
            seed: stage_seed(spec.seed, &s.id),
            device: spec.device.clone(),
            model: spec.model.clone(),
            workers: s.workers,
            links: links.clone(),
            graph: graph.clone(),
        };
        if s.workers > 1 && !kind.parallel() {
            errs.push(loc.error(&format!("{base}.workers"), format!("`{}` keeps state from item to item and runs as one worker; remove `workers: {}`", s.kind, s.workers)));
        }
        match kind.configure(&s.with, &ctx) {
            Ok(configured) => partial.push(Some(Configuring {
                inputs: kind.inputs(),
                outputs: kind.outputs(),
                parallel: kind.parallel(),
                honors_skip: kind.honors_skip(),
                configured,
                ctx,
            })),
            Err(pe) => {
                // `with:` that is not a mapping is already reported; its stand-in (no parameters)
                // would only add "required" errors.
                let bad_with = spec.errors.iter().any(|e| e.path == format!("{base}.with"));
                push_param_errors(
                    loc,
                    &base,
                    pe.into_iter()
                        .filter(|e| !bad_with || e.field.starts_with('/')),
                    errs,
                );
                // Ports are still known: check the connections too.
                partial.push(None);
            }
        }
    }

    partial
}

/// Parameter errors of stage `base` as spec errors. A field starting with `/` is a path from the
/// spec's top (`/model.encoder.dim`): reported once even when several stages read that block.
fn push_param_errors(
    loc: &Locator,
    base: &str,
    pe: impl IntoIterator<Item = ParamError>,
    errs: &mut Vec<SpecError>,
) {
    for e in pe {
        let path = match e.field.strip_prefix('/') {
            Some(abs) => abs.to_string(),
            None if e.field.is_empty() => format!("{base}.with"),
            None => format!("{base}.with.{}", e.field),
        };
        let err = loc.error(&path, e.message);
        if !errs.contains(&err) {
            errs.push(err);
        }
    }
}

/// The link step: every configured stage declares what it provides and reads, in spec order;
/// the table is then frozen for the stages to read when they are created.
fn link(spec: &Spec, partial: &[Option<Configuring>], links: &Links, errs: &mut Vec<SpecError>) {
    let mut table = LinkTable::default();
    for (s, p) in spec.stages.iter().zip(partial) {
        let Some(c) = p else { continue };
        let pe = c.configured.link(&mut Linker::new(&s.id, &mut table));
        push_param_errors(&spec.locator, &format!("stages.{}", s.id), pe, errs);
    }
    links.freeze(table);
    // Checks against what other stages provide mislead while a stage is missing from the links
    // (its parameters failed): they run once every stage validates.
    if partial.iter().any(|p| p.is_none()) {
        return;
    }
    for (s, p) in spec.stages.iter().zip(partial) {
        let Some(c) = p else { continue };
        let pe = c.configured.check_links();
        push_param_errors(&spec.locator, &format!("stages.{}", s.id), pe, errs);
    }
}

/// Resolves every `from:` into (producer, port) per input, checking names and item types.
fn connect(spec: &Spec, registry: &Registry, errs: &mut Vec<SpecError>) -> Sources {
    let ids: Vec<&str> = spec.stages.iter().map(|s| s.id.as_str()).collect();
    let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    let outputs_of = |i: usize| registry.get(&spec.stages[i].kind).map(|k| k.outputs());
    let mut sources: Sources = Vec::new();
    for s in &spec.stages {
        let base = format!("stages.{}", s.id);
        let Some(inputs) = registry.get(&s.kind).map(|k| k.inputs()) else {
            sources.push(Vec::new());
            continue;
        };
        let mut slots: Vec<Option<(usize, usize)>> = vec![None; inputs.len()];
        let mut upstream_unknown = vec![false; inputs.len()];
        let mut positional = 0usize;
        let errs_before = errs.len();
        // A `from:` the loader could not read is already reported.
        let bad_from = spec.errors.iter().any(|e| {
            e.path == format!("{base}.from") || e.path.starts_with(&format!("{base}.from."))
        });
        for (ci, c) in s.from.iter().enumerate() {
            let path = match &c.input {
                Some(p) => format!("{base}.from.{p}"),
                None if s.from.len() > 1 => format!("{base}.from.{ci}"),
                None => format!("{base}.from"),
            };
            let err = |m: String| spec.locator.error(&path, m);
            let slot = match input_slot(&s.kind, c.input.as_deref(), &inputs, &mut positional) {
                Ok(i) if slots[i].is_some() => {
                    errs.push(err(format!(
                        "input `{}` is connected twice",
                        inputs[i].name
                    )));
                    continue;
                }
                Ok(i) => i,
                Err(m) => {
                    errs.push(err(m));
                    continue;
                }
            };
            // Which producer and port.
            let Some(&pi) = index.get(c.from.stage.as_str()) else {
                let near = suggest(&c.from.stage, ids.iter().copied());
                errs.push(err(format!(
                    "`{}` is not a stage of this spec{near}",
                    c.from.stage
                )));
                continue;
            };
            let Some(outs) = outputs_of(pi) else {
                // The producer's kind is unknown (reported there): this input is connected as far
                // as anyone can tell.
                upstream_unknown[slot] = true;
                continue;
            };
            match output_port(&c.from, &outs) {
                Ok(port) if inputs[slot].ty.id != outs[port].ty.id => errs.push(err(format!(
                    "type mismatch: `{}.{}` carries {} but input `{}` of `{}` takes {}",
                    c.from.stage,
                    outs[port].name,
                    outs[port].ty.name,
                    inputs[slot].name,
                    s.id,
                    inputs[slot].ty.name
                ))),
                Ok(port) => slots[slot] = Some((pi, port)),
                Err(m) => errs.push(err(m)),
            }
        }
        for (i, slot) in slots.iter().enumerate() {
            if slot.is_none() && !upstream_unknown[i] && errs.len() == errs_before && !bad_from {
                errs.push(spec.locator.error(
                    &base,
                    format!(
                        "input `{}` ({}) is not connected: add `from:`",
                        inputs[i].name, inputs[i].ty.name
                    ),
                ));
            }
        }
        sources.push(slots);
    }
    sources
}

/// The input port a `from:` entry feeds: named (`input: port`), else the next one in order.
/// `Err` is the message of the spec error.
fn input_slot(
    kind: &str,
    named: Option<&str>,
    inputs: &[Port],
    positional: &mut usize,
) -> Result<usize, String> {
    match named {
        Some(name) => inputs.iter().position(|p| p.name == name).ok_or_else(|| {
            let known: Vec<&str> = inputs.iter().map(|p| p.name).collect();
            format!(
                "`{kind}` has no input `{name}`{}",
                suggest(name, known.iter().copied())
            )
        }),
        None => {
            let i = *positional;
            *positional += 1;
            if i >= inputs.len() {
                return Err(format!(
                    "`{kind}` takes {} input(s), but `from` names more",
                    inputs.len()
                ));
            }
            Ok(i)
        }
    }
}

/// The producer's output port a `from:` entry reads: named (`stage.port`), else its only one.
fn output_port(from: &crate::spec::Endpoint, outs: &[Port]) -> Result<usize, String> {
    let stage = &from.stage;
    match &from.port {
        Some(pn) => outs.iter().position(|p| p.name == pn).ok_or_else(|| {
            let known: Vec<&str> = outs.iter().map(|p| p.name).collect();
            format!(
                "stage `{stage}` has no output `{pn}`{} (outputs: {})",
                suggest(pn, known.iter().copied()),
                known.join(", ")
            )
        }),
        None => match outs.len() {
            1 => Ok(0),
            0 => Err(format!("stage `{stage}` has no outputs to read from")),
            _ => {
                let known: Vec<String> =
                    outs.iter().map(|p| format!("{stage}.{}", p.name)).collect();
                Err(format!(
                    "stage `{stage}` has several outputs; name one: {}",
                    known.join(", ")
                ))
            }
        },
    }
}

/// An output read by several stages must carry items that can be copied.
fn check_fan_out(spec: &Spec, registry: &Registry, sources: &Sources, errs: &mut Vec<SpecError>) {
    let loc = &spec.locator;
    let ports_of =
        |i: usize| -> Option<Vec<Port>> { registry.get(&spec.stages[i].kind).map(|k| k.outputs()) };
    let mut uses: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
    for (ci, slots) in sources.iter().enumerate() {
        for &(p, port) in slots.iter().flatten() {
            uses.entry((p, port)).or_default().push(ci);
        }
    }
    let mut fan: Vec<_> = uses.iter().filter(|(_, c)| c.len() > 1).collect();
    fan.sort_by_key(|(k, _)| **k);
    for (&(p, port), consumers) in fan {
        if let Some(outs) = ports_of(p) {
            if outs[port].ty.clone.is_none() {
                let names: Vec<&str> = consumers
                    .iter()
                    .map(|&c| spec.stages[c].id.as_str())
                    .collect();
                errs.push(loc.error(
                    &format!("stages.{}", spec.stages[p].id),
                    format!(
                        "output `{}` ({}) cannot be shared by several stages ({})",
                        outs[port].name,
                        outs[port].ty.name,
                        names.join(", ")
                    ),
                ));
            }
        }
    }
}

/// The stages in dependency order (Kahn's algorithm); a cycle is an error.
fn topological_order(spec: &Spec, sources: &Sources, errs: &mut Vec<SpecError>) -> Vec<usize> {
    let loc = &spec.locator;
    let n = spec.stages.len();
    let mut indeg = vec![0usize; n];
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (ci, slots) in sources.iter().enumerate() {
        for &(p, _) in slots.iter().flatten() {
            adj[p].push(ci);
            indeg[ci] += 1;
        }
    }
    let mut order = Vec::new();
    let mut ready: Vec<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    ready.reverse();
    while let Some(i) = ready.pop() {
        order.push(i);
        for &c in &adj[i] {
            indeg[c] -= 1;
            if indeg[c] == 0 {
                ready.push(c);
            }
        }
    }
    if order.len() < n {
        let in_cycle: Vec<&str> = (0..n)
            .filter(|&i| indeg[i] > 0)
            .map(|i| spec.stages[i].id.as_str())
            .collect();
        errs.push(loc.error("stages", format!("the stages form a cycle: {} (data must flow one way; feedback such as EMA weights is not a connection)", in_cycle.join(" → "))));
    }

    order
}
