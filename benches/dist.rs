//! Data parallel on CPU (`cargo bench --bench dist --features mpi`): the tiny model on the demo
//! shards, the same total batch per update (two batches of 16 s) as one process with
//! `update_freq: 2` (1 and 2 threads) and as two MPI ranks of one thread each
//! (`mpirun -np 2`, `update_freq: 1`). Prints updates/s and audio s/s in the steady state (the
//! difference of a 10-update and a 60-update run, so start-up is not counted) and the share of
//! an update the ranks spend in the gradient all-reduce.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const SHORT: u64 = 10;
const LONG: u64 = 60;

fn spec(dir: &Path, shards: &Path) -> PathBuf {
    let text = format!(
        r#"name: dist-bench
seed: 5
device: cpu
model: {{ preset: tiny }}
stages:
  shards: {{ kind: shards.read, with: {{ dir: "{}", epochs: 1000, shuffle: true }} }}
  fbank: {{ kind: features.fbank, from: shards, with: {{ num_mel_bins: 80, normalize: utterance, stack: 2 }} }}
  batch: {{ kind: batch.by_duration, from: fbank, with: {{ max_seconds: 16, min_utt_seconds: 2, max_utt_seconds: 8 }} }}
  teacher: {{ kind: teacher, from: batch }}
  mask: {{ kind: mask.easy_to_hard, from: teacher, with: {{ mask_prob: 0.5, span: 5 }} }}
  student: {{ kind: student, from: mask, with: {{ max_steps: {LONG}, schedule_steps: {LONG}, checkpoint_every: 0, lr: 0.001 }} }}
  steps: {{ kind: log.steps, from: student.steps }}
"#,
        shards.display()
    );
    let p = dir.join("dist-bench.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

struct Setup {
    name: &'static str,
    ranks: usize,
    threads: usize,
    update_freq: u64,
}

/// Wall seconds of a run of `steps` updates, and rank 0's stderr.
fn run(exe: &Path, spec: &Path, run_dir: &Path, s: &Setup, steps: u64) -> (f64, String) {
    let _ = std::fs::remove_dir_all(run_dir);
    let args = [
        "run".to_string(),
        spec.display().to_string(),
        "--set".into(),
        format!("run_dir={}", run_dir.display()),
        "--set".into(),
        format!("stages.student.with.max_steps={steps}"),
        "--set".into(),
        format!("stages.student.with.update_freq={}", s.update_freq),
    ];
    let mut c = if s.ranks > 1 {
        let mut c = Command::new("mpirun");
        c.args([
            "--oversubscribe",
            "--bind-to",
            "none",
            "-np",
            &s.ranks.to_string(),
        ])
        .arg(exe)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        c
    } else {
        Command::new(exe)
    };
    c.args(&args)
        .env("CI", "true")
        .env("RAYON_NUM_THREADS", s.threads.to_string());
    let t0 = Instant::now();
    let o = c.output().expect("cannot start ehmam (or mpirun)");
    let wall = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{} failed:\n{err}", s.name);
    (wall, err)
}

/// Seconds of audio of updates `from..` in a run's step log.
fn audio_after(exe: &Path, run_dir: &Path, from: u64) -> f64 {
    let o = Command::new(exe)
        .args([
            "query",
            "--format",
            "csv",
            &run_dir.display().to_string(),
            &format!("SELECT sum(audio_s) FROM steps WHERE step >= {from}"),
        ])
        .output()
        .expect("ehmam query");
    let t = String::from_utf8_lossy(&o.stdout);
    t.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_ehmam"));
    let shards = root.join("data/shards/demo");
    let tmp = std::env::temp_dir().join("ehmam-bench-dist");
    std::fs::create_dir_all(&tmp).unwrap();
    let spec = spec(&tmp, &shards);
    let setups = [
        Setup {
            name: "1 process × 1 thread, update_freq 2",
            ranks: 1,
            threads: 1,
            update_freq: 2,
        },
        Setup {
            name: "1 process × 2 threads, update_freq 2",
            ranks: 1,
            threads: 2,
            update_freq: 2,
        },
        Setup {
            name: "2 MPI ranks × 1 thread, update_freq 1",
            ranks: 2,
            threads: 1,
            update_freq: 1,
        },
    ];
    println!(
        "data parallel, tiny model on CPU ({} cores), two 16 s batches per update, steady state of updates {SHORT}..{LONG}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<40} {:>10} {:>10} {:>12} {:>22}",
        "setup", "update ms", "updates/s", "audio s/s", "all-reduce (share)"
    );
    for s in &setups {
        let dir = tmp.join(format!("run-{}-{}", s.ranks, s.threads));
        let (t_short, _) = run(&exe, &spec, &dir, s, SHORT);
        let (t_long, err) = run(&exe, &spec, &dir, s, LONG);
        let per = (t_long - t_short) / (LONG - SHORT) as f64;
        let audio = audio_after(&exe, &dir, SHORT) / (LONG - SHORT) as f64;
        let share = err
            .lines()
            .find(|l| l.contains("rank 0 of") && l.contains("all-reduce"))
            .and_then(|l| {
                let a = l.split("all-reduce ").nth(1)?;
                let ms = a.split(" ms").next()?.to_string();
                let pct = l.rsplit('(').next()?.split('%').next()?.to_string();
                Some(format!("{ms} ms ({pct}%)"))
            })
            .unwrap_or_else(|| "—".into());
        println!(
            "{:<40} {:>10.1} {:>10.2} {:>12.1} {:>22}",
            s.name,
            per * 1e3,
            1.0 / per,
            audio / per,
            share
        );
    }
}
