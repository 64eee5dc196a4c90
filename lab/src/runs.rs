//! Running specs: one run with Ctrl-C handling, and a sweep (a grid of runs, each validated before
//! any starts, finished ones skipped, a summary and optionally a report at the end).

use crate::report::{self, ReportError};
use crate::sweep::{self, SweepRun};
use pipeline::{CancelToken, Plan, RunError, RunOptions, RunSummary, SpecErrors};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Errors of running specs.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    /// The spec (or one of a sweep's) did not validate: exit status 2.
    #[error("{0}")]
    Spec(SpecErrors),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A grid or spec list that cannot make a sweep.
    #[error(transparent)]
    Sweep(#[from] crate::sweep::SweepError),
    #[error("cannot install the Ctrl-C handler: {0}")]
    Signal(String),
    /// A run directory on object storage that could not be put there.
    #[error("{0}")]
    Store(String),
}

/// Loads and validates a spec with `--set` overrides.
pub fn load_plan(spec: &Path, set: &[String]) -> Result<Plan, SpecErrors> {
    load_plan_mirrored(spec, set).map(|(plan, _)| plan)
}

/// [`load_plan`], and for a run directory on object storage (`run_dir: s3://…`) its local
/// working copy, pulled from the store before the spec is validated (a resumed run reads its
/// checkpoints there); the plan's run directory is that copy.
pub fn load_plan_mirrored(
    spec: &Path,
    set: &[String],
) -> Result<(Plan, Option<pipeline::storage::RunMirror>), SpecErrors> {
    let registry = stages::registry();
    let mut spec = pipeline::load(spec, set)?;
    let mut mirror = None;
    if pipeline::storage::is_remote(&spec.run_dir) {
        let m = pipeline::storage::RunMirror::new(&spec.run_dir);
        match m.pull() {
            Ok(_) => {
                spec.run_dir = m.local.clone();
                mirror = Some(m);
            }
            Err(e) => {
                let err = spec.locator.error(
                    "run_dir",
                    format!(
                        "cannot read the run directory {}: {e}",
                        spec.run_dir.display()
                    ),
                );
                spec.errors.push(err);
            }
        }
    }
    if let Err(msg) = stages::dist::DistSpec::from_value(spec.distributed.as_ref()) {
        let (path, what) = msg
            .split_once(": ")
            .unwrap_or(("distributed", msg.as_str()));
        let e = spec.locator.error(path, what);
        spec.errors.push(e);
    }
    pipeline::validate(spec, &registry).map(|plan| (plan, mirror))
}

/// Seconds between two pushes of a run directory on object storage while it runs
/// (`EHMAM_SYNC_S`, default 30).
fn sync_every() -> std::time::Duration {
    let s = std::env::var("EHMAM_SYNC_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(30.0);
    std::time::Duration::from_secs_f64(s)
}

/// `ehmam run`: validates, then runs with Ctrl-C stopping every stage cleanly.
pub fn run_spec(
    spec: &Path,
    set: &[String],
    force: bool,
    quiet: bool,
) -> Result<RunSummary, RunsError> {
    // The spec validates before anything is moved; with --force a run of another spec in the
    // run directory is then moved aside and the spec validated again (the first validation may
    // have read the old run's checkpoints).
    let (mut plan, mut mirror) = load_plan_mirrored(spec, set).map_err(RunsError::Spec)?;
    if force && pipeline::claim_run_dir(&plan)?.is_some() {
        (plan, mirror) = load_plan_mirrored(spec, set).map_err(RunsError::Spec)?;
    }
    let cancel = CancelToken::new();
    {
        let c = cancel.clone();
        ctrlc::set_handler(move || {
            second_interrupt_exits();
            eprintln!("\nstopping (Ctrl-C; press again to quit at once)…");
            c.interrupt();
        })
        .map_err(|e| RunsError::Signal(e.to_string()))?;
    }
    let Some(mirror) = mirror else {
        return Ok(pipeline::run(plan, &RunOptions { force, quiet }, &cancel)?);
    };
    // A run directory on object storage: pushed every `EHMAM_SYNC_S` while the run goes on,
    // and once more at its end (finished, failed or stopped).
    let every = sync_every();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let result = std::thread::scope(|s| {
        let m = &mirror;
        let pusher = s.spawn(move || -> std::io::Result<()> {
            loop {
                match done_rx.recv_timeout(every) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        m.push()?;
                    }
                    _ => return Ok(()),
                }
            }
        });
        let r = pipeline::run(plan, &RunOptions { force, quiet }, &cancel);
        let _ = done_tx.send(());
        let pushed = pusher
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the push thread panicked")));
        (r, pushed)
    });
    let (r, pushed) = result;
    let last = mirror.push();
    let url = mirror.url.display();
    match (r, pushed.and(last.map(|_| ()))) {
        (Ok(summary), Ok(())) => {
            if !quiet {
                eprintln!("run directory {url} (worked on in {})", mirror.local.display());
            }
            Ok(summary)
        }
        (Ok(_), Err(e)) => Err(RunsError::Store(format!(
            "the run finished in {} but putting it to {url} failed: {e}; rerun the same command to put it there (the run is not repeated)",
            mirror.local.display()
        ))),
        (Err(e), push) => {
            if let Err(pe) = push {
                eprintln!("(and putting the run directory to {url} failed: {pe})");
            }
            Err(e.into())
        }
    }
}

