//! `features.fbank`: log-mel filterbank features numerically compatible with Kaldi's
//! `compute-fbank-feats` (as exposed by `torchaudio.compliance.kaldi.fbank` and
//! `kaldi-native-fbank`), then per-utterance mean/variance normalisation and frame stacking
//! (method.md §7: 80 bins at 100 Hz → 160 dims at 50 Hz).
//!
//! Reference: Kaldi `feat/feature-window.cc` (framing, dither, DC removal, pre-emphasis, windows),
//! `feat/mel-computations.cc` (mel banks) and `feat/feature-fbank.cc` (power spectrum, log floor).
//! Parity with kaldi-native-fbank is tested against committed fixtures (tests/fbank.rs).

use crate::items::Features;
use crate::items::Utterance;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use rand::{Rng, SeedableRng};
use realfft::{RealFftPlanner, RealToComplex};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Kaldi's analysis windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowType {
    /// (0.5 − 0.5·cos(2πn/(N−1)))^0.85, Kaldi's default.
    #[default]
    Povey,
    Hamming,
    Hanning,
    Rectangular,
    Blackman,
}

/// Kaldi fbank options: the names of `torchaudio.compliance.kaldi.fbank`, with the unit in the
/// name where torchaudio leaves it implicit (`frame_length_ms`, `frame_shift_ms`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct FbankOptions {
    /// Number of triangular mel bins.
    pub num_mel_bins: usize,
    /// Frame length in milliseconds (torchaudio's `frame_length`).
    pub frame_length_ms: f64,
    /// Frame shift in milliseconds (torchaudio's `frame_shift`).
    pub frame_shift_ms: f64,
    /// Analysis window: povey, hamming, hanning, rectangular or blackman.
    pub window_type: WindowType,
    /// Pre-emphasis coefficient (0 turns it off).
    pub preemphasis_coefficient: f64,
    /// Subtract each frame's mean before pre-emphasis.
    pub remove_dc_offset: bool,
    /// Only frames that fit entirely in the signal (true), or centred frames with reflected edges.
    pub snip_edges: bool,
    /// Power spectrum (true) or magnitude spectrum (false).
    pub use_power: bool,
    /// Low cut-off of the mel banks in Hz.
    pub low_freq: f32,
    /// High cut-off in Hz; 0 or negative is relative to the Nyquist frequency.
    pub high_freq: f32,
    /// Gaussian dither added to the int16-scaled samples (0 = off); seeded per utterance.
    pub dither: f32,
    /// Zero-pad frames to a power of two before the FFT.
    pub round_to_power_of_two: bool,
    /// Log of the mel energies (true), or the energies themselves.
    pub use_log_fbank: bool,
    /// Floor under the mel energies before the log (Kaldi: f32 epsilon, 1.1920929e-7).
    pub log_floor: f32,
    /// Samples in [-1, 1] are multiplied by this first: 32768 puts them in the int16 range Kaldi
    /// expects (`compute-fbank-feats` reads int16 WAV); 1 analyses them as they are.
    pub input_scale: f32,
}

impl Default for FbankOptions {
    fn default() -> Self {
        FbankOptions {
            num_mel_bins: 80,
            frame_length_ms: 25.0,
            frame_shift_ms: 10.0,
            window_type: WindowType::Povey,
            preemphasis_coefficient: 0.97,
            remove_dc_offset: true,
            snip_edges: true,
            use_power: true,
            low_freq: 20.0,
            high_freq: 0.0,
            dither: 0.0,
            round_to_power_of_two: true,
            use_log_fbank: true,
            log_floor: f32::EPSILON,
            input_scale: 32768.0,
        }
    }
}

