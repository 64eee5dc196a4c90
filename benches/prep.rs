// Prep throughput: decode + resample + shard, in audio-seconds per wall-second, with one worker
// and with all cores, side by side with ffmpeg decoding the same files to 16 kHz mono s16 PCM.
//
//   cargo bench --bench prep                 # the demo corpus
//   cargo bench --bench prep -- DIR [REPS]   # any directory of audio
//
// ffmpeg runs one process per file (as a shell loop or a `parallel` job would), N at a time;
// its output goes to a pipe that is read and dropped. If ffmpeg is missing its rows are skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn prep_once(input: &Path, workers: usize, out: &Path) -> (f64, f64) {
    let _ = std::fs::remove_dir_all(out);
    let yaml = format!(
        "name: bench
run_dir: {}
stages:
  decode: {{ kind: audio.decode, workers: {workers}, with: {{ input: {}, sample_rate: 16000, min_seconds: 0 }} }}
  shards: {{ kind: shards.write, from: decode, with: {{ dir: {}, target_mb: 64 }} }}
",
        out.join("run").display(),
        input.display(),
        out.join("shards").display()
    );
    let spec = pipeline::load_str(&yaml, "bench.yaml", &[]).expect("bench spec");
    let plan = pipeline::validate(spec, &stages::registry()).expect("bench plan");
    let t0 = Instant::now();
    pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .expect("bench run");
    let wall = t0.elapsed().as_secs_f64();
    let index = stages::data::shards::ShardIndex::load(&out.join("shards"))
        .expect("index")
        .expect("index present");
    let audio_s: f64 = index.shards.iter().map(|s| s.duration_s).sum();
    (audio_s, wall)
}

fn list(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            list(&p, out);
        } else if p.extension().is_some_and(|e| {
            ["flac", "wav", "mp3", "ogg", "m4a"].contains(&e.to_string_lossy().as_ref())
        }) {
            out.push(p);
        }
    }
}

fn ffmpeg_once(files: &[PathBuf], procs: usize) -> Option<f64> {
    let next = AtomicUsize::new(0);
    let ok = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..procs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(f) = files.get(i) else { break };
                let out = Command::new("ffmpeg")
                    .args(["-nostdin", "-v", "error", "-threads", "1", "-i"])
                    .arg(f)
                    .args(["-ac", "1", "-ar", "16000", "-f", "s16le", "-"])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output();
                if out.is_ok_and(|o| o.status.success()) {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (ok.load(Ordering::SeqCst) == files.len()).then(|| t0.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let input = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("data/demo"));
    let reps: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let tmp = std::env::temp_dir().join(format!("ehmam-bench-prep-{}", std::process::id()));
    let mut files = Vec::new();
    list(&input, &mut files);
    println!(
        "prep benchmark: {} ({} files), best of {reps} runs, {cores} cores",
        input.display(),
        files.len()
    );
    let have_ffmpeg = Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    println!(
        "{:<34} {:>8} {:>10} {:>14} {:>10}",
        "", "workers", "audio s", "audio s / s", "vs ffmpeg"
    );
    for workers in [1, cores] {
        let mut best_ours = f64::INFINITY;
        let mut audio = 0.0;
        for _ in 0..reps {
            let (a, w) = prep_once(&input, workers, &tmp);
            audio = a;
            best_ours = best_ours.min(w);
        }
        let ours = audio / best_ours;
        let theirs = if have_ffmpeg {
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                if let Some(w) = ffmpeg_once(&files, workers) {
                    best = best.min(w);
                }
            }
            best.is_finite().then(|| audio / best)
        } else {
            None
        };
        let ratio = theirs
            .map(|t| format!("{:.2}×", ours / t))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<34} {:>8} {:>10.1} {:>14.1} {:>10}",
            "ehmam decode+resample+shard", workers, audio, ours, ratio
        );
        match theirs {
            Some(t) => println!(
                "{:<34} {:>8} {:>10.1} {:>14.1} {:>10}",
                "ffmpeg → 16 kHz mono s16 (pipe)", workers, audio, t, "1.00×"
            ),
            None => println!(
                "{:<34} {:>8} {:>10} {:>14} {:>10}",
                "ffmpeg (not installed: skipped)", workers, "-", "-", "-"
            ),
        }
    }
    // Without process start-up: one long 44.1 kHz stereo FLAC made from the same audio, so both
    // sides decode, down-mix and resample 44.1 → 16 kHz in one go.
    if have_ffmpeg && args.is_empty() {
        let long_dir = tmp.join("long");
        let _ = std::fs::create_dir_all(&long_dir);
        let list = tmp.join("list.txt");
        let text: String = files
            .iter()
            .map(|f| format!("file '{}'\n", f.display()))
            .collect();
        let made = std::fs::write(&list, text).is_ok()
            && Command::new("ffmpeg")
                .args([
                    "-nostdin", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i",
                ])
                .arg(&list)
                .args(["-ar", "44100", "-ac", "2", "-c:a", "flac"])
                .arg(long_dir.join("long.flac"))
                .status()
                .is_ok_and(|s| s.success());
        if made {
            let long = vec![long_dir.join("long.flac")];
            let mut best_ours = f64::INFINITY;
            let mut audio = 0.0;
            let out = tmp.join("long-out");
            for _ in 0..reps {
                let (a, w) = prep_once(&long_dir, 1, &out);
                audio = a;
                best_ours = best_ours.min(w);
            }
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                if let Some(w) = ffmpeg_once(&long, 1) {
                    best = best.min(w);
                }
            }
            println!("one {audio:.0} s file, 44.1 kHz stereo FLAC → 16 kHz mono (decode, down-mix, resample, store):");
            println!(
                "{:<34} {:>8} {:>10.1} {:>14.1} {:>10}",
                "ehmam decode+resample+shard",
                1,
                audio,
                audio / best_ours,
                format!("{:.2}×", best / best_ours)
            );
            println!(
                "{:<34} {:>8} {:>10.1} {:>14.1} {:>10}",
                "ffmpeg → 16 kHz mono s16 (pipe)",
                1,
                audio,
                audio / best,
                "1.00×"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
