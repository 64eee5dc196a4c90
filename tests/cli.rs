//! The command line: validation errors, the stage listing, manifests, reading shards back.

mod common;
use common::*;

#[test]
fn validate_prints_every_error_and_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad
stages:
  decode:
    kind: audio.decod
  shards:
    kind: shards.write
    from: decoder
    with:
      dir: x
      target_mb: -1
      zstd: 3
  read: { kind: shards.read, workers: 0, with: { dir: /nonexistent, epochs: many } }
",
    )
    .unwrap();
    let o = ehmam(&["validate", bad.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    for needle in [
        "bad.yaml:4: stages.decode.kind: unknown stage kind `audio.decod` (did you mean `audio.decode`",
        "bad.yaml:7: stages.shards.from: `decoder` is not a stage",
        "bad.yaml:10: stages.shards.with.target_mb: must be > 0",
        "bad.yaml:11: stages.shards.with.zstd: unknown parameter (did you mean `zstd_level`",
        "bad.yaml:12: stages.read.workers: must be at least 1",
        "bad.yaml:12: stages.read.with.epochs",
    ] {
        assert!(t.contains(needle), "missing `{needle}` in:\n{t}");
    }
    // Invalid YAML and an empty file.
    std::fs::write(&bad, "name: x\nstages: {a: [\n").unwrap();
    let o = ehmam(&["validate", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("invalid YAML"), "{}", text(&o));
    std::fs::write(&bad, "\n# nothing\n").unwrap();
    let o = ehmam(&["run", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("the spec is empty"), "{}", text(&o));
    // A bad override is named as such.
    let o = ehmam(&[
        "validate",
        "specs/prep.yaml",
        "--set",
        "stages.decode.with.sample_rate=fast",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("--set: stages.decode.with.sample_rate"),
        "{}",
        text(&o)
    );
    assert!(ok(&["validate", "specs/prep.yaml"]).contains("ok"));
    // The base recipe is a valid spec (on the CPU here; on cuda:0 where CUDA is built in). It
    // is refused on this build only for its device.
    let shards = format!("stages.shards.with.dir={}", demo_shards().display());
    assert!(ok(&[
        "validate",
        "specs/base.yaml",
        "--set",
        "device=cpu",
        "--set",
        &shards
    ])
    .contains("ok"));
    if !cfg!(feature = "cuda") {
        let o = ehmam(&["validate", "specs/base.yaml", "--set", &shards]);
        assert_eq!(o.status.code(), Some(2));
        let t = text(&o);
        assert!(t.contains("device") && t.contains("--features cuda"), "{t}");
        assert_eq!(
            t.matches("specs/base.yaml:").count(),
            1,
            "one error only: {t}"
        );
    }
}

#[test]
fn stages_lists_kinds_ports_and_parameters() {
    let out = ok(&["stages"]);
    for needle in [
        "audio.decode",
        "shards.write",
        "shards.read",
        "outputs: out (Decoded)",
        "min_seconds",
        "layout",
        "auto|dir|librispeech|manifest",
        "target_mb",
    ] {
        assert!(out.contains(needle), "missing {needle} in\n{out}");
    }
}

#[test]
fn a_fairseq_manifest_is_read_in_order_with_missing_files_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = root().join("tests/fixtures/audio");
    let manifest = tmp.path().join("train.tsv");
    std::fs::write(&manifest, format!("{}\nwav_s16_mono_16k.wav\t9600\nflac_s24_stereo_48k.flac\t28800\nmissing.wav\t100\nmp3_mono_22k.mp3\tlots\nogg_vorbis_stereo_44k.ogg\t26460\n", fx.display()))
        .unwrap();
    let spec = tmp.path().join("m.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: m
run_dir: {}
stages:
  decode: {{ kind: audio.decode, with: {{ input: {} }} }}
  shards: {{ kind: shards.write, from: decode, with: {{ dir: {} }} }}
  read: {{ kind: shards.read, with: {{ dir: {} }} }}
",
            tmp.path().join("run").display(),
            manifest.display(),
            tmp.path().join("shards").display(),
            tmp.path().join("shards").display()
        ),
    )
    .unwrap();
    // shards.read on a directory that does not exist yet is refused before anything runs.
    let o = ehmam(&["run", spec.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("run the prep spec first"), "{}", text(&o));
    let s = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        s.lines()
            .filter(|l| !l.contains("read:"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    ok(&["run", spec.to_str().unwrap()]);
    let run = tmp.path().join("run");
    let utts = query_csv(
        &[&run],
        "SELECT utt_id, source, num_samples FROM utterances ORDER BY shard, utt_id",
    );
    let ids: Vec<&str> = utts.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        ids,
        [
            "flac_s24_stereo_48k",
            "ogg_vorbis_stereo_44k",
            "wav_s16_mono_16k"
        ]
    );
    // Stored in manifest order (not sorted): the shard's rows as the manifest lists them.
    let shard = std::fs::File::open(tmp.path().join("shards/shard-00000.parquet")).unwrap();
    let mut stored = Vec::new();
    for b in parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(shard)
        .unwrap()
        .build()
        .unwrap()
    {
        let b = b.unwrap();
        let c = b
            .column_by_name("utt_id")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .clone();
        stored.extend(c.iter().flatten().map(str::to_string));
    }
    assert_eq!(
        stored,
        [
            "wav_s16_mono_16k",
            "flac_s24_stereo_48k",
            "ogg_vorbis_stereo_44k"
        ]
    );
    // Resampled to 16 kHz: 0.6 s each.
    assert!(utts.iter().all(|r| r[2] == "9600"), "{utts:?}");
    let rejects = query_csv(
        &[&run],
        "SELECT source, reason FROM rejects ORDER BY source",
    );
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    assert!(
        rejects[0][0] == "missing.wav" && rejects[0][1].contains("missing: manifest line 4"),
        "{rejects:?}"
    );
    assert!(
        rejects[1][0] == "mp3_mono_22k.mp3" && rejects[1][1].contains("num_samples"),
        "{rejects:?}"
    );
}

/// `ehmam bench-update` times real updates and says what it timed: the tiny model's parameter
/// count (926,788, the count PyTorch's reference gives for the same model), the shapes asked for,
/// finite losses, and FLOPs that grow with the batch.
#[test]
fn bench_update_reports_what_it_timed() {
    let run = |batch: &str| -> serde_json::Value {
        let out = ok(&[
            "bench-update",
            "--batch",
            batch,
            "--seconds",
            "1",
            "--updates",
            "2",
            "--warmup",
            "1",
            "--peak-tflops",
            "100",
            "--json",
        ]);
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("one JSON line")
    };
    let a = run("2");
    assert_eq!(a["parameters"], 926_788);
    assert_eq!(a["model_frames"], 50);
    assert_eq!(a["updates"], 2);
    assert_eq!(a["audio_s_per_update"], 2.0);
    let ms = a["ms_per_update"].as_f64().unwrap();
    assert!(ms > 0.0 && a["last_loss"].as_f64().unwrap().is_finite());
    let phases: f64 = a["phases_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(
        phases <= ms * 1.05,
        "phases {phases} ms within the update's {ms} ms"
    );
    let mfu = a["mfu"].as_f64().unwrap();
    assert!((mfu - a["tflops_per_s"].as_f64().unwrap() / 100.0).abs() < 1e-12);
    let b = run("4");
    let ratio = b["flops_per_update"].as_f64().unwrap() / a["flops_per_update"].as_f64().unwrap();
    assert!(
        (1.8..2.2).contains(&ratio),
        "FLOPs scale with the batch: {ratio}"
    );
    // A bad model block is refused with its field.
    let o = ehmam(&["bench-update", "--model", "{encoder: {heads: 3}}"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("model.encoder.heads"), "{}", text(&o));
}

#[test]
fn a_bad_distributed_block_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("d.yaml");
    let tiny = std::fs::read_to_string(common::root().join("specs/tiny.yaml")).unwrap();
    std::fs::write(&spec, format!("distributed:\n  world_sise: 2\n{tiny}")).unwrap();
    let o = ehmam(&["validate", &spec.display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(
        t.contains("d.yaml:2: distributed.world_sise: unknown field"),
        "{t}"
    );
    std::fs::write(&spec, format!("distributed:\n  timeout_s: -1\n{tiny}")).unwrap();
    let t = text(&ehmam(&["validate", &spec.display().to_string()]));
    assert!(t.contains("distributed.timeout_s: must be > 0"), "{t}");
}

/// Without the `mpi` feature a run that asks for several ranks says how to get them.
#[cfg(not(feature = "mpi"))]
#[test]
fn several_ranks_need_the_mpi_build() {
    let tmp = tempfile::tempdir().unwrap();
    let run = format!("run_dir={}", tmp.path().join("r").display());
    let o = ehmam(&[
        "run",
        "specs/tiny.yaml",
        "--set",
        &run,
        "--set",
        "distributed.world_size=2",
    ]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("built without MPI") && t.contains("--features mpi"),
        "{t}"
    );
    assert!(!tmp.path().join("r").exists());
}
