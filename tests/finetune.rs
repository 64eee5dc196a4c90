//! End-to-end CTC fine-tuning on the demo corpus (issue 19): pre-train tiny briefly, fine-tune
//! with `specs/finetune/demo.yaml` on 8 speakers, and score the 2 held out and the 8 trained on.
//! The `wer` table holds finite WER and CER per set and evaluation, equal to what an independent
//! Levenshtein count over the `hypotheses` table gives; the CER on the training speakers falls
//! well below its value at the first evaluation; a rerun with more updates resumes from the last
//! checkpoint and re-scores that step identically; bad specs are refused before anything runs.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Fine-tuning settings of the test: lighter masking than the demo spec, so that a few hundred
/// updates on 2 cores learn (the demo spec's 1,500 updates take the heavier masking).
const FAST: [&str; 7] = [
    "stages.finetune.with.max_steps=400",
    "stages.finetune.with.freeze_finetune_updates=50",
    "stages.finetune.with.eval_every=200",
    "stages.finetune.with.checkpoint_every=200",
    "stages.finetune.with.mask_prob=0.1",
    "stages.finetune.with.mask_channel_prob=0",
    "stages.finetune.with.phase_ratio=[0.1, 0.6, 0.3]",
];

/// `specs/finetune/demo.yaml` over the test's shards and pre-trained run, into `run`.
fn finetune_args(pre: &Path, run: &Path, extra: &[&str]) -> Vec<String> {
    let shards = demo_shards().display().to_string();
    let mut sets: Vec<String> = vec![
        format!("run_dir={}", run.display()),
        format!("stages.finetune.with.init={}", pre.display()),
        format!("stages.finetune.with.vocab_from={shards}"),
    ];
    for s in ["shards", "heldout_shards", "train_shards"] {
        sets.push(format!("stages.{s}.with.dir={shards}"));
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    let mut args: Vec<String> = vec![
        "run".into(),
        "specs/finetune/demo.yaml".into(),
        "--quiet".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s);
    }
    args
}

fn run(args: &[String]) -> String {
    ok_all(args)
}

/// (step, set) → (utterances, words, errors, wer, cer, chars, char_errors).
type WerRows = BTreeMap<(u64, String), (u64, u64, u64, f64, f64, u64, u64)>;

fn wer_rows(run: &Path) -> WerRows {
    let rows = query_csv(
        &[run],
        "SELECT step, set, utterances, words, errors, wer, cer, chars, char_errors FROM wer ORDER BY step, set",
    );
    let mut out = BTreeMap::new();
    for r in rows {
        let n = |i: usize| r[i].parse::<u64>().unwrap();
        let x = |i: usize| r[i].parse::<f64>().unwrap_or(f64::NAN);
        let key = (n(0), r[1].clone());
        assert!(
            out.insert(key.clone(), (n(2), n(3), n(4), x(5), x(6), n(7), n(8)))
                .is_none(),
            "two rows for {key:?}"
        );
    }
    out
}

