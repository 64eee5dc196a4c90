// Reading a shard store from disk and from S3 (moto's server on loopback, from
// scripts/install-s3.sh; or any S3 endpoint in AWS_ENDPOINT with its bucket in
// EHMAM_BENCH_BUCKET): the demo shards streamed by `shards.read` through a light consumer
// (features.waveform → features.stats), with and without prefetch, each in its own process so
// that its peak resident memory (VmHWM) is its own. Prints audio s/s and peak memory side by
// side.
//
//   scripts/install-s3.sh && cargo bench --bench store_read            # demo corpus, 20 epochs
//   cargo bench --bench store_read -- EPOCHS TARGET_MB

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn spec(run: &Path, dir: &str, prefetch: usize, epochs: u32) -> String {
    format!(
        "name: bench
run_dir: {}
stages:
  shards: {{ kind: shards.read, with: {{ dir: \"{dir}\", epochs: {epochs}, prefetch: {prefetch} }} }}
  wave: {{ kind: features.waveform, from: shards }}
  stats: {{ kind: features.stats, from: wave }}
",
        run.display()
    )
}

fn run_spec(yaml: &str) {
    let spec = pipeline::load_str(yaml, "bench.yaml", &[]).expect("bench spec");
    let plan = pipeline::validate(spec, &stages::registry()).expect("bench plan");
    pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .expect("run");
}

/// The child: one read of the store; prints seconds and peak RSS in kB.
fn child(dir: &str, prefetch: usize, epochs: u32, run: &Path) {
    let t = Instant::now();
    run_spec(&spec(run, dir, prefetch, epochs));
    let secs = t.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    println!("RESULT {secs} {hwm}");
}

fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--child") {
        child(
            &args[1],
            args[2].parse().expect("prefetch"),
            args[3].parse().expect("epochs"),
            Path::new(&args[4]),
        );
        return;
    }
    let epochs: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let target_mb: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = std::env::temp_dir().join(format!("ehmam-bench-s3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);

    // The S3 server: AWS_ENDPOINT if given, else moto on a free port.
    let mut moto = None;
    if std::env::var_os("AWS_ENDPOINT").is_none() {
        let bin = root.join(".venv-s3/bin/moto_server");
        if !bin.exists() {
            eprintln!(
                "{} is missing: run scripts/install-s3.sh (or set AWS_ENDPOINT)",
                bin.display()
            );
            std::process::exit(2);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        moto = Some(
            Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server"),
        );
        let t0 = Instant::now();
        while http(port, "PUT", "/ehmam-bench").is_err() {
            assert!(t0.elapsed() < Duration::from_secs(60), "moto did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "bench".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "bench".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ] {
            std::env::set_var(k, v);
        }
    }
    let bucket = std::env::var("EHMAM_BENCH_BUCKET").unwrap_or_else(|_| "ehmam-bench".into());
    let url = format!("s3://{bucket}/bench-{}", std::process::id());
    let local = tmp.join("shards");
    for dir in [local.display().to_string(), url.clone()] {
        run_spec(&format!(
            "name: prep
run_dir: {}
stages:
  decode: {{ kind: audio.decode, workers: 2, with: {{ input: {}, layout: librispeech, min_seconds: 0.5 }} }}
  shards: {{ kind: shards.write, from: decode, with: {{ dir: \"{dir}\", target_mb: {target_mb} }} }}
",
            tmp.join("prep").display(),
            root.join("data/demo").display()
        ));
    }
    use stages::stream::PartSource;
    let parts = stages::data::shards::Shards::parts(&local).expect("parts");
    let index = stages::data::shards::ShardIndex::load(&local)
        .expect("index")
        .expect("index");
    let audio_s: f64 = index.shards.iter().map(|s| s.duration_s).sum::<f64>() * epochs as f64;
    let mb: f64 = parts.iter().map(|p| p.bytes).sum::<u64>() as f64 / 1e6;
    println!(
        "shards.read → features.waveform → features.stats over the demo shards: {} shards of {target_mb} MB target, {mb:.1} MB, × {epochs} epochs = {:.0} s of audio; best of 3 runs, each its own process",
        parts.len(),
        audio_s
    );
    println!(
        "{:<28} {:>8} {:>10} {:>14} {:>14}",
        "store", "prefetch", "s", "audio s/s", "peak RSS MB"
    );
    let exe = std::env::current_exe().expect("exe");
    let mut disk_rate = 0.0;
    for (name, dir) in [
        ("disk", local.display().to_string()),
        ("S3 (loopback)", url.clone()),
    ] {
        for prefetch in [0usize, 2, 4] {
            let mut best = f64::INFINITY;
            let mut peak = 0u64;
            for rep in 0..3 {
                let out = Command::new(&exe)
                    .args([
                        "--child",
                        &dir,
                        &prefetch.to_string(),
                        &epochs.to_string(),
                        &tmp.join(format!("run-{rep}")).display().to_string(),
                    ])
                    .output()
                    .expect("child");
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text
                    .lines()
                    .find_map(|l| l.strip_prefix("RESULT "))
                    .unwrap_or_else(|| {
                        panic!("child failed: {}", String::from_utf8_lossy(&out.stderr))
                    });
                let mut it = line.split_whitespace();
                let s: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                let kb: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                best = best.min(s);
                peak = peak.max(kb);
            }
            let rate = audio_s / best;
            if name == "disk" && prefetch == 0 {
                disk_rate = rate;
            }
            println!(
                "{:<28} {:>8} {:>10.3} {:>14.0} {:>14.1}",
                name,
                prefetch,
                best,
                rate,
                peak as f64 / 1024.0
            );
        }
    }
    // The transfer alone: every shard of every epoch fetched from S3 (GET + BLAKE3), nothing
    // decoded; the least a read from S3 can take on this server.
    let remote_parts = stages::data::shards::Shards::parts(Path::new(&url)).expect("parts");
    let t = Instant::now();
    for _ in 0..epochs {
        for p in &remote_parts {
            p.fetch().expect("fetch");
        }
    }
    let fetch_s = t.elapsed().as_secs_f64();
    println!(
        "{:<28} {:>8} {:>10.3} {:>14.0} {:>14}",
        "S3 fetch only (no decode)",
        "-",
        fetch_s,
        audio_s / fetch_s,
        "-"
    );
    println!("(disk, prefetch 0 = {disk_rate:.0} audio s/s is the reference; the S3 server runs on the same cores)");
    if let Some(mut m) = moto {
        let _ = m.kill();
        let _ = m.wait();
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