/// What `ehmam sweep` asks for.
pub struct SweepOptions<'a> {
    pub specs: &'a [PathBuf],
    pub grid: &'a [String],
    pub set: &'a [String],
    pub out: &'a Path,
    pub report: bool,
    pub force: bool,
    pub quiet: bool,
    /// Fine-tune every run of the grid with this spec (its `finetune.ctc` stage's `init` set to
    /// the run), right after the run.
    pub finetune: Option<&'a Path>,
    /// Overrides of the fine-tuning spec.
    pub finetune_set: &'a [String],
}

/// How a sweep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepOutcome {
    /// Every run ran or was finished before.
    Done,
    /// A run failed.
    Failed,
    /// Ctrl-C stopped the sweep.
    Interrupted,
}

/// `ehmam sweep`: every run validated first (any error refuses the whole sweep), then run one by
/// one, each with its own cancel token; a summary table at the end.
pub fn run_sweep(o: &SweepOptions) -> Result<SweepOutcome, RunsError> {
    if pipeline::storage::is_remote(o.out) {
        return Err(RunsError::Store(format!(
            "--out {}: a sweep writes its runs into a local directory (object storage is for stores and for the run directory of `ehmam run`)",
            o.out.display()
        )));
    }
    let axes = o
        .grid
        .iter()
        .map(|g| sweep::parse_axis(g))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut runs = sweep::plan(o.specs, &axes, o.set, o.out)?;
    if let Some(ft) = o.finetune {
        runs = sweep::chain_finetune(runs, ft, o.finetune_set, o.out)?;
    }
    let plans = validate_all(&runs)?;
    // One sweep at a time writes OUT (its summary, its report); each run also locks its own
    // run directory.
    let _lock = pipeline::lock_dir(o.out, "sweep").map_err(pipeline::RunError::from)?;
    // Each run gets its own cancel token (a failed run cancels its own graph only); Ctrl-C
    // interrupts the current run and stops the sweep.
    let stop = Arc::new(AtomicBool::new(false));
    let current = Arc::new(Mutex::new(CancelToken::new()));
    {
        let (stop, current) = (stop.clone(), current.clone());
        ctrlc::set_handler(move || {
            second_interrupt_exits();
            eprintln!("\nstopping the sweep (Ctrl-C; press again to quit at once)…");
            stop.store(true, Ordering::SeqCst);
            if let Ok(c) = current.lock() {
                c.interrupt();
            }
        })
        .map_err(|e| RunsError::Signal(e.to_string()))?;
    }
    let mut outcome: Vec<(SweepRun, String)> = Vec::new();
    let n = runs.len();
    for (i, (r, plan)) in runs.iter().zip(plans).enumerate() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let plan = match (plan, &r.after) {
            (Some(p), _) => p,
            (None, Some((pre, _))) => {
                // A fine-tuning validates once its pre-training has a checkpoint.
                let pre_ok = outcome
                    .get(*pre)
                    .is_some_and(|(_, w)| !w.starts_with("failed") && !w.starts_with("not run"));
                if !pre_ok {
                    eprintln!(
                        "[{}/{n}] {}: not run (its pre-training did not finish)",
                        i + 1,
                        r.name
                    );
                    outcome.push((r.clone(), "not run (pre-training failed)".to_string()));
                    continue;
                }
                match load_plan(&r.spec, &r.sets) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{} ({}):\n{e}", r.name, r.spec.display());
                        outcome.push((
                            r.clone(),
                            format!("failed: the spec does not validate ({} errors)", e.0.len()),
                        ));
                        continue;
                    }
                }
            }
            (None, None) => {
                outcome.push((r.clone(), "failed: not validated".to_string()));
                continue;
            }
        };
        if sweep::is_finished(r, &plan.spec.resolved) {
            eprintln!("[{}/{n}] {}: finished earlier, skipped", i + 1, r.name);
            outcome.push((r.clone(), "skipped (finished)".to_string()));
            continue;
        }
        let cancel = CancelToken::new();
        if let Ok(mut c) = current.lock() {
            *c = cancel.clone();
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        eprintln!(
            "[{}/{n}] {}: running {} into {}",
            i + 1,
            r.name,
            r.spec.display(),
            r.run_dir.display()
        );
        let result = run_one(r, plan, o, &cancel);
        if let Err(e) = &result {
            eprintln!("{}: {e}", r.name);
        }
        outcome.push((r.clone(), result.unwrap_or_else(|e| format!("failed: {e}"))));
        if cancel.was_interrupted() {
            break;
        }
    }
    let outcome = summarize_sweep(&outcome, n, o)?;
    Ok(if stop.load(Ordering::SeqCst) {
        SweepOutcome::Interrupted
    } else {
        outcome
    })
}

