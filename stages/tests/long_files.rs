//! Long files through the prep: `audio.decode` cuts them into rows of `max_segment_seconds`,
//! `shards.write` counts each file as one input however many rows it gives and however many
//! shards they span, and a resume after a shard that ends inside a long file ends byte-identical.

use pipeline::{CancelToken, RunOptions};
use std::path::Path;

/// A mono 16-bit PCM WAV of `n` samples of noise and a tone.
fn wav(path: &Path, rate: u32, n: usize, seed: u32) {
    let data = n as u32 * 2;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    let mut x = seed;
    for i in 0..n {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let v = ((x >> 20) as f32 / 4096.0 - 0.5) * 0.3 + (i as f32 * 0.03).sin() * 0.5;
        b.extend_from_slice(&((v * 20000.0) as i16).to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

fn prep(input: &Path, out: &Path, workers: usize) {
    let yaml = format!(
        "name: long
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: {workers}, with: {{ input: {}, layout: dir, max_segment_seconds: 2 }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {}, target_mb: 0.1 }} }}
",
        out.join("run").display(),
        input.display(),
        out.join("shards").display()
    );
    let plan = pipeline::validate(
        pipeline::load_str(&yaml, "long.yaml", &[]).unwrap(),
        &stages::registry(),
    )
    .unwrap();
    pipeline::run(
        plan,
        &RunOptions {
            force: true,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .unwrap();
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        // The directory's lock file says who wrote it, not what.
        .filter(|e| e.file_name() != pipeline::lock::LOCK_FILE)
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_long_file_is_one_input_across_shards_and_a_resume_inside_it_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    wav(&input.join("a.wav"), 16000, 16000, 1);
    // 25 s at 8 kHz: rows of 2 s at 16 kHz (64 kB as int16), 0.1 MB shards.
    wav(&input.join("long.wav"), 8000, 25 * 8000, 2);
    wav(&input.join("z.wav"), 16000, 16000, 3);
    let full = tmp.path().join("full");
    prep(&input, &full, 1);

    let index = stages::data::shards::ShardIndex::load(&full.join("shards"))
        .unwrap()
        .unwrap();
    assert!(index.complete);
    // Three inputs, each counted once; the ranges follow each other.
    assert_eq!(index.inputs_done(), 3);
    let mut next = 0;
    for s in &index.shards {
        assert_eq!(s.first_input, next);
        next += s.inputs;
    }
    let mut ids = Vec::new();
    for s in &index.shards {
        let f = full.join("shards").join(s.file.as_ref().unwrap());
        for u in stages::data::shards::read_shard(&f, 0).unwrap() {
            ids.push((u.utt_id, u.samples.len()));
        }
    }
    let mut want = vec![("a".to_string(), 16000)];
    for k in 0..12 {
        want.push((format!("long@{k}"), 32000));
    }
    want.push(("long@12".to_string(), 16000));
    want.push(("z".to_string(), 16000));
    assert_eq!(ids, want);
    // Some shard ends inside the long file, and says so.
    let inside = index
        .shards
        .iter()
        .position(|s| s.open.is_some())
        .expect("a shard that ends inside long.wav");
    assert_eq!(
        index.shards[inside].open.as_ref().unwrap().source,
        "long.wav"
    );
    assert!(index.shards.last().unwrap().open.is_none());

    // Parallel decoding gives the same bytes.
    let par = tmp.path().join("par");
    prep(&input, &par, 3);
    assert!(files(&full.join("shards")) == files(&par.join("shards")));

    // A crash after that shard: the index up to it, not complete, later shards gone.
    let cut = tmp.path().join("cut");
    std::fs::create_dir_all(cut.join("shards")).unwrap();
    let mut kept = index.clone();
    kept.shards.truncate(inside + 1);
    kept.complete = false;
    for s in &kept.shards {
        let f = s.file.as_ref().unwrap();
        std::fs::copy(full.join("shards").join(f), cut.join("shards").join(f)).unwrap();
    }
    std::fs::write(
        cut.join("shards/index.json"),
        serde_json::to_string_pretty(&kept).unwrap(),
    )
    .unwrap();
    prep(&input, &cut, 2);
    assert!(
        files(&full.join("shards")) == files(&cut.join("shards")),
        "the resumed shards differ"
    );
}
