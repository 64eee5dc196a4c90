//! `ehmam`: the command line. A thin layer that registers the stages and calls the engine.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use lab::runs::{RunsError, SweepOptions, SweepOutcome};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ehmam",
    version,
    about = "Dataflow pipeline for self-supervised speech pre-training with EH-MAM"
)]
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
        /// Output format: table, csv or json (csv and json stream the result as it comes; json
        /// writes NaN and infinities as "NaN", "Infinity", "-Infinity", SQL NULL as null).
        #[arg(long, default_value = "table")]
        format: String,
        /// Memory the query may hold: a size (512M, 2G) or a share of physical memory (25%);
        /// default a quarter of physical memory. A query that needs more fails (no spilling).
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
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
    /// OUT/encoder.safetensors and OUT/config.json, from the run's newest complete checkpoint.
    Export {
        /// The run directory (runs/NAME).
        run_dir: PathBuf,
        /// Output directory (new or empty, unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Export the EMA teacher's encoder instead of the student's.
        #[arg(long)]
        teacher: bool,
        /// Write into a non-empty output directory (replaces encoder.safetensors and
        /// config.json there; nothing else is touched).
        #[arg(long)]
        force: bool,
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

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { spec, set } => validate(&spec, &set),
        Command::Run {
            spec,
            set,
            force,
            quiet,
        } => run(&spec, &set, force, quiet),
        Command::Export {
            run_dir,
            out,
            teacher,
            force,
        } => export(&run_dir, &out, teacher, force),
        Command::Report {
            run_dirs,
            out,
            no_probe,
            no_masking,
        } => {
            let masking = !no_probe && !no_masking;
            let opts = lab::report::ReportOptions {
                out,
                probe: !no_probe,
                masking,
                ..Default::default()
            };
            print_paths(lab::report::report(&run_dirs, &opts)?)
        }
        Command::Sweep {
            specs,
            grid,
            set,
            out,
            report,
            force,
            quiet,
        } => {
            let o = SweepOptions {
                specs: &specs,
                grid: &grid,
                set: &set,
                out: &out,
                report,
                force,
                quiet,
            };
            match lab::runs::run_sweep(&o) {
                Ok(SweepOutcome::Done) => Ok(ExitCode::SUCCESS),
                Ok(SweepOutcome::Failed) => Ok(ExitCode::FAILURE),
                Ok(SweepOutcome::Interrupted) => Ok(ExitCode::from(INTERRUPTED)),
                Err(RunsError::Spec(_)) => Ok(ExitCode::from(2)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Plot {
            run_dirs,
            out,
            utt,
            step,
        } => print_paths(lab::plot::plot(
            &run_dirs,
            &lab::plot::PlotOptions { out, utt, step },
        )?),
        Command::Stages => {
            print!("{}", stages::registry().describe());
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            mut args,
            format,
            memory,
        } => {
            let format: lab::sql::Format = format.parse()?;
            let memory = match memory {
                Some(m) => lab::sql::parse_memory(&m)?,
                None => lab::sql::default_memory(),
            };
            let Some(sql) = args.pop() else {
                bail!("usage: ehmam query RUN_DIR... \"SQL\"")
            };
            let dirs: Vec<PathBuf> = args.into_iter().map(PathBuf::from).collect();
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            lab::sql::query_to(&dirs, &sql, format, memory, &mut out)?;
            // Flushed by query_to (a reader that went away is no error).
            let _ = std::io::Write::flush(&mut out);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_paths(files: Vec<PathBuf>) -> Result<ExitCode> {
    for f in files {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `ehmam validate`: every error (exit status 2), or the plan's size and links.
fn validate(spec: &Path, set: &[String]) -> Result<ExitCode> {
    match lab::runs::load_plan(spec, set) {
        Ok(plan) => {
            println!(
                "{}: ok ({} stages, run directory {})",
                spec.display(),
                plan.nodes.len(),
                plan.spec.run_dir.display()
            );
            for l in plan.links() {
                let from = l.provider.as_deref().unwrap_or("(nobody)");
                let to = if l.readers.is_empty() {
                    "(nobody)".to_string()
                } else {
                    l.readers.join(", ")
                };
                println!("  link {}: {from} → {to}", l.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errs) => {
            eprint!("{errs}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `ehmam run`.
fn run(spec: &Path, set: &[String], force: bool, quiet: bool) -> Result<ExitCode> {
    match lab::runs::run_spec(spec, set, force, quiet) {
        Ok(summary) => {
            if !quiet {
                let dir = summary.run_dir.display();
                eprintln!("done in {:.1} s; run directory {dir}", summary.wall_s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(RunsError::Spec(errs)) => {
            eprint!("{errs}");
            Ok(ExitCode::from(2))
        }
        Err(RunsError::Run(e @ pipeline::RunError::Interrupted)) => {
            // The shell's convention for a command ended by SIGINT.
            eprintln!("{e}");
            Ok(ExitCode::from(INTERRUPTED))
        }
        Err(e) => Err(e.into()),
    }
}

/// Exit status of a run or sweep stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
const INTERRUPTED: u8 = 130;

/// `ehmam export`.
fn export(run_dir: &Path, out: &Path, teacher: bool, force: bool) -> Result<ExitCode> {
    let exported = stages::train::export(run_dir, out, teacher, force)?;
    for n in &exported.notes {
        eprintln!("warning: {n}");
    }
    let cfg = exported.config;
    let parameters: usize = stages::model::shapes_of(&cfg.model)
        .iter()
        .filter(|(n, _)| cfg.tensors.contains(n))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!(
        "exported the {} encoder of {} at step {} ({} tensors, {parameters} parameters) to {}",
        cfg.weights,
        run_dir.display(),
        cfg.step,
        cfg.tensors.len(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
