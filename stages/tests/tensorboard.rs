//! `log.tensorboard` read back by an independent reader: TensorBoard's own `EventAccumulator`
//! (tests/tensorboard_read.py) gives the same steps and f32 values as were written, a record cut
//! short by a crash is skipped by it without error, and a resumed writer adds a new file without
//! writing any step twice.
//!
//! The Python half needs `python3 -c "import tensorboard"` to work (scripts/install-test-tools.sh
//! installs it; `EHMAM_PYTHON` names another interpreter). Without it these tests print SKIPPED
//! and pass, unless `EHMAM_REQUIRE_TENSORBOARD=1`, which makes a missing TensorBoard a failure.

use stages::items::StepRecord;
use stages::logs::tensorboard::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

type Scalar = (String, i64, f32);

fn python() -> String {
    std::env::var("EHMAM_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether TensorBoard's Python package can be imported; prints why a test skips its Python half.
fn tensorboard_available(test: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", "import tensorboard"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("EHMAM_REQUIRE_TENSORBOARD").as_deref() != Ok("1"),
            "EHMAM_REQUIRE_TENSORBOARD=1 but `{} -c \"import tensorboard\"` fails: run scripts/install-test-tools.sh",
            python()
        );
        // Straight to stderr, past the test harness's capture, so a plain `cargo test` shows it.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test} (TensorBoard's reader): `{} -c \"import tensorboard\"` fails; run scripts/install-test-tools.sh (or set EHMAM_REQUIRE_TENSORBOARD=1 to make this a failure)",
            python()
        );
    }
    ok
}

/// Every scalar of `dir` as TensorBoard's EventAccumulator reads it, sorted by tag and step.
fn tensorboard_read(dir: &Path) -> Vec<Scalar> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tensorboard_read.py");
    let o = Command::new(python())
        .arg(&script)
        .arg(dir)
        .output()
        .expect("python3 runs");
    assert!(
        o.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<(String, i64, f64)> = serde_json::from_slice(&o.stdout).expect("JSON rows");
    rows.into_iter()
        .map(|(t, s, v)| {
            let x = v as f32;
            // The reader's value is the event's float32 widened: exact, no rounding in between.
            assert!(x as f64 == v || (v.is_nan() && x.is_nan()), "{t}@{s}: {v}");
            (t, s, x)
        })
        .collect()
}

/// This crate's own reader, sorted like [`tensorboard_read`].
fn rust_read(dir: &Path) -> Vec<Scalar> {
    let mut v = read_scalars(dir).unwrap();
    v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    v
}

fn same(a: &[Scalar], b: &[Scalar]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && x.1 == y.1 && x.2.to_bits() == y.2.to_bits())
}

/// A record whose values vary by step: 0.0, values f32 rounds, undefined predictor metrics.
fn record(step: u64) -> StepRecord {
    let s = step as f64;
    StepRecord {
        step,
        epoch: (step / 100) as u32,
        lr: 1e-3 * (s / 300.0).min(1.0),
        loss: 7.0 / (1.0 + s).sqrt() + 1e-9 * s,
        loss_rec: 6.5 / (1.0 + s).sqrt(),
        loss_aux: if step.is_multiple_of(7) {
            0.0
        } else {
            0.1 / (1.0 + s)
        },
        tau: 0.99 + 0.009 * s / 300.0,
        hard_ratio: s / 300.0,
        masked_frac: 0.5 - 0.25 * s / 300.0,
        frames: 400,
        utterances: 3,
        audio_s: 8.0 + (step % 5) as f64,
        step_ms: 20.0 + (step % 3) as f64,
        target_std: 1.0 + 1e-3 * s,
        pred_std: if step.is_multiple_of(11) {
            f64::NAN
        } else {
            0.5
        },
        rank_agreement: if step.is_multiple_of(11) {
            f64::NAN
        } else {
            0.5 + s / 1000.0
        },
        teacher_rank_agreement: 0.55,
        grad_norm: 0.5,
        teacher_version: step,
        checkpoint_follows: false,
    }
}

/// The deterministic tags a record gives (throughput depends on the clock).
fn expected(steps: impl Iterator<Item = u64>) -> Vec<Scalar> {
    let mut out = Vec::new();
    for s in steps {
        let r = record(s);
        let mut v = vec![
            ("train/loss", r.loss),
            ("train/loss_rec", r.loss_rec),
            ("train/loss_aux", r.loss_aux),
            ("train/lr", r.lr),
            ("train/tau", r.tau),
            ("train/hard_ratio", r.hard_ratio),
            ("train/masked_frac", r.masked_frac),
            ("train/teacher_rank_agreement", r.teacher_rank_agreement),
            ("train/target_std", r.target_std),
            ("train/grad_norm", r.grad_norm),
            ("perf/step_ms", r.step_ms),
        ];
        if !s.is_multiple_of(11) {
            v.push(("train/rank_agreement", r.rank_agreement));
            v.push(("train/pred_std", r.pred_std));
        }
        out.extend(
            v.into_iter()
                .map(|(t, x)| (t.to_string(), s as i64, x as f32)),
        );
    }
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    out
}

