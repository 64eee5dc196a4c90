//! `ehmam`: the command line. A thin layer that registers the stages and calls the engine.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

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
                    eprintln!("\nstopping (Ctrl-C)…");
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