impl FbankOptions {
    /// Every problem with the options at `sample_rate`.
    pub fn check(&self, sample_rate: u32) -> Vec<ParamError> {
        let mut e = Vec::new();
        let nyquist = sample_rate as f32 / 2.0;
        let high = if self.high_freq > 0.0 {
            self.high_freq
        } else {
            nyquist + self.high_freq
        };
        if self.num_mel_bins < 3 {
            e.push(ParamError::new(
                "num_mel_bins",
                format!("must be at least 3, got {}", self.num_mel_bins),
            ));
        }
        let len = (sample_rate as f64 * self.frame_length_ms * 1e-3) as usize;
        let shift = (sample_rate as f64 * self.frame_shift_ms * 1e-3) as usize;
        if len < 2 {
            e.push(ParamError::new(
                "frame_length_ms",
                format!("{} ms is under two samples", self.frame_length_ms),
            ));
        }
        if shift < 1 || !(self.frame_shift_ms > 0.0) {
            e.push(ParamError::new(
                "frame_shift_ms",
                format!(
                    "must give at least one sample, got {} ms",
                    self.frame_shift_ms
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.preemphasis_coefficient) {
            e.push(ParamError::new(
                "preemphasis_coefficient",
                format!("must be in [0, 1], got {}", self.preemphasis_coefficient),
            ));
        }
        if !(self.low_freq >= 0.0 && self.low_freq < nyquist) {
            e.push(ParamError::new(
                "low_freq",
                format!("must be in [0, {nyquist}) Hz, got {}", self.low_freq),
            ));
        }
        if !(high > self.low_freq && high <= nyquist) {
            e.push(ParamError::new("high_freq", format!("gives a high cut-off of {high} Hz, which must lie above low_freq ({}) and at most at Nyquist ({nyquist})", self.low_freq)));
        }
        if !(self.dither >= 0.0 && self.dither.is_finite()) {
            e.push(ParamError::new(
                "dither",
                format!("must be ≥ 0, got {}", self.dither),
            ));
        }
        if !(self.log_floor > 0.0 && self.log_floor.is_finite()) && self.use_log_fbank {
            e.push(ParamError::new(
                "log_floor",
                format!("must be > 0 (the log of 0 is -inf), got {}", self.log_floor),
            ));
        }
        if !(self.input_scale > 0.0 && self.input_scale.is_finite()) {
            e.push(ParamError::new(
                "input_scale",
                format!("must be > 0, got {}", self.input_scale),
            ));
        }
        e
    }
}

fn mel(f: f32) -> f32 {
    1127.0 * (1.0 + f / 700.0).ln()
}

/// A filterbank computer for one sample rate: window, mel banks and FFT plan made once.
pub struct Fbank {
    opts: FbankOptions,
    frame_len: usize,
    frame_shift: usize,
    padded: usize,
    window: Vec<f32>,
    /// Per mel bin: first FFT bin and weights.
    banks: Vec<(usize, Vec<f32>)>,
    fft: Arc<dyn RealToComplex<f32>>,
    frame: Vec<f32>,
    spectrum: Vec<realfft::num_complex::Complex<f32>>,
    power: Vec<f32>,
    scratch: Vec<realfft::num_complex::Complex<f32>>,
}

impl Fbank {
    pub fn new(opts: &FbankOptions, sample_rate: u32) -> crate::Result<Self> {
        let problems = opts.check(sample_rate);
        if let Some(p) = problems.first() {
            return Err(crate::Error::from(format!("{}: {}", p.field, p.message)));
        }
        let frame_len = (sample_rate as f64 * opts.frame_length_ms * 1e-3) as usize;
        let frame_shift = (sample_rate as f64 * opts.frame_shift_ms * 1e-3) as usize;
        let padded = if opts.round_to_power_of_two {
            frame_len.next_power_of_two()
        } else {
            frame_len
        };
        let a = 2.0 * std::f64::consts::PI / (frame_len as f64 - 1.0);
        let window = (0..frame_len)
            .map(|i| {
                let i = i as f64;
                (match opts.window_type {
                    WindowType::Hanning => 0.5 - 0.5 * (a * i).cos(),
                    WindowType::Hamming => 0.54 - 0.46 * (a * i).cos(),
                    WindowType::Povey => (0.5 - 0.5 * (a * i).cos()).powf(0.85),
                    WindowType::Rectangular => 1.0,
                    WindowType::Blackman => 0.42 - 0.5 * (a * i).cos() + 0.08 * (2.0 * a * i).cos(),
                }) as f32
            })
            .collect();
        // Mel banks as Kaldi builds them (float arithmetic, Nyquist bin excluded).
        let nyquist = 0.5 * sample_rate as f32;
        let high = if opts.high_freq > 0.0 {
            opts.high_freq
        } else {
            nyquist + opts.high_freq
        };
        let num_fft_bins = padded / 2;
        let bin_width = sample_rate as f32 / padded as f32;
        let (mel_low, mel_high) = (mel(opts.low_freq), mel(high));
        let delta = (mel_high - mel_low) / (opts.num_mel_bins as f32 + 1.0);
        let mut banks = Vec::with_capacity(opts.num_mel_bins);
        for b in 0..opts.num_mel_bins {
            let left = mel_low + b as f32 * delta;
            let center = mel_low + (b as f32 + 1.0) * delta;
            let right = mel_low + (b as f32 + 2.0) * delta;
            let mut first = None;
            let mut weights = Vec::new();
            for i in 0..num_fft_bins {
                let m = mel(bin_width * i as f32);
                if m > left && m < right {
                    let w = if m <= center {
                        (m - left) / (center - left)
                    } else {
                        (right - m) / (right - center)
                    };
                    if first.is_none() {
                        first = Some(i);
                    }
                    weights.push(w);
                } else if first.is_some() {
                    break;
                }
            }
            banks.push((first.unwrap_or(0), weights));
        }
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(padded);
        let spectrum = fft.make_output_vec();
        let scratch = fft.make_scratch_vec();
        Ok(Fbank {
            opts: opts.clone(),
            frame_len,
            frame_shift,
            padded,
            window,
            banks,
            fft,
            frame: vec![0.0; padded],
            spectrum,
            power: vec![0.0; padded / 2 + 1],
            scratch,
        })
    }

    /// Frames Kaldi computes for `n` samples.
    pub fn num_frames(&self, n: usize) -> usize {
        if self.opts.snip_edges {
            if n < self.frame_len {
                0
            } else {
                1 + (n - self.frame_len) / self.frame_shift
            }
        } else {
            (n + self.frame_shift / 2) / self.frame_shift
        }
    }

    pub fn dim(&self) -> usize {
        self.opts.num_mel_bins
    }

    /// Log-mel features of `samples` (in [-1, 1]; scaled to the int16 range as Kaldi expects),
    /// row-major `frames × num_mel_bins`. `seed` drives the dither, if any.
    pub fn compute(&mut self, samples: &[f32], seed: u64) -> (usize, Vec<f32>) {
        let n = samples.len();
        let frames = self.num_frames(n);
        let dim = self.opts.num_mel_bins;
        let mut out = vec![0.0f32; frames * dim];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for f in 0..frames {
            let start: i64 = if self.opts.snip_edges {
                (f * self.frame_shift) as i64
            } else {
                (f * self.frame_shift + self.frame_shift / 2) as i64 - (self.frame_len / 2) as i64
            };
            for s in 0..self.frame_len {
                let mut i = start + s as i64;
                // Reflect at the edges (only reached with snip_edges: false).
                while i < 0 || i >= n as i64 {
                    i = if i < 0 { -i - 1 } else { 2 * n as i64 - 1 - i };
                }
                self.frame[s] = samples[i as usize] * self.opts.input_scale;
            }
            let w = &mut self.frame[..self.frame_len];
            if self.opts.dither > 0.0 {
                for x in w.iter_mut() {
                    // Box–Muller: a standard normal draw, as Kaldi's RandGauss.
                    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                    let u2: f32 = rng.random::<f32>();
                    *x += self.opts.dither
                        * (-2.0 * u1.ln()).sqrt()
                        * (2.0 * std::f32::consts::PI * u2).cos();
                }
            }
            if self.opts.remove_dc_offset {
                let mean = w.iter().sum::<f32>() / w.len() as f32;
                for x in w.iter_mut() {
                    *x -= mean;
                }
            }
            let p = self.opts.preemphasis_coefficient as f32;
            if p != 0.0 {
                for i in (1..w.len()).rev() {
                    w[i] -= p * w[i - 1];
                }
                w[0] -= p * w[0];
            }
            for (x, c) in w.iter_mut().zip(&self.window) {
                *x *= c;
            }
            for x in &mut self.frame[self.frame_len..] {
                *x = 0.0;
            }
            // The plan was made for `padded` samples, so the lengths always match.
            if self
                .fft
                .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.scratch)
                .is_err()
            {
                continue;
            }
            for (p, c) in self.power.iter_mut().zip(&self.spectrum) {
                let e = c.re * c.re + c.im * c.im;
                *p = if self.opts.use_power { e } else { e.sqrt() };
            }
            let row = &mut out[f * dim..(f + 1) * dim];
            for (r, (first, weights)) in row.iter_mut().zip(&self.banks) {
                let e: f32 = weights
                    .iter()
                    .zip(&self.power[*first..])
                    .map(|(w, p)| w * p)
                    .sum();
                *r = if self.opts.use_log_fbank {
                    e.max(self.opts.log_floor).ln()
                } else {
                    e
                };
            }
        }
        let _ = self.padded;
        (frames, out)
    }
}

/// Per-bin mean/variance normalisation over the frames of one utterance, in place.
pub fn normalize_utterance(data: &mut [f32], frames: usize, dim: usize) {
    if frames == 0 {
        return;
    }
    for b in 0..dim {
        let mut sum = 0.0f64;
        let mut sq = 0.0f64;
        for t in 0..frames {
            let x = data[t * dim + b] as f64;
            sum += x;
            sq += x * x;
        }
        let mean = sum / frames as f64;
        let var = (sq / frames as f64 - mean * mean).max(0.0);
        let inv = 1.0 / (var + 1e-10).sqrt();
        for t in 0..frames {
            let x = &mut data[t * dim + b];
            *x = ((*x as f64 - mean) * inv) as f32;
        }
    }
}

/// Stacks `k` consecutive frames into one (`frames / k` frames of `k·dim`; a remainder is dropped).
pub fn stack(data: &[f32], frames: usize, dim: usize, k: usize) -> (usize, Vec<f32>) {
    if k <= 1 {
        return (frames, data.to_vec());
    }
    let out_frames = frames / k;
    (out_frames, data[..out_frames * k * dim].to_vec())
}

/// Feature normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Mean and variance per bin over each utterance.
    #[default]
    Utterance,
    /// Corpus mean and variance per dimension, from a `features.stats` run (`stats` file).
    Global,
    None,
}

/// Parameters of `features.fbank`: Kaldi's options plus normalisation and stacking.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct FbankParams {
    /// Kaldi's options (num_mel_bins, frame_length_ms, window_type, …; see `FbankOptions`).
    #[serde(flatten)]
    pub kaldi: FbankOptions,
    /// Normalisation: utterance (mean/variance per bin), global or none.
    pub normalize: Normalize,
    /// Consecutive frames stacked into one (2: 100 Hz → 50 Hz); 1 = no stacking.
    pub stack: usize,
    /// With `normalize: global`: the statistics file written by `features.stats`
    /// (default: `feature_stats.json` in this run's directory).
    pub stats: Option<std::path::PathBuf>,
}

