//! `ehmam`: the command line. A thin layer that registers the stages and calls the engine.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Parser)]
#[command(name = "ehmam", version, about = "Dataflow pipeline for self-supervised speech pre-training with EH-MAM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline spec.
    Run {
        /// The YAML spec.
        spec: PathBuf,
        /// Override a spec value: PATH=VALUE, PATH dotted (stages.mask.with.mask_prob=0.6), VALUE YAML.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
        /// Run even if the run directory holds a run of a different spec.
        #[arg(long)]
        force: bool,
        /// No progress and no telemetry table.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check a spec without running it: every error, non-zero exit on any.
    Validate {
        spec: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
    },
    /// List every stage kind with its ports and parameters.
    Stages,
    /// SQL over the tables of one or more run directories: ehmam query RUN_DIR... "SQL".
    Query {
        /// Run directories, then the SQL statement.
        #[arg(required = true, num_args = 2.., value_name = "RUN_DIR... SQL")]
        args: Vec<String>,
        /// Output format: table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// PNG figures from the tables of one or more runs: losses.png, health.png and, per run, one
    /// utterance's frames (predicted loss, masked and hard frames, the input under them).
    Plot {
        /// Run directories.
        #[arg(required = true)]
        run_dirs: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Utterance of the frame figure (default: the first logged at the chosen step).
        #[arg(long)]
        utt: Option<String>,
        /// Step of the frame figure (default: the latest step with logged frames).
        #[arg(long)]
        step: Option<u64>,
    },
    /// Run a grid of experiments: every SPEC with every combination of the --grid values, each
    /// into OUT/<name>-<key>=<value>…; finished runs are skipped on a rerun; a summary at the end.
    Sweep {
        /// Specs (e.g. specs/ablations/*.yaml).
        #[arg(required = true)]
        specs: Vec<PathBuf>,
        /// A grid axis: PATH=[V1, V2, …] (YAML), e.g. stages.student.with.alpha=[1, 0.5, 0.1, 0.05, 0.01].
        #[arg(long = "grid", value_name = "PATH=[V1, V2, …]")]
        grid: Vec<String>,
        /// Override applied to every run: PATH=VALUE.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
        /// Directory of the sweep's run directories.
        #[arg(long, default_value = "runs/sweep")]
        out: PathBuf,
        /// Also write `ehmam report` of the sweep's runs into OUT/report.
        #[arg(long)]
        report: bool,
        /// Run over run directories that hold a run of a different spec (as `ehmam run --force`:
        /// training continues from their checkpoints). Without it such runs are refused.
        #[arg(long)]
        force: bool,
        /// No progress and no telemetry tables.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Compare runs: OUT/report.md (summary, linear probe, masking analysis) and PNG figures.
    Report {
        /// Run directories.
        #[arg(required = true)]
        run_dirs: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Skip the linear probe and the masking analysis (tables and curves only).
        #[arg(long)]
        no_probe: bool,
        /// Skip the masking analysis only.
        #[arg(long)]
        no_masking: bool,
    },
    /// Export the trained encoder (front-end + transformer) of a run for downstream use:
    /// OUT/encoder.safetensors and OUT/config.json, from the run's last checkpoint.
    Export {
        /// The run directory (runs/NAME).
        run_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Export the EMA teacher's encoder instead of the student's.
        #[arg(long)]
        teacher: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_plan(spec: &PathBuf, set: &[String]) -> Result<pipeline::Plan, pipeline::SpecErrors> {
    let registry = stages::registry();
    let spec = pipeline::load(spec, set)?;
    pipeline::validate(spec, &registry)
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { spec, set } => match load_plan(&spec, &set) {
            Ok(plan) => {
                println!("{}: ok ({} stages, run directory {})", spec.display(), plan.nodes.len(), plan.spec.run_dir.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(errs) => {
                eprint!("{errs}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Run { spec, set, force, quiet } => {
            if force {
                // A run of another spec in the run directory is moved aside before validation
                // (which would otherwise read its checkpoints).
                if let Ok(s) = pipeline::load(&spec, &set) {
                    pipeline::runtime::claim_run_dir(&s)?;
                }
            }
            let plan = match load_plan(&spec, &set) {
                Ok(p) => p,
                Err(errs) => {
                    eprint!("{errs}");
                    return Ok(ExitCode::from(2));
                }
            };
            let cancel = pipeline::CancelToken::new();
            {
                let c = cancel.clone();
                ctrlc::set_handler(move || {
                    second_interrupt_exits();
                    eprintln!("\nstopping (Ctrl-C; press again to quit at once)…");
                    c.interrupt();
                })
                .context("cannot install the Ctrl-C handler")?;
            }
            let opts = pipeline::RunOptions { force, quiet };
            let summary = pipeline::run(plan, &opts, &cancel)?;
            if !quiet {
                eprintln!("done in {:.1} s; run directory {}", summary.wall_s, summary.run_dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { run_dir, out, teacher } => {
            let cfg = stages::train::export(&run_dir, &out, teacher)?;
            println!(
                "exported the {} encoder of {} at step {} ({} tensors, {} parameters) to {}",
                cfg.weights,
                run_dir.display(),
                cfg.step,
                cfg.tensors.len(),
                stages::model::shapes_of(&cfg.model).iter().filter(|(n, _)| cfg.tensors.contains(n)).map(|(_, s)| s.iter().product::<usize>()).sum::<usize>(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { run_dirs, out, no_probe, no_masking } => {
            let opts = stages::report::ReportOptions { out, probe: !no_probe, masking: !no_probe && !no_masking, ..Default::default() };
            for f in stages::report::report(&run_dirs, &opts)? {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweep { specs, grid, set, out, report, force, quiet } => sweep(&specs, &grid, &set, &out, report, force, quiet),
        Command::Plot { run_dirs, out, utt, step } => {
            let files = stages::plot::plot(&run_dirs, &stages::plot::PlotOptions { out, utt, step })?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stages => {
            print!("{}", stages::registry().describe());
            Ok(ExitCode::SUCCESS)
        }
        Command::Query { mut args, format } => {
            let format: stages::sql::Format = format.parse().map_err(anyhow::Error::msg)?;
            let Some(sql) = args.pop() else { bail!("usage: ehmam query RUN_DIR... \"SQL\"") };
            let dirs: Vec<PathBuf> = args.into_iter().map(PathBuf::from).collect();
            let out = stages::sql::query(&dirs, &sql, format)?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `ehmam sweep`.
#[allow(clippy::too_many_arguments)]
fn sweep(specs: &[PathBuf], grid: &[String], set: &[String], out: &std::path::Path, report: bool, force: bool, quiet: bool) -> Result<ExitCode> {
    let axes = grid.iter().map(|g| stages::sweep::parse_axis(g)).collect::<std::result::Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    let runs = stages::sweep::plan(specs, &axes, set, out).map_err(anyhow::Error::msg)?;
    // Every run is validated before any starts.
    let registry = stages::registry();
    let validate = |r: &stages::sweep::SweepRun| pipeline::load(&r.spec, &r.sets).map_err(|e| e.to_string()).and_then(|s| pipeline::validate(s, &registry).map_err(|e| e.to_string()));
    let mut plans = Vec::new();
    let mut bad = false;
    for r in &runs {
        match validate(r) {
            Ok(p) => plans.push(Some(p)),
            Err(e) => {
                eprintln!("{} ({}):\n{e}", r.name, r.spec.display());
                bad = true;
                plans.push(None);
            }
        }
    }
    if bad {
        return Ok(ExitCode::from(2));
    }
    // Each run gets its own cancel token (a failed run cancels its own graph only); Ctrl-C
    // interrupts the current run and stops the sweep.
    let stop = Arc::new(AtomicBool::new(false));
    let current = Arc::new(Mutex::new(pipeline::CancelToken::new()));
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
        .context("cannot install the Ctrl-C handler")?;
    }
    let mut outcome = Vec::new();
    let n = runs.len();
    for (i, (r, p)) in runs.iter().zip(plans).enumerate() {
        let Some(plan) = p else { continue };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if stages::sweep::is_finished(r, &plan.spec.resolved) {
            eprintln!("[{}/{n}] {}: finished earlier, skipped", i + 1, r.name);
            outcome.push((r.clone(), "skipped (finished)".to_string()));
            continue;
        }
        let cancel = pipeline::CancelToken::new();
        if let Ok(mut c) = current.lock() {
            *c = cancel.clone();
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut plan = plan;
        if force {
            // Move a run of another spec aside first, then validate again (validation reads the
            // run directory's checkpoints).
            match pipeline::runtime::claim_run_dir(&plan.spec).map_err(|e| e.to_string()).and_then(|moved| moved.map(|_| validate(r)).transpose()) {
                Ok(None) => {}
                Ok(Some(p)) => plan = p,
                Err(e) => {
                    eprintln!("{}: {e}", r.name);
                    outcome.push((r.clone(), format!("failed: {e}")));
                    continue;
                }
            }
        }
        eprintln!("[{}/{n}] {}: running {} into {}", i + 1, r.name, r.spec.display(), r.run_dir.display());
        // Without --force a run directory that holds another spec's run is refused (as `ehmam run`
        // does), never silently continued from that run's checkpoints.
        match pipeline::run(plan, &pipeline::RunOptions { force, quiet }, &cancel) {
            Ok(s) => outcome.push((r.clone(), format!("ran ({:.0} s)", s.wall_s))),
            Err(e) => {
                eprintln!("{}: {e}", r.name);
                outcome.push((r.clone(), format!("failed: {e}")));
                if cancel.was_interrupted() {
                    break;
                }
            }
        }
    }
    let dirs: Vec<PathBuf> = outcome.iter().map(|(r, _)| r.run_dir.clone()).filter(|d| d.join("spec.yaml").exists()).collect();
    println!("\nsweep of {n} runs in {}:\n", out.display());
    for (r, o) in &outcome {
        println!("  {:<40} {o}", r.name);
    }
    if !dirs.is_empty() {
        let rows = stages::report::summarize(&dirs, 0.1)?;
        println!("\n{}", stages::report::summary_markdown(&rows));
        let _ = std::fs::create_dir_all(out);
        let _ = std::fs::write(out.join("summary.md"), stages::report::summary_markdown(&rows));
        if report {
            let opts = stages::report::ReportOptions { out: out.join("report"), ..Default::default() };
            for f in stages::report::report(&dirs, &opts)? {
                println!("{}", f.display());
            }
        }
    }
    let failed = outcome.iter().any(|(_, o)| o.starts_with("failed")) || outcome.len() < n;
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// A second Ctrl-C quits at once (exit status 130), for a stage stuck in a long computation.
/// Every output is written to a temporary name and renamed when complete, and `run.json` still
/// says `running`, so nothing left behind reads as finished.
fn second_interrupt_exits() {
    static PRESSED: AtomicBool = AtomicBool::new(false);
    if PRESSED.swap(true, Ordering::SeqCst) {
        eprintln!("\nquitting (second Ctrl-C)");
        std::process::exit(130);
    }
}
