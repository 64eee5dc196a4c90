//! Running a plan: one thread per stage instance, bounded channels between them (wired here;
//! what a stage sees of them is in [`crate::io`]), the first error (or Ctrl-C) stopping every
//! thread cleanly, telemetry saved at the end.

use crate::cancel::CancelToken;
use crate::error::{RunError, StageError};
use crate::io::{relay, CloneFn, InPort, Msg, OutPort, StageIo, Window};
use crate::plan::{Node, Plan};
use crate::progress::Progress;
use crate::run_dir::{prepare_run_dir, RunStatus};
use crate::telemetry::{format_table, to_batch, write_parquet_atomic, StageReport, Stats};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// The first error of a run: (stage, kind, message).
type FirstError = Arc<Mutex<Option<(String, String, String)>>>;

/// Records a stage's error (the first one wins) and cancels the run.
#[derive(Clone)]
struct Recorder {
    first: FirstError,
    cancel: CancelToken,
}

impl Recorder {
    fn record(&self, stage: &str, kind: &str, msg: String) {
        if let Ok(mut slot) = self.first.lock() {
            if slot.is_none() {
                *slot = Some((stage.to_string(), kind.to_string(), msg));
            }
        }
        self.cancel.cancel();
    }
}

/// `run.json` of the attempt under way: earlier attempts' wall time plus this one's.
#[derive(Clone, Copy)]
struct Attempt {
    started: Instant,
    prior_wall: f64,
    prior_attempts: u64,
}

impl Attempt {
    fn status(&self, state: &str, error: Option<String>) -> RunStatus {
        RunStatus {
            status: state.into(),
            wall_s: self.prior_wall + self.started.elapsed().as_secs_f64(),
            attempts: self.prior_attempts + 1,
            error,
        }
    }
}

/// Runs a validated plan to the end, or until the first error or cancellation.
pub fn run(plan: Plan, opts: &RunOptions, cancel: &CancelToken) -> Result<RunSummary, RunError> {
    if cancel.is_cancelled() {
        return Err(if cancel.was_interrupted() {
            RunError::Interrupted
        } else {
            RunError::Other("the run was cancelled before it started".into())
        });
    }
    // Every directory the run writes is this process's until it ends (the run directory first).
    let mut locks = crate::run_dir::lock_plan(&plan)?;
    let (run_dir, attempt) = start_attempt(&plan, opts, &mut locks[0])?;
    let show_bars =
        !opts.quiet && std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
    let multi = show_bars.then(indicatif::MultiProgress::new);
    let (skip_out, discard) = resume_skips(&plan).inspect_err(|e| {
        // Failed before any thread started: the attempt is over, say so in run.json.
        if let RunError::Stage {
            stage,
            kind,
            message,
        } = e
        {
            let error = Some(format!("stage `{stage}` ({kind}): {message}"));
            let _ = attempt.status("failed", error).write(&run_dir);
        }
    })?;
    let stats: Vec<Arc<Stats>> = plan
        .nodes
        .iter()
        .map(|_| Arc::new(Stats::default()))
        .collect();
    let progress: Vec<Arc<Progress>> = plan
        .nodes
        .iter()
        .map(|nd| Arc::new(Progress::new(&nd.id, multi.clone())))
        .collect();
    let recorder = Recorder {
        first: Arc::new(Mutex::new(None)),
        cancel: cancel.clone(),
    };
    let mut handles = Vec::new();
    {
        // The engine keeps no sender: a stage's input ends when its producers finish.
        let (in_tx, in_rx) = channels(&plan);
        for (ni, node) in plan.nodes.iter().enumerate() {
            let wiring = Wiring {
                in_tx: &in_tx,
                in_rx: &in_rx[ni],
                skip: &skip_out[ni],
                discard: &discard[ni],
                stats: &stats[ni],
                progress: &progress[ni],
            };
            spawn_node(&plan, ni, node, &wiring, &recorder, cancel, &mut handles)?;
        }
    }
    let reporter = (!opts.quiet && !show_bars).then_some(plan.spec.name.as_str());
    wait_for(handles, &run_dir, attempt, &progress, reporter);
    let summary = finish(
        &plan,
        opts,
        cancel,
        &recorder.first,
        &stats,
        run_dir,
        attempt,
    );
    // Released only now, after run.json says how the attempt ended.
    drop(locks);
    summary
}

