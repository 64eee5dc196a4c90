//! Running a plan: one thread per stage instance, bounded channels between them, order restored
//! behind parallel stages, the first error (or Ctrl-C) stopping every thread cleanly.
//!
//! Ordering protocol. A stage with `workers: N > 1` tags each output with the sequence number of
//! the unit it is working on (an input item's sequence number, or a unit claimed by a parallel
//! source) and sends `Done(seq)` once that unit is finished. A relay thread per output port puts
//! the units back in order, numbers them afresh and hands them on. Workers never run more than a
//! window of units ahead of the relay, so memory stays bounded however slow one unit is.

use crate::error::{RunError, StageError};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::stage::{CloneFn, Configured, Item};
use crate::telemetry::{format_table, to_batch, write_parquet_atomic, StageReport, Stats};
use crossbeam_channel::{bounded, select, Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub(crate) enum Msg {
    Item { seq: u64, minor: u32, item: Item },
    Done { seq: u64 },
}

/// Cancels a run from anywhere (a failing stage, Ctrl-C); every blocking wait wakes up.
#[derive(Clone)]
pub struct CancelToken(Arc<CancelInner>);

struct CancelInner {
    flag: AtomicBool,
    interrupted: AtomicBool,
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    pub fn new() -> Self {
        let (tx, rx) = bounded(0);
        CancelToken(Arc::new(CancelInner { flag: AtomicBool::new(false), interrupted: AtomicBool::new(false), tx: Mutex::new(Some(tx)), rx }))
    }
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        if let Ok(mut tx) = self.0.tx.lock() {
            tx.take();
        }
    }
    /// Cancels because the user asked to stop (Ctrl-C).
    pub fn interrupt(&self) {
        self.0.interrupted.store(true, Ordering::SeqCst);
        self.cancel();
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }
    pub fn was_interrupted(&self) -> bool {
        self.0.interrupted.load(Ordering::SeqCst)
    }
    fn rx(&self) -> &Receiver<()> {
        &self.0.rx
    }
}

