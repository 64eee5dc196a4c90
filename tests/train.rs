//! End-to-end training on the demo corpus through the command line: a short fixed-seed run
//! learns (L_rec falls, targets do not collapse, the predictor ranks frames better than chance),
//! a stopped and resumed run ends with the same weights as an uninterrupted one (and its
//! TensorBoard files hold each step once), a rerun of a finished run trains nothing, the encoder
//! exports, and bad model blocks are refused.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `ehmam run specs/tiny.yaml` into `run` with test-sized settings and extra overrides.
fn train(run: &Path, extra: &[&str]) -> String {
    let mut sets: Vec<String> = vec![
        format!("run_dir={}", run.display()),
        format!("stages.shards.with.dir={}", demo_shards().display()),
        // Encoder dropout off keeps the short runs steady. Reproducibility does not depend on it:
        // every random draw (dropout, noise tokens, masks, crops) comes from streams seeded by
        // the spec's seed and the step, and parallel fbank workers are put back in order.
        "model.encoder.dropout=0.0".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let mut args: Vec<String> = vec!["run".into(), "specs/tiny.yaml".into(), "--quiet".into()];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    ok_all(&args)
}

fn checkpoint_tensors(run: &Path) -> (u64, BTreeMap<String, Vec<f32>>) {
    let (meta, path) = stages::train::latest_checkpoint(run)
        .unwrap()
        .expect("a checkpoint");
    let t = stages::train::load_tensors(&path, &stages::candle_core::Device::Cpu).unwrap();
    (
        meta.step,
        t.into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect(),
    )
}

fn steps(run: &Path) -> Vec<Vec<String>> {
    query_csv(&[run], "SELECT step, loss_rec, target_std, rank_agreement, masked_frac, hard_ratio, loss FROM steps ORDER BY step")
}

fn f(s: &str) -> f64 {
    s.parse().unwrap_or(f64::NAN)
}

#[test]
fn short_run_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(
        &run,
        &[
            "stages.student.with.max_steps=120",
            "stages.student.with.checkpoint_every=60",
        ],
    );
    let rows = steps(&run);
    assert_eq!(rows.len(), 120, "one steps row per update");
    let st = pipeline::RunStatus::read(&run).expect("run.json");
    assert!(
        st.is_complete() && st.attempts == 1 && st.wall_s > 0.0,
        "{st:?}"
    );
    let mean =
        |rs: &[Vec<String>], c: usize| rs.iter().map(|r| f(&r[c])).sum::<f64>() / rs.len() as f64;
    let (first, last) = (&rows[..10], &rows[rows.len() - 20..]);
    let (rec0, rec1) = (mean(first, 1), mean(last, 1));
    assert!(
        rec1 < 0.8 * rec0,
        "L_rec should fall: first 10 steps {rec0:.4}, last 20 {rec1:.4}"
    );
    for r in &rows {
        assert!(
            f(&r[2]) > 0.1,
            "target std collapsed at step {}: {}",
            r[0],
            r[2]
        );
        assert!(f(&r[6]).is_finite());
    }
    let agree = mean(last, 3);
    assert!(agree > 0.5, "the student's loss predictor should rank masked frames better than chance by the end: {agree:.3}");
    // Easy to hard: r ramps from 0 to 1; the masked share shrinks as r grows (method §4.3).
    assert!(
        f(&rows[0][5]) < 0.02 && f(&rows[119][5]) > 0.95,
        "hard_ratio {} → {}",
        rows[0][5],
        rows[119][5]
    );
    assert!(
        mean(first, 4) > mean(last, 4),
        "masked_frac should shrink as the hard share grows"
    );
    // Checkpoints every 60 updates and at the end, with the data position.
    let (step, t) = checkpoint_tensors(&run);
    assert_eq!(step, 120);
    assert!(
        t.keys().any(|k| k.starts_with("teacher.encoder."))
            && t.keys().any(|k| k.starts_with("adam.m."))
    );
    // Rerunning a finished run trains nothing.
    let out = train(
        &run,
        &[
            "stages.student.with.max_steps=120",
            "stages.student.with.checkpoint_every=60",
        ],
    );
    let _ = out;
    assert_eq!(steps(&run).len(), 120);
    let st2 = pipeline::RunStatus::read(&run).expect("run.json");
    assert!(
        st2.is_complete() && st2.attempts == 2 && st2.wall_s > st.wall_s,
        "{st2:?}"
    );
    // Export the encoder for downstream use.
    let export = tmp.path().join("export");
    let out = ok(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
        "--format",
        "native",
    ]);
    assert!(out.contains("step 120"), "{out}");
    let (cfg, w) = stages::train::load_encoder(&export, &stages::candle_core::Device::Cpu).unwrap();
    assert!(
        w.contains_key("frontend.proj.weight") && w.contains_key("encoder.blocks.3.fc2.weight")
    );
    assert!(!w
        .keys()
        .any(|k| k.starts_with("decoder.") || k.starts_with("loss_predictor.")));
    assert_eq!(
        w["encoder.blocks.0.fc1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        t["student.encoder.blocks.0.fc1.weight"]
    );
    assert_eq!(cfg.step, 120);
}

