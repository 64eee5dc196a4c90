// Training throughput of `specs/tiny.yaml` on CPU: updates/s and audio-seconds/s with 1 and 2
// compute threads (candle's CPU kernels, set through RAYON_NUM_THREADS in a child process), for
// the paper's exact schedule (`teacher.staleness: 0`: the teacher waits for the previous update's
// weights) and with the teacher one step ahead (`staleness: 1`), with the time split by stage from
// the telemetry. Then the data stages alone (shards.read → features.fbank → batch.by_duration) to
// show how far ahead of the student they run.
//
//   cargo bench --bench train                 (release build)
//   cargo run --example bench_train           (the same, in the test profile)
//   cargo bench --bench train -- STEPS        (updates per configuration; default 60)
//
// Steady state: the figures from the `steps` table skip the first 5 updates.
//
// Last, the `log.tensorboard` sink's own cost: 1,000 step records written (each point one write
// to the event file), in µs a record and as a share of the fastest update above (the issue's
// bound: under 1 %). `-- --sink-only` prints that line alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn run(yaml_path: &Path, sets: &[String]) -> pipeline::RunSummary {
    let spec = pipeline::load(yaml_path, sets).unwrap_or_else(|e| panic!("spec: {e}"));
    let plan =
        pipeline::validate(spec, &stages::registry()).unwrap_or_else(|e| panic!("plan: {e}"));
    pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .unwrap_or_else(|e| panic!("run: {e}"))
}

