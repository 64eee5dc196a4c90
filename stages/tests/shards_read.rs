//! `shards.read`: every utterance of every epoch, shuffled by seed, the same for the same seed.

use pipeline::{CancelToken, RunOptions};
use std::sync::Mutex;

mod common;

static SEEN: Mutex<Vec<(u32, String, usize)>> = Mutex::new(Vec::new());

sink!(Sink, stages::items::Utterance, SEEN, "test.sink", |u| (
    u.epoch,
    u.utt_id,
    u.samples.len()
));

fn run(yaml: &str) -> Vec<(u32, String, usize)> {
    SEEN.lock().unwrap().clear();
    let mut reg = stages::registry();
    reg.with::<Sink>();
    let plan = pipeline::validate(pipeline::load_str(yaml, "t.yaml", &[]).unwrap(), &reg).unwrap();
    pipeline::run(
        plan,
        &RunOptions {
            force: true,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .unwrap();
    SEEN.lock().unwrap().clone()
}

#[test]
fn read_back_every_epoch_shuffled_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo");
    let shards = tmp.path().join("shards");
    let prep = format!(
        "name: p
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: 2, with: {{ input: {} }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {}, target_mb: 0.5 }} }}
",
        tmp.path().join("p").display(),
        demo.display(),
        shards.display()
    );
    let plan = pipeline::validate(
        pipeline::load_str(&prep, "p.yaml", &[]).unwrap(),
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

    let read = |seed: u64, shuffle: bool| {
        run(&format!(
            "name: r
seed: {seed}
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {}, epochs: 3, shuffle: {shuffle} }} }}
  s: {{ kind: test.sink, from: r }}
",
            tmp.path().join("r").display(),
            shards.display()
        ))
    };
    let plain = read(1, false);
    let a = read(1, true);
    let b = read(1, true);
    let c = read(2, true);
    assert_eq!(a, b, "same seed, same order");
    assert_ne!(a, c, "another seed, another order");
    for epoch in 0..3 {
        let ids = |v: &Vec<(u32, String, usize)>| {
            let mut x: Vec<String> = v
                .iter()
                .filter(|t| t.0 == epoch)
                .map(|t| t.1.clone())
                .collect();
            x.sort();
            x
        };
        assert_eq!(ids(&a).len(), 160, "every utterance once per epoch");
        assert_eq!(ids(&a), ids(&plain));
    }
    let e0: Vec<&String> = a.iter().filter(|t| t.0 == 0).map(|t| &t.1).collect();
    let e1: Vec<&String> = a.iter().filter(|t| t.0 == 1).map(|t| &t.1).collect();
    assert_ne!(e0, e1, "each epoch is shuffled anew");
    // Unshuffled, the order is the stored (input) order.
    let p0: Vec<&String> = plain.iter().filter(|t| t.0 == 0).map(|t| &t.1).collect();
    let mut sorted = p0.clone();
    sorted.sort();
    assert_eq!(p0, sorted);

    // Speaker filters: `speakers` keeps, `exclude_speakers` leaves out; a filtered stream is the
    // unfiltered one without the others' rows (same order), and a resumed one (start_index
    // counts kept rows) continues it.
    let filtered = |with: &str| {
        run(&format!(
            "name: r
seed: 1
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {}, epochs: 2, shuffle: true, {with} }} }}
  s: {{ kind: test.sink, from: r }}
",
            tmp.path().join("r").display(),
            shards.display()
        ))
    };
    let spk = |id: &str| id.split('-').next().unwrap().to_string();
    let held = filtered("speakers: [1009, \"1010\"]");
    let rest = filtered("exclude_speakers: [1009, 1010]");
    assert_eq!(held.len(), 2 * 32);
    assert_eq!(rest.len(), 2 * 128);
    let a2: Vec<_> = a.iter().filter(|t| t.0 < 2).cloned().collect();
    let want_held: Vec<_> = a2
        .iter()
        .filter(|t| ["1009", "1010"].contains(&spk(&t.1).as_str()))
        .cloned()
        .collect();
    assert_eq!(held, want_held);
    let want_rest: Vec<_> = a2
        .iter()
        .filter(|t| !["1009", "1010"].contains(&spk(&t.1).as_str()))
        .cloned()
        .collect();
    assert_eq!(rest, want_rest);
    let resumed = filtered("exclude_speakers: [1009, 1010], start_epoch: 1, start_index: 50");
    assert_eq!(resumed, want_rest[128 + 50..].to_vec());
}

static FEATS: Mutex<Vec<(String, usize, usize, f64, f32)>> = Mutex::new(Vec::new());

sink!(
    FeatSink,
    stages::items::Features,
    FEATS,
    "test.featsink",
    |f| {
        let mean = f.data.iter().sum::<f32>() / f.data.len().max(1) as f32;
        (f.utt_id, f.num_frames, f.dim, f.frame_rate, mean)
    }
);

