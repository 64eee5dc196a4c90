//! `ehmam bench-update --finetune`: how fast CTC fine-tuning updates of a model block run on a
//! device. One `Finetuner::train_step` after another (front-end, time and channel masking, the
//! encoder with the recipe's dropout and layerdrop, the CTC head, the CTC loss with its backward,
//! AdamW), the encoder not frozen (the cost of most of a run), on random input of the front-end's
//! kind with random letter sequences of 12.5 labels a second (LibriSpeech speaks about 15
//! characters a second, spaces included). Medians over the timed updates, the warm-up excluded.

use super::trainer::{FinetuneParams, Finetuner};
use super::vocab::Vocab;
use crate::train::bench::BenchSpec;
use candle_core::{DType, Tensor};
use std::time::Instant;

/// What it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinetuneBenchResult {
    pub preset: String,
    pub device: String,
    pub batch: usize,
    pub input_frames: usize,
    pub labels_per_utterance: usize,
    pub parameters: usize,
    pub updates: usize,
    pub ms_per_update: f64,
    pub updates_per_s: f64,
    pub audio_s_per_s: f64,
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Runs the benchmark; `progress(i)` after each update.
pub fn run(spec: &BenchSpec, mut progress: impl FnMut(u64)) -> crate::Result<FinetuneBenchResult> {
    use rand::{Rng, SeedableRng};
    let cfg = spec.cfg.clone();
    let total = spec.warmup + spec.updates;
    let letters = "ETAONIHSRDLUMWCFGYPBVK'XJQZ";
    let vocab = Vocab::from_transcripts([letters]);
    let w = crate::model::init_weights(&cfg, spec.seed, &spec.device, DType::F32)?;
    let p = FinetuneParams {
        max_steps: total.max(1),
        freeze_finetune_updates: 0,
        ..FinetuneParams::default()
    };
    let mut ft = Finetuner::on(cfg.clone(), &w, vocab.clone(), p, spec.seed, &spec.device)?;
    let parameters: usize = ft.vars.values().map(|v| v.elem_count()).sum();
    let dim = cfg.input_dim();
    let model_frames = cfg.frames_for(spec.frames);
    let n_labels = ((spec.frames as f64 / spec.frame_rate) * 12.5)
        .round()
        .max(1.0) as usize;
    let n_labels = n_labels.min(model_frames / 2).max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed ^ 0xf7be);
    let x: Vec<f32> = (0..spec.batch * spec.frames * dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let x = Tensor::from_vec(x, (spec.batch, spec.frames, dim), &spec.device)?;
    let lengths = vec![spec.frames; spec.batch];
    let labels: Vec<Vec<u32>> = (0..spec.batch)
        .map(|_| {
            (0..n_labels)
                .map(|_| rng.random_range(1..vocab.len() as u32))
                .collect()
        })
        .collect();
    let (mut times, mut first, mut last) = (Vec::new(), f64::NAN, f64::NAN);
    for i in 0..total {
        let t0 = Instant::now();
        let s = ft.train_step(&x, &lengths, &labels)?;
        if !spec.device.is_cpu() {
            spec.device.synchronize()?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            first = s.loss;
        }
        last = s.loss;
        if i >= spec.warmup {
            times.push(ms);
        }
        progress(i + 1);
    }
    let n = times.len();
    let ms = crate::train::bench::median(&mut times);
    let audio = spec.batch as f64 * spec.frames as f64 / spec.frame_rate;
    Ok(FinetuneBenchResult {
        preset: cfg.preset.clone(),
        device: format!("{:?}", spec.device.location()),
        batch: spec.batch,
        input_frames: spec.frames,
        labels_per_utterance: n_labels,
        parameters,
        updates: n,
        ms_per_update: ms,
        updates_per_s: 1e3 / ms,
        audio_s_per_s: audio * 1e3 / ms,
        first_loss: first,
        last_loss: last,
    })
}
