//! `ehmam bench-update`: how fast one EH-MAM update of a model block runs on a device, before a
//! run is committed to it. One update after another, in series as the paper's algorithm runs
//! them: the teacher on the student's published weights (`teacher::teach`, front-end included),
//! the easy-to-hard mask (P = 0.5, spans of 5, the hard share ramping 0 → 1 over the updates),
//! and `Student::train_step` (forward, backward, gradient norm, AdamW, EMA, the step's metrics),
//! on random input of the front-end's kind (standard normal fbank-like features or a normalised
//! waveform). Medians over the timed updates, the warm-up excluded; the model FLOPs of an update
//! counted from the model block (matmuls and convolutions: 2 FLOPs a multiply-add; the student's
//! backward twice its forward), and the device memory in use at the phase boundaries (GPU).

use crate::items::{Batch, DataPosition, Masked, Taught};
use crate::model::{FrontendKind, HeadConfig, ModelConfig};
use crate::train::masking::{eh_mask, Rounding};
use crate::train::student::{Student, StudentParams};
use candle_core::{DType, Device};
use std::time::Instant;

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub cfg: ModelConfig,
    pub device: Device,
    /// Utterances per batch.
    pub batch: usize,
    /// Input frames per utterance (fbank frames at 50 Hz; samples for the CNN).
    pub frames: usize,
    /// Input frames per second (50 for fbank, 16000 for waveforms).
    pub frame_rate: f64,
    pub warmup: u64,
    pub updates: u64,
    pub seed: u64,
    /// Multi-mask (`clone_batch`): the student sees each utterance this many times, with
    /// independent masks, after one teacher pass (1: off).
    pub clones: usize,
}