#[test]
fn stopped_and_resumed_run_ends_with_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let common = [
        "stages.student.with.schedule_steps=24",
        "stages.student.with.checkpoint_every=6",
    ];
    let with = |max: &str| -> Vec<String> {
        let mut v: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        v.push(format!("stages.student.with.max_steps={max}"));
        v
    };
    let run = |dir: &PathBuf, max: &str| {
        let v = with(max);
        let r: Vec<&str> = v.iter().map(String::as_str).collect();
        train(dir, &r)
    };
    run(&a, "24");
    run(&b, "10");
    assert_eq!(checkpoint_tensors(&b).0, 10);
    let out = run(&b, "24");
    assert!(
        out.contains("resuming from") && out.contains("(step 10)"),
        "{out}"
    );
    // The data stream continues at the checkpoint's position instead of being read again.
    assert!(
        out.contains("shards: resuming the data stream at epoch"),
        "{out}"
    );
    let ((sa, ta), (sb, tb)) = (checkpoint_tensors(&a), checkpoint_tensors(&b));
    assert_eq!((sa, sb), (24, 24));
    assert_eq!(ta.len(), tb.len());
    for (k, v) in &ta {
        assert!(
            tb[k] == *v,
            "{k} differs between the uninterrupted and the resumed run"
        );
    }
    // The logged losses of the steps after the resume equal the uninterrupted run's.
    let (la, lb) = (steps(&a), steps(&b));
    let tail = |rows: &[Vec<String>]| {
        rows.iter()
            .filter(|r| f(&r[0]) >= 10.0)
            .map(|r| r[6].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(tail(&la), tail(&lb));
    // The TensorBoard view: the resumed attempt wrote a second event file, each step is in one
    // of them once, with the uninterrupted run's loss.
    let losses = |run: &Path| {
        let dir = run.join("tensorboard");
        let files = stages::logs::tensorboard::event_files(&dir).unwrap();
        let v: Vec<(i64, f32)> = stages::logs::tensorboard::read_scalars(&dir)
            .unwrap()
            .into_iter()
            .filter(|(t, _, _)| t == "train/loss")
            .map(|(_, s, v)| (s, v))
            .collect();
        (files.len(), v)
    };
    let ((na, ta), (nb, tb)) = (losses(&a), losses(&b));
    assert_eq!((na, nb), (1, 2));
    assert_eq!(
        ta.iter().map(|x| x.0).collect::<Vec<_>>(),
        (0..24).collect::<Vec<i64>>()
    );
    assert_eq!(ta, tb);
}

/// Issue 14's `update_freq`: two batches per update. The steps table has one row per update,
/// each update taught with the weights of the update before (staleness 0) and covering two
/// batches' utterances; a run stopped at update 4 and resumed ends with the same weights as an
/// uninterrupted one.
#[test]
fn update_freq_counts_updates_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let run = |dir: &PathBuf, max: &str| {
        let sets = [
            "stages.student.with.update_freq=2".to_string(),
            "stages.student.with.schedule_steps=8".to_string(),
            "stages.student.with.checkpoint_every=4".to_string(),
            format!("stages.student.with.max_steps={max}"),
        ];
        let r: Vec<&str> = sets.iter().map(String::as_str).collect();
        train(dir, &r)
    };
    run(&a, "8");
    let rows = query_csv(
        &[&a],
        "SELECT step, teacher_version, utterances, lr FROM steps ORDER BY step",
    );
    assert_eq!(rows.len(), 8);
    for (u, r) in rows.iter().enumerate() {
        assert_eq!(r[0], u.to_string());
        assert_eq!(
            r[1],
            u.to_string(),
            "update {u} taught with version {}",
            r[1]
        );
    }
    // Two batches of utterances per update: more than any single batch of the run holds
    // (batches are at most 16 s of 2–8 s utterances: 8 at most).
    let utts: Vec<u64> = rows.iter().map(|r| r[2].parse().unwrap()).collect();
    assert!(utts.iter().all(|&n| n >= 2), "{utts:?}");
    assert!(utts.iter().any(|&n| n > 8), "{utts:?}");
    run(&b, "4");
    assert_eq!(checkpoint_tensors(&b).0, 4);
    let out = run(&b, "8");
    assert!(out.contains("(step 4)"), "{out}");
    let ((sa, ta), (sb, tb)) = (checkpoint_tensors(&a), checkpoint_tensors(&b));
    assert_eq!((sa, sb), (8, 8));
    for (k, v) in &ta {
        assert!(
            tb[k] == *v,
            "{k} differs between the uninterrupted and the resumed run"
        );
    }
}