fn query(dir: &Path, sql: &str) -> Vec<Vec<String>> {
    let batches = lab::sql::query_batches(&[dir.to_path_buf()], sql).expect("query");
    let text = lab::sql::format_batches(&batches, lab::sql::Format::Csv).expect("format");
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// One configuration, in this process (the child).
fn child(root: &Path, shards: &Path, out: &Path, staleness: u32, steps: u64) {
    let _ = std::fs::remove_dir_all(out);
    let sets: Vec<String> = vec![
        format!("run_dir={}", out.display()),
        format!("stages.shards.with.dir={}", shards.display()),
        format!("stages.student.with.max_steps={steps}"),
        format!("stages.mask.with.ramp_updates={steps}"),
        "stages.student.with.checkpoint_every=0".into(),
        format!("stages.teacher.with.staleness={staleness}"),
    ];
    let t0 = Instant::now();
    let s = run(&root.join("specs/tiny.yaml"), &sets);
    let wall = t0.elapsed().as_secs_f64();
    let rows = query(out, "SELECT count(*), sum(audio_s), sum(step_ms), avg(frames), avg(utterances) FROM steps WHERE step >= 5");
    let r = &rows[0];
    let f = |i: usize| r[i].parse::<f64>().unwrap_or(f64::NAN);
    let (n, audio, step_ms, frames, utts) = (f(0), f(1), f(2), f(3), f(4));
    let stage = |name: &str| {
        s.stages
            .iter()
            .find(|x| x.stage == name)
            .cloned()
            .expect("stage")
    };
    let student = stage("student");
    let mask = stage("mask");
    let mut o = serde_json::json!({
        "wall_s": wall,
        "updates_per_s": n / (step_ms / 1e3),
        "steady_updates": n,
        "audio_s_per_s": audio / (step_ms / 1e3),
        "end_to_end_updates_per_s": steps as f64 / wall,
        "end_to_end_audio_s_per_s": audio * steps as f64 / n.max(1.0) / wall,
        "step_ms": step_ms / n,
        "frames_per_batch": frames,
        "utterances_per_batch": utts,
        "student_busy_frac": student.busy_s / student.wall_s.max(1e-9),
        "mask_ms_per_step": mask.busy_s * 1e3 / mask.items_out.max(1) as f64,
    });
    let mut split = Vec::new();
    for x in &s.stages {
        split.push(serde_json::json!({"stage": x.stage, "kind": x.kind, "workers": x.workers, "busy_s": x.busy_s, "starved_s": x.starved_s, "backpressured_s": x.backpressured_s, "wall_s": x.wall_s, "in": x.items_in, "out": x.items_out}));
    }
    o["stages"] = serde_json::Value::Array(split);
    println!("BENCH {o}");
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().collect();
    let tmp = std::env::temp_dir().join("ehmam-bench-train");
    let shards = tmp.join("shards");
    if args.get(1).map(String::as_str) == Some("--child") {
        let staleness: u32 = args[2].parse().expect("staleness");
        let steps: u64 = args[3].parse().expect("steps");
        child(
            &root,
            &shards,
            &tmp.join(format!(
                "run-{}-{staleness}",
                std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
            )),
            staleness,
            steps,
        );
        return;
    }
    if args.iter().any(|a| a == "--sink-only") {
        println!("{}", tensorboard_sink_line(&tmp, None));
        return;
    }
    let steps: u64 = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(60);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Demo shards once.
    let _ = std::fs::remove_dir_all(&tmp);
    run(
        &root.join("specs/prep.yaml"),
        &[
            format!("run_dir={}", tmp.join("prep").display()),
            format!("stages.shards.with.dir={}", shards.display()),
        ],
    );
    println!("training benchmark: specs/tiny.yaml (D = 128, 4 blocks, fbank front-end, batches of ≤ 16 s), {steps} updates per row, {cores} cores");
    println!("steady state = updates 5.. from the steps table; threads = candle's CPU threads (RAYON_NUM_THREADS)\n");
    println!(
        "{:>7} {:>9} {:>10} {:>12} {:>9} {:>12} {:>14} {:>12}",
        "threads",
        "staleness",
        "updates/s",
        "audio s / s",
        "ms/step",
        "student busy",
        "mask ms/step",
        "mask share"
    );
    let exe = std::env::current_exe().expect("own path");
    let mut results = Vec::new();
    let mut threads: Vec<usize> = vec![1, 2];
    if cores > 2 {
        threads.push(cores);
    }
    for &t in &threads {
        for staleness in [0u32, 1] {
            let o = Command::new(&exe)
                .args(["--child", &staleness.to_string(), &steps.to_string()])
                .env("RAYON_NUM_THREADS", t.to_string())
                .output()
                .expect("child");
            let text = String::from_utf8_lossy(&o.stdout);
            let Some(line) = text.lines().find_map(|l| l.strip_prefix("BENCH ")) else {
                eprintln!(
                    "child failed:\n{text}\n{}",
                    String::from_utf8_lossy(&o.stderr)
                );
                std::process::exit(1);
            };
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            let g = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:>7} {:>9} {:>10.2} {:>12.1} {:>9.0} {:>11.1}% {:>14.2} {:>11.2}%",
                t,
                staleness,
                g("end_to_end_updates_per_s"),
                g("end_to_end_audio_s_per_s"),
                g("step_ms"),
                100.0 * g("student_busy_frac"),
                g("mask_ms_per_step"),
                100.0 * g("mask_ms_per_step") / g("step_ms")
            );
            results.push((t, staleness, v));
        }
    }
    println!("\n(updates/s and audio s / s: end to end, start-up included; ms/step: the student's own time per update)");
    for (t, staleness, v) in &results {
        println!(
            "\ntime by stage, {t} thread(s), staleness {staleness} ({:.1} s wall, {:.0} frames and {:.1} utterances a batch):",
            v["wall_s"].as_f64().unwrap_or(0.0),
            v["frames_per_batch"].as_f64().unwrap_or(0.0),
            v["utterances_per_batch"].as_f64().unwrap_or(0.0)
        );
        for s in v["stages"].as_array().into_iter().flatten() {
            let w = s["wall_s"].as_f64().unwrap_or(0.0).max(1e-9);
            let pct = |k: &str| 100.0 * s[k].as_f64().unwrap_or(0.0) / w;
            println!(
                "  {:<8} {:<18} busy {:>7.2} s ({:>5.1}%)  starved {:>5.1}%  back-pressured {:>5.1}%  in {:>6} out {:>6}",
                s["stage"].as_str().unwrap_or(""),
                s["kind"].as_str().unwrap_or(""),
                s["busy_s"].as_f64().unwrap_or(0.0),
                pct("busy_s"),
                pct("starved_s"),
                pct("backpressured_s"),
                s["in"],
                s["out"]
            );
        }
    }

    // The data stages alone: how many batches a second they can make, against the student's needs.
    let yaml = format!(
        "name: data
run_dir: {}
seed: 7
stages:
  shards: {{ kind: shards.read, with: {{ dir: {}, epochs: 20, shuffle: true }} }}
  fbank: {{ kind: features.fbank, from: shards, workers: 2, with: {{ num_mel_bins: 80, normalize: utterance, stack: 2 }} }}
  batch: {{ kind: batch.by_duration, from: fbank, with: {{ max_seconds: 16, min_utt_seconds: 2, max_utt_seconds: 8 }} }}
",
        tmp.join("data").display(),
        shards.display()
    );
    let plan = pipeline::validate(
        pipeline::load_str(&yaml, "data.yaml", &[]).expect("spec"),
        &stages::registry(),
    )
    .expect("plan");
    let t0 = Instant::now();
    let s = pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .expect("run");
    let wall = t0.elapsed().as_secs_f64();
    let batches = s
        .stages
        .iter()
        .find(|x| x.stage == "batch")
        .map_or(0, |x| x.items_out);
    let fastest = results
        .iter()
        .map(|(_, _, v)| 1e3 / v["step_ms"].as_f64().unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    println!(
        "\ndata stages alone (shards.read → features.fbank ×2 → batch.by_duration, 20 epochs): {batches} batches in {wall:.1} s = {:.0} batches/s, {:.0}× the fastest student above ({fastest:.2} updates/s)",
        batches as f64 / wall,
        batches as f64 / wall / fastest.max(1e-9)
    );
    println!(
        "{}",
        tensorboard_sink_line(&tmp, Some(1e3 / fastest.max(1e-9)))
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Times 1,000 writes of the `log.tensorboard` sink into a fresh directory; `step_ms`, the
/// fastest update's time, puts it in proportion.
fn tensorboard_sink_line(tmp: &Path, step_ms: Option<f64>) -> String {
    use stages::logs::tensorboard::{TensorBoardLog, TensorBoardParams};
    const N: u64 = 1000;
    let dir = tmp.join("tensorboard-sink");
    let _ = std::fs::remove_dir_all(&dir);
    let record = |step: u64| stages::items::StepRecord {
        step,
        epoch: 0,
        lr: 1e-3,
        loss: 5.0 / (1.0 + step as f64),
        loss_rec: 4.0,
        loss_aux: 0.1,
        tau: 0.995,
        hard_ratio: 0.5,
        masked_frac: 0.4,
        frames: 480,
        utterances: 4,
        audio_s: 16.0,
        step_ms: 300.0,
        target_std: 1.0,
        pred_std: 0.8,
        rank_agreement: 0.6,
        teacher_rank_agreement: 0.55,
        grad_norm: 0.5,
        teacher_version: step,
    };
    let records: Vec<_> = (0..N).map(record).collect();
    let mut log = TensorBoardLog::new(&TensorBoardParams::default(), &dir);
    let t0 = Instant::now();
    for r in &records {
        log.write(r).expect("tensorboard write");
    }
    let s = log.finish().expect("tensorboard finish");
    let us = t0.elapsed().as_secs_f64() * 1e6 / N as f64;
    let _ = std::fs::remove_dir_all(&dir);
    let share = match step_ms {
        Some(ms) => format!(
            " = {:.4} % of the fastest update ({ms:.0} ms)",
            100.0 * us / (ms * 1e3)
        ),
        None => String::new(),
    };
    format!(
        "\nlog.tensorboard sink: {us:.1} µs a record ({N} records, {} bytes a point, the final sync included){share}",
        s.bytes / s.points.max(1)
    )
}
