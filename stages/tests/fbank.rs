//! Kaldi fbank parity: our `features.fbank` against kaldi-native-fbank 1.23 on demo utterances and
//! edge cases (shorter than one window, exactly one, odd lengths, silence), with default and
//! non-default options. References made by tests/fixtures/fbank/make_fbank_fixtures.py.

use serde::Deserialize;
use stages::data::fbank::{normalize_utterance, stack, Fbank, FbankOptions, WindowType};

/// Largest absolute difference of log-mel values allowed (both sides compute in float32).
const TOL: f32 = 1e-3;

#[derive(Deserialize)]
struct Case {
    input: String,
    output: String,
    frames: usize,
    options: serde_json::Value,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn read<T: Copy, const N: usize>(path: &std::path::Path, f: fn([u8; N]) -> T) -> Vec<T> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(N)
        .map(|c| f(c.try_into().unwrap()))
        .collect()
}

fn options(v: &serde_json::Value) -> FbankOptions {
    let window = match v["window_type"].as_str().unwrap() {
        "povey" => WindowType::Povey,
        "hamming" => WindowType::Hamming,
        "hanning" => WindowType::Hanning,
        "rectangular" => WindowType::Rectangular,
        "blackman" => WindowType::Blackman,
        other => panic!("window {other}"),
    };
    FbankOptions {
        num_mel_bins: v["num_mel_bins"].as_u64().unwrap() as usize,
        frame_length_ms: v["frame_length_ms"].as_f64().unwrap(),
        frame_shift_ms: v["frame_shift_ms"].as_f64().unwrap(),
        window_type: window,
        preemphasis_coefficient: v["preemphasis_coefficient"].as_f64().unwrap(),
        remove_dc_offset: v["remove_dc_offset"].as_bool().unwrap(),
        snip_edges: v["snip_edges"].as_bool().unwrap(),
        use_power: v["use_power"].as_bool().unwrap(),
        low_freq: v["low_freq"].as_f64().unwrap() as f32,
        high_freq: v["high_freq"].as_f64().unwrap() as f32,
        dither: 0.0,
        round_to_power_of_two: v["round_to_power_of_two"].as_bool().unwrap(),
        ..FbankOptions::default()
    }
}

#[test]
fn fbank_matches_kaldi_native_fbank() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fbank");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut worst = 0.0f32;
    for c in &cases.cases {
        let x: Vec<f32> = read(&dir.join(&c.input), i16::from_le_bytes)
            .into_iter()
            .map(|v| v as f32 / 32768.0)
            .collect();
        let want: Vec<f32> = read(&dir.join(&c.output), f32::from_le_bytes);
        let o = options(&c.options);
        let mut fb = Fbank::new(&o, 16000).unwrap();
        let (frames, got) = fb.compute(&x, 0);
        assert_eq!(frames, c.frames, "{}: frames", c.output);
        assert_eq!(got.len(), want.len(), "{}", c.output);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= TOL, "{}: max |diff| {max}", c.output);
        worst = worst.max(max);
    }
    eprintln!(
        "fbank parity: worst max |diff| over {} cases = {worst:e}",
        cases.cases.len()
    );
}

#[test]
fn normalisation_and_stacking_by_hand() {
    // Two bins, three frames: bin 0 = 1, 2, 3 (mean 2, var 2/3); bin 1 constant.
    let mut d = vec![1.0, 5.0, 2.0, 5.0, 3.0, 5.0];
    normalize_utterance(&mut d, 3, 2);
    let s = (2.0f32 / 3.0).sqrt();
    for (a, b) in d.iter().zip([-1.0 / s, 0.0, 0.0, 0.0, 1.0 / s, 0.0]) {
        assert!((a - b).abs() < 1e-5, "{d:?}");
    }
    // Stacking pairs of 2-dim frames: 3 frames → 1 frame of 4 dims (the odd frame dropped).
    let (n, st) = stack(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2, 2);
    assert_eq!((n, st), (1, vec![1.0, 2.0, 3.0, 4.0]));
}

