//! Issue 11 through the command line: a mask span longer than the shortest utterance is refused
//! at validation, `export --out` refuses a non-empty directory without `--force`, a run whose
//! newest checkpoint is cut short resumes from the one before (naming the bad file), and a
//! non-finite update stops the run or is skipped and counted (`on_nonfinite`).

mod common;
use common::*;
use std::path::Path;

/// The arguments of `ehmam run specs/tiny.yaml` into `run` with extra overrides.
fn train_args(run: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), "specs/tiny.yaml".into(), "--quiet".into()];
    let sets = [
        format!("run_dir={}", run.display()),
        format!("stages.shards.with.dir={}", demo_shards().display()),
        "model.encoder.dropout=0.0".into(),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

/// `ehmam run specs/tiny.yaml` into `run` with extra overrides; returns the output.
fn train(run: &Path, extra: &[&str]) -> std::process::Output {
    let args = train_args(run, extra);
    ehmam(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// tiny.yaml's batcher keeps utterances of at least 2 s: 100 frames at 50 Hz. A longer span is
/// refused by `validate` (exit 2, naming the parameter), whichever mask kind reads it.
#[test]
fn span_longer_than_the_shortest_utterance_is_refused() {
    let dir = format!("stages.shards.with.dir={}", demo_shards().display());
    for kind in ["mask.easy_to_hard", "mask.random", "mask.hard"] {
        let k = format!("stages.mask.kind={kind}");
        let o = ehmam(&[
            "validate",
            "specs/tiny.yaml",
            "--set",
            &dir,
            "--set",
            &k,
            "--set",
            "stages.mask.with.span=101",
        ]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{kind}: {t}");
        assert!(
            t.contains("stages.mask.with.span") && t.contains("100 model frames"),
            "{kind}: {t}"
        );
        assert!(!t.contains("panicked"), "{t}");
        let fits = ok(&[
            "validate",
            "specs/tiny.yaml",
            "--set",
            &dir,
            "--set",
            &k,
            "--set",
            "stages.mask.with.span=100",
        ]);
        assert!(fits.contains("ok"), "{fits}");
    }
    // The bound follows the batcher's parameter: 0.07 s is 4 frames, under tiny.yaml's span of 5.
    let o = ehmam(&[
        "validate",
        "specs/tiny.yaml",
        "--set",
        &dir,
        "--set",
        "stages.batch.with.min_utt_seconds=0.07",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("stages.mask.with.span"), "{}", text(&o));
}

/// A run directory with checkpoints at steps 1 and 2 (written through the library).
fn run_with_checkpoints(run: &Path) {
    use stages::candle_core::{DType, Device};
    use stages::train::student::{Student, StudentParams};
    let mut s = Student::new(
        StudentParams::default(),
        stages::model::ModelConfig::tiny(),
        Device::Cpu,
        1,
        DType::F32,
    )
    .unwrap();
    for step in [1, 2] {
        s.step = step;
        stages::train::save_checkpoint(run, &s.checkpoint_meta(), &s.checkpoint_tensors(), 0)
            .unwrap();
    }
}

#[test]
fn export_refuses_a_non_empty_out_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    run_with_checkpoints(&run);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("README"), "keep me").unwrap();
    let (r, o) = (run.to_str().unwrap(), out.to_str().unwrap());
    let refused = ehmam(&["export", r, "--out", o, "--format", "native"]);
    assert!(!refused.status.success());
    let t = text(&refused);
    assert!(
        t.contains("not empty") && t.contains("--force") && t.contains(o),
        "{t}"
    );
    assert!(!out.join("config.json").exists());
    let done = ok(&["export", r, "--out", o, "--force", "--format", "native"]);
    assert!(done.contains("step 2"), "{done}");
    assert!(out.join("config.json").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("README")).unwrap(),
        "keep me"
    );
    // The newest checkpoint cut short: the export takes step 1 and names the bad file.
    let bad = stages::train::checkpoint_dir(&run).join("step-00000002.safetensors");
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    let o2 = tmp.path().join("out2");
    let fell_back = ehmam(&[
        "export",
        r,
        "--out",
        o2.to_str().unwrap(),
        "--format",
        "native",
    ]);
    assert!(fell_back.status.success(), "{}", text(&fell_back));
    let t = text(&fell_back);
    assert!(
        t.contains("step 1") && t.contains(&bad.display().to_string()),
        "{t}"
    );
}

/// A run stopped after step 4 whose newest checkpoint (step 4) was cut short: the rerun resumes
/// from step 2, says which file it passed over, and trains on to the end.
#[test]
fn rerun_after_a_truncated_newest_checkpoint_resumes_from_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let common = [
        "stages.student.with.schedule_steps=6",
        "stages.student.with.checkpoint_every=2",
    ];
    let first = train(
        &run,
        &[common[0], common[1], "stages.student.with.max_steps=4"],
    );
    assert!(first.status.success(), "{}", text(&first));
    let bad = stages::train::checkpoint_dir(&run).join("step-00000004.safetensors");
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.set_len(f.metadata().unwrap().len() - 64).unwrap();
    let again = train(
        &run,
        &[common[0], common[1], "stages.student.with.max_steps=6"],
    );
    let t = text(&again);
    assert!(again.status.success() && !t.contains("panicked"), "{t}");
    assert!(t.contains(&bad.display().to_string()), "{t}");
    assert!(t.contains("(step 2)"), "{t}");
    let (meta, _) = stages::train::latest_checkpoint(&run).unwrap().unwrap();
    assert_eq!(meta.step, 6);
}

/// lr = 1e30 blows the weights up in the first update, so every later loss is NaN. `stop` (the
/// default) fails naming update 1 and writes nothing after it; `skip` drops those updates, counts
/// them in the stage counts and finishes (the teacher gets each version: no deadlock).
#[test]
fn nonfinite_updates_stop_the_run_or_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let blow_up = [
        "stages.student.with.lr=1e30",
        "stages.student.with.warmup_steps=0",
        "stages.student.with.max_steps=4",
        "stages.student.with.checkpoint_every=1",
    ];
    let stop = tmp.path().join("stop");
    let o = train(&stop, &blow_up);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("update 1:") && t.contains("on_nonfinite: skip") && !t.contains("panicked"),
        "{t}"
    );
    let (meta, _) = stages::train::latest_checkpoint(&stop).unwrap().unwrap();
    assert_eq!(meta.step, 1, "nothing is written after the bad update");

    let skip = tmp.path().join("skip");
    let mut sets = blow_up.to_vec();
    sets.push("stages.student.with.on_nonfinite=skip");
    let o = train(&skip, &sets);
    let t = text(&o);
    assert!(o.status.success() && !t.contains("panicked"), "{t}");
    let (meta, _) = stages::train::latest_checkpoint(&skip).unwrap().unwrap();
    assert_eq!(meta.step, 4);
    let rows = query_csv(&[&skip], "SELECT count(*) FROM steps");
    assert_eq!(rows[0][0], "1", "only the finite update has a steps row");
    let counts = query_csv(
        &[&skip],
        "SELECT counts['skipped_updates'] FROM stages WHERE stage = 'student'",
    );
    let c = counts[0].join(",");
    assert!(c.contains('3'), "skipped_updates: {c}");
}

