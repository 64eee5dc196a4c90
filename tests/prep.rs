//! End-to-end: the prep pipeline on the demo corpus through the command line — shards, index,
//! tables, determinism across `workers`, resume after an interruption, SQL over the tables.

mod common;
use common::*;
use std::path::Path;

fn prep(run: &Path, shards: &Path, extra: &[&str]) -> String {
    let run_set = format!("run_dir={}", run.display());
    let dir_set = format!("stages.shards.with.dir={}", shards.display());
    let mut args = vec![
        "run",
        "specs/prep.yaml",
        "--set",
        run_set.as_str(),
        "--set",
        dir_set.as_str(),
    ];
    for e in extra {
        args.push("--set");
        args.push(e);
    }
    let o = ehmam(&args);
    assert!(o.status.success(), "prep failed:\n{}", text(&o));
    text(&o)
}

fn demo_files() -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if p.extension().is_some_and(|x| x == "flac") {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    walk(
        &root().join("data/demo"),
        &root().join("data/demo"),
        &mut out,
    );
    out.sort();
    out
}

#[test]
fn demo_prep_accounts_for_every_file_and_writes_valid_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, shards) = (tmp.path().join("run"), tmp.path().join("shards"));
    prep(&run, &shards, &[]);

    // Every input file is in exactly one of utterances and rejects.
    let utts = query_csv(&[&run], "SELECT source FROM utterances ORDER BY source");
    let rejects = query_csv(&[&run], "SELECT source FROM rejects ORDER BY source");
    let mut seen: Vec<String> = utts
        .iter()
        .chain(rejects.iter())
        .map(|r| r[0].clone())
        .collect();
    seen.sort();
    assert_eq!(seen, demo_files());
    assert!(
        utts.len() >= 100,
        "the demo corpus should give at least 100 utterances, got {}",
        utts.len()
    );

    // Columns and metadata as documented; ids unique; transcripts and speakers from LibriSpeech.
    let rows = query_csv(
        &[&run],
        "SELECT count(*), count(DISTINCT utt_id), count(DISTINCT speaker), min(sample_rate), max(sample_rate), sum(CASE WHEN transcript IS NULL THEN 1 ELSE 0 END), \
         sum(CASE WHEN abs(duration_s - num_samples / 16000.0) < 1e-9 THEN 0 ELSE 1 END) FROM utterances",
    );
    let r = &rows[0];
    assert_eq!(r[0], r[1], "utt_id must be unique");
    assert!(r[2].parse::<u32>().unwrap() >= 4, "several speakers: {r:?}");
    assert_eq!((r[3].as_str(), r[4].as_str()), ("16000", "16000"));
    assert_eq!(r[5], "0", "every LibriSpeech utterance has a transcript");
    assert_eq!(r[6], "0", "duration_s = num_samples / sample_rate");
    // Speaker and chapter are the first two fields of the id, as in the LibriSpeech folders.
    let bad = query_csv(
        &[&run],
        "SELECT count(*) FROM utterances WHERE chapter IS NULL OR source <> concat(speaker, '/', chapter, '/', utt_id, '.flac') OR utt_id NOT LIKE concat(speaker, '-', chapter, '-%')",
    );
    assert_eq!(bad[0][0], "0", "speaker/chapter/utt_id.flac");
    let chapters = query_csv(
        &[&run],
        "SELECT count(DISTINCT concat(speaker, '-', chapter)) FROM utterances",
    );
    assert_eq!(chapters[0][0], "15", "the demo corpus has 15 chapters");

    // The index lists each shard with its rows and content hash, and the shards hold the rows.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shards.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["complete"], true);
    let mut total = 0u64;
    for s in index["shards"].as_array().unwrap() {
        let Some(file) = s["file"].as_str() else {
            continue;
        };
        let bytes = std::fs::read(shards.join(file)).unwrap();
        assert_eq!(bytes.len() as u64, s["bytes"].as_u64().unwrap());
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(shards.join(file)).unwrap(),
        )
        .unwrap();
        let kv = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .cloned()
            .unwrap_or_default();
        assert!(
            kv.iter()
                .any(|k| k.key == "ehmam.audio_format" && k.value.as_deref() == Some("int16")),
            "{kv:?}"
        );
        let schema = reader.schema().clone();
        for col in [
            "utt_id",
            "speaker",
            "chapter",
            "source",
            "sample_rate",
            "num_samples",
            "duration_s",
            "transcript",
            "audio",
        ] {
            assert!(schema.field_with_name(col).is_ok(), "missing column {col}");
        }
        let rows: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows as u64, s["rows"].as_u64().unwrap());
        total += rows as u64;
    }
    assert_eq!(total as usize, utts.len());
    assert!(
        index["shards"].as_array().unwrap().len() > 1,
        "target_mb: 1 should give several shards"
    );

    // The stages table has the telemetry of both stages.
    let st = query_csv(
        &[&run],
        "SELECT stage, items_in, items_out FROM stages ORDER BY stage",
    );
    assert_eq!(st.len(), 2);
    assert_eq!(st[0][0], "decode");
    assert_eq!(st[0][2], demo_files().len().to_string());
    assert_eq!(st[1][1], demo_files().len().to_string());
}

