// The cost of verifying a store's parts on read: BLAKE3 of every shard (what `shards.read` and
// `features.read` now do when they open a part) beside reading the same shards back (Parquet
// decode into utterances), on the demo corpus or any directory of audio.
//
//   cargo bench --bench read                 # the demo corpus
//   cargo bench --bench read -- DIR [REPS]   # any directory of audio

use std::path::PathBuf;
use std::time::Instant;

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
    let reps: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    let tmp = std::env::temp_dir().join(format!("ehmam-bench-read-{}", std::process::id()));
    let yaml = format!(
        "name: bench
run_dir: {}
stages:
  decode: {{ kind: audio.decode, workers: 2, with: {{ input: {}, min_seconds: 0 }} }}
  shards: {{ kind: shards.write, from: decode, with: {{ dir: {}, target_mb: 4 }} }}
",
        tmp.join("run").display(),
        input.display(),
        tmp.join("shards").display()
    );
    let spec = pipeline::load_str(&yaml, "bench.yaml", &[]).expect("bench spec");
    let plan = pipeline::validate(spec, &stages::registry()).expect("bench plan");
    pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .expect("prep");
    use stages::stream::PartSource;
    let parts = stages::data::shards::Shards::parts(&tmp.join("shards")).expect("parts");
    let bytes: u64 = parts.iter().map(|p| p.bytes).sum();
    let best = |f: &dyn Fn()| {
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let hash = best(&|| {
        for p in &parts {
            p.verify().expect("verify");
        }
    });
    let read = best(&|| {
        for p in &parts {
            stages::data::shards::read_shard(&p.path, 0).expect("read");
        }
    });
    let mb = bytes as f64 / 1e6;
    println!(
        "verify on read: {} shards, {mb:.1} MB (zstd Parquet) of {}, best of {reps}, one thread",
        parts.len(),
        input.display()
    );
    println!("{:<36} {:>10} {:>10}", "", "s", "MB/s");
    println!(
        "{:<36} {:>10.4} {:>10.0}",
        "BLAKE3 of every shard",
        hash,
        mb / hash
    );
    println!(
        "{:<36} {:>10.4} {:>10.0}",
        "read_shard (Parquet → utterances)",
        read,
        mb / read
    );
    println!(
        "verification adds {:.1} % to reading the shards back",
        100.0 * hash / read
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
