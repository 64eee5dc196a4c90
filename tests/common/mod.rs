//! Helpers for the end-to-end tests: run the `ehmam` binary and read what it wrote.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `ehmam ARGS` from the repository root.
pub fn ehmam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ehmam"))
        .args(args)
        .current_dir(root())
        .env("CI", "true")
        .output()
        .expect("cannot start ehmam")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `ehmam` and asserts success.
pub fn ok(args: &[&str]) -> String {
    let o = ehmam(args);
    assert!(o.status.success(), "ehmam {args:?} failed:\n{}", text(&o));
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `ehmam` and asserts success; returns stdout and stderr together (progress notes such as
/// "resuming from" are on stderr).
pub fn ok_all(args: &[String]) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ehmam(&a);
    assert!(
        o.status.success() && !text(&o).contains("panicked"),
        "ehmam {a:?} failed:\n{}",
        text(&o)
    );
    text(&o)
}

/// Query as CSV rows (header dropped).
pub fn query_csv(dirs: &[&Path], sql: &str) -> Vec<Vec<String>> {
    let mut args: Vec<String> = vec!["query".into(), "--format".into(), "csv".into()];
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    args.push(sql.into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(&a);
    out.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// Every file below `dir` with its bytes, by relative path; the lock files of the directories a
/// run wrote (`.ehmam.lock`: who held them, not output) left out.
pub fn tree_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let mut es: Vec<PathBuf> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        es.sort();
        for p in es {
            if p.is_dir() {
                walk(base, &p, out);
            } else if p.file_name() == Some(std::ffi::OsStr::new(pipeline::lock::LOCK_FILE)) {
                continue;
            } else {
                out.push((
                    p.strip_prefix(base).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// Every file below `dir` with the BLAKE3 hash of its bytes, by relative path (printable).
pub fn tree_hashes(dir: &Path) -> Vec<(String, String)> {
    tree_bytes(dir)
        .into_iter()
        .map(|(n, b)| (n, blake3::hash(&b).to_hex().to_string()))
        .collect()
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let dst = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// Shards of the whole demo corpus (`specs/prep.yaml`), made once per test binary.
pub fn demo_shards() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let run = format!("run_dir={}", tmp.path().join("prep").display());
        let out = format!(
            "stages.shards.with.dir={}",
            tmp.path().join("shards").display()
        );
        ok(&[
            "run",
            "specs/prep.yaml",
            "--quiet",
            "--set",
            &run,
            "--set",
            &out,
        ]);
        tmp
    });
    Box::leak(Box::new(dir.path().join("shards")))
}

/// Runs `ehmam ARGS` and kills it (SIGKILL) as soon as `ready` holds, which it must before the
/// run ends and within `limit_s` seconds.
pub fn kill_when(
    args: &[String],
    env: &[(String, String)],
    limit_s: u64,
    ready: impl Fn() -> bool,
) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ehmam"))
        .args(args)
        .current_dir(root())
        .env("CI", "true")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(limit_s));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
