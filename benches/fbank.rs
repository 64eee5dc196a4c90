// fbank throughput (audio-seconds per second), one thread and all cores, next to
// kaldi-native-fbank and torchaudio's Kaldi fbank on the same audio when Python has them
// (benches/fbank_reference.py, which installs nothing); then the `shards.read → features.fbank →
// batch.by_duration` pipeline over 20 epochs with its telemetry and peak memory.
//
//   cargo bench --bench fbank        (release build)
//   cargo run --example bench_fbank  (the same, in the test profile)

use stages::data::fbank::{Fbank, FbankOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn list(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut es: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    es.sort();
    for p in es {
        if p.is_dir() {
            list(&p, out);
        } else if p.extension().is_some_and(|e| e == "flac") {
            out.push(p);
        }
    }
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn run_spec(yaml: &str) -> pipeline::RunSummary {
    let plan = pipeline::validate(
        pipeline::load_str(yaml, "bench.yaml", &[]).expect("spec"),
        &stages::registry(),
    )
    .expect("plan");
    pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .expect("run")
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut files = Vec::new();
    list(&root.join("data/demo"), &mut files);
    let utts: Vec<Vec<f32>> = files
        .iter()
        .map(|f| {
            stages::data::audio::decode_file(f)
                .expect("demo decodes")
                .to_mono()
        })
        .collect();
    let total_s: f64 = utts.iter().map(|u| u.len() as f64 / 16000.0).sum();
    let reps = 5;
    println!("fbank benchmark: {} demo utterances, {total_s:.1} s of audio, best of {reps}, {cores} cores", utts.len());

    let opts = FbankOptions::default();
    let mut fb = Fbank::new(&opts, 16000).expect("fbank");
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        for u in &utts {
            std::hint::black_box(fb.compute(u, 0));
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let single = total_s / best;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::thread::scope(|s| {
            for c in 0..cores {
                let utts = &utts;
                let opts = &opts;
                s.spawn(move || {
                    let mut fb = Fbank::new(opts, 16000).expect("fbank");
                    for u in utts.iter().skip(c).step_by(cores) {
                        std::hint::black_box(fb.compute(u, 0));
                    }
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    let all = total_s / best;

    // The references, in the same run.
    let tmp = std::env::temp_dir().join(format!("ehmam-bench-fbank-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&tmp);
    let mut raw = Vec::new();
    for u in &utts {
        for &x in u {
            raw.extend_from_slice(&stages::data::audio::to_i16(x).to_le_bytes());
        }
    }
    let _ = std::fs::write(tmp.join("audio.s16"), raw);
    let _ = std::fs::write(
        tmp.join("lengths.json"),
        format!(
            "[{}]",
            utts.iter()
                .map(|u| u.len().to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    let refs: serde_json::Value = std::process::Command::new("python3")
        .arg(root.join("benches/fbank_reference.py"))
        .arg(&tmp)
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(serde_json::Value::Null);
    println!(
        "{:<28} {:>8} {:>16} {:>12}",
        "fbank (80 bins, Kaldi defaults)", "threads", "audio s / s", "per core"
    );
    println!("{:<28} {:>8} {:>16.0} {:>12.0}", "ehmam", 1, single, single);
    println!(
        "{:<28} {:>8} {:>16.0} {:>12.0}",
        "ehmam",
        cores,
        all,
        all / cores as f64
    );
    for name in ["kaldi-native-fbank", "torchaudio"] {
        match refs.get(name).and_then(|v| v.as_f64()) {
            Some(v) => println!(
                "{:<28} {:>8} {:>16.0} {:>12.0}   (ehmam single thread: {:.2}×)",
                name,
                1,
                v,
                v,
                single / v
            ),
            None => println!(
                "{:<28} {:>8} {:>16} {:>12}",
                format!("{name} (not installed)"),
                1,
                "-",
                "-"
            ),
        }
    }

    // The pipeline over 20 epochs, with telemetry; peak RSS after 2 epochs vs after 20.
    let shards = tmp.join("shards");
    run_spec(&format!(
        "name: p
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: {cores}, with: {{ input: {} }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {}, target_mb: 1 }} }}
",
        tmp.join("p").display(),
        root.join("data/demo").display(),
        shards.display()
    ));
    let mut peaks = Vec::new();
    for epochs in [2u32, 20] {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let t = Instant::now();
        let s = run_spec(&format!(
            "name: f
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {}, epochs: {epochs}, shuffle: true }} }}
  fb: {{ kind: features.fbank, from: r, workers: {cores} }}
  b: {{ kind: batch.by_duration, from: fb, with: {{ max_seconds: 32 }} }}
",
            tmp.join("f").display(),
            shards.display()
        ));
        let wall = t.elapsed().as_secs_f64();
        peaks.push((epochs, status_kb("VmHWM:").unwrap_or(0)));
        if epochs == 20 {
            println!("\npipeline shards.read → features.fbank ({cores} workers) → batch.by_duration, 20 epochs:");
            println!(
                "  {:.0} audio s / s ({:.1} s wall for {:.0} s of audio)",
                total_s * 20.0 / wall,
                wall,
                total_s * 20.0
            );
            for r in &s.stages {
                println!(
                    "  {:<4} {:<18} busy {:>6.2} s  starved {:>6.2} s  back-pressured {:>6.2} s  in {:>5} out {:>5}",
                    r.stage, r.kind, r.busy_s, r.starved_s, r.backpressured_s, r.items_in, r.items_out
                );
            }
        }
    }
    println!(
        "  peak RSS: {} MB after 2 epochs, {} MB after 20 epochs",
        peaks[0].1 / 1024,
        peaks[1].1 / 1024
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