impl Default for FbankParams {
    fn default() -> Self {
        FbankParams {
            kaldi: FbankOptions::default(),
            normalize: Normalize::Utterance,
            stack: 2,
            stats: None,
        }
    }
}

impl FbankParams {
    fn stats_path(&self, ctx: &StageContext) -> std::path::PathBuf {
        self.stats
            .clone()
            .unwrap_or_else(|| ctx.run_dir.join(crate::data::stats::STATS_FILE))
    }
}

impl FbankParams {
    pub fn options(&self) -> FbankOptions {
        self.kaldi.clone()
    }
}

impl Params for FbankParams {
    fn check(&self) -> Vec<ParamError> {
        // Checked at 16 kHz here; the stage checks again at each utterance's rate.
        let mut e = self.options().check(16000);
        if self.stack == 0 {
            e.push(ParamError::new(
                "stack",
                "must be at least 1 (1 = no stacking)",
            ));
        }
        if self.stats.is_some() && self.normalize != Normalize::Global {
            e.push(ParamError::new(
                "stats",
                "only used with `normalize: global`",
            ));
        }
        e
    }
}

/// The `features.fbank` stage.
pub struct FeaturesFbank {
    p: FbankParams,
    seed: u64,
    fbank: Option<(u32, Fbank)>,
    /// Global (mean, 1/std) per output dimension.
    global: Option<(Vec<f32>, Vec<f32>)>,
}

