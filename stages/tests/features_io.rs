//! Features stored and read back unchanged; waveform normalisation; batches from stored features.

use pipeline::{CancelToken, RunOptions};
use stages::data::waveform::normalize_waveform;
use std::sync::Mutex;

mod common;

static BATCHES: Mutex<Vec<stages::items::Batch>> = Mutex::new(Vec::new());
/// The tests that collect into `BATCHES` take turns (the harness runs tests on parallel threads).
static BATCHES_IN_USE: Mutex<()> = Mutex::new(());

fn batches_in_use() -> std::sync::MutexGuard<'static, ()> {
    BATCHES_IN_USE.lock().unwrap_or_else(|e| e.into_inner())
}

sink!(
    BatchSink,
    stages::items::Batch,
    BATCHES,
    "test.batchsink",
    |b| b
);

fn go(yaml: &str) {
    let mut reg = stages::registry();
    reg.with::<BatchSink>();
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
}

#[test]
fn waveform_normalisation_is_a_layer_norm() {
    // Hand-worked: [1, 2, 3, 4] → mean 2.5, var 1.25 → (x − 2.5) / sqrt(1.25 + 1e-5).
    let y = normalize_waveform(&[1.0, 2.0, 3.0, 4.0]);
    let s = (1.25f64 + 1e-5).sqrt();
    for (a, x) in y.iter().zip([1.0, 2.0, 3.0, 4.0]) {
        assert!((*a as f64 - (x - 2.5) / s).abs() < 1e-6);
    }
}

#[test]
fn stored_features_read_back_identical_and_batch() {
    let _turn = batches_in_use();
    let tmp = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo");
    let (shards, feats) = (tmp.path().join("shards"), tmp.path().join("feats"));
    go(&format!(
        "name: a
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: 2, with: {{ input: {} }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {} }} }}
",
        tmp.path().join("a").display(),
        demo.display(),
        shards.display()
    ));
    go(&format!(
        "name: b
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {} }} }}
  fb: {{ kind: features.fbank, from: r, workers: 2 }}
  w: {{ kind: features.write, from: fb, with: {{ dir: {}, target_mb: 2 }} }}
",
        tmp.path().join("b").display(),
        shards.display(),
        feats.display()
    ));
    let index = stages::data::store::FeatureIndex::load(&feats)
        .unwrap()
        .unwrap();
    assert!(index.complete && index.parts.len() >= 2, "{index:?}");
    // Recompute directly and compare with what was stored.
    let stored: Vec<stages::items::Features> = index
        .parts
        .iter()
        .flat_map(|p| stages::data::store::read_features(&feats.join(&p.file), None).unwrap())
        .collect();
    assert_eq!(stored.len(), 160);
    let first = stages::data::shards::read_shard(&shards.join("shard-00000.parquet"), 0).unwrap();
    let mut fb = <stages::data::fbank::FeaturesFbank as pipeline::StageDef>::create(
        &Default::default(),
        &pipeline::StageContext {
            stage: "fb".into(),
            kind: "features.fbank".into(),
            run: "b".into(),
            run_dir: tmp.path().into(),
            seed: 0,
            device: "cpu".into(),
            model: None,
            graph: Default::default(),
            workers: 1,
            links: Default::default(),
        },
        0,
    )
    .unwrap();
    let direct = fb.features(&first[0]).unwrap();
    assert_eq!(stored[0], direct);

    // features.read → batch.by_duration: 2 epochs, every utterance once per epoch, within budget.
    BATCHES.lock().unwrap().clear();
    go(&format!(
        "name: c
run_dir: {}
stages:
  r: {{ kind: features.read, with: {{ dir: {}, epochs: 2, shuffle: true }} }}
  b: {{ kind: batch.by_duration, from: r, with: {{ max_seconds: 16, max_utt_seconds: 3, buffer: 64 }} }}
  s: {{ kind: test.batchsink, from: b }}
",
        tmp.path().join("c").display(),
        feats.display()
    ));
    let batches = BATCHES.lock().unwrap().clone();
    for e in 0..2 {
        let n: usize = batches
            .iter()
            .filter(|b| b.epoch == e)
            .map(|b| b.size())
            .sum();
        assert_eq!(n, 160, "epoch {e}");
    }
    assert!(batches
        .iter()
        .all(|b| b.frames * b.size() <= 16 * 50 && b.dim == 160 && b.frames <= 150));
}

static FEATS: Mutex<Vec<stages::items::Features>> = Mutex::new(Vec::new());

