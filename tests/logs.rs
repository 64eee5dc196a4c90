//! The frame-level logs of a short training run through the command line: what `ehmam query`
//! returns equals what this test computes by reading the Arrow files itself; the logs agree with
//! the student's own step records; writing statements and other files are refused; a part cut
//! off by a crash is skipped with a warning; several runs union with `run` telling them apart;
//! `ehmam plot` draws its figures.

mod common;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Int32Type, Int64Type};
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Demo shards and two short runs (different names and masks), made once for this binary.
struct Fixture {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let shards = tmp.path().join("shards");
        ok(&[
            "run",
            "specs/prep.yaml",
            "--quiet",
            "--set",
            &format!("run_dir={}", tmp.path().join("prep").display()),
            "--set",
            &format!("stages.shards.with.dir={}", shards.display()),
        ]);
        let run = |name: &str, mask: &str| -> PathBuf {
            let dir = tmp.path().join(name);
            let sets = [
                format!("run_dir={}", dir.display()),
                format!("name={name}"),
                format!("stages.shards.with.dir={}", shards.display()),
                format!("stages.mask.kind={mask}"),
                "stages.student.with.max_steps=5".into(),
                "stages.frames.with.every=1".into(),
                "stages.frames.with.utterances=1.0".into(),
                "stages.frames.with.inputs_every=2".into(),
                "stages.frames.with.rotate_every=2".into(),
                "stages.steps.with.rotate_every=2".into(),
            ];
            let mut args = vec![
                "run".to_string(),
                "specs/tiny.yaml".into(),
                "--quiet".into(),
            ];
            for s in &sets {
                args.push("--set".into());
                args.push(s.clone());
            }
            ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
            dir
        };
        let a = run("alpha", "mask.easy_to_hard");
        let b = run("beta", "mask.random");
        Fixture { _tmp: tmp, a, b }
    })
}

/// Every row of the frames table, read from the Arrow IPC parts without DataFusion.
#[derive(Debug, Clone)]
struct Frame {
    step: i64,
    utt: String,
    member: i32,
    frame: i32,
    masked: bool,
    hard: bool,
    student_pred: f32,
    recon: Option<f32>,
}

fn read_frames(run: &Path) -> Vec<Frame> {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(run.join("frames"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "arrow"))
        .collect();
    parts.sort();
    assert!(
        parts.len() >= 3,
        "5 steps rotated every 2 give 3 parts: {parts:?}"
    );
    let mut out = Vec::new();
    for p in parts {
        let r = arrow::ipc::reader::FileReader::try_new(std::fs::File::open(&p).unwrap(), None)
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let c = |n: &str| b.column_by_name(n).unwrap().clone();
            let (step, utt, member, frame) = (c("step"), c("utt_id"), c("member"), c("frame"));
            let (masked, hard, sp, rl) =
                (c("masked"), c("hard"), c("student_pred"), c("recon_loss"));
            for i in 0..b.num_rows() {
                let rl = rl.as_primitive::<Float32Type>();
                out.push(Frame {
                    step: step.as_primitive::<Int64Type>().value(i),
                    utt: utt.as_string::<i32>().value(i).to_string(),
                    member: member.as_primitive::<Int32Type>().value(i),
                    frame: frame.as_primitive::<Int32Type>().value(i),
                    masked: masked.as_boolean().value(i),
                    hard: hard.as_boolean().value(i),
                    student_pred: sp.as_primitive::<Float32Type>().value(i),
                    recon: if rl.is_null(i) {
                        None
                    } else {
                        Some(rl.value(i))
                    },
                });
            }
        }
    }
    out
}

fn f(s: &str) -> f64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

