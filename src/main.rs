//! `ehmam`: the command line. A thin layer that registers the stages and calls the engine.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use lab::runs::{RunsError, SweepOptions, SweepOutcome};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod distributed;

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

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Hf,
    Native,
}

#[derive(Subcommand)]
enum ShardsCommand {
    /// Make one store of a partitioned prep: writes DIR/index.json over DIR/part-iiiii-of-NNNNN
    /// (the shards stay where they are), in the order of the whole input. Refuses a store where
    /// a partition is missing, unfinished, duplicated or made by another spec or input listing.
    Merge {
        /// The `dir` of the prep's shards.write stage.
        dir: PathBuf,
        /// Also check every shard's BLAKE3 against its index (reads every byte).
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Shard stores: `ehmam shards merge DIR` after a partitioned prep.
    Shards {
        #[command(subcommand)]
        command: ShardsCommand,
    },
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
        /// Fine-tune every run of the grid with this spec (e.g. specs/finetune/demo.yaml) right
        /// after it: its finetune.ctc stage's `init` is set to the run, into OUT/<run>-<spec name>.
        #[arg(long, value_name = "SPEC")]
        finetune: Option<PathBuf>,
        /// Override of the fine-tuning spec: PATH=VALUE (as --set for the grid's specs).
        #[arg(long = "finetune-set", value_name = "PATH=VALUE")]
        finetune_set: Vec<String>,
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
    /// Time EH-MAM updates of a model on a device (random input, teacher → mask → student in
    /// series): ms per update and its phases, updates/s, audio s/s, model FLOPs and, with
    /// --peak-tflops, the model FLOPs utilisation; device memory in use on GPUs.
    BenchUpdate {
        /// The model block, as in a spec (a YAML flow mapping), e.g. "{preset: base, dtype: bf16}".
        #[arg(long, default_value = "{preset: tiny}")]
        model: String,
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Utterances per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Seconds of audio per utterance (50 fbank frames or 16,000 samples a second).
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        /// Multi-mask: the student sees each utterance this many times (clone_batch).
        #[arg(long, default_value_t = 1)]
        clones: usize,
        /// Timed updates.
        #[arg(long, default_value_t = 20)]
        updates: u64,
        /// Untimed updates first.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// The device's peak dense TFLOP/s to report model FLOPs utilisation against (H100 and
        /// H200 SXM: 989 for bf16).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Time CTC fine-tuning updates (finetune.ctc's, the encoder not frozen) instead of
        /// pre-training ones.
        #[arg(long)]
        finetune: bool,
        /// Print one JSON line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Export the trained encoder (front-end + transformer) of a run's newest complete checkpoint
    /// for downstream use: `--format hf` (default) a directory that Hugging Face's
    /// AutoModel.from_pretrained(OUT, trust_remote_code=True) loads and s3prl takes as an upstream;
    /// `--format native` OUT/encoder.safetensors and OUT/config.json for ehmam.
    Export {
        /// The run directory (runs/NAME).
        run_dir: PathBuf,
        /// Output directory (new or empty, unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Export the EMA teacher's encoder instead of the student's.
        #[arg(long)]
        teacher: bool,
        /// hf (PyTorch module, Hugging Face and s3prl) or native (ehmam's own layout).
        #[arg(long, value_enum, default_value = "hf")]
        format: ExportFormat,
        /// For an fbank model trained on stored features (features.read): the spec whose
        /// features.fbank stage computed them (the run's own spec otherwise).
        #[arg(long)]
        fbank_spec: Option<PathBuf>,
        /// Write into a non-empty output directory (replaces the export's own files there:
        /// model.safetensors, config.json, the Python files, or for native encoder.safetensors
        /// and config.json; nothing else is touched).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            match stages::dist::current() {
                Some(d) => eprintln!("error: rank {}: {e:#}", d.rank),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Shards {
            command: ShardsCommand::Merge { dir, verify },
        } => {
            let m = stages::data::shards::merge_partitions(&dir, verify)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let what = if m.unchanged {
                "already merged, unchanged"
            } else {
                "merged"
            };
            println!(
                "{}: {what}: {} partitions, {} shards, {} inputs: {} utterances ({:.3} h), {} rejected",
                dir.display(),
                m.partitions,
                m.shards,
                m.inputs,
                m.rows,
                m.duration_s / 3600.0,
                m.rejects
            );
            Ok(ExitCode::SUCCESS)
        }
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
            format,
            fbank_spec,
            force,
        } => export(
            &local_run(run_dir)?,
            &out,
            teacher,
            force,
            format,
            fbank_spec.as_deref(),
        ),
        Command::BenchUpdate {
            model,
            device,
            batch,
            seconds,
            clones,
            updates,
            warmup,
            seed,
            peak_tflops,
            finetune,
            json,
        } => bench_update(
            &model,
            &device,
            (batch, seconds, clones),
            (warmup, updates),
            seed,
            peak_tflops,
            (finetune, json),
        ),
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
            print_paths(lab::report::report(&local_runs(run_dirs)?, &opts)?)
        }
        Command::Sweep {
            specs,
            grid,
            set,
            out,
            report,
            finetune,
            finetune_set,
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
                finetune: finetune.as_deref(),
                finetune_set: &finetune_set,
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
            &local_runs(run_dirs)?,
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
            // A run directory on object storage is read where it is (no local copy).
            let dirs: Vec<PathBuf> = args.into_iter().map(PathBuf::from).collect();
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            lab::sql::query_to(&dirs, &sql, format, memory, &mut out)?;
            // Flushed by query_to (a reader that went away is no error).
            let _ = std::io::Write::flush(&mut out);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A run directory as a local directory: one on object storage (`s3://…`) is brought into its
/// local copy first (what changed since the last time only).
fn local_run(dir: PathBuf) -> Result<PathBuf> {
    if !pipeline::storage::is_remote(&dir) {
        return Ok(dir);
    }
    let m = pipeline::storage::RunMirror::new(&dir);
    m.pull()
        .map_err(|e| anyhow::anyhow!("cannot read the run directory {}: {e}", dir.display()))?;
    Ok(m.local)
}

fn local_runs(dirs: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    dirs.into_iter().map(local_run).collect()
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
    // One rank of a data-parallel run (mpirun, srun, torchrun): rank r > 0 runs quietly in
    // RUN_DIR/rank-r; rank 0 reports.
    let rank = distributed::setup(spec, set, force)?;
    let mut set = set.to_vec();
    let mut quiet = quiet;
    if let Some(r) = &rank {
        set.extend(r.set.iter().cloned());
        quiet |= r.rank > 0;
        if r.rank == 0 && !quiet {
            eprintln!(
                "data parallel: {} ranks; rank 0 writes the checkpoints and logs, rank r > 0 its telemetry in RUN_DIR/rank-r",
                r.world
            );
        }
    }
    match lab::runs::run_spec(spec, &set, force, quiet) {
        Ok(summary) => {
            if !quiet {
                let dir = summary.run_dir.display();
                eprintln!("done in {:.1} s; run directory {dir}", summary.wall_s);
            }
            if rank.is_some() {
                stages::dist::finish();
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
fn bench_update(
    model: &str,
    device: &str,
    (batch, seconds, clones): (usize, f64, usize),
    (warmup, updates): (u64, u64),
    seed: u64,
    peak_tflops: Option<f64>,
    (finetune, json): (bool, bool),
) -> Result<ExitCode> {
    use stages::model::{FrontendKind, ModelConfig};
    let v: serde_yaml::Value =
        serde_yaml::from_str(model).map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    let cfg = ModelConfig::from_spec(Some(&v)).map_err(|errs| {
        anyhow::anyhow!(
            "--model: {}",
            errs.iter()
                .map(|(p, m)| format!("{p}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    if batch == 0 || !(seconds > 0.0) || updates == 0 {
        bail!("--batch, --seconds and --updates must be positive");
    }
    let frame_rate = match cfg.frontend.kind {
        FrontendKind::Fbank => 50.0,
        FrontendKind::Cnn => 16000.0,
    };
    let frames = (seconds * frame_rate).round() as usize;
    let dev = stages::train::device(device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let spec = stages::train::bench::BenchSpec {
        cfg,
        device: dev,
        batch,
        frames,
        frame_rate,
        warmup,
        updates,
        seed,
        clones: clones.max(1),
    };
    let bar = indicatif::ProgressBar::new(warmup + updates);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    if finetune {
        let r = stages::finetune::bench::run(&spec, |i| bar.set_position(i))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        bar.finish_and_clear();
        if json {
            println!("{}", serde_json::to_value(&r)?);
        } else {
            println!(
                "CTC fine-tuning of {} ({} parameters with the head) in f32 on {}: batch {} × {:.2} s, {} labels each, {} timed updates after {warmup}",
                r.preset, r.parameters, r.device, r.batch, seconds, r.labels_per_utterance, r.updates
            );
            println!(
                "  {:.2} ms/update  ({:.2} updates/s, {:.1} audio s/s); loss {:.2} → {:.2}",
                r.ms_per_update, r.updates_per_s, r.audio_s_per_s, r.first_loss, r.last_loss
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let r = stages::train::bench::run(&spec, |i| bar.set_position(i))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    bar.finish_and_clear();
    let mfu = peak_tflops.map(|p| r.tflops_per_s / p);
    if json {
        let mut o = serde_json::to_value(&r)?;
        o["mfu"] = serde_json::json!(mfu);
        o["peak_tflops"] = serde_json::json!(peak_tflops);
        println!("{o}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} ({} parameters) in {} on {}: batch {} × {:.2} s{} ({} model frames, {:.1}% masked), {} timed updates after {warmup}",
        r.preset, r.parameters, r.dtype, r.device, r.batch, seconds,
        if r.clones > 1 { format!(", {} masks each", r.clones) } else { String::new() },
        r.model_frames, 100.0 * r.masked_frac, r.updates
    );
    println!(
        "  {:.2} ms/update  ({:.2} updates/s, {:.1} audio s/s)",
        r.ms_per_update, r.updates_per_s, r.audio_s_per_s
    );
    let names = [
        "teacher",
        "mask",
        "forward",
        "backward",
        "optimiser",
        "metrics",
    ];
    let phases: Vec<String> = names
        .iter()
        .zip(r.phases_ms)
        .map(|(n, v)| format!("{n} {v:.2}"))
        .collect();
    println!("  phases (ms): {}", phases.join(", "));
    println!(
        "  model FLOPs {:.3e}/update, {:.2} TFLOP/s{}",
        r.flops_per_update,
        r.tflops_per_s,
        match mfu {
            Some(m) => format!(
                ", MFU {:.1}% of {} TFLOP/s",
                100.0 * m,
                peak_tflops.unwrap_or(0.0)
            ),
            None => String::new(),
        }
    );
    if let Some(m) = r.peak_mem_bytes {
        println!(
            "  device memory in use, highest: {:.2} GiB",
            m as f64 / 1073741824.0
        );
    }
    println!(
        "  loss {:.4} (first) → {:.4} (last)",
        r.first_loss, r.last_loss
    );
    Ok(ExitCode::SUCCESS)
}

fn export(
    run_dir: &Path,
    out: &Path,
    teacher: bool,
    force: bool,
    format: ExportFormat,
    fbank_spec: Option<&Path>,
) -> Result<ExitCode> {
    let exported = match format {
        ExportFormat::Native => stages::train::export(run_dir, out, teacher, force)?,
        ExportFormat::Hf => {
            stages::train::export_hf::export_hf(run_dir, out, teacher, force, fbank_spec)?
        }
    };
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
        "exported the {} encoder of {} at step {} ({} tensors, {parameters} parameters) to {} ({})",
        cfg.weights,
        run_dir.display(),
        cfg.step,
        cfg.tensors.len(),
        out.display(),
        match format {
            ExportFormat::Hf => "Hugging Face: AutoModel.from_pretrained(DIR, trust_remote_code=True); s3prl: s3prl_upstream.py",
            ExportFormat::Native => "ehmam's layout",
        }
    );
    Ok(ExitCode::SUCCESS)
}