/// How far workers may run ahead of the relays that restore order.
struct Window {
    next: Vec<AtomicU64>,
    size: u64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Window {
    fn min_next(&self) -> u64 {
        self.next.iter().map(|n| n.load(Ordering::SeqCst)).min().unwrap_or(u64::MAX)
    }
    fn wait(&self, seq: u64, cancel: &CancelToken) -> Result<(), StageError> {
        let mut guard = self.lock.lock().map_err(|_| StageError::failed("internal: window lock poisoned"))?;
        while seq >= self.min_next().saturating_add(self.size) {
            if cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            guard = self.cv.wait_timeout(guard, Duration::from_millis(20)).map_err(|_| StageError::failed("internal: window lock poisoned"))?.0;
        }
        Ok(())
    }
    fn advance(&self, relay: usize, next: u64) {
        self.next[relay].store(next, Ordering::SeqCst);
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
}

struct OutPort {
    senders: Vec<Sender<Msg>>,
    clone: Option<CloneFn>,
    counter: u64,
    minor: u32,
    connected: bool,
}

/// Sends `item` to every sender (copies for all but the last). Drops senders whose consumer has
/// finished; `Closed` once none is left.
fn fan_out(senders: &mut Vec<Sender<Msg>>, clone: Option<CloneFn>, seq: u64, minor: u32, item: Item, cancel: &CancelToken) -> Result<(), StageError> {
    let mut item = Some(item);
    let mut i = 0;
    while i < senders.len() {
        let last = i + 1 == senders.len();
        let payload = if last {
            item.take()
        } else {
            match (clone, item.as_ref()) {
                (Some(f), Some(it)) => f(it),
                _ => None,
            }
        };
        let Some(payload) = payload else {
            return Err(StageError::failed("internal: cannot copy an item for several consumers"));
        };
        let msg = Msg::Item { seq, minor, item: payload };
        select! {
            send(senders[i], msg) -> r => {
                if r.is_err() {
                    senders.remove(i);
                    continue;
                }
            }
            recv(cancel.rx()) -> _ => return Err(StageError::Cancelled),
        }
        i += 1;
    }
    if senders.is_empty() {
        return Err(StageError::Closed);
    }
    Ok(())
}

struct InPort {
    rx: Receiver<Msg>,
    /// Leading items to drop (resume, when the producer cannot skip them itself).
    discard: u64,
}

/// What a running stage instance uses to receive, send, claim work and report progress.
pub struct StageIo {
    stage: String,
    worker: usize,
    workers: usize,
    inputs: Vec<InPort>,
    outputs: Vec<OutPort>,
    /// Tag outputs with the current unit (the stage runs as several workers).
    tagged: bool,
    current: Option<u64>,
    cancel: CancelToken,
    stats: Arc<Stats>,
    window: Option<Arc<Window>>,
    claims: Arc<AtomicU64>,
    skip: Vec<u64>,
    progress: Arc<Progress>,
}

impl StageIo {
    pub fn stage(&self) -> &str {
        &self.stage
    }
    pub fn worker(&self) -> usize {
        self.worker
    }
    pub fn workers(&self) -> usize {
        self.workers
    }
    pub fn progress(&self) -> &Progress {
        &self.progress
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    /// Returns `Err(Cancelled)` once the run is being stopped; call it inside long loops.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }
    /// Whether output `port` has any consumer (a stage may skip work nobody reads).
    pub fn is_connected(&self, port: usize) -> bool {
        self.outputs.get(port).is_some_and(|o| o.connected)
    }
    /// Leading items of output `port` that its consumer already holds from an earlier run; a
    /// source that declares `HONORS_SKIP` starts after them.
    pub fn skip_leading(&self, port: usize) -> u64 {
        self.skip.get(port).copied().unwrap_or(0)
    }

    /// Runs `f`, a wait for input that arrives outside the channels (a learner's new weights),
    /// and counts its time as starved rather than busy.
    pub fn starved_while<R>(&self, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        Stats::add(&self.stats.starved_ns, t0.elapsed().as_nanos() as u64);
        r
    }

    fn finish_unit(&mut self) {
        if let (true, Some(seq)) = (self.tagged, self.current.take()) {
            for o in &mut self.outputs {
                o.minor = 0;
                o.senders.retain(|s| s.send(Msg::Done { seq }).is_ok());
            }
        }
    }

    /// Waits until the ordering window admits item `seq`. Being held back means downstream has
    /// not taken the earlier items yet: back-pressure, not work.
    fn wait_in_order(&self, seq: u64) -> Result<(), StageError> {
        let Some(w) = &self.window else { return Ok(()) };
        let t0 = Instant::now();
        let r = w.wait(seq, &self.cancel);
        Stats::add(&self.stats.blocked_ns, t0.elapsed().as_nanos() as u64);
        r
    }

    /// Next unit of work for a parallel source: indices `0..total`, each handed to one worker.
    pub fn claim(&mut self, total: u64) -> Result<Option<u64>, StageError> {
        self.finish_unit();
        self.check_cancelled()?;
        let s = self.claims.fetch_add(1, Ordering::SeqCst);
        if s >= total {
            return Ok(None);
        }
        self.wait_in_order(s)?;
        if self.tagged {
            self.current = Some(s);
        }
        Stats::add(&self.stats.items_in, 1);
        Ok(Some(s))
    }

    /// Receives the next item of input `port`; `None` once the producer has finished.
    pub fn recv<T: 'static>(&mut self, port: usize) -> Result<Option<T>, StageError> {
        self.finish_unit();
        let stage = self.stage.clone();
        let Some(input) = self.inputs.get_mut(port) else {
            return Err(StageError::failed(format!("internal: stage `{stage}` has no input #{port}")));
        };
        loop {
            let t0 = Instant::now();
            let msg = select! {
                recv(input.rx) -> m => m,
                recv(self.cancel.rx()) -> _ => {
                    Stats::add(&self.stats.starved_ns, t0.elapsed().as_nanos() as u64);
                    return Err(StageError::Cancelled);
                }
            };
            Stats::add(&self.stats.starved_ns, t0.elapsed().as_nanos() as u64);
            match msg {
                Err(_) => return Ok(None),
                Ok(Msg::Done { .. }) => continue,
                Ok(Msg::Item { seq, item, .. }) => {
                    if input.discard > 0 {
                        input.discard -= 1;
                        continue;
                    }
                    Stats::add(&self.stats.items_in, 1);
                    if self.tagged {
                        self.wait_in_order(seq)?;
                        self.current = Some(seq);
                    }
                    return match item.downcast::<T>() {
                        Ok(t) => Ok(Some(*t)),
                        Err(_) => Err(StageError::failed(format!("internal: input #{port} of `{stage}` is not of type {}", std::any::type_name::<T>()))),
                    };
                }
            }
        }
    }

    /// Sends an item on output `port`. `Err(Closed)` when no consumer wants more.
    pub fn send<T: Send + 'static>(&mut self, port: usize, item: T) -> Result<(), StageError> {
        let stage = self.stage.clone();
        let current = self.current;
        let tagged = self.tagged;
        let Some(out) = self.outputs.get_mut(port) else {
            return Err(StageError::failed(format!("internal: stage `{stage}` has no output #{port}")));
        };
        Stats::add(&self.stats.items_out, 1);
        if !out.connected {
            return Ok(());
        }
        let (seq, minor) = if tagged {
            let Some(seq) = current else {
                return Err(StageError::failed(format!("internal: parallel stage `{stage}` sent outside a unit of work")));
            };
            out.minor += 1;
            (seq, out.minor - 1)
        } else {
            out.counter += 1;
            (out.counter - 1, 0)
        };
        let t0 = Instant::now();
        let r = fan_out(&mut out.senders, out.clone, seq, minor, Box::new(item), &self.cancel);
        Stats::add(&self.stats.blocked_ns, t0.elapsed().as_nanos() as u64);
        if matches!(r, Err(StageError::Closed)) && self.outputs.iter().any(|o| o.connected && !o.senders.is_empty()) {
            // This port's consumers are done but others still read: keep going.
            return Ok(());
        }
        r
    }

    fn close(&mut self) {
        self.finish_unit();
        for o in &mut self.outputs {
            o.senders.clear();
        }
        self.inputs.clear();
    }
}

/// Puts the units of a parallel stage's output back in order and hands them on.
fn relay(rx: Receiver<Msg>, mut out: OutPort, window: Arc<Window>, index: usize, cancel: CancelToken) -> Result<(), StageError> {
    let mut buffer: BTreeMap<u64, Vec<(u32, Item)>> = BTreeMap::new();
    let mut done: BTreeSet<u64> = BTreeSet::new();
    let mut next: u64 = 0;
    let mut counter: u64 = 0;
    let emit = |items: Vec<(u32, Item)>, out: &mut OutPort, counter: &mut u64| -> Result<(), StageError> {
        let mut items = items;
        items.sort_by_key(|(m, _)| *m);
        for (_, item) in items {
            fan_out(&mut out.senders, out.clone, *counter, 0, item, &cancel)?;
            *counter += 1;
        }
        Ok(())
    };
    loop {
        let msg = select! {
            recv(rx) -> m => m,
            recv(cancel.rx()) -> _ => return Err(StageError::Cancelled),
        };
        match msg {
            Err(_) => break,
            Ok(Msg::Item { seq, minor, item }) => buffer.entry(seq).or_default().push((minor, item)),
            Ok(Msg::Done { seq }) => {
                done.insert(seq);
            }
        }
        while done.remove(&next) {
            if let Some(items) = buffer.remove(&next) {
                emit(items, &mut out, &mut counter)?;
            }
            next += 1;
            window.advance(index, next);
        }
    }
    // Every worker has finished: hand on what is left, in order.
    if !cancel.is_cancelled() {
        for (_, items) in std::mem::take(&mut buffer) {
            emit(items, &mut out, &mut counter)?;
        }
    }
    window.advance(index, u64::MAX / 2);
    Ok(())
}

/// Options of one run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Run even if the run directory holds a different resolved spec (it is replaced).
    pub force: bool,
    /// No progress, no telemetry table on stderr.
    pub quiet: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub stages: Vec<StageReport>,
    pub wall_s: f64,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".into()
    }
}

