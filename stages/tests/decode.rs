//! Decoding against an independent decoder: every fixture in `tests/fixtures/audio` was decoded by
//! ffmpeg to raw float32 (`*.ref.f32`, made by `make_fixtures.sh`), and resampling is compared with
//! sox's `rate -v`. Broken files must be rejected with the right reason, in the library and in a
//! prep run over a folder that mixes them with good files.

use serde::Deserialize;
use stages::data::audio::{decode_file, resample};
use stages::data::decode::{decode_input, InputFile};
use stages::items::Decoded;
use std::path::{Path, PathBuf};

/// Lossless formats (PCM of every sample format, FLAC, AIFF): the same float values as ffmpeg's
/// decode, up to float32 rounding of the integer → float conversion.
const TOL_LOSSLESS: f32 = 1e-6;
/// Lossy formats: two correct decoders may differ by their IMDCT/synthesis arithmetic. Measured
/// here between symphonia and ffmpeg: at most 9.4e-7 (MP3), 1.2e-7 (Vorbis), 5.2e-7 (AAC); ffmpeg
/// vs sox (libmad, libvorbis) differ by up to 1.5e-5 (tests/fixtures/audio/README.md). The bound
/// leaves room for other platforms' float arithmetic.
const TOL_LOSSY_MAX: f32 = 1e-4;
/// …and the whole-signal error at least this far (dB) below the signal.
const LOSSY_MIN_SNR_DB: f64 = 60.0;

#[derive(Debug, Deserialize)]
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
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/audio")
}

fn fixtures() -> Vec<Fixture> {
    let text = std::fs::read_to_string(dir().join("fixtures.json")).expect("fixtures.json");
    serde_json::from_str(&text).expect("fixtures.json parses")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn snr_db(reference: &[f32], test: &[f32]) -> f64 {
    let sig: f64 = reference.iter().map(|&x| (x as f64).powi(2)).sum();
    let err: f64 = reference
        .iter()
        .zip(test)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum();
    10.0 * (sig / err.max(1e-30)).log10()
}

#[test]
fn good_fixtures_decode_like_ffmpeg() {
    let mut checked = 0;
    for f in fixtures().iter().filter(|f| f.expect == "ok") {
        let Some(r) = &f.reference else { continue };
        let pcm = decode_file(&dir().join(&f.file)).unwrap_or_else(|e| panic!("{}: {e}", f.file));
        let want = read_f32(&dir().join(r));
        if let Some(c) = f.channels {
            assert_eq!(pcm.channels, c, "{}: channels", f.file);
        }
        if let Some(sr) = f.sample_rate {
            assert_eq!(pcm.sample_rate, sr, "{}: sample rate", f.file);
        }
        let lossy = f.sample_format.as_deref() == Some("lossy");
        if !lossy {
            assert_eq!(
                pcm.frames(),
                f.frames.unwrap_or(want.len() / pcm.channels),
                "{}: frames",
                f.file
            );
        } else {
            // Priming and padding are trimmed from the stream's own metadata (LAME header, Ogg
            // granule positions, the MP4 edit list) to the encoder's input length. ffmpeg 5.1
            // keeps the AAC end padding, so its reference is longer there: compare the overlap.
            let want_frames = f.source_frames.unwrap_or(want.len() / pcm.channels);
            assert_eq!(pcm.frames(), want_frames, "{}: frames (lossy)", f.file);
        }
        let n = want.len().min(pcm.interleaved.len());
        let max = want[..n]
            .iter()
            .zip(&pcm.interleaved[..n])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if lossy {
            let snr = snr_db(&want[..n], &pcm.interleaved[..n]);
            assert!(
                max <= TOL_LOSSY_MAX,
                "{}: max |diff| {max} > {TOL_LOSSY_MAX}",
                f.file
            );
            assert!(
                snr >= LOSSY_MIN_SNR_DB,
                "{}: SNR {snr:.1} dB < {LOSSY_MIN_SNR_DB}",
                f.file
            );
        } else {
            assert!(
                max <= TOL_LOSSLESS,
                "{}: max |diff| {max} > {TOL_LOSSLESS}",
                f.file
            );
        }
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} fixtures checked");
}

fn spectrum(x: &[f32]) -> Vec<realfft::num_complex::Complex<f64>> {
    let n = x.len();
    let mut planner = realfft::RealFftPlanner::<f64>::new();
    let fft = planner.plan_fft_forward(n);
    let mut input: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            v as f64 * (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
        })
        .collect();
    let mut out = fft.make_output_vec();
    fft.process(&mut input, &mut out).unwrap();
    out
}