#[test]
fn bad_model_blocks_and_devices_are_refused_before_running() {
    let o = ehmam(&[
        "validate",
        "specs/tiny.yaml",
        "--set",
        "model.encoder.heads=3",
        "--set",
        "model.decoder.kernel=4",
        "--set",
        "stages.student.with.alpha=-1",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("model.encoder.heads"), "{t}");
    assert!(t.contains("model.decoder.kernel"), "{t}");
    assert!(t.contains("stages.student.with.alpha"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    // Reported once although teacher and student both read the block.
    assert_eq!(t.matches("model.encoder.heads").count(), 1, "{t}");
    if !cfg!(feature = "cuda") {
        let o = ehmam(&["validate", "specs/tiny.yaml", "--set", "device=cuda:0"]);
        assert_eq!(o.status.code(), Some(2));
        assert!(text(&o).contains("CUDA"), "{}", text(&o));
    }
}

/// An ablation is one line: every mask kind takes the spec's mask block unchanged. Hard-only
/// masking hides only frames of hard spans; random masking none.
#[test]
fn mask_kinds_swap_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, hard_where_masked) in [("mask.hard", true), ("mask.random", false)] {
        assert!(ok(&[
            "validate",
            "specs/tiny.yaml",
            "--set",
            &format!("stages.mask.kind={kind}"),
            "--set",
            &format!("stages.shards.with.dir={}", demo_shards().display())
        ])
        .contains("ok"));
        let run = tmp.path().join(kind);
        train(
            &run,
            &[
                &format!("stages.mask.kind={kind}"),
                "stages.student.with.max_steps=3",
                "stages.frames.with.every=1",
                "stages.frames.with.utterances=1.0",
            ],
        );
        let rows = query_csv(&[&run], "SELECT count(*), sum(CASE WHEN hard THEN 1 ELSE 0 END), min(hard_ratio), max(hard_ratio) FROM frames WHERE masked");
        let (n, hard): (u64, u64) = (rows[0][0].parse().unwrap(), rows[0][1].parse().unwrap());
        assert!(n > 0);
        if hard_where_masked {
            assert_eq!(hard, n, "{kind}: every masked frame lies in a hard span");
            assert_eq!((rows[0][2].as_str(), rows[0][3].as_str()), ("1.0", "1.0"));
        } else {
            assert_eq!(hard, 0, "{kind}: no frame is chosen by hardness");
            assert_eq!((rows[0][2].as_str(), rows[0][3].as_str()), ("0.0", "0.0"));
        }
        // The frames table points back into the audio: time_s = (crop offset + frame) / 50.
        let bad = query_csv(
            &[&run],
            "SELECT count(*) FROM frames WHERE time_s < frame / 50.0 - 1e-9",
        );
        assert_eq!(bad[0][0], "0");
    }
}

/// A run that fails is marked failed in run.json, with the stage's error; it never reads as
/// complete.
#[test]
fn a_failed_run_is_marked_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args: Vec<String> = vec!["run".into(), "specs/tiny.yaml".into(), "--quiet".into()];
    for s in [
        format!("run_dir={}", run.display()),
        format!("stages.shards.with.dir={}", demo_shards().display()),
        "stages.batch.with.crop=pad".into(),
    ] {
        args.push("--set".into());
        args.push(s);
    }
    let o = ehmam(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(
        text(&o).contains("crop: shortest") && !text(&o).contains("panicked"),
        "{}",
        text(&o)
    );
    let st = pipeline::RunStatus::read(&run).expect("run.json");
    assert_eq!(st.status, "failed");
    assert!(
        st.error.as_deref().is_some_and(|e| e.contains("teacher")),
        "{st:?}"
    );
}

/// `model.preset: base` brings the base schedule to the student (lr 7.5e-4 after 8k warm-up
/// updates, τ 0.999 → 0.99999 over 75k), unless `with:` says otherwise: read back from the lr
/// and τ that the steps table logs.
#[test]
fn preset_base_brings_the_base_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    // The base preset with a small model (the schedule is what is checked).
    let model = "model={preset: base, frontend: {kind: fbank, input_dim: 160}, encoder: {dim: 32, heads: 2, ffn: 64, layers: 2, top_k: 2, pos_conv_depth: 1, pos_conv_kernel: 5, pos_conv_groups: 2, layerdrop: 0.0, dropout: 0.0}, decoder: {dim: 16, layers: 1, kernel: 3, groups: 2}, loss_predictor: {dim: 16, layers: 1, kernel: 3, groups: 2}}";
    for (with, lr_peak) in [
        ("{max_steps: 3, schedule_steps: 400000}", 7.5e-4),
        ("{max_steps: 3, schedule_steps: 400000, lr: 0.002}", 2e-3),
    ] {
        let run = tmp.path().join(format!("r{lr_peak}"));
        let sets = [model.to_string(), format!("stages.student.with={with}")];
        let mut args = vec![
            "run".to_string(),
            "specs/tiny.yaml".into(),
            "--quiet".into(),
            "--set".into(),
            format!("run_dir={}", run.display()),
            "--set".into(),
            format!("stages.shards.with.dir={}", demo_shards().display()),
        ];
        for s in sets {
            args.push("--set".into());
            args.push(s);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ehmam(&a);
        assert!(o.status.success(), "{}", text(&o));
        let rows = query_csv(&[&run], "SELECT step, lr, tau FROM steps ORDER BY step");
        assert_eq!(rows.len(), 3, "{rows:?}");
        for r in &rows {
            let step: f64 = f(&r[0]);
            let want_lr = lr_peak * step / 8000.0;
            let n = step + 1.0;
            let want_tau = 0.99999 - (0.99999 - 0.999) * (1.0 - n / 75000.0);
            assert!(
                (f(&r[1]) - want_lr).abs() <= 1e-15 + 1e-9 * want_lr,
                "{r:?}"
            );
            assert!((f(&r[2]) - want_tau).abs() < 1e-12, "{r:?}");
        }
    }
}