/// Every run of a sweep validated before any starts; any error refuses the whole sweep. A
/// chained fine-tuning whose pre-training has no checkpoint yet is validated with every check
/// but that of its `init` (`None`: validated again when its turn comes).
fn validate_all(runs: &[SweepRun]) -> Result<Vec<Option<Plan>>, RunsError> {
    let mut plans = Vec::new();
    let mut bad = false;
    for r in runs {
        match load_plan(&r.spec, &r.sets) {
            Ok(p) => plans.push(Some(p)),
            Err(e) => {
                let only_init = r.after.as_ref().is_some_and(|(_, init)| {
                    !e.0.is_empty() && e.0.iter().all(|x| x.path == *init)
                });
                if only_init {
                    plans.push(None);
                    continue;
                }
                eprintln!("{} ({}):\n{e}", r.name, r.spec.display());
                bad = true;
            }
        }
    }
    if bad {
        return Err(RunsError::Spec(SpecErrors(Vec::new())));
    }
    Ok(plans)
}

/// Runs one run of a sweep; `Ok` says how it went.
fn run_one(
    r: &SweepRun,
    mut plan: Plan,
    o: &SweepOptions,
    cancel: &CancelToken,
) -> Result<String, RunsError> {
    if o.force {
        // Move a run of another spec aside first, then validate again (validation reads the
        // run directory's checkpoints).
        if pipeline::claim_run_dir(&plan)?.is_some() {
            plan = load_plan(&r.spec, &r.sets).map_err(RunsError::Spec)?;
        }
    }
    // Without --force a run directory that holds another spec's run is refused (as `ehmam run`
    // does), never silently continued from that run's checkpoints.
    let s = pipeline::run(
        plan,
        &RunOptions {
            force: o.force,
            quiet: o.quiet,
        },
        cancel,
    )?;
    Ok(format!("ran ({:.0} s)", s.wall_s))
}

/// The sweep's table, `summary.md` and, if asked, its report.
fn summarize_sweep(
    outcome: &[(SweepRun, String)],
    n: usize,
    o: &SweepOptions,
) -> Result<SweepOutcome, RunsError> {
    let dirs: Vec<PathBuf> = outcome
        .iter()
        .map(|(r, _)| r.run_dir.clone())
        .filter(|d| d.join("spec.yaml").exists())
        .collect();
    println!("\nsweep of {n} runs in {}:\n", o.out.display());
    for (r, what) in outcome {
        println!("  {:<40} {what}", r.name);
    }
    if !dirs.is_empty() {
        let split = report::split_runs(&dirs, &report::run_labels(&dirs), 0.1)?;
        let mut md = report::summary_markdown(&split.rows);
        if !split.finetune.is_empty() {
            md.push_str(&report::finetune_markdown(&split.finetune, &split.rows));
        }
        println!("\n{md}");
        let _ = std::fs::create_dir_all(o.out);
        let _ = std::fs::write(o.out.join("summary.md"), md);
        if o.report {
            let opts = report::ReportOptions {
                out: o.out.join("report"),
                ..Default::default()
            };
            for f in report::report(&dirs, &opts)? {
                println!("{}", f.display());
            }
        }
    }
    let failed = outcome.iter().any(|(_, what)| what.starts_with("failed")) || outcome.len() < n;
    Ok(if failed {
        SweepOutcome::Failed
    } else {
        SweepOutcome::Done
    })
}

/// A second Ctrl-C quits at once (exit status 130), for a stage stuck in a long computation.
/// Every output is written to a temporary name and renamed when complete, and `run.json` still
/// says `running`, so nothing left behind reads as finished.
pub fn second_interrupt_exits() {
    static PRESSED: AtomicBool = AtomicBool::new(false);
    if PRESSED.swap(true, Ordering::SeqCst) {
        eprintln!("\nquitting (second Ctrl-C)");
        std::process::exit(130);
    }
}
