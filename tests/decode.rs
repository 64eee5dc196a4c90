//! Prep over a folder of every fixture in `tests/fixtures/audio` (plus non-audio files): every
//! file ends up an utterance or a reject. The decoding itself is checked in `stages/tests/decode.rs`.

mod common;
use common::*;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
#[allow(dead_code)]
struct Fixture {
    file: String,
    sample_format: Option<String>,
    channels: Option<usize>,
    sample_rate: Option<u32>,
    frames: Option<usize>,
    /// The signal's true length (the encoder's input), where the reference decode differs.
    source_frames: Option<usize>,
    #[serde(rename = "ref")]
    reference: Option<String>,
    expect: String,
    why: Option<String>,
}

fn dir() -> PathBuf {
    root().join("tests/fixtures/audio")
}

fn fixtures() -> Vec<Fixture> {
    let text = std::fs::read_to_string(dir().join("fixtures.json")).expect("fixtures.json");
    serde_json::from_str(&text).expect("fixtures.json parses")
}

#[test]
fn a_prep_over_a_mixed_folder_accounts_for_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    let fx = fixtures();
    for (i, f) in fx.iter().enumerate() {
        // Half of the files one level down, to exercise the recursive listing.
        let dst = if i % 2 == 0 {
            input.join(&f.file)
        } else {
            input.join("sub").join(&f.file)
        };
        std::fs::copy(dir().join(&f.file), dst).unwrap();
    }
    // Text beside the audio is metadata (counted, not an input); any other file is an input that
    // is not audio, and lands in the rejects.
    std::fs::write(input.join("README.txt"), "not an input").unwrap();
    std::fs::write(input.join("sub/blob.dat"), [0u8, 1, 2, 3, 255]).unwrap();
    std::fs::write(input.join("NOEXT"), "RIFF").unwrap();
    let spec = tmp.path().join("mixed.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: mixed
run_dir: {}
stages:
  decode: {{ kind: audio.decode, workers: 2, with: {{ input: {}, min_seconds: 0.1 }} }}
  shards: {{ kind: shards.write, from: decode, with: {{ dir: {} }} }}
",
            tmp.path().join("run").display(),
            input.display(),
            tmp.path().join("shards").display()
        ),
    )
    .unwrap();
    let out = ehmam(&["run", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ignored 1 text and metadata files"),
        "{}",
        text(&out)
    );
    let run = tmp.path().join("run");
    let utts: Vec<String> = query_csv(&[&run], "SELECT source FROM utterances")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let rejects: Vec<(String, String)> = query_csv(&[&run], "SELECT source, reason FROM rejects")
        .into_iter()
        .map(|r| (r[0].clone(), r[1..].join(",")))
        .collect();
    assert_eq!(utts.len() + rejects.len(), fx.len() + 2);
    for name in ["sub/blob.dat", "NOEXT"] {
        assert!(
            rejects
                .iter()
                .any(|(s, r)| s == name && r.starts_with("not audio")),
            "{name}: {rejects:?}"
        );
    }
    for f in &fx {
        let name = |s: &String| s.rsplit('/').next() == Some(f.file.as_str());
        if f.expect == "ok" {
            assert!(
                utts.iter().any(name),
                "{} should be an utterance; rejects: {rejects:?}",
                f.file
            );
        } else {
            assert!(
                rejects.iter().any(|(s, _)| name(s)),
                "{} should be rejected",
                f.file
            );
        }
    }
}