impl StageDef for FeaturesFbank {
    type Params = FbankParams;
    const KIND: &'static str = "features.fbank";
    const DOC: &'static str =
        "Kaldi-compatible log-mel filterbanks (compute-fbank-feats defaults), per-utterance mean/variance\nnormalisation and frame stacking (default 80 bins at 100 Hz → 160 dims at 50 Hz).";
    const PARALLEL: bool = true;

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Utterance>("in", "utterances")]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>(
            "out",
            "features, one item per utterance",
        )]
    }
    fn paths(p: &FbankParams, ctx: &StageContext) -> pipeline::StagePaths {
        pipeline::StagePaths {
            reads: if p.normalize == Normalize::Global {
                vec![p.stats_path(ctx)]
            } else {
                vec![]
            },
            writes: vec![],
            ..Default::default()
        }
    }
    fn validate(p: &FbankParams, ctx: &StageContext) -> Vec<ParamError> {
        if p.normalize != Normalize::Global {
            return Vec::new();
        }
        let path = p.stats_path(ctx);
        match crate::data::stats::FeatureStats::load(&path) {
            Ok(st) if Some(st.dim) != p.kaldi.num_mel_bins.checked_mul(p.stack) => {
                vec![ParamError::new(
                    "stats",
                    format!(
                    "{} holds statistics of {}-dimensional features; this stage makes {} × {} = {}",
                    path.display(),
                    st.dim,
                    p.kaldi.num_mel_bins,
                    p.stack,
                    p.kaldi.num_mel_bins.saturating_mul(p.stack)
                ),
                )]
            }
            Ok(_) => Vec::new(),
            Err(e) => vec![ParamError::new(
                "stats",
                format!(
                    "{e}; run a spec with `features.stats` (over `normalize: none` features) first"
                ),
            )],
        }
    }
    fn create(p: &FbankParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        let global = if p.normalize == Normalize::Global {
            let st = crate::data::stats::FeatureStats::load(&p.stats_path(ctx))
                .map_err(StageError::from)?;
            let inv = st
                .var
                .iter()
                .map(|&v| (1.0 / (v + 1e-10).sqrt()) as f32)
                .collect();
            Some((st.mean.iter().map(|&m| m as f32).collect(), inv))
        } else {
            None
        };
        Ok(FeaturesFbank {
            p: p.clone(),
            seed: ctx.seed,
            fbank: None,
            global,
        })
    }
}