#[test]
fn shards_to_fbank_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo");
    let yaml = format!(
        "name: f
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: 2, with: {{ input: {} }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {} }} }}
",
        tmp.path().join("p").display(),
        demo.display(),
        tmp.path().join("shards").display()
    );
    let plan = pipeline::validate(
        pipeline::load_str(&yaml, "p.yaml", &[]).unwrap(),
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
    let mut reg = stages::registry();
    reg.with::<FeatSink>();
    let yaml = format!(
        "name: g
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {} }} }}
  fb: {{ kind: features.fbank, from: r, workers: 3 }}
  s: {{ kind: test.featsink, from: fb }}
",
        tmp.path().join("g").display(),
        tmp.path().join("shards").display()
    );
    let plan = pipeline::validate(pipeline::load_str(&yaml, "g.yaml", &[]).unwrap(), &reg).unwrap();
    pipeline::run(
        plan,
        &RunOptions {
            force: true,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .unwrap();
    let feats = FEATS.lock().unwrap().clone();
    assert_eq!(feats.len(), 160);
    let ids: Vec<&String> = feats.iter().map(|f| &f.0).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "order kept behind 3 workers");
    for (id, frames, dim, rate, mean) in &feats {
        assert_eq!(*dim, 160, "{id}");
        assert_eq!(*rate, 50.0, "{id}");
        // 2–3.4 s utterances → 100–170 stacked frames; normalised features have mean ≈ 0 (not
        // exactly: stacking drops an odd last frame after normalisation).
        assert!((100..=170).contains(frames), "{id}: {frames}");
        assert!(mean.abs() < 0.05, "{id}: mean {mean}");
    }
}

// The corruption test's own sinks (the other tests read `SEEN` and `FEATS` while it runs).
static UTT_IDS: Mutex<Vec<String>> = Mutex::new(Vec::new());
sink!(
    UttIds,
    stages::items::Utterance,
    UTT_IDS,
    "test.utt_ids",
    |u| u.utt_id
);
static FEAT_IDS: Mutex<Vec<String>> = Mutex::new(Vec::new());
sink!(
    FeatIds,
    stages::items::Features,
    FEAT_IDS,
    "test.feat_ids",
    |f| f.utt_id
);

fn try_run(yaml: &str) -> Result<(), String> {
    let mut reg = stages::registry();
    reg.with::<UttIds>();
    reg.with::<FeatIds>();
    let plan = pipeline::validate(pipeline::load_str(yaml, "t.yaml", &[]).unwrap(), &reg)
        .map_err(|e| e.to_string())?;
    pipeline::run(
        plan,
        &RunOptions {
            force: true,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Flips one bit in the middle of `path`.
fn flip_a_bit(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_part_changed_after_it_was_written_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo/1001");
    let (shards, feats) = (tmp.path().join("shards"), tmp.path().join("feats"));
    try_run(&format!(
        "name: p
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: 2, with: {{ input: {} }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {}, target_mb: 0.2 }} }}
",
        tmp.path().join("p").display(),
        demo.display(),
        shards.display()
    ))
    .unwrap();
    try_run(&format!(
        "name: f
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {} }} }}
  fb: {{ kind: features.fbank, from: r }}
  w: {{ kind: features.write, from: fb, with: {{ dir: {}, target_mb: 0.5 }} }}
",
        tmp.path().join("f").display(),
        shards.display(),
        feats.display()
    ))
    .unwrap();
    let read_shards = || {
        try_run(&format!(
            "name: r\nrun_dir: {}\nstages:\n  r: {{ kind: shards.read, with: {{ dir: {} }} }}\n  s: {{ kind: test.utt_ids, from: r }}\n",
            tmp.path().join("r").display(),
            shards.display()
        ))
    };
    let read_feats = || {
        try_run(&format!(
            "name: q\nrun_dir: {}\nstages:\n  r: {{ kind: features.read, with: {{ dir: {} }} }}\n  s: {{ kind: test.feat_ids, from: r }}\n",
            tmp.path().join("q").display(),
            feats.display()
        ))
    };
    read_shards().unwrap();
    read_feats().unwrap();
    // Before the check, a flipped bit in the samples' pages read back as other samples.
    let shard = shards.join("shard-00001.parquet");
    flip_a_bit(&shard);
    let e = read_shards().unwrap_err();
    assert!(
        e.contains("shard-00001.parquet") && e.contains("BLAKE3"),
        "{e}"
    );
    let part = feats.join("features-00000.parquet");
    flip_a_bit(&part);
    let e = read_feats().unwrap_err();
    assert!(
        e.contains("features-00000.parquet") && e.contains("BLAKE3"),
        "{e}"
    );
    // A truncated part is named by its size.
    let bytes = std::fs::read(&part).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() - 7]).unwrap();
    let e = read_feats().unwrap_err();
    assert!(
        e.contains("features-00000.parquet") && e.contains("bytes"),
        "{e}"
    );
}
