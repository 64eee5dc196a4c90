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
// Then the `log.tensorboard` sink's own cost: 1,000 step records written (each point one write
// to the event file), in µs a record and as a share of the fastest update above (the issue's
// bound: under 1 %). `-- --sink-only` prints that line alone.
//
// Last, one update side by side with PyTorch (issue 12): ehmam's update called in-process (the
// teacher stage's `teach`, the easy-to-hard mask, `Student::train_step`, in series as the paper's
// algorithm runs them; no pipeline around it) on batches of 8 × 200 frames (8 × 4 s crops at
// 50 Hz) of random 160-dim features, median ms of STEPS updates after 3 warm-up ones, at 1 and 2
// threads; then `python3 benches/train_reference.py` (an independent eager PyTorch implementation
// of the same update, same shapes) in the same run, and the ratio. Where torch is not installed the
// script says so (`benches/install_references.sh` installs it) and the comparison is skipped.
// `-- --compare-only` runs this part alone.

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
    if args.get(1).map(String::as_str) == Some("--update") {
        update_child(args[2].parse().expect("steps"));
        return;
    }
    if args.get(1).map(String::as_str) == Some("--finetune-child") {
        finetune_child(args[2].parse().expect("steps"));
        return;
    }
    if args.iter().any(|a| a == "--finetune-only") {
        let steps = args
            .iter()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .and_then(|a| a.parse().ok())
            .unwrap_or(60);
        finetune_lines(steps);
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
    if args.iter().any(|a| a == "--compare-only") {
        compare_with_pytorch(&root, steps);
        return;
    }
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
    compare_with_pytorch(&root, steps);
    finetune_lines(steps);
}

/// Utterances and frames per utterance of the side-by-side batches: 8 × 4 s crops at 50 Hz.
const CMP_BATCH: usize = 8;
const CMP_FRAMES: usize = 200;
/// Untimed updates before the timed ones (both sides).
const CMP_WARMUP: u64 = 3;

/// The side-by-side batches: tiny on the CPU, CMP_BATCH × CMP_FRAMES random features, `steps`
/// timed updates after CMP_WARMUP.
fn cmp_spec(steps: u64) -> stages::train::bench::BenchSpec {
    stages::train::bench::BenchSpec {
        cfg: stages::model::ModelConfig::tiny(),
        device: stages::candle_core::Device::Cpu,
        batch: CMP_BATCH,
        frames: CMP_FRAMES,
        frame_rate: 50.0,
        warmup: CMP_WARMUP,
        updates: steps,
        seed: 7,
        clones: 1,
    }
}