/// Saves the resolved spec in the run directory; refuses a different one unless `force`.
fn prepare_run_dir(plan: &Plan, opts: &RunOptions) -> Result<PathBuf, RunError> {
    let dir = plan.spec.run_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| RunError::Io { context: format!("cannot create run directory {}", dir.display()), cause: e })?;
    let text = serde_yaml::to_string(&plan.spec.resolved).map_err(|e| RunError::Other(format!("cannot serialise the spec: {e}")))?;
    let path = dir.join("spec.yaml");
    {
        let mut changed = saved_spec_changes(&dir, &plan.spec.resolved);
        // Continuable parameters (a trainer's max_steps) continue the run; said, not refused.
        let cont: Vec<String> = plan.nodes.iter().flat_map(|n| n.continuable.iter().map(move |p| format!("stages.{}.with.{p}", n.id))).collect();
        let continued: Vec<String> = changed.iter().filter(|c| cont.contains(c)).cloned().collect();
        changed.retain(|c| !cont.contains(c));
        if changed.is_empty() && !continued.is_empty() && !opts.quiet {
            eprintln!("{}: continuing the run there with a changed {}", dir.display(), continued.join(", "));
        }
        if !changed.is_empty() && opts.force {
            // Validation may have read the earlier run (a checkpoint to resume from): a caller
            // that forces must claim the directory before validating (`claim_run_dir`).
            move_aside(&dir, &changed)?;
            std::fs::create_dir_all(&dir).map_err(|e| RunError::Io { context: format!("cannot create run directory {}", dir.display()), cause: e })?;
        }
        if !changed.is_empty() && !opts.force {
            let shown: Vec<&str> = changed.iter().take(5).map(String::as_str).collect();
            let more = if changed.len() > 5 { format!(" and {} more", changed.len() - 5) } else { String::new() };
            return Err(RunError::Other(format!(
                "{} holds a run of a different spec ({}; changed: {}{more}); use another `name`/`run_dir`, or pass --force to run over it",
                dir.display(),
                path.display(),
                shown.join(", ")
            )));
        }
    }
    let tmp = dir.join("spec.yaml.tmp");
    std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| RunError::Io { context: format!("cannot write {}", path.display()), cause: e })?;
    Ok(dir)
}