#[test]
fn query_results_equal_an_independent_reading_of_the_logs() {
    let fx = fixture();
    let frames = read_frames(&fx.a);
    // Per step: rows, masked rows, mean recon loss over masked frames, hard frames.
    let mut mine: BTreeMap<i64, (u64, u64, f64, u64)> = BTreeMap::new();
    for r in &frames {
        let e = mine.entry(r.step).or_default();
        e.0 += 1;
        if r.masked {
            e.1 += 1;
            e.2 += r.recon.expect("recon_loss set where masked") as f64;
        } else {
            assert!(r.recon.is_none(), "recon_loss is null where not masked");
        }
        e.3 += r.hard as u64;
        assert!(!r.hard || r.masked, "hard frames are masked");
    }
    assert_eq!(
        mine.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    let rows = query_csv(&[&fx.a], "SELECT step, count(*), sum(CASE WHEN masked THEN 1 ELSE 0 END), avg(recon_loss), sum(CASE WHEN hard THEN 1 ELSE 0 END) FROM frames GROUP BY step ORDER BY step");
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let (n, m, mean, h) = mine[&(f(&r[0]) as i64)];
        assert_eq!(
            (f(&r[1]) as u64, f(&r[2]) as u64, f(&r[4]) as u64),
            (n, m, h),
            "step {}",
            r[0]
        );
        assert!(
            (f(&r[3]) - mean / m as f64).abs() < 1e-5,
            "step {}: avg(recon_loss) {} vs {}",
            r[0],
            r[3],
            mean / m as f64
        );
    }
    // With every utterance of every step logged, the frames table reproduces the student's
    // step records: L_rec is the mean per-frame loss over masked frames (method §1.7), the
    // masked fraction is masked / frames, and the student predictor's rank agreement is the
    // share of masked pairs (within an utterance, distinct losses) it orders like the losses.
    let steps = query_csv(
        &[&fx.a],
        "SELECT step, loss_rec, masked_frac, frames, rank_agreement FROM steps ORDER BY step",
    );
    assert_eq!(steps.len(), 5);
    for s in &steps {
        let step = f(&s[0]) as i64;
        let (n, m, sum, _) = mine[&step];
        assert!(
            (f(&s[1]) - sum / m as f64).abs() < 1e-4 * f(&s[1]).abs().max(1.0),
            "step {step}: loss_rec {} vs frames {}",
            s[1],
            sum / m as f64
        );
        assert!(
            (f(&s[2]) - m as f64 / n as f64).abs() < 1e-9,
            "step {step}: masked_frac"
        );
        assert_eq!(f(&s[3]) as u64, n);
        let mut by_utt: BTreeMap<(i32, &str), Vec<(f32, f32)>> = BTreeMap::new();
        for r in frames.iter().filter(|r| r.step == step && r.masked) {
            by_utt
                .entry((r.member, r.utt.as_str()))
                .or_default()
                .push((r.student_pred, r.recon.unwrap_or(f32::NAN)));
        }
        let (mut agree, mut total) = (0u64, 0u64);
        for v in by_utt.values() {
            for i in 0..v.len() {
                for j in i + 1..v.len() {
                    if v[i].1 != v[j].1 {
                        total += 1;
                        agree += ((v[j].0 - v[i].0) * (v[j].1 - v[i].1) > 0.0) as u64;
                    }
                }
            }
        }
        assert!(
            (f(&s[4]) - agree as f64 / total as f64).abs() < 1e-12,
            "step {step}: rank_agreement {} vs {agree}/{total}",
            s[4]
        );
    }
    // Frame indices run 0..T per member, without holes.
    let mut per: BTreeMap<(i64, i32), Vec<i32>> = BTreeMap::new();
    for r in &frames {
        per.entry((r.step, r.member)).or_default().push(r.frame);
    }
    for v in per.values() {
        assert_eq!(*v, (0..v.len() as i32).collect::<Vec<_>>());
    }
}

#[test]
fn several_runs_union_and_run_tells_them_apart() {
    let fx = fixture();
    let rows = query_csv(&[&fx.a, &fx.b], "SELECT run, count(*), sum(CASE WHEN hard THEN 1 ELSE 0 END), max(hard_ratio) FROM frames GROUP BY run ORDER BY run");
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0][0].as_str(), rows[1][0].as_str()),
        ("alpha", "beta")
    );
    assert_eq!(f(&rows[0][1]) as usize, read_frames(&fx.a).len());
    assert_eq!(f(&rows[1][1]) as usize, read_frames(&fx.b).len());
    assert_eq!(rows[1][2], "0", "mask.random chooses nothing by hardness");
    assert_eq!(f(&rows[1][3]), 0.0);
    let steps = query_csv(
        &[&fx.a, &fx.b],
        "SELECT run, count(*), count(DISTINCT step) FROM steps GROUP BY run ORDER BY run",
    );
    assert_eq!(
        steps,
        vec![
            vec!["alpha".to_string(), "5".into(), "5".into()],
            vec!["beta".to_string(), "5".into(), "5".into()]
        ]
    );
    // Input features are logged every `inputs_every` steps, one row per logged frame.
    let inputs = query_csv(&[&fx.a], "SELECT step, count(*), min(feature_dim), max(cardinality(features)) FROM inputs GROUP BY step ORDER BY step");
    let per_step = |s: i64| {
        read_frames(&fx.a)
            .iter()
            .filter(|r| r.step == s)
            .count()
            .to_string()
    };
    assert_eq!(
        inputs,
        vec![
            vec!["0".to_string(), per_step(0), "160".into(), "160".into()],
            vec!["2".into(), per_step(2), "160".into(), "160".into()],
            vec!["4".into(), per_step(4), "160".into(), "160".into()]
        ]
    );
    // JSON output keeps NULLs.
    let o = ok(&[
        "query",
        "--format",
        "json",
        fx.a.to_str().unwrap(),
        "SELECT recon_loss FROM frames WHERE NOT masked LIMIT 1",
    ]);
    assert!(o.contains("\"recon_loss\":null"), "{o}");
}