/// Runs this bench as a child (`flag steps`, `threads` compute threads) and reads its one
/// `PREFIX {json}` line; a child that fails ends the benchmark with its output.
fn child_json(flag: &str, steps: u64, threads: usize, prefix: &str) -> serde_json::Value {
    let exe = std::env::current_exe().expect("own path");
    let o = Command::new(&exe)
        .args([flag, &steps.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .expect("child");
    let text = String::from_utf8_lossy(&o.stdout);
    match text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
    {
        Some(v) => v,
        None => {
            eprintln!(
                "{flag} child failed:\n{text}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::process::exit(1);
        }
    }
}

/// One EH-MAM update after another, in this process (the child of `--update`; threads through
/// RAYON_NUM_THREADS): `stages::train::bench::run`, the loop behind `ehmam bench-update` (teacher
/// weights published by the student, the teacher's forward with its front-end, the easy-to-hard
/// mask with the hard ratio ramping 0 → 1 over the run, `Student::train_step`), on random
/// features standing in for precomputed fbank. Prints the medians as one `UPDATE {json}` line.
fn update_child(steps: u64) {
    use stages::train::bench::run;
    let spec = cmp_spec(steps);
    let r = run(&spec, |_| {}).expect("update");
    let o = serde_json::json!({
        "ms_per_update": r.ms_per_update,
        "teacher_mask_ms": r.teacher_mask_ms,
        "student_ms": r.student_ms,
        "masked_frac": r.masked_frac,
        "phases_ms": r.phases_ms,
        "updates": r.updates,
        "last_loss": r.last_loss,
    });
    println!("UPDATE {o}");
}

/// A child process (its thread count from RAYON_NUM_THREADS): `stages::finetune::bench::run`,
/// the loop behind `ehmam bench-update --finetune`, on the comparison's batches. One
/// `FINETUNE {json}` line.
fn finetune_child(steps: u64) {
    let spec = cmp_spec(steps);
    let r = stages::finetune::bench::run(&spec, |_| {}).expect("fine-tuning update");
    println!("FINETUNE {}", serde_json::to_value(&r).expect("json"));
}

/// Fine-tuning's line (issue 19): CTC updates of tiny at 1 and 2 threads, next to the
/// pre-training update of the same batch.
fn finetune_lines(steps: u64) {
    println!(
        "\nCTC fine-tuning of tiny (finetune.ctc's update, the encoder not frozen, 10 h recipe's masking and dropout), {CMP_BATCH} × {CMP_FRAMES} frames of random 160-dim features, 50 labels each; median of {steps} updates after {CMP_WARMUP}:"
    );
    for t in [1usize, 2] {
        let mut line = format!("  {t} thread(s):");
        for (flag, prefix, what) in [
            ("--finetune-child", "FINETUNE ", "fine-tuning"),
            ("--update", "UPDATE ", "pre-training"),
        ] {
            let v = child_json(flag, steps, t, prefix);
            let ms = v["ms_per_update"].as_f64().unwrap_or(f64::NAN);
            line.push_str(&format!(
                "  {what} {ms:.1} ms/update ({:.2} updates/s)",
                1e3 / ms
            ));
        }
        println!("{line}");
    }
}

/// The side-by-side table of issue 12: ehmam's update (children at 1 and 2 threads) against
/// `benches/train_reference.py`, run here in the same process tree.
fn compare_with_pytorch(root: &Path, steps: u64) {
    use stages::model::{in_teacher, parameter_count, shapes_of, ModelConfig};
    let cfg = ModelConfig::tiny();
    let params = parameter_count(&cfg);
    let teacher_params: usize = shapes_of(&cfg)
        .iter()
        .filter(|(n, _)| in_teacher(n))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let profile = if cfg!(debug_assertions) {
        "test/dev profile (cargo run --example), our crates at opt-level 1, dependencies at 2"
    } else {
        "release profile (cargo bench)"
    };
    println!(
        "\none update side by side with PyTorch: tiny model (method §7), {CMP_BATCH} × {CMP_FRAMES} frames a batch ({CMP_BATCH} × {} s crops at 50 Hz) of random 160-dim features (fbank precomputed), dropout on;",
        CMP_FRAMES / 50
    );
    println!("teacher forward + easy-to-hard mask, then student forward + backward + AdamW + EMA, in series; median of {steps} updates after {CMP_WARMUP} warm-up ones; ehmam built in the {profile}");
    // Other work on the machine skews the 2-thread rows most (both sides want both cores).
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "?".into())
    };
    let load_before = load();
    let mut ours: Vec<(usize, serde_json::Value)> = Vec::new();
    for t in [1usize, 2] {
        ours.push((t, child_json("--update", steps, t, "UPDATE ")));
    }
    // The reference, in the same run.
    let script = root.join("benches/train_reference.py");
    let reference = Command::new("python3")
        .arg(&script)
        .args(["--updates", &steps.to_string()])
        .args(["--warmup", &CMP_WARMUP.to_string()])
        .args(["--threads", "1,2"])
        .args(["--batch", &CMP_BATCH.to_string()])
        .args(["--frames", &CMP_FRAMES.to_string()])
        .output();
    let mut theirs: std::collections::BTreeMap<usize, std::collections::BTreeMap<String, String>> =
        Default::default();
    let mut torch_params: Option<(String, String)> = None;
    let mut torch_version = String::new();
    let mut skipped: Option<String> = None;
    match reference {
        Err(e) => {
            skipped = Some(format!(
                "PyTorch reference skipped: cannot run python3 ({e})"
            ))
        }
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            if let Some(l) = text.lines().find(|l| l.starts_with("torch_missing:")) {
                skipped = Some(format!("PyTorch reference skipped: {l}"));
            } else if !o.status.success() {
                let err = String::from_utf8_lossy(&o.stderr);
                let tail: Vec<&str> = err.lines().rev().take(8).collect();
                skipped = Some(format!(
                    "PyTorch reference failed ({}):\n{}",
                    o.status,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            for l in text.lines() {
                let mut words = l.split_whitespace();
                let key = words.next().unwrap_or("");
                let kv: std::collections::BTreeMap<String, String> = words
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                match key {
                    "torch_ms_per_update" => {
                        if let Some(t) = kv.get("threads").and_then(|t| t.parse().ok()) {
                            theirs.insert(t, kv);
                        }
                    }
                    "torch_parameters" => {
                        torch_params = Some((
                            kv.get("student").cloned().unwrap_or_default(),
                            kv.get("teacher").cloned().unwrap_or_default(),
                        ))
                    }
                    "torch_version" => torch_version = kv.get("value").cloned().unwrap_or_default(),
                    _ => {}
                }
            }
        }
    }
    println!(
        "load average (1 min) before / after the comparison: {load_before} / {}",
        load()
    );
    match &torch_params {
        Some((s, t)) => println!(
            "parameters: ehmam {params} (teacher {teacher_params}), PyTorch reference {s} (teacher {t}){}",
            if *s == params.to_string() && *t == teacher_params.to_string() {
                ": equal"
            } else {
                ": DIFFERENT"
            }
        ),
        None => println!("parameters: ehmam {params} (teacher {teacher_params})"),
    }
    if let Some(why) = &skipped {
        println!("{why}");
    }
    println!(
        "\n{:>7} {:>16} {:>22} {:>18} {:>30} {:>16}",
        "threads",
        "ehmam ms/update",
        "ehmam teacher+mask ms",
        "ehmam student ms",
        "PyTorch ms/update",
        "ehmam / PyTorch"
    );
    for (t, v) in &ours {
        let g = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let (torch, ratio) = match theirs.get(t) {
            Some(kv) => {
                let ms: f64 = kv
                    .get("value")
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                (
                    format!(
                        "{ms:.1} ({} + {})",
                        kv.get("teacher_mask_ms").map_or("?", String::as_str),
                        kv.get("student_ms").map_or("?", String::as_str)
                    ),
                    format!("{:.2}×", g("ms_per_update") / ms),
                )
            }
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{:>7} {:>16.1} {:>22.1} {:>18.1} {:>30} {:>16}",
            t,
            g("ms_per_update"),
            g("teacher_mask_ms"),
            g("student_ms"),
            torch,
            ratio
        );
    }
    // Where the time goes, phase by phase, both sides.
    let names = [
        "teacher forward",
        "easy-to-hard mask",
        "student forward + losses",
        "backward",
        "grad norm + AdamW + EMA",
        "step metrics",
    ];
    let mut header = format!("\n{:<26}", "median ms per phase");
    for (t, _) in &ours {
        header += &format!(
            " {:>10} {:>11}",
            format!("ehmam {t}t"),
            format!("PyTorch {t}t")
        );
    }
    println!("{header}");
    for (k, name) in names.iter().enumerate() {
        let mut line = format!("{name:<26}");
        for (t, v) in &ours {
            let e = v["phases_ms"][k].as_f64().unwrap_or(f64::NAN);
            let p = theirs
                .get(t)
                .and_then(|kv| kv.get("phases_ms"))
                .and_then(|x| x.split(',').nth(k))
                .and_then(|x| x.parse::<f64>().ok());
            line += &format!(
                " {e:>10.1} {:>11}",
                p.map_or("-".to_string(), |p| format!("{p:.1}"))
            );
        }
        println!("{line}");
    }
    let frac = |v: &serde_json::Value| v["masked_frac"].as_f64().unwrap_or(f64::NAN);
    let torch_frac: Vec<String> = theirs
        .values()
        .filter_map(|kv| kv.get("masked_frac").cloned())
        .collect();
    println!(
        "(PyTorch column: {}total (teacher+mask + student) ms; masked share of frames at 1 / 2 threads: ehmam {}, PyTorch {}; a ratio above 1 means ehmam is slower)",
        if theirs.is_empty() {
            String::new()
        } else {
            format!("torch {torch_version}, ")
        },
        ours.iter()
            .map(|(_, v)| format!("{:.3}", frac(v)))
            .collect::<Vec<_>>()
            .join(" / "),
        if torch_frac.is_empty() {
            "-".to_string()
        } else {
            torch_frac.join(" / ")
        }
    );
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
        checkpoint_follows: false,
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
