// Frame logs: the `log.frames` sink's throughput (frames/s, bytes per frame, for each compression)
// and group-by queries over 10 million frame rows with `ehmam query`'s DataFusion session, side
// by side with DuckDB on the same Arrow IPC files when Python has duckdb and pyarrow
// (benches/logs_reference.py, which installs nothing; `benches/install_references.sh` does).
//
//   cargo bench --bench logs                  (release build)
//   cargo run --example bench_logs            (the same, in the test profile)
//   cargo bench --bench logs -- ROWS          (rows of the query table; default 10,000,000)
//
// Records are synthetic but shaped like the tiny run's: 6 utterances × 120 frames per step, ~30 %
// masked, ids from a pool of 160.

use rand::{Rng, SeedableRng};
use stages::items::FrameRecord;
use stages::logs::frames::{FrameLog, FramesLogParams};
use stages::logs::LogCompression;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const UTTS: usize = 6;
const FRAMES: usize = 120;

fn records(n: usize, seed: u64) -> Vec<FrameRecord> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|step| {
            let cells = UTTS * FRAMES;
            let mask: Vec<bool> = (0..cells).map(|_| rng.random::<f32>() < 0.3).collect();
            let hard: Vec<bool> = mask
                .iter()
                .map(|&m| m && rng.random::<f32>() < 0.5)
                .collect();
            let recon: Vec<f32> = mask
                .iter()
                .map(|&m| {
                    if m {
                        rng.random_range(0.0..8.0)
                    } else {
                        f32::NAN
                    }
                })
                .collect();
            FrameRecord {
                step: step as u64,
                epoch: (step / 30) as u32,
                utt_ids: (0..UTTS)
                    .map(|_| {
                        format!(
                            "{}-{}-{:04}",
                            1000 + rng.random_range(0..10),
                            100,
                            rng.random_range(0..16)
                        )
                    })
                    .collect(),
                offsets_s: (0..UTTS)
                    .map(|_| rng.random_range(0..200) as f64 / 50.0)
                    .collect(),
                frame_rate: 50.0,
                frames: FRAMES,
                mask,
                hard,
                teacher_pred: (0..cells).map(|_| rng.random_range(-1.0..1.0)).collect(),
                student_pred: (0..cells).map(|_| rng.random_range(-1.0..1.0)).collect(),
                recon_loss: recon,
                hard_ratio: step as f32 / n as f32,
                features: Arc::new(
                    (0..cells * 160)
                        .map(|_| rng.random_range(-2.0..2.0))
                        .collect(),
                ),
                feature_dim: 160,
                checkpoint_follows: false,
            }
        })
        .collect()
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Writes `recs` through a frame log; returns (seconds, frame rows, bytes of the frames table).
fn sink(
    recs: &[FrameRecord],
    dir: &Path,
    compression: LogCompression,
    inputs: bool,
    rotate: u64,
) -> (f64, u64, u64) {
    let _ = std::fs::remove_dir_all(dir);
    let p = FramesLogParams {
        every: 1,
        utterances: 1.0,
        rotate_every: rotate,
        compression,
        inputs_table: if inputs { Some("inputs".into()) } else { None },
        inputs_every: 0,
        ..FramesLogParams::default()
    };
    let mut log = FrameLog::new(&p, "bench", dir, 7);
    let t = Instant::now();
    for r in recs {
        log.write(r).expect("write");
    }
    let s = log.finish().expect("finish");
    (
        t.elapsed().as_secs_f64(),
        s.frames.rows,
        dir_bytes(&dir.join("frames")),
    )
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let rows_wanted: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let tmp = std::env::temp_dir().join("ehmam-bench-logs");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");

    // 1. The sink.
    let recs = records(2000, 1);
    println!(
        "log.frames sink: 2000 steps × {UTTS} utterances × {FRAMES} frames = {} frame rows",
        2000 * UTTS * FRAMES
    );
    println!(
        "{:<12} {:<16} {:>14} {:>16}",
        "compression", "tables", "frames / s", "bytes / frame"
    );
    for compression in [
        LogCompression::Zstd,
        LogCompression::Lz4,
        LogCompression::None,
    ] {
        for inputs in [false, true] {
            let (s, rows, bytes) = sink(&recs, &tmp.join("sink"), compression, inputs, 100);
            let in_bytes = if inputs {
                dir_bytes(&tmp.join("sink").join("inputs"))
            } else {
                0
            };
            println!(
                "{:<12} {:<16} {:>14.0} {:>16}",
                format!("{compression:?}").to_lowercase(),
                if inputs { "frames + inputs" } else { "frames" },
                rows as f64 / s,
                if inputs {
                    format!(
                        "{:.1} + {:.0}",
                        bytes as f64 / rows as f64,
                        in_bytes as f64 / rows as f64
                    )
                } else {
                    format!("{:.1}", bytes as f64 / rows as f64)
                }
            );
        }
    }
    drop(recs);

    // 2. 10 million rows, queried.
    let steps = rows_wanted.div_ceil(UTTS * FRAMES);
    let run = tmp.join("run");
    let mut total_rows = 0u64;
    let t = Instant::now();
    {
        let p = FramesLogParams {
            every: 1,
            utterances: 1.0,
            rotate_every: 1000,
            inputs_table: None,
            ..FramesLogParams::default()
        };
        let mut log = FrameLog::new(&p, "bench", &run, 7);
        for chunk in 0..steps.div_ceil(500) {
            let n = 500.min(steps - chunk * 500);
            let mut recs = records(n, 100 + chunk as u64);
            for r in &mut recs {
                r.step += (chunk * 500) as u64;
            }
            for r in &recs {
                log.write(r).expect("write");
            }
        }
        total_rows = log.finish().expect("finish").frames.rows.max(total_rows);
    }
    let _ = std::fs::write(run.join("spec.yaml"), "name: bench\n");
    println!(
        "\n{total_rows} frame rows written in {:.1} s ({} MB, zstd)",
        t.elapsed().as_secs_f64(),
        dir_bytes(&run.join("frames")) / 1_000_000
    );
    let queries = [
        ("per utterance", "SELECT utt_id, count(*) AS n, avg(recon_loss) AS rec, avg(teacher_pred) AS tp FROM frames WHERE masked GROUP BY utt_id ORDER BY rec DESC"),
        ("per 1000 steps", "SELECT step / 1000 AS k, avg(CASE WHEN hard THEN 1.0 ELSE 0.0 END) AS hard_share, sum(CASE WHEN masked THEN 1 ELSE 0 END) AS masked, avg(student_pred) AS sp FROM frames GROUP BY step / 1000 ORDER BY k"),
    ];
    let session = lab::sql::Session::open(&[run.clone()]).expect("session");
    let mut ours = Vec::new();
    let first = session.query(queries[0].1).expect("query");
    let mut mine: Vec<(String, i64, f64)> = Vec::new();
    for b in &first {
        use arrow::array::AsArray;
        let ids =
            arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).expect("utf8");
        let n = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Int64).expect("i64");
        let rec =
            arrow::compute::cast(b.column(2), &arrow::datatypes::DataType::Float64).expect("f64");
        for i in 0..b.num_rows() {
            mine.push((
                ids.as_string::<i32>().value(i).to_string(),
                n.as_primitive::<arrow::datatypes::Int64Type>().value(i),
                rec.as_primitive::<arrow::datatypes::Float64Type>().value(i),
            ));
        }
    }
    for (name, sql) in &queries {
        let mut best = f64::INFINITY;
        let mut groups = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let b = session.query(sql).expect("query");
            best = best.min(t.elapsed().as_secs_f64());
            groups = b.iter().map(|b| b.num_rows()).sum::<usize>();
        }
        ours.push((name, best, groups));
    }
    drop(session);
    let reference: serde_json::Value = std::process::Command::new("python3")
        .arg(root.join("benches/logs_reference.py"))
        .arg(run.join("frames"))
        .args(queries.iter().map(|q| q.1))
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(serde_json::Value::Null);
    println!("group-by over {total_rows} rows (best of 3; files read by each engine, 2 cores):");
    println!(
        "{:<16} {:>8} {:>22} {:>30}",
        "query", "groups", "ehmam (DataFusion) s", "DuckDB s (pyarrow read + query)"
    );
    for (i, (name, s, groups)) in ours.iter().enumerate() {
        let duck = reference
            .get("queries")
            .and_then(|q| q.get(i))
            .and_then(|v| v.as_f64());
        let load = reference.get("load_s").and_then(|v| v.as_f64());
        let d = match (duck, load) {
            (Some(d), Some(l)) => {
                format!("{:.2} + {:.2} = {:.2} ({:.2}×)", l, d, l + d, (l + d) / s)
            }
            _ => "not installed".to_string(),
        };
        println!("{:<16} {:>8} {:>22.2} {:>30}", name, groups, s, d);
    }
    if let Some(check) = reference.get("check").and_then(|v| v.as_array()) {
        let mut theirs: Vec<(String, i64, f64)> = check
            .iter()
            .filter_map(|r| Some((r[0].as_str()?.to_string(), r[1].as_i64()?, r[2].as_f64()?)))
            .collect();
        theirs.sort_by(|a, b| a.0.cmp(&b.0));
        mine.sort_by(|a, b| a.0.cmp(&b.0));
        let same = theirs.len() == mine.len()
            && theirs.iter().zip(&mine).all(|(a, b)| {
                a.0 == b.0 && a.1 == b.1 && (a.2 - b.2).abs() < 1e-6 * a.2.abs().max(1.0)
            });
        println!(
            "answers: {} groups, counts and means {} DuckDB's",
            mine.len(),
            if same { "equal to" } else { "DIFFERENT from" }
        );
    }
    if let Some(v) = reference.get("duckdb").and_then(|v| v.as_str()) {
        println!(
            "(DuckDB {v}, pyarrow {}; DuckDB queries the Arrow table pyarrow read from the same files; its query-only time is the second figure)",
            reference.get("pyarrow").and_then(|v| v.as_str()).unwrap_or("?")
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
