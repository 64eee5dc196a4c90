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
