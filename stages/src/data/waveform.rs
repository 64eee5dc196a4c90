//! `features.waveform`: the CNN front-end's input, zero mean and unit variance per utterance.

use crate::items::Features;
use crate::items::Utterance;
use pipeline::{Port, Stage, StageContext, StageDef, StageError, StageIo};

/// Zero mean, unit variance over all samples (population variance, eps 1e-5), as fairseq's
/// `postprocess` with `normalize: true`.
pub fn normalize_waveform(x: &[f32]) -> Vec<f32> {
    if x.is_empty() {
        return Vec::new();
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-5).sqrt();
    x.iter()
        .map(|&v| ((v as f64 - mean) * inv) as f32)
        .collect()
}

/// The `features.waveform` stage.
pub struct FeaturesWaveform;

impl StageDef for FeaturesWaveform {
    type Params = pipeline::NoParams;
    const KIND: &'static str = "features.waveform";
    const DOC: &'static str = "The CNN front-end's input: each utterance normalised to zero mean and unit variance over its\nsamples (method §1.1), as 1-dimensional frames at the sample rate.";
    const PARALLEL: bool = true;
    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Utterance>("in", "utterances")]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>(
            "out",
            "normalised waveforms (dim 1)",
        )]
    }
    fn create(_: &pipeline::NoParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(FeaturesWaveform)
    }
}

impl Stage for FeaturesWaveform {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(u) = io.recv::<Utterance>(0)? {
            let data = normalize_waveform(&u.samples);
            io.send(
                0,
                Features {
                    utt_id: u.utt_id,
                    speaker: u.speaker,
                    source: u.source,
                    transcript: u.transcript,
                    epoch: u.epoch,
                    frame_rate: u.sample_rate as f64,
                    num_frames: data.len(),
                    dim: 1,
                    data,
                },
            )?;
        }
        Ok(())
    }
}