/// Claims the run directory and marks the attempt `running` in `run.json`.
fn start_attempt(
    plan: &Plan,
    opts: &RunOptions,
    lock: &mut crate::lock::DirLock,
) -> Result<(PathBuf, Attempt), RunError> {
    let started = Instant::now();
    let run_dir = prepare_run_dir(plan, opts.force, opts.quiet, lock)?;
    let before = RunStatus::read(&run_dir);
    let (prior_wall, prior_attempts) = before.map_or((0.0, 0), |s| (s.wall_s, s.attempts));
    let attempt = Attempt {
        started,
        prior_wall,
        prior_attempts,
    };
    attempt
        .status("running", None)
        .write(&run_dir)
        .map_err(|e| RunError::Io {
            context: format!("cannot write {}", run_dir.join("run.json").display()),
            cause: e,
        })?;
    Ok((run_dir, attempt))
}

/// Joins every stage thread while the heartbeat (and, off a terminal, the progress lines of run
/// `reporter`) run beside them.
fn wait_for(
    handles: Vec<JoinHandle<()>>,
    run_dir: &std::path::Path,
    attempt: Attempt,
    progress: &[Arc<Progress>],
    reporter: Option<&str>,
) {
    let finished = Arc::new(AtomicBool::new(false));
    let heartbeat = spawn_heartbeat(finished.clone(), run_dir.to_path_buf(), attempt);
    let reporter =
        reporter.map(|name| spawn_reporter(finished.clone(), progress.to_vec(), name.to_string()));
    for h in handles {
        let _ = h.join();
    }
    finished.store(true, Ordering::SeqCst);
    let _ = heartbeat.join();
    if let Some(r) = reporter {
        let _ = r.join();
    }
    for p in progress {
        p.finish();
    }
}

/// Leading items each output may skip and each input must discard: what the consumers already
/// hold from an earlier attempt (a learner resuming from its checkpoint).
///
/// Resuming has three parts, each for its own reason: this skip count (any single-input stage
/// can say how many items it already consumed for good); the data position a trainer hands its
/// readers through a link (so a reader starts inside its stream instead of re-reading it); and a
/// store writer's own index (prep skips finished inputs). The first is the engine's fallback
/// when no reader can start inside its stream.
fn resume_skips(plan: &Plan) -> Result<(Vec<Vec<u64>>, Vec<Vec<u64>>), RunError> {
    let mut skip_out: Vec<Vec<u64>> = plan
        .nodes
        .iter()
        .map(|nd| vec![0; nd.outputs.len()])
        .collect();
    let mut discard: Vec<Vec<u64>> = plan
        .nodes
        .iter()
        .map(|nd| vec![0; nd.inputs.len()])
        .collect();
    for (c, node) in plan.nodes.iter().enumerate() {
        if node.inputs.len() != 1 || node.workers != 1 {
            continue;
        }
        let k = node.configured.resume_skip().map_err(|e| RunError::Stage {
            stage: node.id.clone(),
            kind: node.kind.clone(),
            message: e.to_string(),
        })?;
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
    Ok((skip_out, discard))
}

type Channels = (Vec<Vec<Option<Sender<Msg>>>>, Vec<Vec<Receiver<Msg>>>);

/// One bounded channel per consumer input.
fn channels(plan: &Plan) -> Channels {
    let mut in_tx = Vec::new();
    let mut in_rx = Vec::new();
    for node in &plan.nodes {
        let (txs, rxs): (Vec<_>, Vec<_>) = node
            .inputs
            .iter()
            .map(|_| {
                let (tx, rx) = bounded(node.capacity);
                (Some(tx), rx)
            })
            .unzip();
        in_tx.push(txs);
        in_rx.push(rxs);
    }
    (in_tx, in_rx)
}

/// What one node's threads are connected to.
struct Wiring<'a> {
    in_tx: &'a [Vec<Option<Sender<Msg>>>],
    in_rx: &'a [Receiver<Msg>],
    skip: &'a [u64],
    discard: &'a [u64],
    stats: &'a Arc<Stats>,
    progress: &'a Arc<Progress>,
}