/// What it measured (milliseconds are medians over the timed updates).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub preset: String,
    pub dtype: String,
    pub device: String,
    pub batch: usize,
    pub clones: usize,
    pub input_frames: usize,
    pub model_frames: usize,
    pub masked_frac: f64,
    pub parameters: usize,
    pub updates: usize,
    pub ms_per_update: f64,
    /// Teacher forward, mask, student forward, backward, optimiser (+ EMA), metrics.
    pub phases_ms: [f64; 6],
    /// The teacher with the mask, and the student's update (medians of each, not of the phases).
    pub teacher_mask_ms: f64,
    pub student_ms: f64,
    pub updates_per_s: f64,
    pub audio_s_per_update: f64,
    pub audio_s_per_s: f64,
    /// Model FLOPs of one update (teacher forward + 3 × student forward).
    pub flops_per_update: f64,
    pub tflops_per_s: f64,
    /// Device memory in use (total − free) at its highest phase boundary, bytes (GPU only).
    pub peak_mem_bytes: Option<u64>,
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Device memory in use now (`total − free` from the driver), for GPUs.
fn mem_in_use(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let _ = device.synchronize();
        return candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as u64);
    }
    let _ = device;
    None
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs the benchmark; `progress(i)` after each update.
pub fn run(spec: &BenchSpec, mut progress: impl FnMut(u64)) -> crate::Result<BenchResult> {
    use rand::{Rng, SeedableRng};
    let cfg = &spec.cfg;
    let total = spec.warmup + spec.updates;
    let p = StudentParams {
        max_steps: total.max(1),
        checkpoint_every: 0,
        ..StudentParams::default()
    };
    let mut s = Student::new(p, cfg.clone(), spec.device.clone(), spec.seed, DType::F32)?;
    let parameters: usize = s.vars.values().map(|v| v.elem_count()).sum();
    let dim = cfg.input_dim();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed ^ 0xbe9c);
    let pool: Vec<Vec<f32>> = (0..total.clamp(1, 4))
        .map(|_| {
            (0..spec.batch * spec.frames * dim)
                .map(|_| {
                    let u1: f64 = rng.random::<f64>().max(1e-300);
                    let u2: f64 = rng.random::<f64>();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect()
        })
        .collect();
    let mask_spec = crate::train::mask::MaskParams::default().spec(Rounding::PerBatch);
    let (mut all, mut teach, mut learn) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: [Vec<f64>; 6] = Default::default();
    let (mut frac, mut first_loss, mut last_loss, mut t_model) = (0.0, f64::NAN, f64::NAN, 0);
    let mut peak: Option<u64> = None;
    let note_mem = |peak: &mut Option<u64>| {
        if let Some(m) = mem_in_use(&spec.device) {
            *peak = Some(peak.map_or(m, |p| p.max(m)));
        }
    };
    for i in 0..total {
        let batch = Batch {
            step: i,
            position: DataPosition {
                step: i,
                ..DataPosition::default()
            },
            epoch: 0,
            utt_ids: (0..spec.batch).map(|u| format!("random-{u}")).collect(),
            offsets: vec![0; spec.batch],
            lengths: vec![spec.frames; spec.batch],
            longest: spec.frames,
            frames: spec.frames,
            dim,
            frame_rate: spec.frame_rate,
            data: pool[i as usize % pool.len()].clone(),
            padding_mask: None,
            transcripts: Vec::new(),
            whole: Vec::new(),
        };
        let t0 = Instant::now();
        let tw = s.teacher_weights()?;
        let (targets, target_dim, pred_loss, t) =
            crate::train::teacher::teach(cfg, &tw.weights, &batch, &spec.device)
                .map_err(|e| e.to_string())?;
        let t_teach = Instant::now();
        note_mem(&mut peak);
        let r = i as f64 / total as f64;
        let c = spec.clones.max(1);
        let mut taught = Taught {
            batch,
            targets,
            target_dim,
            frames: t,
            pred_loss,
            teacher_version: tw.version,
        };
        if c > 1 {
            taught = crate::train::mask::clone_rows(taught, c).map_err(|e| e.to_string())?;
        }
        let rows = spec.batch * c;
        let out = eh_mask(
            &taught.pred_loss,
            rows,
            t,
            &vec![t; rows],
            &mask_spec,
            r,
            &mut rng,
        )
        .map_err(|e| e.to_string())?;
        let mm = out.masked_per_row;
        let masked = Masked {
            taught,
            mask: out.mask,
            hard: out.hard,
            masked_per_row: mm,
            hard_ratio: r as f32,
            spans: out.spans,
            hard_spans: out.hard_spans,
            strategy: "mask.easy_to_hard".into(),
            clones: c,
        };
        let t1 = Instant::now();
        let o = s.train_step(&masked)?;
        let t2 = Instant::now();
        note_mem(&mut peak);
        if i == 0 {
            first_loss = o.record.loss;
        }
        last_loss = o.record.loss;
        t_model = t;
        if i >= spec.warmup {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            all.push(ms(t2 - t0));
            teach.push(ms(t1 - t0));
            learn.push(ms(t2 - t1));
            frac += mm as f64 / t as f64;
            let tm = &o.timing;
            for (v, x) in phases.iter_mut().zip([
                ms(t_teach - t0),
                ms(t1 - t_teach),
                tm.forward_ms,
                tm.backward_ms,
                tm.optimizer_ms,
                tm.metrics_ms,
            ]) {
                v.push(x);
            }
        }
        progress(i + 1);
    }
    let n = all.len();
    let ms = median(&mut all);
    let masked_frac = frac / n.max(1) as f64;
    let mm = (masked_frac * t_model as f64).round() as usize;
    let flops = update_flops(
        cfg,
        spec.batch,
        spec.clones.max(1),
        spec.frames,
        t_model,
        mm,
    );
    let audio = (spec.batch * spec.frames) as f64 / spec.frame_rate;
    Ok(BenchResult {
        preset: cfg.preset.clone(),
        dtype: format!("{:?}", cfg.dtype).to_lowercase(),
        device: format!("{:?}", spec.device.location()),
        batch: spec.batch,
        clones: spec.clones.max(1),
        input_frames: spec.frames,
        model_frames: t_model,
        masked_frac,
        parameters,
        updates: n,
        ms_per_update: ms,
        phases_ms: std::array::from_fn(|k| median(&mut phases[k])),
        teacher_mask_ms: median(&mut teach),
        student_ms: median(&mut learn),
        updates_per_s: 1e3 / ms,
        audio_s_per_update: audio,
        audio_s_per_s: audio * 1e3 / ms,
        flops_per_update: flops,
        tflops_per_s: flops / (ms * 1e-3) / 1e12,
        peak_mem_bytes: peak,
        first_loss,
        last_loss,
    })
}

/// Model FLOPs of one update of `b` utterances of `n` input frames (`t` model frames, `m` of them
/// masked per row), each seen `c` times by the student: the teacher's forward (front-end,
/// positional conv and blocks over `t`, the loss predictor) on `b` rows plus three times the
/// student's forward (front-end and positional conv over `t`, blocks over the `t − m` visible
/// frames, decoder and predictor over `t`) on `b·c` rows: the backward pass costs twice the
/// forward. Matmuls and convolutions only (2 FLOPs a multiply-add), as MFU is usually counted.
pub fn update_flops(cfg: &ModelConfig, b: usize, c: usize, n: usize, t: usize, m: usize) -> f64 {
    let rows = |k: usize| (b * k) as f64;
    let (t, tv) = (t as f64, t.saturating_sub(m) as f64);
    let e = &cfg.encoder;
    let d = e.dim as f64;
    let frontend = |b: f64| match cfg.frontend.kind {
        FrontendKind::Fbank => 2.0 * b * t * cfg.frontend.input_dim as f64 * d,
        FrontendKind::Cnn => {
            let (mut len, mut c_in, mut f) = (n as f64, 1.0, 0.0);
            for l in &cfg.frontend.conv_layers {
                let (c, k, s) = (l[0] as f64, l[1] as f64, l[2] as f64);
                len = ((len - k) / s).floor() + 1.0;
                f += 2.0 * b * len * c * c_in * k;
                c_in = c;
            }
            f + 2.0 * b * t * c_in * d
        }
    };
    let pos = |b: f64| {
        e.pos_conv_depth as f64
            * 2.0
            * b
            * t
            * d
            * (d / e.pos_conv_groups as f64)
            * e.pos_conv_kernel as f64
    };
    let blocks = |b: f64, tt: f64| {
        let f = e.ffn as f64;
        e.layers as f64
            * 2.0
            * b
            * (tt * d * 3.0 * d + 2.0 * tt * tt * d + tt * d * d + 2.0 * tt * d * f)
    };
    let head = |b: f64, h: &HeadConfig| {
        let hd = h.dim as f64;
        let k = h.kernel as f64;
        let g = h.groups as f64;
        let mut f = 0.0;
        let mut c_in = d;
        for _ in 0..h.layers {
            f += 2.0 * b * t * c_in * (hd / g) * k;
            c_in = hd;
        }
        f + 2.0 * b * t * hd * d
    };
    let (bt, bs) = (rows(1), rows(c));
    let teacher = frontend(bt) + pos(bt) + blocks(bt, t) + head(bt, &cfg.loss_predictor);
    let student = frontend(bs)
        + pos(bs)
        + blocks(bs, tv)
        + head(bs, &cfg.decoder)
        + head(bs, &cfg.loss_predictor);
    teacher + 3.0 * student
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand count for a small model (fbank 4 → D 8, 2 heads, FFN 16, one block, positional conv
    /// depth 1 / kernel 3 / groups 2, heads of one conv layer 8 → 4, kernel 3, groups 2), one row
    /// of 10 frames with 4 masked:
    /// front-end 2·10·4·8 = 640; positional conv 2·10·8·(8/2)·3 = 1920;
    /// block over 10 frames 2·(10·8·24 + 2·10²·8 + 10·8·8 + 2·10·8·16) = 13440, over the 6 visible
    /// 2·(6·8·24 + 2·6²·8 + 6·8·8 + 2·6·8·16) = 7296; a head 2·10·8·(4/2)·3 + 2·10·4·8 = 1600.
    /// Teacher 640 + 1920 + 13440 + 1600 = 17600; student 640 + 1920 + 7296 + 1600 + 1600 = 13056;
    /// update 17600 + 3·13056 = 56768. With 2 masks per utterance the student's part doubles.
    #[test]
    fn update_flops_by_hand() {
        let v: serde_yaml::Value = serde_yaml::from_str(
            "{frontend: {input_dim: 4}, encoder: {dim: 8, heads: 2, ffn: 16, layers: 1, top_k: 1, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}, decoder: {dim: 4, layers: 1, kernel: 3, groups: 2}, loss_predictor: {dim: 4, layers: 1, kernel: 3, groups: 2}}",
        )
        .unwrap();
        let cfg = ModelConfig::from_spec(Some(&v)).unwrap();
        assert_eq!(update_flops(&cfg, 1, 1, 10, 10, 4), 56768.0);
        assert_eq!(update_flops(&cfg, 1, 2, 10, 10, 4), 17600.0 + 6.0 * 13056.0);
        // The CNN front-end: one layer of 3 channels, kernel 4, stride 2 over 10 samples gives
        // 4 frames: 2·4·3·1·4 = 96, and its projection 3 → 8 over them 2·4·3·8 = 192.
        let mut cnn = cfg.clone();
        cnn.frontend.kind = FrontendKind::Cnn;
        cnn.frontend.input_dim = 1;
        cnn.frontend.conv_layers = vec![[3, 4, 2]];
        let d = update_flops(&cnn, 1, 1, 10, 4, 1) - update_flops(&cfg, 1, 1, 10, 4, 1);
        // fbank front-end over 4 frames: 2·4·4·8 = 256; 4 times (teacher + 3 × student).
        assert_eq!(d, 4.0 * (96.0 + 192.0 - 256.0));
    }
}
