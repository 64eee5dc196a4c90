//! The code path a GPU takes, run on the CPU: with the fused CPU kernels off, every op of the
//! `tiny` and `base` models (front-end, teacher, student encoder, heads, losses, backward, AdamW,
//! EMA) runs as composed candle ops, and every matmul among them is checked against cuBLAS's
//! layout rules (`model::cublas_layout_ok`), which candle's CUDA matmul enforces and its CPU one
//! does not (issue 13). Its own test binary: the switch is process-wide.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use stages::items::{Batch, DataPosition, Masked, Taught};
use stages::model::{cublas_layout_ok, fused, ModelConfig};
use stages::train::student::{Student, StudentParams};

fn config(preset: &str, dtype: &str) -> ModelConfig {
    let v: serde_yaml::Value =
        serde_yaml::from_str(&format!("{{preset: {preset}, dtype: {dtype}}}")).unwrap();
    ModelConfig::from_spec(Some(&v)).unwrap()
}

/// Two updates of `cfg` on random input of `samples` input frames per row (2 rows): teacher,
/// random mask, student update. Returns the losses.
fn two_updates(cfg: &ModelConfig, samples: usize) -> Vec<f64> {
    let p = StudentParams {
        warmup_steps: Some(0),
        ..StudentParams::default()
    };
    let mut s = Student::new(p, cfg.clone(), Device::Cpu, 3, DType::F32).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (rows, f) = (2, cfg.input_dim());
    let mut losses = Vec::new();
    for step in 0..2 {
        let batch = Batch {
            step,
            position: DataPosition::default(),
            epoch: 0,
            utt_ids: vec!["a".into(), "b".into()],
            offsets: vec![0; rows],
            lengths: vec![samples; rows],
            longest: samples,
            frames: samples,
            dim: f,
            frame_rate: if f == 1 { 16000.0 } else { 50.0 },
            data: (0..rows * samples * f)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
            padding_mask: None,
            transcripts: Vec::new(),
            whole: Vec::new(),
        };
        let tw = s.teacher_weights().unwrap();
        let (targets, d, pred, t) =
            stages::train::teacher::teach(cfg, &tw.weights, &batch, &Device::Cpu).unwrap();
        let hidden = t / 2;
        let mut mask = vec![false; rows * t];
        for r in 0..rows {
            for k in 0..hidden {
                mask[r * t + (2 * k + r) % t] = true;
            }
        }
        let m = Masked {
            taught: Taught {
                batch,
                targets,
                target_dim: d,
                frames: t,
                pred_loss: pred,
                teacher_version: tw.version,
            },
            hard: vec![false; rows * t],
            mask,
            masked_per_row: hidden,
            hard_ratio: 0.0,
            spans: vec![1; rows],
            hard_spans: vec![0; rows],
            strategy: "test".into(),
            clones: 1,
        };
        let out = s.train_step(&m).unwrap();
        assert!(out.skipped.is_none() && out.record.loss.is_finite());
        losses.push(out.record.loss);
    }
    losses
}

#[test]
fn every_op_of_tiny_and_base_runs_on_the_gpu_code_path() {
    // The fused path first, for the comparison below.
    let tiny = config("tiny", "f32");
    let fused_losses = two_updates(&tiny, 60);
    fused::set_composed_only(true);
    for dtype in ["f32", "bf16", "f16"] {
        let l = two_updates(&config("tiny", dtype), 60);
        if dtype == "f32" {
            // Same model, same draws (the composed dropout uses the fused one's mask bits):
            // only the order of float operations differs.
            for (a, b) in l.iter().zip(&fused_losses) {
                assert!((a - b).abs() < 1e-4 * b.abs(), "composed {a} vs fused {b}");
            }
        }
    }
    // base: the CNN front-end over 0.5 s of waveform (24 model frames), 12 × 768 blocks.
    let l = two_updates(&config("base", "f32"), 8000);
    assert!(l.iter().all(|x| x.is_finite()));
    fused::set_composed_only(false);
}

/// The layout rule itself: what candle's CUDA matmul takes and what it refuses.
#[test]
fn cublas_layout_rule() {
    let d = Device::Cpu;
    let a = Tensor::zeros((4, 5, 6), DType::F32, &d).unwrap();
    let b = Tensor::zeros((4, 6, 3), DType::F32, &d).unwrap();
    // Contiguous, and transposed minor dimensions: taken.
    assert!(cublas_layout_ok(&a, &b).is_ok());
    let bt = Tensor::zeros((4, 3, 6), DType::F32, &d)
        .unwrap()
        .t()
        .unwrap();
    assert!(cublas_layout_ok(&a, &bt).is_ok());
    // A column picked out of a wider tensor (row stride ≠ columns): refused.
    let wide = Tensor::zeros((4, 6, 8), DType::F32, &d).unwrap();
    let narrow = wide.narrow(2, 0, 3).unwrap();
    assert!(cublas_layout_ok(&a, &narrow).is_err());
    // Three batch dimensions: refused.
    let a5 = Tensor::zeros((2, 2, 2, 5, 6), DType::F32, &d).unwrap();
    let b5 = Tensor::zeros((2, 2, 2, 6, 3), DType::F32, &d).unwrap();
    assert!(cublas_layout_ok(&a5, &b5).is_err());
    // Batch dimensions swapped (no single stride between batches): refused.
    let a4 = Tensor::zeros((3, 2, 5, 6), DType::F32, &d)
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    let b4 = Tensor::zeros((2, 3, 6, 4), DType::F32, &d).unwrap();
    assert!(cublas_layout_ok(&a4, &b4).is_err());
    // And the model's matmul says so with the shapes.
    let e = stages::model::matmul(&a, &narrow).unwrap_err().to_string();
    assert!(e.contains("cuBLAS would refuse"), "{e}");
}