/// What differs between the spec saved in `dir` (if any) and `resolved`.
fn saved_spec_changes(dir: &Path, resolved: &serde_yaml::Value) -> Vec<String> {
    match std::fs::read_to_string(dir.join("spec.yaml")) {
        Err(_) => Vec::new(),
        Ok(old) => match serde_yaml::from_str::<serde_yaml::Value>(&old) {
            Ok(old) => run_spec_changes(&old, resolved),
            Err(_) => vec!["(the saved spec.yaml is not YAML)".to_string()],
        },
    }
}

/// Moves an earlier run out of the way (`DIR.replaced-N`), whole: nothing is deleted.
fn move_aside(dir: &Path, changed: &[String]) -> Result<PathBuf, RunError> {
    let aside = (1..).map(|k| PathBuf::from(format!("{}.replaced-{k}", dir.display()))).find(|p| !p.exists()).unwrap_or_else(|| dir.with_extension("replaced"));
    std::fs::rename(dir, &aside).map_err(|e| RunError::Io { context: format!("cannot move the earlier run {} aside to {}", dir.display(), aside.display()), cause: e })?;
    eprintln!("--force: {} held a run of a different spec (changed: {}); moved it to {}", dir.display(), changed.iter().take(5).cloned().collect::<Vec<_>>().join(", "), aside.display());
    Ok(aside)
}

/// `--force` before validation: when the spec's run directory holds a run of a different spec,
/// moves that run aside (`RUN_DIR.replaced-N`) so that the new one starts afresh and validation
/// does not read the old run's checkpoints. Returns where it went, if it moved.
pub fn claim_run_dir(spec: &crate::Spec) -> Result<Option<PathBuf>, RunError> {
    let changed = saved_spec_changes(&spec.run_dir, &spec.resolved);
    if changed.is_empty() {
        return Ok(None);
    }
    move_aside(&spec.run_dir, &changed).map(Some)
}

/// What differs between the spec saved in a run directory and the one about to run there:
/// [`spec_diff`] without the top-level `run_dir` (the same directory may be named differently,
/// `runs/x` or `./runs/x`).
pub fn run_spec_changes(old: &serde_yaml::Value, new: &serde_yaml::Value) -> Vec<String> {
    let strip = |v: &serde_yaml::Value| {
        let mut v = v.clone();
        if let serde_yaml::Value::Mapping(m) = &mut v {
            m.remove("run_dir");
        }
        v
    };
    let mut changed = Vec::new();
    spec_diff(&strip(old), &strip(new), "", &mut changed);
    changed
}