#[test]
fn shards_are_byte_identical_for_one_and_four_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    prep(
        &a.join("run"),
        &a.join("shards"),
        &["stages.decode.workers=1"],
    );
    prep(
        &b.join("run"),
        &b.join("shards"),
        &["stages.decode.workers=4"],
    );
    let ta = tree_bytes(&a.join("shards"));
    let tb = tree_bytes(&b.join("shards"));
    assert_eq!(ta.len(), tb.len());
    for ((na, ba), (nb, bb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(ba == bb, "{na} differs between workers: 1 and workers: 4");
    }
}

#[test]
fn an_interrupted_prep_resumes_and_ends_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    prep(
        &full.join("run"),
        &full.join("shards"),
        &["stages.shards.with.target_mb=0.5"],
    );

    // What a crash after the second shard leaves: the index up to it, not complete, the next
    // shard half-written under its temporary name.
    let cut = tmp.path().join("cut");
    copy_tree(&full.join("shards"), &cut.join("shards"));
    let ipath = cut.join("shards/index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ipath).unwrap()).unwrap();
    let all = index["shards"].as_array().unwrap().clone();
    assert!(all.len() >= 4, "need several shards, got {}", all.len());
    let kept: Vec<serde_json::Value> = all[..2].to_vec();
    for s in &all[2..] {
        if let Some(f) = s["file"].as_str() {
            std::fs::remove_file(cut.join("shards").join(f)).unwrap();
        }
    }
    std::fs::write(
        cut.join("shards/.shard-00002.parquet.tmp"),
        b"PAR1 half a shard",
    )
    .unwrap();
    index["shards"] = serde_json::Value::Array(kept.clone());
    index["complete"] = serde_json::Value::Bool(false);
    std::fs::write(&ipath, serde_json::to_string_pretty(&index).unwrap()).unwrap();

    // A reader refuses the incomplete directory, before anything runs.
    let read_spec = tmp.path().join("read.yaml");
    std::fs::write(
        &read_spec,
        format!(
            "name: r
stages:
  read: {{ kind: shards.read, with: {{ dir: {} }} }}
",
            cut.join("shards").display()
        ),
    )
    .unwrap();
    let o = ehmam(&["validate", read_spec.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("has not finished"), "{}", text(&o));

    let log = prep(
        &cut.join("run"),
        &cut.join("shards"),
        &["stages.shards.with.target_mb=0.5"],
    );
    let done: u64 = kept.iter().map(|s| s["inputs"].as_u64().unwrap()).sum();
    assert!(
        log.contains(&format!("resuming: {done} of")),
        "the rerun should skip the finished inputs:\n{log}"
    );
    let ta = tree_bytes(&full.join("shards"));
    let tb = tree_bytes(&cut.join("shards"));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((n, a), (_, b)) in ta.iter().zip(&tb) {
        assert!(a == b, "{n} differs after resume");
    }
    // The tables of the resumed run cover every file, not just the new ones.
    let n = query_csv(
        &[&cut.join("run")],
        "SELECT (SELECT count(*) FROM utterances) + (SELECT count(*) FROM rejects)",
    );
    assert_eq!(n[0][0], demo_files().len().to_string());
}

#[test]
fn a_finished_prep_rerun_does_nothing_and_a_changed_format_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, shards) = (tmp.path().join("run"), tmp.path().join("shards"));
    prep(&run, &shards, &[]);
    let before = tree_hashes(&shards);
    let log = prep(&run, &shards, &[]);
    assert!(log.contains("resuming"), "{log}");
    assert_eq!(before, tree_hashes(&shards));
    let o = ehmam(&[
        "run",
        "specs/prep.yaml",
        "--force",
        "--set",
        &format!("run_dir={}", run.display()),
        "--set",
        &format!("stages.shards.with.dir={}", shards.display()),
        "--set",
        "stages.shards.with.audio_format=float32",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("audio_format=int16"), "{}", text(&o));
}