#[test]
fn writing_statements_and_other_files_are_refused() {
    let fx = fixture();
    let a = fx.a.to_str().unwrap();
    let target = fx.a.join("out.csv");
    for sql in [
        format!("COPY (SELECT * FROM steps) TO '{}'", target.display()),
        "CREATE TABLE t AS SELECT * FROM steps".to_string(),
        "INSERT INTO steps SELECT * FROM steps".to_string(),
        "DROP TABLE frames".to_string(),
        format!(
            "CREATE EXTERNAL TABLE x STORED AS ARROW LOCATION '{}'",
            fx.a.join("frames").display()
        ),
        "SET datafusion.execution.batch_size = 1".to_string(),
        format!("SELECT * FROM '{}'", fx.b.join("steps").display()),
        "SELECT 1; DROP TABLE steps".to_string(),
    ] {
        let o = ehmam(&["query", a, &sql]);
        assert!(!o.status.success(), "{sql} was not refused: {}", text(&o));
        assert!(!text(&o).contains("panicked"), "{}", text(&o));
    }
    assert!(!target.exists());
    let o = ehmam(&["query", a, "COPY (SELECT 1) TO 'x.csv'"]);
    assert!(
        text(&o).to_lowercase().contains("read-only") || text(&o).contains("refused"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_part_cut_off_by_a_crash_is_skipped_with_a_warning() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("alpha");
    copy_tree(&fx.a, &copy);
    let mut parts: Vec<PathBuf> = std::fs::read_dir(copy.join("frames"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    parts.sort();
    let last = parts.last().unwrap().clone();
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() / 2]).unwrap();
    // A leftover temporary part (a crash mid-write) is not a table file either.
    std::fs::write(
        copy.join("frames").join("part-000000099.arrow.tmp"),
        b"partial",
    )
    .unwrap();
    let o = ehmam(&[
        "query",
        "--format",
        "csv",
        copy.to_str().unwrap(),
        "SELECT count(*), max(step) FROM frames",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("warning")
            && text(&o).contains(&last.file_name().unwrap().to_string_lossy().to_string()),
        "{}",
        text(&o)
    );
    let row: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    let whole = read_frames(&fx.a);
    let kept = whole.iter().filter(|r| r.step < 4).count();
    assert_eq!(
        f(&row[0]) as usize,
        kept,
        "the rows of the intact parts (steps 0–3)"
    );
    assert_eq!(row[1], "3");
}

/// PNG width and height from the IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    (
        u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
        u32::from_be_bytes([b[20], b[21], b[22], b[23]]),
    )
}

#[test]
fn plot_draws_the_figures() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plots");
    let o = ok(&[
        "plot",
        fx.a.to_str().unwrap(),
        fx.b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let files: Vec<PathBuf> = o.lines().map(PathBuf::from).collect();
    assert_eq!(files.len(), 4, "{o}");
    assert_eq!(png_size(&out.join("losses.png")), (1200, 940));
    assert_eq!(png_size(&out.join("health.png")), (1200, 940));
    let frames: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("frames-alpha-step4-")
        })
        .collect();
    assert_eq!(frames.len(), 1, "{o}");
    assert_eq!(png_size(frames[0]), (1400, 820));
    // A chosen utterance and step; an unknown one is a clear error.
    let utt = read_frames(&fx.a)
        .into_iter()
        .find(|r| r.step == 2)
        .unwrap()
        .utt;
    let o = ok(&[
        "plot",
        fx.a.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--utt",
        &utt,
        "--step",
        "2",
    ]);
    assert!(
        o.contains(&format!(
            "frames-alpha-step2-{}",
            utt.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                "_"
            )
        )),
        "{o}"
    );
    let o = ehmam(&[
        "plot",
        fx.a.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--utt",
        "no-such-utterance",
    ]);
    assert!(
        !o.status.success()
            && text(&o).contains("no-such-utterance")
            && !text(&o).contains("panicked"),
        "{}",
        text(&o)
    );
}