sink!(
    FeatSink,
    stages::items::Features,
    FEATS,
    "test.feats",
    |f| f
);

#[test]
fn global_statistics_normalise_the_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo");
    let shards = tmp.path().join("shards");
    go(&format!(
        "name: a
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: 2, with: {{ input: {} }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {} }} }}
",
        tmp.path().join("a").display(),
        demo.display(),
        shards.display()
    ));
    let stats = tmp.path().join("stats");
    // Global normalisation without statistics is refused before anything runs.
    let refused = format!(
        "name: n
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {} }} }}
  fb: {{ kind: features.fbank, from: r, with: {{ normalize: global }} }}
",
        stats.display(),
        shards.display()
    );
    let errs = pipeline::validate(
        pipeline::load_str(&refused, "n.yaml", &[]).unwrap(),
        &stages::registry(),
    )
    .err()
    .unwrap();
    assert!(errs.to_string().contains("features.stats"), "{errs}");
    go(&format!(
        "name: s
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {} }} }}
  fb: {{ kind: features.fbank, from: r, workers: 2, with: {{ normalize: none }} }}
  st: {{ kind: features.stats, from: fb }}
",
        stats.display(),
        shards.display()
    ));
    let st = stages::data::stats::FeatureStats::load(&stats.join("feature_stats.json")).unwrap();
    assert_eq!((st.dim, st.utterances), (160, 160));
    let mut reg = stages::registry();
    reg.with::<FeatSink>();
    let yaml = format!(
        "name: g
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {} }} }}
  fb: {{ kind: features.fbank, from: r, with: {{ normalize: global, stats: {} }} }}
  s: {{ kind: test.feats, from: fb }}
",
        tmp.path().join("g").display(),
        shards.display(),
        stats.join("feature_stats.json").display()
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
    // Over the whole corpus every dimension now has mean 0 and variance 1.
    let n: usize = feats.iter().map(|f| f.num_frames).sum();
    for d in [0usize, 40, 79, 80, 159] {
        let xs: Vec<f64> = feats
            .iter()
            .flat_map(|f| f.data.chunks_exact(160).map(move |r| r[d] as f64))
            .collect();
        assert_eq!(xs.len(), n);
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 1e-3 && (var - 1.0).abs() < 1e-3,
            "dim {d}: mean {mean}, var {var}"
        );
    }
}

#[test]
fn the_data_stream_resumes_mid_epoch_without_rereading() {
    let _turn = batches_in_use();
    let tmp = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo");
    let shards = tmp.path().join("shards");
    go(&format!(
        "name: a
run_dir: {}
stages:
  d: {{ kind: audio.decode, workers: 2, with: {{ input: {} }} }}
  w: {{ kind: shards.write, from: d, with: {{ dir: {}, target_mb: 0.5 }} }}
",
        tmp.path().join("a").display(),
        demo.display(),
        shards.display()
    ));
    let spec = |extra_read: &str, extra_batch: &str| {
        format!(
            "name: t
seed: 3
run_dir: {}
stages:
  r: {{ kind: shards.read, with: {{ dir: {}, epochs: 3, shuffle: true{extra_read} }} }}
  fb: {{ kind: features.fbank, from: r, workers: 2 }}
  b: {{ kind: batch.by_duration, from: fb, with: {{ max_seconds: 12, max_utt_seconds: 3, buffer: 40{extra_batch} }} }}
  s: {{ kind: test.batchsink, from: b }}
",
            tmp.path().join("t").display(),
            shards.display()
        )
    };
    BATCHES.lock().unwrap().clear();
    go(&spec("", ""));
    let full = std::mem::take(&mut *BATCHES.lock().unwrap());
    // Stop after a batch in the middle of epoch 1, then resume from its position.
    let k = full
        .iter()
        .position(|b| b.epoch == 1 && b.position.start > 0)
        .unwrap()
        + 1;
    let pos = full[k].position.after();
    assert!(pos.start > 0, "resume inside the epoch: {pos:?}");
    go(&spec(
        &format!(", start_epoch: {}, start_index: {}", pos.epoch, pos.start),
        &format!(
            ", resume_from: {{ epoch: {}, start: {}, flush: {}, index: {}, step: {} }}",
            pos.epoch, pos.start, pos.flush, pos.index, pos.step
        ),
    ));
    let resumed = std::mem::take(&mut *BATCHES.lock().unwrap());
    assert_eq!(resumed.len(), full.len() - k - 1);
    assert!(
        resumed == full[k + 1..],
        "the resumed stream differs from the uninterrupted one"
    );
}