#[test]
fn query_is_read_only_and_unions_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, shards) = (tmp.path().join("run"), tmp.path().join("shards"));
    prep(&run, &shards, &[]);
    for sql in [
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO utterances SELECT * FROM utterances",
        "COPY utterances TO '/tmp/ehmam-copy.csv'",
        "DROP TABLE utterances",
        "SET datafusion.execution.batch_size = 1",
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc/'",
    ] {
        let o = ehmam(&["query", run.to_str().unwrap(), sql]);
        assert!(!o.status.success(), "{sql} should be refused");
        assert!(text(&o).contains("query refused"), "{sql}: {}", text(&o));
    }
    let o = ehmam(&[
        "query",
        run.to_str().unwrap(),
        "SELECT * FROM '/etc/passwd'",
    ]);
    assert!(!o.status.success(), "reading other files must fail");

    // Two runs: the union, told apart by `run`.
    let run2 = tmp.path().join("run2");
    copy_tree(&run, &run2);
    let rows = query_csv(&[&run, &run2], "SELECT count(*) FROM utterances");
    let one = query_csv(&[&run], "SELECT count(*) FROM utterances");
    assert_eq!(
        rows[0][0].parse::<u64>().unwrap(),
        2 * one[0][0].parse::<u64>().unwrap()
    );
    let json = ok(&[
        "query",
        "--format",
        "json",
        run.to_str().unwrap(),
        "SELECT utt_id, speaker FROM utterances ORDER BY utt_id LIMIT 2",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let table = ok(&[
        "query",
        run.to_str().unwrap(),
        "SELECT count(*) AS n FROM rejects",
    ]);
    assert!(table.contains("| n |") || table.contains("| n "), "{table}");
}

/// Every utterance of a shard store in its reading order (the whole row, audio included), and
/// its rejects, through the reader's own code.
fn store_contents(
    dir: &Path,
) -> (
    Vec<stages::items::Utterance>,
    Vec<stages::data::shards::RejectEntry>,
) {
    use stages::stream::PartSource;
    let parts = stages::data::shards::Shards::parts(dir).unwrap();
    let mut utts = Vec::new();
    for p in parts {
        utts.extend(stages::data::shards::read_shard(&p.path, 0).unwrap());
    }
    let index = stages::data::shards::ShardIndex::load(dir)
        .unwrap()
        .unwrap();
    let rejects = index.shards.into_iter().flat_map(|s| s.rejects).collect();
    (utts, rejects)
}

/// `ehmam run` with `envs` set (a launcher's variables).
fn run_with_env(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ehmam"));
    c.args(args).current_dir(root()).env("CI", "true");
    for k in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
        "SLURM_ARRAY_TASK_COUNT",
        "JOB_COMPLETION_INDEX",
    ] {
        c.env_remove(k);
    }
    c.envs(envs.iter().copied());
    c.output().unwrap()
}