/// Starts a node's workers, and a relay per connected output when it runs as several workers.
fn spawn_node(
    plan: &Plan,
    ni: usize,
    node: &Node,
    wiring: &Wiring,
    recorder: &Recorder,
    cancel: &CancelToken,
    handles: &mut Vec<JoinHandle<()>>,
) -> Result<(), RunError> {
    let multi_worker = node.workers > 1;
    // Output ports: direct to consumers, or through a relay that restores order.
    let window = (multi_worker && !node.outputs.is_empty()).then(|| {
        // Unconnected ports have no relay: they never hold workers back.
        let next = (0..node.outputs.len())
            .map(|pi| {
                AtomicU64::new(if plan.consumers(ni, pi).is_empty() {
                    u64::MAX / 2
                } else {
                    0
                })
            })
            .collect();
        Arc::new(Window::new(
            next,
            (node.capacity * (node.workers + 1)).max(4) as u64,
        ))
    });
    let mut worker_outs: Vec<(Vec<Sender<Msg>>, Option<CloneFn>, bool)> = Vec::new();
    for (pi, port) in node.outputs.iter().enumerate() {
        let senders: Vec<Sender<Msg>> = plan
            .consumers(ni, pi)
            .iter()
            .filter_map(|&(c, ci)| wiring.in_tx[c][ci].clone())
            .collect();
        let connected = !senders.is_empty();
        match (&window, connected) {
            (Some(w), true) => {
                let (rtx, rrx) = bounded::<Msg>(node.capacity * node.workers);
                let out = OutPort::new(senders, port.ty.clone, connected);
                handles.push(spawn_relay(
                    node,
                    rrx,
                    out,
                    w.clone(),
                    pi,
                    recorder,
                    cancel,
                )?);
                worker_outs.push((vec![rtx], port.ty.clone, true));
            }
            _ => worker_outs.push((senders, port.ty.clone, connected)),
        }
    }
    let claims = Arc::new(AtomicU64::new(0));
    for w in 0..node.workers {
        let io = StageIo {
            stage: node.id.clone(),
            worker: w,
            workers: node.workers,
            inputs: wiring
                .in_rx
                .iter()
                .enumerate()
                .map(|(i, rx)| InPort {
                    rx: rx.clone(),
                    discard: if w == 0 { wiring.discard[i] } else { 0 },
                })
                .collect(),
            outputs: worker_outs
                .iter()
                .map(|(s, clone, connected)| OutPort::new(s.clone(), *clone, *connected))
                .collect(),
            tagged: multi_worker,
            current: None,
            cancel: cancel.clone(),
            stats: wiring.stats.clone(),
            window: window.clone(),
            claims: claims.clone(),
            skip: wiring.skip.to_vec(),
            progress: wiring.progress.clone(),
        };
        handles.push(spawn_worker(node, w, io, recorder)?);
    }
    Ok(())
}

fn spawn_relay(
    node: &Node,
    rx: Receiver<Msg>,
    out: OutPort,
    w: Arc<Window>,
    pi: usize,
    recorder: &Recorder,
    cancel: &CancelToken,
) -> Result<JoinHandle<()>, RunError> {
    let (c, rec) = (cancel.clone(), recorder.clone());
    let (id, kind) = (node.id.clone(), node.kind.clone());
    std::thread::Builder::new()
        .name(format!("{}-relay", node.id))
        .spawn(move || {
            let result = relay(rx, out, w.clone(), pi, c);
            // However the relay ended, it no longer holds the workers back.
            w.advance(pi, u64::MAX / 2);
            match result {
                Ok(()) | Err(StageError::Cancelled) | Err(StageError::Closed) => {}
                Err(e) => rec.record(&id, &kind, e.to_string()),
            }
        })
        .map_err(|e| RunError::Io {
            context: "cannot start a thread".into(),
            cause: e,
        })
}