/// The code-faithful ablation truncates the hard/random split as the reference code does, and
/// still validates (the rest of it comes from tiny.yaml).
#[test]
fn easy_to_hard_code_spec_truncates_the_split() {
    let path = "specs/ablations/easy_to_hard_code.yaml";
    let v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap();
    assert_eq!(
        v["stages"]["mask"]["with"]["rounding"].as_str(),
        Some("truncate")
    );
    let dir = format!("stages.shards.with.dir={}", demo_shards().display());
    assert!(ok(&["validate", path, "--set", &dir]).contains("ok"));
    // A bad value is named by its path.
    let o = ehmam(&[
        "validate",
        path,
        "--set",
        &dir,
        "--set",
        "stages.mask.with.rounding=round",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("stages.mask.with.rounding"),
        "{}",
        text(&o)
    );
}

/// A run killed with SIGKILL once its checkpoint of update 8 is written, then resumed, has the
/// log rows of the same run made uninterrupted: every step and every logged frame, update 0's
/// included. (A log part is closed after each update a checkpoint follows, so none is open across
/// a checkpoint; before, the frames part holding updates 0–99 went with the kill.)
#[test]
fn a_run_killed_after_a_checkpoint_and_resumed_has_every_log_row() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "stages.student.with.max_steps=16",
        "stages.student.with.checkpoint_every=4",
        "stages.batch.with.max_seconds=8",
    ];
    let whole = tmp.path().join("whole");
    let o = train(&whole, &extra);
    assert!(o.status.success(), "{}", text(&o));

    let killed = tmp.path().join("killed");
    let ready = killed.join("checkpoints/step-00000008.json");
    kill_when(&train_args(&killed, &extra), &[], 300, || ready.exists());
    let o = train(&killed, &extra);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resum"), "{}", text(&o));

    for q in [
        "SELECT step, loss, loss_rec, loss_aux, grad_norm FROM steps ORDER BY step",
        "SELECT step, utt_id, frame, masked, hard, teacher_pred, student_pred, recon_loss FROM frames ORDER BY step, utt_id, member, frame",
        "SELECT step, utt_id, frame FROM inputs ORDER BY step, utt_id, frame",
    ] {
        let a = query_csv(&[&whole], q);
        let b = query_csv(&[&killed], q);
        assert!(!a.is_empty(), "{q}");
        assert_eq!(a.len(), b.len(), "{q}: rows lost");
        assert_eq!(a, b, "{q}");
    }
    let steps = query_csv(&[&killed], "SELECT min(step), count(*) FROM frames");
    assert_eq!(steps[0][0], "0", "update 0's frames are there");
}