fn without_perf_rates(v: &[Scalar]) -> Vec<Scalar> {
    v.iter()
        .filter(|x| x.0 != "perf/updates_per_s" && x.0 != "perf/audio_s_per_s")
        .cloned()
        .collect()
}

fn write_steps(run_dir: &Path, steps: std::ops::Range<u64>) -> TensorBoardSummary {
    let mut log = TensorBoardLog::new(&TensorBoardParams::default(), run_dir);
    for s in steps {
        log.write(&record(s)).unwrap();
    }
    log.finish().unwrap()
}

/// Half of one more record, as a crash in the middle of a write leaves it.
fn append_half_record(file: &Path, step: i64) {
    let event = Event {
        wall_time: 1.0,
        step,
        what: Some(EventWhat::Summary(Summary {
            value: vec![SummaryValue {
                tag: "train/loss".into(),
                value: Some(ValueKind::SimpleValue(123.0)),
            }],
        })),
    };
    let mut bytes = Vec::new();
    frame_record(&prost::Message::encode_to_vec(&event), &mut bytes);
    let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
}

fn copy_dir(from: &Path, to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    event_files(from)
        .unwrap()
        .into_iter()
        .map(|f| {
            let dst = to.join(f.file_name().unwrap());
            std::fs::copy(&f, &dst).unwrap();
            dst
        })
        .collect()
}

#[test]
fn tensorboard_reads_the_same_steps_and_values_and_skips_a_cut_record() {
    let tmp = tempfile::tempdir().unwrap();
    let sum = write_steps(tmp.path(), 0..300);
    assert_eq!((sum.points, sum.skipped), (300, 0));
    let dir = tmp.path().join("tensorboard");
    let ours = rust_read(&dir);
    assert!(same(&without_perf_rates(&ours), &expected(0..300)));
    // Throughput from the second point on, per tag once per step.
    let rates = ours.iter().filter(|x| x.0 == "perf/updates_per_s").count();
    assert_eq!(rates, 299);

    // A crash mid-write: half a record after the complete ones.
    let cut = tmp.path().join("cut");
    let files = copy_dir(&dir, &cut);
    append_half_record(&files[0], 300);
    assert!(same(&rust_read(&cut), &ours));

    if !tensorboard_available("tensorboard_reads_the_same_steps_and_values_and_skips_a_cut_record")
    {
        return;
    }
    let theirs = tensorboard_read(&dir);
    assert_eq!(theirs.len(), ours.len());
    assert!(same(&theirs, &ours), "EventAccumulator reads other scalars");
    assert!(
        same(&tensorboard_read(&cut), &ours),
        "EventAccumulator should skip the cut record and keep the complete ones"
    );
}

#[test]
fn a_resumed_writer_adds_a_file_and_writes_no_step_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tensorboard");
    // The first attempt logs 0..50 and crashes in the middle of writing step 50.
    write_steps(tmp.path(), 0..50);
    let first = event_files(&dir).unwrap();
    assert_eq!(first.len(), 1);
    append_half_record(&first[0], 50);
    let crashed = std::fs::read(&first[0]).unwrap();
    // The resumed attempt restarts at its checkpoint, step 30.
    let sum = write_steps(tmp.path(), 30..80);
    assert_eq!((sum.points, sum.skipped), (30, 20));
    let files = event_files(&dir).unwrap();
    assert_eq!(files.len(), 2, "a new file: {files:?}");
    assert_eq!(sum.file.as_ref(), Some(&files[1]));
    assert!(
        std::fs::read(&files[0]).unwrap() == crashed,
        "the earlier attempt's file is left as it was"
    );
    let ours = rust_read(&dir);
    assert!(same(&without_perf_rates(&ours), &expected(0..80)));
    for tag in ["train/loss", "perf/step_ms"] {
        let steps: Vec<i64> = ours.iter().filter(|x| x.0 == tag).map(|x| x.1).collect();
        assert_eq!(
            steps,
            (0..80).collect::<Vec<i64>>(),
            "{tag}: each step once"
        );
    }
    // A third attempt with nothing new writes no file.
    let sum = write_steps(tmp.path(), 60..80);
    assert_eq!((sum.points, sum.skipped, sum.file), (0, 20, None));
    assert_eq!(event_files(&dir).unwrap().len(), 2);

    if !tensorboard_available("a_resumed_writer_adds_a_file_and_writes_no_step_twice") {
        return;
    }
    assert!(
        same(&tensorboard_read(&dir), &ours),
        "EventAccumulator reads both files as one run, each step once"
    );
}