impl FeaturesFbank {
    /// Features of one utterance (also used by tests and benchmarks).
    pub fn features(&mut self, u: &Utterance) -> Result<Features, StageError> {
        if self
            .fbank
            .as_ref()
            .is_none_or(|(sr, _)| *sr != u.sample_rate)
        {
            let fb = Fbank::new(&self.p.options(), u.sample_rate).map_err(|e| {
                StageError::failed(format!("{}: fbank at {} Hz: {e}", u.utt_id, u.sample_rate))
            })?;
            self.fbank = Some((u.sample_rate, fb));
        }
        let Some((_, fb)) = self.fbank.as_mut() else {
            return Err(StageError::failed("internal: no fbank"));
        };
        // Dither depends on the utterance and epoch only, never on which worker computes it.
        let seed = crate::seed::fbank_dither(self.seed, &u.utt_id, u.epoch);
        let (frames, mut data) = fb.compute(&u.samples, seed);
        let dim = fb.dim();
        let shift_s = fb.frame_shift as f64 / u.sample_rate as f64;
        if self.p.normalize == Normalize::Utterance {
            normalize_utterance(&mut data, frames, dim);
        }
        let (frames, mut data) = stack(&data, frames, dim, self.p.stack);
        if let Some((mean, inv)) = &self.global {
            for row in data.chunks_exact_mut(mean.len()) {
                for ((x, m), s) in row.iter_mut().zip(mean).zip(inv) {
                    *x = (*x - m) * s;
                }
            }
        }
        Ok(Features {
            utt_id: u.utt_id.clone(),
            speaker: u.speaker.clone(),
            source: u.source.clone(),
            transcript: u.transcript.clone(),
            epoch: u.epoch,
            frame_rate: 1.0 / (shift_s * self.p.stack as f64),
            num_frames: frames,
            dim: dim * self.p.stack,
            data,
        })
    }
}

impl Stage for FeaturesFbank {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(u) = io.recv::<Utterance>(0)? {
            let f = self.features(&u)?;
            io.send(0, f)?;
        }
        Ok(())
    }
}