/// Levenshtein distance, written here independently of `stages::finetune::wer`.
fn distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if x == y {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[test]
fn finetune_learns_scores_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("tiny");
    // The pre-training of the main job (specs/tiny.yaml, 300 updates).
    ok(&[
        "run",
        "specs/tiny.yaml",
        "--quiet",
        "--set",
        &format!("run_dir={}", pre.display()),
        "--set",
        &format!("stages.shards.with.dir={}", demo_shards().display()),
    ]);
    inits_from_exports_match_the_run(&pre, tmp.path());
    let ft = tmp.path().join("ft");
    run(&finetune_args(&pre, &ft, &FAST));

    let wer = wer_rows(&ft);
    let keys: Vec<(u64, &str)> = wer.keys().map(|(s, n)| (*s, n.as_str())).collect();
    assert_eq!(
        keys,
        vec![
            (200, "heldout"),
            (200, "train"),
            (400, "heldout"),
            (400, "train")
        ]
    );
    for ((step, set), (utts, words, errors, w, c, chars, cerr)) in &wer {
        // The held-out speakers 1009 and 1010 say 16 sentences each; the 8 others 128.
        let want = if set == "heldout" { 32 } else { 128 };
        assert_eq!(*utts, want, "{step} {set}");
        assert!(w.is_finite() && c.is_finite(), "{step} {set}: {w} {c}");
        assert!((w - *errors as f64 / *words as f64).abs() < 1e-12);
        assert!((c - *cerr as f64 / *chars as f64).abs() < 1e-12);
    }
    let cer = |step: u64, set: &str| wer[&(step, set.to_string())].4;
    eprintln!(
        "CER train {:.4} → {:.4}, held out {:.4} → {:.4}; WER train {:.4} → {:.4}, held out {:.4} → {:.4}",
        cer(200, "train"),
        cer(400, "train"),
        cer(200, "heldout"),
        cer(400, "heldout"),
        wer[&(200, "train".into())].3,
        wer[&(400, "train".into())].3,
        wer[&(200, "heldout".into())].3,
        wer[&(400, "heldout".into())].3,
    );
    assert!(
        cer(400, "train") < 0.5 * cer(200, "train") && cer(400, "train") < 0.2,
        "the CER on the training speakers did not fall well below its first value"
    );

    // The hypotheses: one per utterance and evaluation; their edit distances, counted here,
    // add up to the `wer` table's errors and character errors.
    let hyp = query_csv(
        &[&ft],
        "SELECT step, set, utt_id, reference, hypothesis, words, errors FROM hypotheses ORDER BY step, set, utt_id",
    );
    assert_eq!(hyp.len(), 2 * (32 + 128));
    let mut sums: BTreeMap<(u64, String), (u64, u64, u64, u64)> = BTreeMap::new();
    for h in &hyp {
        let (r, y) = (&h[3], &h[4]);
        let rw: Vec<&str> = r.split_whitespace().collect();
        let yw: Vec<&str> = y.split_whitespace().collect();
        let (rc, yc): (Vec<char>, Vec<char>) = (
            rw.join(" ").chars().collect(),
            yw.join(" ").chars().collect(),
        );
        let e = distance(&rw, &yw) as u64;
        assert_eq!(h[6].parse::<u64>().unwrap(), e, "{h:?}");
        assert_eq!(h[5].parse::<u64>().unwrap(), rw.len() as u64);
        let s = sums
            .entry((h[0].parse().unwrap(), h[1].clone()))
            .or_default();
        s.0 += rw.len() as u64;
        s.1 += e;
        s.2 += rc.len() as u64;
        s.3 += distance(&rc, &yc) as u64;
        if h[1] == "heldout" {
            let spk = h[2].split('-').next().unwrap();
            assert!(spk == "1009" || spk == "1010", "{h:?}");
        }
    }
    for (k, (words, errors, chars, cerr)) in &sums {
        let row = &wer[k];
        assert_eq!(
            (row.1, row.2, row.5, row.6),
            (*words, *errors, *chars, *cerr),
            "{k:?}"
        );
    }
    let dict = std::fs::read_to_string(ft.join("dict.ltr.txt")).unwrap();
    assert!(dict.lines().any(|l| l.starts_with("| ")), "{dict}");

    // More updates: the rerun resumes from the checkpoint at 400, scores it again (the same
    // figures) and scores 420.
    let mut more: Vec<&str> = FAST.to_vec();
    more[0] = "stages.finetune.with.max_steps=420";
    let out = run(&finetune_args(&pre, &ft, &more));
    assert!(out.contains("resuming from"), "{out}");
    let again = wer_rows(&ft);
    assert_eq!(again.len(), 6, "{again:?}");
    for k in wer.keys() {
        assert_eq!(again[k], wer[k], "{k:?} changed on the rerun");
    }
    assert_eq!(again[&(420, "train".to_string())].0, 128);
    assert_eq!(again[&(420, "heldout".to_string())].0, 32);
    let steps = query_csv(
        &[&ft],
        "SELECT count(*), count(DISTINCT step), max(step) FROM steps",
    );
    assert_eq!(steps[0], vec!["420", "420", "419"]);

    // `ehmam report` of the pre-training and the fine-tuning: the WER section holds the final
    // figures, and the pre-training run's row names them.
    let rep = tmp.path().join("report");
    ok(&[
        "report",
        &pre.display().to_string(),
        &ft.display().to_string(),
        "--out",
        &rep.display().to_string(),
        "--no-probe",
    ]);
    let md = std::fs::read_to_string(rep.join("report.md")).unwrap();
    let (w, c) = (
        again[&(420, "heldout".to_string())].3,
        again[&(420, "heldout".to_string())].4,
    );
    let cell = format!(
        "heldout | 420 | 32 | 196 | {:.2} | {:.2} |",
        100.0 * w,
        100.0 * c
    );
    assert!(md.contains(&cell), "no `{cell}` in\n{md}");
    assert!(
        md.contains(&format!("heldout {:.2} / {:.2}", 100.0 * w, 100.0 * c)),
        "{md}"
    );
    assert!(rep.join("wer.png").is_file());

    recipes_hold_the_papers_values_and_validate(&pre, tmp.path());
}