/// The paths at which two resolved specs differ. Mappings compare key by key whatever their
/// order; numbers compare by value (`1` equals `1.0`).
pub fn spec_diff(old: &serde_yaml::Value, new: &serde_yaml::Value, path: &str, out: &mut Vec<String>) {
    use serde_yaml::Value;
    let at = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    let here = || if path.is_empty() { "(the whole spec)".to_string() } else { path.to_string() };
    match (old, new) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            let key = |k: &Value| k.as_str().map(str::to_string).unwrap_or_else(|| serde_yaml::to_string(k).unwrap_or_default().trim().to_string());
            for (k, va) in a {
                match b.get(k) {
                    Some(vb) => spec_diff(va, vb, &at(&key(k)), out),
                    None => out.push(at(&key(k))),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(at(&key(k)));
            }
        }
        (Value::Sequence(a), Value::Sequence(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                spec_diff(va, vb, &at(&i.to_string()), out);
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let same = match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ => a.as_f64() == b.as_f64(),
            };
            if !same {
                out.push(here());
            }
        }
        (Value::Tagged(a), Value::Tagged(b)) if a.tag == b.tag => spec_diff(&a.value, &b.value, path, out),
        (a, b) => {
            if a != b {
                out.push(here());
            }
        }
    }
}

/// `run.json` in a run directory: whether the run finished, and its wall time over all attempts.
/// Written as `running` when an attempt starts and replaced (atomically) when it ends, so a run
/// that crashed or was stopped never reads as complete.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunStatus {
    /// `running`, `complete`, `failed` or `interrupted`.
    pub status: String,
    /// Wall time of every attempt so far, in seconds.
    pub wall_s: f64,
    pub attempts: u64,
    /// The error of a failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunStatus {
    pub fn read(run_dir: &Path) -> Option<RunStatus> {
        let text = std::fs::read_to_string(run_dir.join("run.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
    pub fn is_complete(&self) -> bool {
        self.status == "complete"
    }
    fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        let tmp = run_dir.join("run.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, run_dir.join("run.json"))
    }
}

/// Runs a validated plan to the end, or until the first error or cancellation.
pub fn run(plan: Plan, opts: &RunOptions, cancel: &CancelToken) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    if cancel.is_cancelled() {
        return Err(if cancel.was_interrupted() { RunError::Interrupted } else { RunError::Other("the run was cancelled before it started".into()) });
    }
    let run_dir = prepare_run_dir(&plan, opts)?;
    let before = RunStatus::read(&run_dir);
    let (prior_wall, prior_attempts) = before.map_or((0.0, 0), |s| (s.wall_s, s.attempts));
    let status = move |state: &str, error: Option<String>| RunStatus { status: state.into(), wall_s: prior_wall + started.elapsed().as_secs_f64(), attempts: prior_attempts + 1, error };
    status("running", None).write(&run_dir).map_err(|e| RunError::Io { context: format!("cannot write {}", run_dir.join("run.json").display()), cause: e })?;
    let n = plan.nodes.len();
    let show_bars = !opts.quiet && std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
    let multi = if show_bars { Some(indicatif::MultiProgress::new()) } else { None };

    // Resume: how many leading items each consumer already holds.
    let mut skip_out: Vec<Vec<u64>> = plan.nodes.iter().map(|nd| vec![0; nd.outputs.len()]).collect();
    let mut discard: Vec<Vec<u64>> = plan.nodes.iter().map(|nd| vec![0; nd.inputs.len()]).collect();
    for (c, node) in plan.nodes.iter().enumerate() {
        if node.inputs.len() != 1 || node.workers != 1 {
            continue;
        }
        let k = match node.configured.resume_skip() {
            Ok(k) => k,
            Err(e) => {
                // Failed before any thread started: the attempt is over, say so in run.json.
                let (stage, kind, message) = (node.id.clone(), node.kind.clone(), e.to_string());
                let _ = status("failed", Some(format!("stage `{stage}` ({kind}): {message}"))).write(&run_dir);
                return Err(RunError::Stage { stage, kind, message });
            }
        };
        if k == 0 {
            continue;
        }
        let (p, port) = node.sources[0];
        if plan.nodes[p].honors_skip && plan.consumers(p, port).len() == 1 {
            skip_out[p][port] = k;
        } else {
            discard[c][0] = k;
        }
    }

    // Channels: one per consumer input.
    let mut in_tx: Vec<Vec<Option<Sender<Msg>>>> = Vec::new();
    let mut in_rx: Vec<Vec<Receiver<Msg>>> = Vec::new();
    for node in &plan.nodes {
        let mut txs = Vec::new();
        let mut rxs = Vec::new();
        for _ in &node.inputs {
            let (tx, rx) = bounded(node.capacity);
            txs.push(Some(tx));
            rxs.push(rx);
        }
        in_tx.push(txs);
        in_rx.push(rxs);
    }

    let stats: Vec<Arc<Stats>> = (0..n).map(|_| Arc::new(Stats::default())).collect();
    let progress: Vec<Arc<Progress>> = plan.nodes.iter().map(|nd| Arc::new(Progress::new(&nd.id, multi.clone()))).collect();
    let first_error: Arc<Mutex<Option<(String, String, String)>>> = Arc::new(Mutex::new(None));
    let record = {
        let first_error = first_error.clone();
        let cancel = cancel.clone();
        move |stage: &str, kind: &str, msg: String| {
            if let Ok(mut slot) = first_error.lock() {
                if slot.is_none() {
                    *slot = Some((stage.to_string(), kind.to_string(), msg));
                }
            }
            cancel.cancel();
        }
    };

    let mut handles = Vec::new();
    for (ni, node) in plan.nodes.iter().enumerate() {
        let multi_worker = node.workers > 1;
        // Output ports: direct to consumers, or through a relay that restores order.
        let window = if multi_worker && !node.outputs.is_empty() {
            Some(Arc::new(Window {
                // Unconnected ports have no relay: they never hold workers back.
                next: (0..node.outputs.len()).map(|pi| AtomicU64::new(if plan.consumers(ni, pi).is_empty() { u64::MAX / 2 } else { 0 })).collect(),
                size: (node.capacity * (node.workers + 1)).max(4) as u64,
                lock: Mutex::new(()),
                cv: Condvar::new(),
            }))
        } else {
            None
        };
        let mut worker_outs: Vec<(Vec<Sender<Msg>>, Option<CloneFn>, bool)> = Vec::new();
        for (pi, port) in node.outputs.iter().enumerate() {
            let consumers = plan.consumers(ni, pi);
            let senders: Vec<Sender<Msg>> = consumers.iter().filter_map(|&(c, ci)| in_tx[c][ci].clone()).collect();
            let connected = !senders.is_empty();
            if multi_worker && connected {
                let (rtx, rrx) = bounded::<Msg>(node.capacity * node.workers);
                let out = OutPort { senders, clone: port.ty.clone, counter: 0, minor: 0, connected };
                let (w, c) = (window.clone(), cancel.clone());
                let rec = record.clone();
                let (id, kind) = (node.id.clone(), node.kind.clone());
                let handle = std::thread::Builder::new()
                    .name(format!("{}-relay", node.id))
                    .spawn(move || {
                        let Some(w) = w else { return };
                        let result = relay(rrx, out, w.clone(), pi, c);
                        // However the relay ended, it no longer holds the workers back.
                        w.advance(pi, u64::MAX / 2);
                        match result {
                            Ok(()) | Err(StageError::Cancelled) | Err(StageError::Closed) => {}
                            Err(e) => rec(&id, &kind, e.to_string()),
                        }
                    })
                    .map_err(|e| RunError::Io { context: "cannot start a thread".into(), cause: e })?;
                handles.push((ni, handle));
                worker_outs.push((vec![rtx], port.ty.clone, true));
            } else {
                worker_outs.push((senders, port.ty.clone, connected));
            }
        }
        let claims = Arc::new(AtomicU64::new(0));
        let configured: Arc<dyn Configured> = node.configured.clone();
        for w in 0..node.workers {
            let mut io = StageIo {
                stage: node.id.clone(),
                worker: w,
                workers: node.workers,
                inputs: in_rx[ni].iter().enumerate().map(|(i, rx)| InPort { rx: rx.clone(), discard: if w == 0 { discard[ni][i] } else { 0 } }).collect(),
                outputs: worker_outs.iter().map(|(s, clone, connected)| OutPort { senders: s.clone(), clone: *clone, counter: 0, minor: 0, connected: *connected }).collect(),
                tagged: multi_worker,
                current: None,
                cancel: cancel.clone(),
                stats: stats[ni].clone(),
                window: window.clone(),
                claims: claims.clone(),
                skip: skip_out[ni].clone(),
                progress: progress[ni].clone(),
            };
            let configured = configured.clone();
            let rec = record.clone();
            let (id, kind) = (node.id.clone(), node.kind.clone());
            let stats = stats[ni].clone();
            let handle = std::thread::Builder::new()
                .name(format!("{}-{}", node.id, w))
                .spawn(move || {
                    let t0 = Instant::now();
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let mut stage = configured.instance(w)?;
                        stage.run(&mut io)
                    }));
                    io.close();
                    Stats::add(&stats.wall_ns, t0.elapsed().as_nanos() as u64);
                    match result {
                        Ok(Ok(())) | Ok(Err(StageError::Cancelled)) | Ok(Err(StageError::Closed)) => {}
                        Ok(Err(e)) => rec(&id, &kind, e.to_string()),
                        Err(p) => rec(&id, &kind, format!("internal error (panic): {}", panic_message(p.as_ref()))),
                    }
                })
                .map_err(|e| RunError::Io { context: "cannot start a thread".into(), cause: e })?;
            handles.push((ni, handle));
        }
    }
    // The engine keeps no sender: a stage's input ends when its producers finish.
    drop(in_tx);
    drop(in_rx);

    let finished = Arc::new(AtomicBool::new(false));
    // run.json keeps the wall time of this attempt up to date (every 10 s), so an attempt that
    // is killed still counts in "wall time over all attempts".
    let heartbeat = {
        let finished = finished.clone();
        let dir = run_dir.clone();
        std::thread::spawn(move || {
            let mut tick = 0u64;
            while !finished.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                tick += 1;
                if tick.is_multiple_of(100) && !finished.load(Ordering::SeqCst) {
                    let _ = status("running", None).write(&dir);
                }
            }
        })
    };
    // Plain progress lines when not on a terminal.
    let reporter = if !opts.quiet && !show_bars {
        let finished = finished.clone();
        let progress = progress.clone();
        let name = plan.spec.name.clone();
        Some(std::thread::spawn(move || {
            let mut last: Vec<u64> = vec![u64::MAX; progress.len()];
            let mut tick = 0u64;
            while !finished.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                tick += 1;
                if !tick.is_multiple_of(100) {
                    continue;
                }
                for (i, p) in progress.iter().enumerate() {
                    if p.position() != last[i] {
                        if let Some(line) = p.line() {
                            eprintln!("[{name}] {line}");
                        }
                        last[i] = p.position();
                    }
                }
            }
        }))
    } else {
        None
    };

    for (_, h) in handles {
        let _ = h.join();
    }
    finished.store(true, Ordering::SeqCst);
    let _ = heartbeat.join();
    if let Some(r) = reporter {
        let _ = r.join();
    }
    for p in &progress {
        p.finish();
    }

    let reports: Vec<StageReport> = plan.nodes.iter().enumerate().map(|(i, nd)| StageReport::from_stats(&nd.id, &nd.kind, nd.workers, &stats[i])).collect();
    let wall_s = started.elapsed().as_secs_f64();
    if !opts.quiet {
        eprintln!("\n{}", format_table(&reports));
    }
    let stages_path = run_dir.join("stages.parquet");
    let save = to_batch(&plan.spec.name, &reports)
        .map_err(std::io::Error::other)
        .and_then(|b| write_parquet_atomic(&stages_path, &b))
        .map_err(|e| RunError::Io { context: format!("cannot write {}", stages_path.display()), cause: e });

    let err = first_error.lock().ok().and_then(|mut e| e.take());
    if let Some((stage, kind, message)) = err {
        let _ = status("failed", Some(format!("stage `{stage}` ({kind}): {message}"))).write(&run_dir);
        return Err(RunError::Stage { stage, kind, message });
    }
    if cancel.was_interrupted() {
        let _ = status("interrupted", None).write(&run_dir);
        return Err(RunError::Interrupted);
    }
    if cancel.is_cancelled() {
        // Cancelled from outside without an error of its own: stopped, not finished.
        let _ = status("interrupted", None).write(&run_dir);
        return Err(RunError::Other("the run was cancelled".into()));
    }
    save?;
    status("complete", None).write(&run_dir).map_err(|e| RunError::Io { context: format!("cannot write {}", run_dir.join("run.json").display()), cause: e })?;
    Ok(RunSummary { run_dir, stages: reports, wall_s })
}
