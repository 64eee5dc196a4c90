//! Ablations through the command line: the ablation specs state only what differs from
//! specs/tiny.yaml and validate; a sweep runs a grid into its own run directories, skips the
//! finished runs when rerun and prints a summary whose figures equal the steps tables'; the report
//! holds the summary, the probe and the masking analysis.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn demo_shards(tmp: &Path) -> PathBuf {
    let shards = tmp.join("shards");
    ok(&[
        "run",
        "specs/prep.yaml",
        "--quiet",
        "--set",
        &format!("run_dir={}", tmp.join("prep").display()),
        "--set",
        &format!("stages.shards.with.dir={}", shards.display()),
    ]);
    shards
}

#[test]
fn ablation_specs_extend_tiny_and_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-shards-here");
    let shards = demo_shards(tmp.path());
    let want = [
        "random",
        "random_predictor",
        "hard_only",
        "easy_to_hard",
        "easy_to_hard_code",
        "frame_level",
    ];
    for name in want {
        let path = format!("specs/ablations/{name}.yaml");
        let body = std::fs::read_to_string(root().join(&path)).unwrap();
        assert!(
            body.contains("extends: ../tiny.yaml"),
            "{path} extends the tiny spec"
        );
        assert!(
            !body.contains("shards.read") && !body.contains("features.fbank"),
            "{path} restates only what differs"
        );
        // Before prep, validation points at the missing shards (the tiny spec's line)...
        let o = ehmam(&[
            "validate",
            &path,
            "--set",
            &format!("stages.shards.with.dir={}", missing.display()),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            text(&o).contains("stages.shards.with.dir")
                && text(&o).contains("run the prep spec first"),
            "{}",
            text(&o)
        );
        // ...and with shards the inherited spec is whole.
        let out = ok(&[
            "validate",
            &path,
            "--set",
            &format!("stages.shards.with.dir={}", shards.display()),
        ]);
        assert!(out.contains(&format!("runs/{name}")), "{out}");
    }
}

