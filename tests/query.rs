//! `ehmam query` against damage and size: a log part with a flipped byte is skipped with a
//! warning that names it (its rows left out, exit 0, no panic); a query over its `--memory`
//! fails cleanly; a result larger than the limit streams.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// A short training run (5 steps, parts of 2 steps), made once for this binary.
fn run_dir() -> &'static Path {
    static F: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &F.get_or_init(|| {
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
        let dir = tmp.path().join("run");
        let sets = [
            format!("run_dir={}", dir.display()),
            "name=q".into(),
            format!("stages.shards.with.dir={}", shards.display()),
            "stages.student.with.max_steps=5".into(),
            "stages.frames.with.every=1".into(),
            "stages.frames.with.utterances=1.0".into(),
            "stages.frames.with.rotate_every=2".into(),
            "stages.steps.with.rotate_every=2".into(),
        ];
        let mut args = vec!["run", "specs/tiny.yaml", "--quiet"];
        for s in &sets {
            args.push("--set");
            args.push(s);
        }
        ok(&args);
        (tmp, dir)
    })
    .1
}

fn parts(dir: &Path) -> Vec<PathBuf> {
    let mut p: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "arrow"))
        .collect();
    p.sort();
    p
}

/// (rows, sum of step) of one part, read with arrow alone.
fn rows_and_steps(part: &Path) -> (u64, i64) {
    let r =
        arrow::ipc::reader::FileReader::try_new(std::fs::File::open(part).unwrap(), None).unwrap();
    let (mut n, mut sum) = (0u64, 0i64);
    for b in r {
        let b = b.unwrap();
        let s = b
            .column_by_name("step")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .clone();
        n += b.num_rows() as u64;
        sum += s.values().iter().sum::<i64>();
    }
    (n, sum)
}

#[test]
fn a_part_with_a_flipped_byte_is_skipped_with_a_warning() {
    let run = run_dir();
    let frames = parts(&run.join("frames"));
    assert_eq!(frames.len(), 3, "{frames:?}");
    let whole: Vec<(u64, i64)> = frames.iter().map(|p| rows_and_steps(p)).collect();
    let len = std::fs::metadata(&frames[1]).unwrap().len() as usize;
    // Data in the middle, near the start (schema), and the footer.
    for at in [len / 2, len / 5, len - 30] {
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("run");
        copy_tree(run, &copy);
        let bad = parts(&copy.join("frames"))[1].clone();
        let mut bytes = std::fs::read(&bad).unwrap();
        bytes[at] ^= 0x10;
        std::fs::write(&bad, &bytes).unwrap();
        let o = ehmam(&[
            "query",
            "--format",
            "csv",
            copy.to_str().unwrap(),
            "SELECT count(*) AS n, sum(step) AS s FROM frames",
        ]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "byte {at}: {t}");
        assert!(!t.contains("panicked"), "{t}");
        let name = bad.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            t.lines()
                .any(|l| l.starts_with("warning") && l.contains(&name) && l.contains("damaged")),
            "byte {at}: no warning naming {name}:\n{t}"
        );
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let want = (whole[0].0 + whole[2].0, whole[0].1 + whole[2].1);
        assert_eq!(
            out,
            format!("n,s\n{},{}\n", want.0, want.1),
            "byte {at}: the rows of the two sound parts only"
        );
    }
    // Untouched, every part counts and nothing is said.
    let o = ehmam(&[
        "query",
        "--format",
        "csv",
        run.to_str().unwrap(),
        "SELECT count(*) AS n FROM frames",
    ]);
    let n: u64 = whole.iter().map(|w| w.0).sum();
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("n\n{n}\n"));
    assert!(o.stderr.is_empty(), "{}", text(&o));
}

#[test]
fn a_query_over_its_memory_limit_fails_cleanly() {
    let run = run_dir().to_str().unwrap();
    let o = ehmam(&[
        "query",
        "--memory",
        "8M",
        run,
        "SELECT count(DISTINCT x) FROM (SELECT unnest(range(0, 4000000)) AS x)",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(
        t.contains("Resources exhausted") && t.contains("--memory"),
        "{t}"
    );
    for bad in ["lots", "0", "150%"] {
        let o = ehmam(&["query", "--memory", bad, run, "SELECT 1"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o).contains(&format!("--memory `{bad}`")),
            "{}",
            text(&o)
        );
    }
    let o = ehmam(&[
        "query",
        "--memory",
        "25%",
        "--format",
        "csv",
        run,
        "SELECT 1 AS one",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "one\n1\n",
        "{}",
        text(&o)
    );
}

/// A result far beyond the memory limit (10^10 rows) streams: its first rows arrive while the
/// query runs, and closing the pipe ends it quietly.
#[test]
fn a_large_result_streams_and_a_closed_pipe_ends_it() {
    let run = run_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ehmam"))
        .args([
            "query",
            "--memory",
            "16M",
            "--format",
            "csv",
            run.to_str().unwrap(),
            "SELECT a.x AS i, b.x AS j FROM (SELECT unnest(range(0, 100000)) AS x) a \
             CROSS JOIN (SELECT unnest(range(0, 100000)) AS x) b",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let lines: Vec<String> = BufReader::new(stdout)
            .lines()
            .take(100_001)
            .map(|l| l.unwrap())
            .collect();
        let _ = tx.send(lines);
        // The pipe closes here.
    });
    let lines = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("no 100,000 rows within 120 s: the result is not streamed");
        }
    };
    assert_eq!(lines[0], "i,j");
    assert_eq!(lines.len(), 100_001);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
