//! Two processes, one directory: a run, prep or sweep holds an OS lock on every directory it
//! writes, a second process is refused at once naming the holder, a crashed holder leaves no
//! lock, Ctrl-C exits 130, and `--force` moves only a run directory that may be moved.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Shards of one demo speaker, made once for this test binary.
fn shards() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        prep(&tmp.path().join("prep"), &tmp.path().join("shards"), &[]);
        tmp
    });
    Box::leak(Box::new(dir.path().join("shards")))
}

fn prep_args(run: &Path, shards: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into(), "specs/prep.yaml".into(), "--quiet".into()];
    let demo = root().join("data/demo/1001");
    for s in [
        format!("run_dir={}", run.display()),
        format!("stages.shards.with.dir={}", shards.display()),
        format!("stages.decode.with.input={}", demo.display()),
        "stages.decode.with.layout=dir".to_string(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Preps one demo speaker into `shards` (run directory `run`).
fn prep(run: &Path, shards: &Path, extra: &[&str]) -> std::process::Output {
    let a = prep_args(run, shards, extra);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ehmam(&a)
}

/// `ehmam run specs/tiny.yaml` into `run` over [`shards`], with `--set`s and flags.
fn train_args(run: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into(), "specs/tiny.yaml".into(), "--quiet".into()];
    for s in [
        format!("run_dir={}", run.display()),
        format!("stages.shards.with.dir={}", shards().display()),
        "stages.batch.with.max_seconds=8".to_string(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn train(run: &Path, extra: &[&str]) -> std::process::Output {
    let a = train_args(run, extra);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ehmam(&a)
}

/// A training run that would take minutes, in the background.
fn long_training(run: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ehmam"))
        .args(train_args(
            run,
            &["--set", "stages.student.with.max_steps=100000"],
        ))
        .current_dir(root())
        .env("CI", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `child` holds `dir`'s lock (the run has started), reading the lock file only
/// (probing the lock itself could make the child's own attempt fail).
fn wait_for_holder(dir: &Path, child: &mut Child) -> String {
    let start = Instant::now();
    let me = format!("pid: {}", child.id());
    loop {
        let text = std::fs::read_to_string(dir.join(pipeline::lock::LOCK_FILE)).unwrap_or_default();
        if text.contains(&me) {
            return text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the run ended ({status}) before it held {}", dir.display());
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "nobody locked {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    let s = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

fn output_of(child: Child) -> (Option<i32>, String) {
    let o = child.wait_with_output().unwrap();
    (o.status.code(), text(&o))
}

#[test]
fn a_second_run_is_refused_naming_the_holder_and_ctrl_c_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut child = long_training(&run);
    let holder = wait_for_holder(&run, &mut child);
    assert!(holder.contains("run `tiny`"), "{holder}");
    // Before the locks, this second run trained beside the first, into the same tables.
    let o = train(&run, &["--set", "stages.student.with.max_steps=100000"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("in use by another ehmam process"), "{t}");
    assert!(t.contains(&format!("pid {}", child.id())), "{t}");
    assert!(t.contains("started 20"), "{t}");
    // --force never moves a directory another process holds.
    let o = train(&run, &["--force", "--set", "stages.student.with.lr=0.002"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("in use by another ehmam process"));
    assert!(!tmp.path().join("run.replaced-1").exists());
    // Ctrl-C: every stage stops, the exit status is the shell's 128 + SIGINT.
    signal(&child, "-INT");
    let (code, t) = output_of(child);
    assert_eq!(code, Some(130), "{t}");
    assert_eq!(
        pipeline::RunStatus::read(&run).unwrap().status,
        "interrupted"
    );
    assert_eq!(pipeline::lock::holder(&run), None);

    // A holder killed outright (-9) leaves no lock behind: the next run goes on.
    let mut child = long_training(&run);
    wait_for_holder(&run, &mut child);
    signal(&child, "-KILL");
    let (code, _) = output_of(child);
    assert_eq!(code, None, "killed by a signal");
    assert_eq!(pipeline::lock::holder(&run), None);
    let o = train(&run, &["--set", "stages.student.with.max_steps=2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(pipeline::RunStatus::read(&run).unwrap().is_complete());
}

#[test]
fn a_prep_or_sweep_is_refused_while_another_process_holds_what_it_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, shards) = (tmp.path().join("run"), tmp.path().join("shards"));
    let me = format!("pid {}", std::process::id());
    // The test process holds the shard directory as another ehmam would.
    let held = pipeline::lock_dir(&shards, "prep elsewhere").unwrap();
    let o = prep(&run, &shards, &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains(&me) && t.contains("prep elsewhere"), "{t}");
    assert!(!shards.join("index.json").exists(), "nothing written: {t}");
    drop(held);
    // The run directory likewise.
    let held = pipeline::lock_dir(&run, "a run elsewhere").unwrap();
    let o = prep(&run, &shards, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("a run elsewhere"), "{}", text(&o));
    assert!(!run.join("spec.yaml").exists());
    drop(held);
    let o = prep(&run, &shards, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // Nothing mixed between a store's writer and its readers: while a run reads the shards (a
    // shared lock) no prep writes them, and while a prep writes them no run reads them.
    let reading = pipeline::lock::lock_dir_shared(&shards).unwrap().unwrap();
    let o = prep(&run, &shards, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("reading it as its input"), "{}", text(&o));
    drop(reading);
    // Retried: a child process that another test of this binary forks in the same instant holds
    // a copy of the shared lock's descriptor until it execs (flock locks follow the open file
    // description), which on a loaded machine can outlast `drop(reading)` by a few milliseconds.
    let writing = {
        let mut tries = 0;
        loop {
            match pipeline::lock_dir(&shards, "prep elsewhere") {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let o = ehmam(&[
        "run",
        "specs/tiny.yaml",
        "--quiet",
        "--set",
        &format!("run_dir={}", tmp.path().join("train").display()),
        "--set",
        &format!("stages.shards.with.dir={}", shards.display()),
        "--set",
        "stages.student.with.max_steps=1",
        "--set",
        "stages.batch.with.max_seconds=8",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("prep elsewhere"), "{}", text(&o));
    drop(writing);
    // A sweep holds its output directory.
    let out = tmp.path().join("sweep");
    let held = pipeline::lock_dir(&out, "another sweep").unwrap();
    let o = ehmam(&[
        "sweep",
        "specs/prep.yaml",
        "--grid",
        "stages.decode.workers=[1]",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("another sweep"), "{}", text(&o));
    drop(held);
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn force_moves_only_a_run_directory_that_may_move() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");

    // A directory that holds files but no run: refused, with or without --force, and untouched.
    let notrun = tmp.path().join("notrun");
    std::fs::create_dir_all(&notrun).unwrap();
    std::fs::write(notrun.join("precious.txt"), "keep me").unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let o = prep(&notrun, &shards, extra);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{t}");
        assert!(
            t.contains("not a run directory") && t.contains("precious.txt"),
            "{t}"
        );
        assert_eq!(
            std::fs::read_to_string(notrun.join("precious.txt")).unwrap(),
            "keep me"
        );
        assert!(!tmp.path().join("notrun.replaced-1").exists());
        assert_eq!(
            entries(&notrun),
            ["precious.txt"],
            "nothing of ours left there"
        );
    }

    // A run; then --force with a spec that does not validate moves nothing.
    let run = tmp.path().join("run");
    assert!(prep(&run, &shards, &[]).status.success());
    let o = prep(
        &run,
        &shards,
        &["--force", "--set", "stages.decode.with.sample_rate=-5"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(!tmp.path().join("run.replaced-1").exists(), "{}", text(&o));
    assert!(run.join("spec.yaml").exists());

    // A trailing slash names the same directory: the old run goes beside it, not into it.
    let slashed = format!("{}/", run.display());
    let o = prep(
        Path::new(&slashed),
        &shards,
        &["--force", "--set", "description=another"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(tmp.path().join("run.replaced-1").join("spec.yaml").exists());
    assert!(!run.join(".replaced-1").exists());

    // A run directory holding the shards this spec reads is never moved.
    let inner = tmp.path().join("inner");
    assert!(prep(&inner, &inner.join("shards"), &[]).status.success());
    let o = ehmam(&[
        "run",
        "specs/tiny.yaml",
        "--quiet",
        "--force",
        "--set",
        &format!("run_dir={}", inner.display()),
        "--set",
        &format!("stages.shards.with.dir={}", inner.join("shards").display()),
        "--set",
        "stages.student.with.max_steps=1",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("reads") && t.contains("shards"), "{t}");
    assert!(!tmp.path().join("inner.replaced-1").exists());
    assert!(inner.join("shards/index.json").exists());

    // `run_dir: .` works in an empty directory, and --force refuses to move the current one.
    let here = tmp.path().join("here");
    std::fs::create_dir_all(&here).unwrap();
    let in_here = |extra: &[&str]| {
        let mut a = prep_args(Path::new("."), &tmp.path().join("shards2"), extra);
        a.iter_mut().for_each(|s| {
            if s == "specs/prep.yaml" {
                *s = root().join("specs/prep.yaml").display().to_string();
            }
        });
        Command::new(env!("CARGO_BIN_EXE_ehmam"))
            .args(&a)
            .current_dir(&here)
            .env("CI", "true")
            .output()
            .unwrap()
    };
    let o = in_here(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(entries(&here).contains(&"spec.yaml".to_string()));
    let o = in_here(&["--force", "--set", "description=another"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("current directory"), "{}", text(&o));
    let _: PathBuf = here;
}