#[test]
fn dither_is_seeded_and_bad_options_are_refused() {
    let x: Vec<f32> = (0..4000).map(|i| ((i as f32) * 0.01).sin() * 0.1).collect();
    let o = FbankOptions {
        dither: 1.0,
        ..FbankOptions::default()
    };
    let mut fb = Fbank::new(&o, 16000).unwrap();
    let a = fb.compute(&x, 1).1;
    let b = fb.compute(&x, 1).1;
    let c = fb.compute(&x, 2).1;
    assert_eq!(a, b);
    assert_ne!(a, c);
    let bad = FbankOptions {
        high_freq: 9000.0,
        num_mel_bins: 1,
        ..FbankOptions::default()
    };
    let errs = bad.check(16000);
    assert!(
        errs.iter().any(|e| e.field == "high_freq")
            && errs.iter().any(|e| e.field == "num_mel_bins"),
        "{errs:?}"
    );
    let t = validate_with(
        "stages.fb={kind: features.fbank, from: decode, with: {stack: 0, window_type: hann}}",
    );
    assert!(
        t.contains("stages.fb.with.stack") && t.contains("stages.fb.with.window_type"),
        "{t}"
    );
}

#[test]
fn log_and_input_scale_options_follow_their_definitions() {
    // Broadband noise (a fixed LCG), well above the floor in (nearly) every bin even unscaled.
    let mut s = 12345u32;
    let x: Vec<f32> = (0..8000)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 1.8
        })
        .collect();
    let (_, logs) = Fbank::new(&FbankOptions::default(), 16000)
        .unwrap()
        .compute(&x, 0);
    let floor = f32::EPSILON.ln();
    let shift = 2.0 * 32768f32.ln();
    // Bins whose unscaled energy stays far above the floor (pre-emphasis all but removes the
    // lowest ones): the floor cannot touch them.
    let clear: Vec<bool> = logs.iter().map(|&v| v - shift > floor + 3.0).collect();
    assert!(
        clear.iter().filter(|&&c| c).count() * 10 >= logs.len() * 9,
        "the test signal stays above the floor"
    );
    // use_log_fbank: false gives the energies themselves: exp of the log values.
    let (_, energies) = Fbank::new(
        &FbankOptions {
            use_log_fbank: false,
            ..FbankOptions::default()
        },
        16000,
    )
    .unwrap()
    .compute(&x, 0);
    for (e, l) in energies.iter().zip(&logs) {
        assert!((e.ln() - l).abs() < 1e-4, "{e} vs exp({l})");
    }
    // input_scale: 1 analyses the [-1, 1] samples: every power falls by 32768², every log
    // energy by 2·ln 32768 (dither off; DC removal, pre-emphasis and window are linear).
    let (_, unit) = Fbank::new(
        &FbankOptions {
            input_scale: 1.0,
            ..FbankOptions::default()
        },
        16000,
    )
    .unwrap()
    .compute(&x, 0);
    for ((u, l), c) in unit.iter().zip(&logs).zip(&clear) {
        if *c {
            assert!((l - u - shift).abs() < 1e-3, "{l} − {u} ≠ {shift}");
        } else {
            assert!(*u >= floor - 1e-6, "the floor holds: {u}");
        }
    }
    let t = validate_with(
        "stages.fb={kind: features.fbank, from: decode, with: {log_floor: 0, input_scale: -1}}",
    );
    assert!(
        t.contains("stages.fb.with.log_floor") && t.contains("stages.fb.with.input_scale"),
        "{t}"
    );
}

/// The errors `ehmam validate specs/prep.yaml --set SET` reports (it must report some).
fn validate_with(set: &str) -> String {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let spec =
        pipeline::load(&root.join("specs/prep.yaml"), &[set.to_string()]).expect("the spec loads");
    match pipeline::validate(spec, &stages::registry()) {
        Ok(_) => panic!("{set} was accepted"),
        Err(e) => e.to_string(),
    }
}