/// `init` from an `ehmam export` of the pre-training (hf: PyTorch names read back; native) trains
/// exactly as `init` from the run directory: the same losses and scores.
fn inits_from_exports_match_the_run(pre: &Path, tmp: &Path) {
    let short = [
        "stages.finetune.with.max_steps=8",
        "stages.finetune.with.eval_every=8",
        "stages.finetune.with.freeze_finetune_updates=3",
    ];
    let mut outcome = Vec::new();
    for (name, format) in [
        ("from-run", None),
        ("from-hf", Some("hf")),
        ("from-native", Some("native")),
    ] {
        let init = match format {
            None => pre.to_path_buf(),
            Some(f) => {
                let dir = tmp.join(format!("export-{f}"));
                ok(&[
                    "export",
                    &pre.display().to_string(),
                    "--out",
                    &dir.display().to_string(),
                    "--format",
                    f,
                ]);
                dir
            }
        };
        let run_dir = tmp.join(name);
        run(&finetune_args(&init, &run_dir, &short));
        let steps = query_csv(
            &[&run_dir],
            "SELECT step, loss, grad_norm FROM steps ORDER BY step",
        );
        assert_eq!(steps.len(), 8);
        outcome.push((name, steps, wer_rows(&run_dir)));
    }
    for (name, steps, wer) in &outcome[1..] {
        assert_eq!(
            steps, &outcome[0].1,
            "{name}: other losses than from the run"
        );
        assert_eq!(wer, &outcome[0].2, "{name}: other scores than from the run");
    }
    // The fine-tuned encoder exports (without its head and mask embedding).
    let run_dir = tmp.join("from-run");
    let out = tmp.join("export-finetuned");
    ok(&[
        "export",
        &run_dir.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--format",
        "native",
    ]);
    let dev = stages::candle_core::Device::Cpu;
    let (cfg, w) = stages::train::load_encoder(&out, &dev).unwrap();
    assert_eq!(cfg.weights, "fine-tuned");
    assert!(!w.contains_key("encoder.mask_emb") && !w.contains_key("ctc.proj.weight"));
    let (_, path) = stages::train::latest_checkpoint(&run_dir).unwrap().unwrap();
    let ck = stages::train::load_tensors(&path, &dev).unwrap();
    let v = |t: &stages::candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let name = "encoder.blocks.0.fc1.weight";
    assert_eq!(v(&w[name]), v(&ck[&format!("model.{name}")]));
}

/// specs/finetune/{10min,1h,10h,100h}.yaml: the paper's fine-tuning values (method §9, Table 5
/// right), and each validates once its data paths point somewhere real.
fn recipes_hold_the_papers_values_and_validate(pre: &Path, tmp: &Path) {
    // (spec, lr, updates, channel-mask prob, layerdrop, frozen updates)
    let table = [
        ("10min", 5e-5, 13000, 0.25, 0.1, 10000),
        ("1h", 5e-5, 13000, 0.25, 0.1, 10000),
        ("10h", 5e-5, 20000, 0.5, 0.05, 10000),
        ("100h", 3e-5, 80000, 0.5, 0.1, 0),
    ];
    let shards = demo_shards().display().to_string();
    for (name, lr, updates, chan, ld, freeze) in table {
        let path = format!("specs/finetune/{name}.yaml");
        let spec: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(root().join(&path)).unwrap()).unwrap();
        let w = &spec["stages"]["finetune"]["with"];
        let f = |k: &str| w[k].as_f64().unwrap_or_else(|| panic!("{path}: {k}"));
        assert_eq!(f("lr"), lr, "{path}");
        assert_eq!(f("max_steps"), updates as f64, "{path}");
        assert_eq!(f("mask_channel_prob"), chan, "{path}");
        assert_eq!(f("layerdrop"), ld, "{path}");
        assert_eq!(f("freeze_finetune_updates"), freeze as f64, "{path}");
        assert_eq!(f("mask_prob"), 0.65, "{path}");
        assert_eq!(f("mask_channel_length"), 64.0, "{path}");
        assert_eq!(f("activation_dropout"), 0.1, "{path}");
        let mut args: Vec<String> = vec!["validate".into(), path.clone()];
        let mut set = |s: String| {
            args.push("--set".into());
            args.push(s);
        };
        set(format!("run_dir={}", tmp.join(name).display()));
        set("device=cpu".into());
        set(format!("stages.finetune.with.init={}", pre.display()));
        set(format!("stages.finetune.with.vocab_from={shards}"));
        for s in ["shards", "dev_clean_shards", "dev_other_shards"] {
            set(format!("stages.{s}.with.dir={shards}"));
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&a);
    }
}