/// Resampling 44.1 → 16 kHz against sox `rate -v` (very high quality). Both are band-limited
/// resamplers; they may differ in the transition band (7.6–8 kHz) and by a constant sub-sample
/// delay (rubato's FFT resampler works block-wise: 0.18 output samples, 11 µs, at this ratio). So:
/// the in-band (0–7 kHz) spectra must agree to 60 dB in magnitude, and to 50 dB as complex
/// spectra once a delay of at most half a sample is allowed for.
#[test]
fn resampling_matches_sox_very_high_quality() {
    let pcm = decode_file(&dir().join("resample_src_mono_44k.wav")).unwrap();
    assert_eq!(pcm.sample_rate, 44100);
    let ours = resample(&pcm.to_mono(), 44100, 16000).unwrap();
    let sox = read_f32(&dir().join("resample_src_mono_44k.sox16k.f32"));
    assert_eq!(ours.len(), sox.len());
    let (a, b) = (spectrum(&sox), spectrum(&ours));
    let n = sox.len() as f64;
    let band = (7000.0 / 8000.0 * (a.len() - 1) as f64) as usize;
    let sig: f64 = a[..band].iter().map(|c| c.norm_sqr()).sum();
    let mag_err: f64 = a[..band]
        .iter()
        .zip(&b[..band])
        .map(|(p, q)| (p.norm() - q.norm()).powi(2))
        .sum();
    let mag_snr = 10.0 * (sig / mag_err).log10();
    assert!(
        mag_snr >= 60.0,
        "in-band magnitude agreement {mag_snr:.1} dB"
    );
    let mut best = (f64::MIN, 0.0);
    for step in -100..=100 {
        let delay = step as f64 / 100.0;
        let err: f64 = a[..band]
            .iter()
            .zip(&b[..band])
            .enumerate()
            .map(|(k, (p, q))| {
                let shift = realfft::num_complex::Complex::from_polar(
                    1.0,
                    2.0 * std::f64::consts::PI * k as f64 * delay / n,
                );
                (p - q * shift).norm_sqr()
            })
            .sum();
        let snr = 10.0 * (sig / err).log10();
        if snr > best.0 {
            best = (snr, delay);
        }
    }
    assert!(
        best.1.abs() <= 0.5,
        "delay against sox {:.2} samples",
        best.1
    );
    assert!(
        best.0 >= 50.0,
        "in-band agreement {:.1} dB after a {:.2}-sample delay",
        best.0,
        best.1
    );
}

fn category(why: &str) -> &'static str {
    match why {
        w if w.contains("empty") => "empty",
        w if w.contains("truncat") => "truncated",
        w if w.contains("not audio") => "not audio",
        w if w.contains("header") => "invalid header",
        w if w.contains("finite") => "non-finite",
        w if w.contains("short") => "too short",
        _ => "",
    }
}

#[test]
fn broken_fixtures_are_rejected_with_their_reason() {
    let mut checked = 0;
    for f in fixtures().iter().filter(|f| f.expect == "reject") {
        let input = InputFile {
            path: dir().join(&f.file),
            source: f.file.clone(),
            utt_id: f.file.clone(),
            speaker: None,
            chapter: None,
            transcript: None,
            problem: None,
            manifest_samples: None,
        };
        match decode_input(&input, 16000, 0.1) {
            Decoded::Utterance(_) | Decoded::Part(_) => {
                panic!("{} should be rejected ({:?})", f.file, f.why)
            }
            Decoded::Rejected(r) => {
                let want = category(f.why.as_deref().unwrap_or(""));
                assert!(!want.is_empty(), "{}: unknown why {:?}", f.file, f.why);
                // "invalid header" files may also be reported as not audio when no reader accepts them.
                let ok = r.reason.starts_with(want)
                    || (want == "invalid header" && r.reason.starts_with("not audio"));
                assert!(
                    ok,
                    "{}: reason `{}` should start with `{want}`",
                    f.file, r.reason
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} broken fixtures");
}