#[test]
fn three_partitions_merged_hold_what_one_prep_holds() {
    let tmp = tempfile::tempdir().unwrap();
    // The demo corpus with two inputs that are rejected (a damaged FLAC, a file that is no audio).
    let corpus = tmp.path().join("corpus");
    copy_tree(&root().join("data/demo"), &corpus);
    std::fs::write(
        corpus.join("1003/103/1003-103-0099.flac"),
        b"fLaC not really",
    )
    .unwrap();
    std::fs::write(corpus.join("1007/110/notes.bin"), [0u8, 1, 2, 3]).unwrap();
    let input = format!("stages.decode.with.input={}", corpus.display());
    let base = [input.as_str(), "stages.decode.with.layout=librispeech"];

    let whole = tmp.path().join("whole");
    prep(&tmp.path().join("run-whole"), &whole, &base);

    // Three processes, each told its partition differently: the spec, a Slurm array task
    // (ids 1–3: SLURM_ARRAY_TASK_MIN is 1), a Kubernetes indexed Job (count in the spec).
    let parts = tmp.path().join("parts");
    let shards_set = format!("stages.shards.with.dir={}", parts.display());
    let launch: [(&str, Vec<(&str, &str)>); 3] = [
        ("{index: 0, count: 3}", vec![]),
        (
            "{}",
            vec![
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
        ),
        ("{count: 3}", vec![("JOB_COMPLETION_INDEX", "2")]),
    ];
    let mut partition_runs = Vec::new();
    for (i, (part, envs)) in launch.iter().enumerate() {
        let run = format!("run_dir={}", tmp.path().join(format!("run-{i}")).display());
        let part = format!("stages.decode.with.partition={part}");
        let mut args = vec![
            "run",
            "specs/prep.yaml",
            "--set",
            &run,
            "--set",
            &shards_set,
        ];
        args.extend(["--set", &part]);
        for b in &base {
            args.extend(["--set", b]);
        }
        // Partition 2 first: the order the processes finish in does not matter.
        partition_runs.push((
            i,
            args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            envs.clone(),
        ));
    }
    partition_runs.rotate_right(1);
    // Before any partition ran, the reader points at the merge, and the merge at the missing ones.
    for (i, args, envs) in &partition_runs {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_with_env(&a, envs);
        assert!(o.status.success(), "partition {i}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("partition {i} of 3")),
            "partition {i} says which it is: {}",
            text(&o)
        );
        if *i == 2 {
            let o = ehmam(&["shards", "merge", &parts.display().to_string()]);
            assert!(!o.status.success());
            assert!(
                text(&o).contains("partitions 0, 1 of 3 are missing"),
                "{}",
                text(&o)
            );
            use stages::stream::PartSource;
            let e = stages::data::shards::Shards::parts(&parts)
                .unwrap_err()
                .to_string();
            assert!(e.contains("ehmam shards merge"), "{e}");
        }
    }
    let merged = ok(&["shards", "merge", "--verify", &parts.display().to_string()]);
    assert!(merged.contains("merged: 3 partitions"), "{merged}");

    let (a, ra) = store_contents(&whole);
    let (b, rb) = store_contents(&parts);
    assert!(a.len() >= 150, "{}", a.len());
    assert_eq!(ra.len(), 2, "two rejects: {ra:?}");
    assert_eq!(ra, rb, "the same rejects, with the same reasons");
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (
                &x.utt_id,
                &x.speaker,
                &x.chapter,
                &x.source,
                &x.transcript,
                x.sample_rate
            ),
            (
                &y.utt_id,
                &y.speaker,
                &y.chapter,
                &y.source,
                &y.transcript,
                y.sample_rate
            )
        );
        assert!(x.samples == y.samples, "{}: the same audio", x.utt_id);
    }
    // The partitions cut their own shards (target_mb 1), so the files differ from the whole
    // prep's; a single partition of one writes the very same bytes.
    let one = tmp.path().join("one");
    let mut b1 = base.to_vec();
    b1.push("stages.decode.with.partition={index: 0, count: 1}");
    prep(&tmp.path().join("run-one"), &one, &b1);
    assert_eq!(
        tree_bytes(&one.join("part-00000-of-00001"))
            .into_iter()
            .filter(|(n, _)| n.ends_with(".parquet"))
            .collect::<Vec<_>>(),
        tree_bytes(&whole)
            .into_iter()
            .filter(|(n, _)| n.ends_with(".parquet"))
            .collect::<Vec<_>>()
    );

    // What merge refuses: an unfinished partition, one of another spec, one of another split.
    let p1 = parts.join("part-00001-of-00003");
    let idx = std::fs::read_to_string(p1.join("index.json")).unwrap();
    std::fs::write(
        p1.join("index.json"),
        idx.replace("\"complete\": true", "\"complete\": false"),
    )
    .unwrap();
    let o = ehmam(&["shards", "merge", &parts.display().to_string()]);
    assert!(
        !o.status.success() && text(&o).contains("partition 1 has not finished"),
        "{}",
        text(&o)
    );
    std::fs::write(p1.join("index.json"), &idx).unwrap();
    // Partition 1 again with another min_seconds, into a copy of the store.
    let other = tmp.path().join("other");
    copy_tree(&parts, &other);
    std::fs::remove_dir_all(other.join("part-00001-of-00003")).unwrap();
    let mut b2 = base.to_vec();
    b2.push("stages.decode.with.partition={index: 1, count: 3}");
    b2.push("stages.decode.with.min_seconds=0.25");
    prep(&tmp.path().join("run-other"), &other, &b2);
    let o = ehmam(&["shards", "merge", &other.display().to_string()]);
    assert!(
        !o.status.success() && text(&o).contains("partition 1 was made by another prep"),
        "{}",
        text(&o)
    );
    // A rerun of a partition with another spec into the same directory is refused too.
    let o = ehmam(&[
        "run",
        "specs/prep.yaml",
        "--quiet",
        "--set",
        &format!("run_dir={}", tmp.path().join("run-other2").display()),
        "--set",
        &format!("stages.shards.with.dir={}", parts.display()),
        "--set",
        &input,
        "--set",
        "stages.decode.with.layout=librispeech",
        "--set",
        "stages.decode.with.partition={index: 1, count: 3}",
        "--set",
        "stages.decode.with.min_seconds=0.25",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("the spec or the input listing changed"),
        "{}",
        text(&o)
    );
    std::fs::create_dir(parts.join("part-00001-of-00004")).unwrap();
    let o = ehmam(&["shards", "merge", &parts.display().to_string()]);
    assert!(
        !o.status.success() && text(&o).contains("split 3 and 4 ways"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_partition_index_outside_the_count_or_without_a_launcher_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let run = format!("run_dir={}", tmp.path().join("run").display());
    for (part, envs, says) in [
        (
            "{index: 3, count: 3}",
            vec![],
            "partition.index: must be below count (3), got 3",
        ),
        (
            "{}",
            vec![],
            "neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set",
        ),
        (
            "{}",
            vec![("JOB_COMPLETION_INDEX", "1")],
            "partition.count: not given",
        ),
        (
            "{}",
            vec![
                ("SLURM_ARRAY_TASK_ID", "5"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "must be below count (4), got 5 (from the Slurm array)",
        ),
    ] {
        let part = format!("stages.decode.with.partition={part}");
        let o = run_with_env(
            &["run", "specs/prep.yaml", "--set", &run, "--set", &part],
            &envs,
        );
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(says), "{part} {envs:?}: {}", text(&o));
        assert!(!tmp.path().join("run").exists(), "nothing ran");
    }
}

#[test]
fn a_store_or_run_directory_url_of_a_scheme_no_store_reads_is_refused_at_validation() {
    for set in [
        "stages.shards.with.dir=http://example.org/shards",
        "run_dir=ftp://example.org/runs/prep",
    ] {
        let o = ehmam(&["validate", "specs/prep.yaml", "--set", set]);
        assert_eq!(o.status.code(), Some(2), "{set}: {}", text(&o));
        assert!(
            text(&o).contains("is no store this build reads"),
            "{set}: {}",
            text(&o)
        );
    }
}