#[test]
fn finetune_specs_are_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("not-trained");
    std::fs::create_dir_all(&empty).unwrap();
    let ft = tmp.path().join("ft");
    let check = |extra: &[&str], want: &[&str]| {
        let mut args = finetune_args(&empty, &ft, extra);
        args[0] = "validate".into();
        args.remove(2); // --quiet
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ehmam(&a);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{t}");
        for w in want {
            assert!(t.contains(w), "expected `{w}` in:\n{t}");
        }
        assert!(!ft.exists(), "validation wrote {}", ft.display());
    };
    // A pre-training run without a checkpoint.
    check(
        &[],
        &["stages.finetune.with.init", "no complete checkpoint"],
    );
    // No vocabulary; a model block; an evaluator without a fine-tuner.
    check(
        &["stages.finetune.with.vocab_from=null"],
        &["stages.finetune.with.vocab", "required"],
    );
    check(
        &["model.preset=tiny"],
        &["model:", "takes its model from `init`"],
    );
    check(
        &["stages.finetune=null", "stages.steps=null"],
        &[
            "stages.heldout",
            "eval.ctc scores what a finetune.ctc stage trains",
        ],
    );
    // Two evaluators of one set.
    check(
        &["stages.train.with.set=heldout"],
        &["table `wer.heldout` is already written"],
    );
}

/// `ehmam sweep --finetune`: each variant of the grid is pre-trained, then fine-tuned from its
/// own run; the summary gives each variant's WER and CER; a rerun skips all four runs.
#[test]
fn a_sweep_chains_fine_tuning_per_variant() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let shards = demo_shards().display().to_string();
    let args: Vec<String> = [
        "sweep",
        "specs/tiny.yaml",
        "--grid",
        "stages.mask.kind=[mask.random, mask.easy_to_hard]",
        "--set",
        "stages.student.with.max_steps=12",
        "--set",
        &format!("stages.shards.with.dir={shards}"),
        "--finetune",
        "specs/finetune/demo.yaml",
        "--finetune-set",
        "stages.finetune.with.max_steps=10",
        "--finetune-set",
        "stages.finetune.with.eval_every=5",
        "--finetune-set",
        &format!("stages.finetune.with.vocab_from={shards}"),
        "--finetune-set",
        &format!("stages.shards.with.dir={shards}"),
        "--finetune-set",
        &format!("stages.heldout_shards.with.dir={shards}"),
        "--finetune-set",
        &format!("stages.train_shards.with.dir={shards}"),
        "--out",
        &out.display().to_string(),
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let first = run(&args);
    for v in ["mask.random", "mask.easy_to_hard"] {
        let pre = out.join(format!("tiny-kind={v}"));
        let ft = out.join(format!("tiny-kind={v}-finetune-demo"));
        let spec: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(ft.join("spec.yaml")).unwrap()).unwrap();
        assert_eq!(
            spec["stages"]["finetune"]["with"]["init"].as_str(),
            Some(pre.display().to_string().as_str())
        );
        let w = wer_rows(&ft);
        assert_eq!(w.len(), 4, "{w:?}");
        let last = &w[&(10, "heldout".to_string())];
        let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
        let cell = format!(
            "| tiny-kind={v}-finetune-demo | tiny-kind={v} | heldout | 10 | 32 | 196 | {:.2} | {:.2} |",
            100.0 * last.3,
            100.0 * last.4
        );
        assert!(
            summary.contains(&cell),
            "no `{cell}` in\n{summary}\n{first}"
        );
    }
    let again = run(&args);
    assert_eq!(
        again.matches("finished earlier, skipped").count(),
        4,
        "{again}"
    );
}