fn spawn_worker(
    node: &Node,
    w: usize,
    mut io: StageIo,
    recorder: &Recorder,
) -> Result<JoinHandle<()>, RunError> {
    let configured = node.configured.clone();
    let rec = recorder.clone();
    let (id, kind) = (node.id.clone(), node.kind.clone());
    std::thread::Builder::new()
        .name(format!("{}-{}", node.id, w))
        .spawn(move || {
            let t0 = Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut stage = configured.instance(w)?;
                stage.run(&mut io)
            }));
            io.close();
            Stats::add(&io.stats.wall_ns, t0.elapsed().as_nanos() as u64);
            match result {
                Ok(Ok(())) | Ok(Err(StageError::Cancelled)) | Ok(Err(StageError::Closed)) => {}
                Ok(Err(e)) => rec.record(&id, &kind, e.to_string()),
                Err(p) => rec.record(
                    &id,
                    &kind,
                    format!("internal error (panic): {}", panic_message(p.as_ref())),
                ),
            }
        })
        .map_err(|e| RunError::Io {
            context: "cannot start a thread".into(),
            cause: e,
        })
}

/// Keeps `run.json`'s wall time of this attempt up to date (every 10 s), so an attempt that is
/// killed still counts in "wall time over all attempts".
fn spawn_heartbeat(finished: Arc<AtomicBool>, dir: PathBuf, attempt: Attempt) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut tick = 0u64;
        while !finished.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            tick += 1;
            if tick.is_multiple_of(100) && !finished.load(Ordering::SeqCst) {
                let _ = attempt.status("running", None).write(&dir);
            }
        }
    })
}

/// Plain progress lines every 10 s when stderr is not a terminal.
fn spawn_reporter(
    finished: Arc<AtomicBool>,
    progress: Vec<Arc<Progress>>,
    name: String,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
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
    })
}

/// Telemetry table and file, then the run's outcome in `run.json`.
fn finish(
    plan: &Plan,
    opts: &RunOptions,
    cancel: &CancelToken,
    first_error: &FirstError,
    stats: &[Arc<Stats>],
    run_dir: PathBuf,
    attempt: Attempt,
) -> Result<RunSummary, RunError> {
    let reports: Vec<StageReport> = plan
        .nodes
        .iter()
        .enumerate()
        .map(|(i, nd)| StageReport::from_stats(&nd.id, &nd.kind, nd.workers, &stats[i]))
        .collect();
    let wall_s = attempt.started.elapsed().as_secs_f64();
    if !opts.quiet {
        eprintln!("\n{}", format_table(&reports));
    }
    let stages_path = run_dir.join("stages.parquet");
    let save = to_batch(&plan.spec.name, &reports)
        .map_err(std::io::Error::other)
        .and_then(|b| write_parquet_atomic(&stages_path, &b))
        .map_err(|e| RunError::Io {
            context: format!("cannot write {}", stages_path.display()),
            cause: e,
        });

    let err = first_error.lock().ok().and_then(|mut e| e.take());
    if let Some((stage, kind, message)) = err {
        let _ = attempt
            .status(
                "failed",
                Some(format!("stage `{stage}` ({kind}): {message}")),
            )
            .write(&run_dir);
        return Err(RunError::Stage {
            stage,
            kind,
            message,
        });
    }
    if cancel.was_interrupted() {
        let _ = attempt.status("interrupted", None).write(&run_dir);
        return Err(RunError::Interrupted);
    }
    if cancel.is_cancelled() {
        // Cancelled from outside without an error of its own: stopped, not finished.
        let _ = attempt.status("interrupted", None).write(&run_dir);
        return Err(RunError::Other("the run was cancelled".into()));
    }
    save?;
    attempt
        .status("complete", None)
        .write(&run_dir)
        .map_err(|e| RunError::Io {
            context: format!("cannot write {}", run_dir.join("run.json").display()),
            cause: e,
        })?;
    Ok(RunSummary {
        run_dir,
        stages: reports,
        wall_s,
    })
}