#[test]
fn a_sweep_runs_its_grid_skips_finished_runs_and_summarises() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = demo_shards(tmp.path());
    let out = tmp.path().join("sweep");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "sweep",
            "specs/ablations/random_predictor.yaml",
            "specs/ablations/hard_only.yaml",
            "--grid",
            "stages.student.with.alpha=[0.5, 0.05]",
            "--quiet",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(out.display().to_string());
        for s in [
            format!("stages.shards.with.dir={}", shards.display()),
            "stages.student.with.max_steps=3".to_string(),
        ] {
            a.push("--set".into());
            a.push(s);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = args(&[]);
    let first = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let names = [
        "random_predictor-alpha=0.5",
        "random_predictor-alpha=0.05",
        "hard_only-alpha=0.5",
        "hard_only-alpha=0.05",
    ];
    for n in names {
        assert!(
            out.join(n).join("run.json").is_file(),
            "{n} has its own run directory"
        );
        assert!(first.contains(&format!("{n:<40} ran")), "{first}");
        let st = pipeline::RunStatus::read(&out.join(n)).unwrap();
        assert!(st.is_complete());
    }
    // The summary's L_rec is the mean of the last 10 % of updates (here the last one).
    for n in names {
        let rec = query_csv(&[&out.join(n)], "SELECT loss_rec FROM steps WHERE step = 2");
        let want: f64 = rec[0][0].parse().unwrap();
        let line = first
            .lines()
            .find(|l| l.starts_with(&format!("| {n} |")))
            .unwrap_or_else(|| panic!("{first}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells[5], "3", "{line}");
        assert!(
            (cells[6].parse::<f64>().unwrap() - want).abs() < 5e-4,
            "{line} vs {want}"
        );
        let alpha: f64 = cells[3].parse().unwrap();
        assert!(n.ends_with(&format!("alpha={alpha}")), "{line}");
    }
    // The resolved spec carries the grid's value.
    let spec = std::fs::read_to_string(out.join("hard_only-alpha=0.05/spec.yaml")).unwrap();
    assert!(
        spec.contains("alpha: 0.05") && spec.contains("kind: mask.hard"),
        "{spec}"
    );
    // A rerun skips all four (whatever the spelling of --out), and a changed grid point runs
    // only the new one.
    let mut a2 = a.clone();
    let o = a2.iter().position(|s| s == "--out").unwrap() + 1;
    a2[o] = tmp.path().join(".").join("sweep").display().to_string();
    let second = ok(&a2.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(second.matches("skipped (finished)").count(), 4, "{second}");
    let mut b = args(&[]);
    let g = b
        .iter()
        .position(|s| s.starts_with("stages.student.with.alpha="))
        .unwrap();
    b[g] = "stages.student.with.alpha=[0.05, 0.01]".into();
    let third = ok(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(third.matches("skipped (finished)").count(), 2, "{third}");
    assert_eq!(third.matches(" ran (").count(), 2, "{third}");
    // A bad grid is refused before anything runs.
    let bad = tmp.path().join("bad");
    let o = ehmam(&[
        "sweep",
        "specs/tiny.yaml",
        "--grid",
        "stages.student.with.alpha=[0.5, -1]",
        "--out",
        bad.to_str().unwrap(),
        "--set",
        &format!("stages.shards.with.dir={}", shards.display()),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("stages.student.with.alpha") && !text(&o).contains("panicked"),
        "{}",
        text(&o)
    );
    assert!(
        !bad.join("tiny-alpha=0.5").exists(),
        "nothing runs before the whole grid validates"
    );
}

#[test]
fn the_report_compares_runs_with_probe_and_masking_analysis() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = demo_shards(tmp.path());
    let mut dirs = Vec::new();
    for name in ["random", "easy_to_hard"] {
        let dir = tmp.path().join(name);
        ok(&[
            "run",
            &format!("specs/ablations/{name}.yaml"),
            "--quiet",
            "--set",
            &format!("run_dir={}", dir.display()),
            "--set",
            &format!("stages.shards.with.dir={}", shards.display()),
            "--set",
            "stages.student.with.max_steps=4",
        ]);
        dirs.push(dir);
    }
    let out = tmp.path().join("report");
    let o = ok(&[
        "report",
        dirs[0].to_str().unwrap(),
        dirs[1].to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    for f in ["report.md", "rec_loss.png", "masking.png"] {
        assert!(out.join(f).is_file() && o.contains(f), "{f}: {o}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| random | mask.random | 0 |")
            || md.contains("| random | mask.random | 0.0 |"),
        "{md}"
    );
    assert!(
        md.contains("| easy_to_hard | mask.easy_to_hard (linear) | 0.05 |"),
        "{md}"
    );
    // Probe: speaker (10 classes) and phrase (16), accuracies in [0, 1], well above chance for
    // the speaker (formant voices differ a lot).
    assert!(
        md.contains(
            "speaker: 10 classes, 40 test utterances. phrase: 16 classes, 32 test utterances."
        ),
        "{md}"
    );
    let probe_rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| random | 4 |") || l.starts_with("| easy_to_hard | 4 |"))
        .collect();
    assert_eq!(probe_rows.len(), 2, "{md}");
    for r in probe_rows {
        let accs: Vec<f64> = r
            .split('|')
            .map(str::trim)
            .skip(3)
            .filter_map(|c| c.parse().ok())
            .collect();
        assert_eq!(accs.len(), 4, "{r}");
        assert!(accs.iter().all(|a| (0.0..=1.0).contains(a)), "{r}");
        assert!(accs[0] > 0.3, "speaker accuracy {r}");
    }
    // Masking analysis: five shares per run, and the hard / random column is their ratio.
    let rows: Vec<Vec<String>> = md
        .lines()
        .filter(|l| l.contains(" % |"))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert_eq!(rows.len(), 10, "{md}");
    for r in &rows {
        let (h, rnd, ratio): (f64, f64, f64) = (
            r[3].parse().unwrap(),
            r[4].parse().unwrap(),
            r[5].parse().unwrap(),
        );
        assert!(h > 0.0 && rnd > 0.0);
        assert!((h / rnd - ratio).abs() < 0.006, "{r:?}");
    }
    // A second run of the same name (a copy without checkpoints, as a run stopped before its
    // first): rows labelled by directory, each from its own tables; the probe names the run it
    // could not probe and the report is still written.
    let twin = tmp.path().join("twin").join("easy_to_hard");
    std::fs::create_dir_all(&twin).unwrap();
    for e in std::fs::read_dir(&dirs[1]).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), twin.join(e.file_name())).unwrap();
        } else if e.file_name() != "checkpoints" {
            let to = twin.join(e.file_name());
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        }
    }
    let out3 = tmp.path().join("r3");
    ok(&[
        "report",
        dirs[1].to_str().unwrap(),
        twin.to_str().unwrap(),
        "--out",
        out3.to_str().unwrap(),
        "--no-masking",
    ]);
    let md = std::fs::read_to_string(out3.join("report.md")).unwrap();
    for d in [&dirs[1], &twin] {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {} | mask.easy_to_hard", d.display())))
            .unwrap_or_else(|| panic!("no row for {}: {md}", d.display()));
        assert_eq!(
            row.split('|').map(str::trim).nth(5),
            Some("4"),
            "4 updates each, not merged: {row}"
        );
    }
    assert!(
        md.contains("Not probed: `") && md.contains("no checkpoint"),
        "{md}"
    );
    // Tables only.
    let o = ok(&[
        "report",
        dirs[1].to_str().unwrap(),
        "--out",
        tmp.path().join("r2").to_str().unwrap(),
        "--no-probe",
    ]);
    assert!(!o.contains("masking.png"));
    assert!(!std::fs::read_to_string(tmp.path().join("r2/report.md"))
        .unwrap()
        .contains("Linear probe"));
}

/// A run that fails is reported and the sweep goes on: the next run trains for real (its own
/// cancel token, not the failed run's) and ends complete; the sweep exits non-zero.
#[test]
fn a_failing_run_does_not_stop_the_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = demo_shards(tmp.path());
    let out = tmp.path().join("sweep");
    // `crop: pad` validates but fails at the teacher (padded batches cannot be trained on).
    let a = [
        "sweep",
        "specs/ablations/random_predictor.yaml",
        "--grid",
        "stages.batch.with.crop=[pad, shortest]",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
        "--set",
        &format!("stages.shards.with.dir={}", shards.display()),
        "--set",
        "stages.student.with.max_steps=2",
    ];
    let o = ehmam(&a);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("random_predictor-crop=pad") && t.contains("failed:"),
        "{t}"
    );
    let good = out.join("random_predictor-crop=shortest");
    assert!(
        pipeline::RunStatus::read(&good).unwrap().is_complete(),
        "{t}"
    );
    assert_eq!(
        query_csv(&[&good], "SELECT count(*) FROM steps")[0][0],
        "2",
        "the run after the failed one trained"
    );
    assert_eq!(
        pipeline::RunStatus::read(&out.join("random_predictor-crop=pad"))
            .unwrap()
            .status,
        "failed"
    );
    // A rerun skips the finished run and tries the failed one again.
    let o = ehmam(&a);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o).matches("skipped (finished)").count(),
        1,
        "{}",
        text(&o)
    );
    // A changed spec over a finished run directory is refused, not silently continued from the
    // old run's checkpoints; --force runs over it.
    let mut b: Vec<&str> = a.to_vec();
    b[3] = "stages.batch.with.crop=[shortest]";
    b.extend(["--set", "stages.student.with.lr=0.002"]);
    let o = ehmam(&b);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("different spec"), "{}", text(&o));
    b.push("--force");
    let o = ehmam(&b);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read_to_string(good.join("spec.yaml"))
        .unwrap()
        .contains("lr: 0.002"));
}
