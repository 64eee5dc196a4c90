//! Model, losses, optimiser and schedules against hand-worked values and finite differences.

use candle_core::{DType, Device, Tensor};
use stages::items::{Batch, DataPosition};
use stages::items::{Masked, Taught};
use stages::model::losses::{self, AuxNorm, RankForm};
use stages::model::optim::{lr_at, tau_at, AdamW};
use stages::model::{self, Model, ModelConfig, Noise};
use stages::train::student::{Student, StudentParams};
use std::collections::BTreeMap;

/// Method §2.9: the base model with the CNN front-end has 94,403,852 parameters.
#[test]
fn base_parameter_count_matches_the_method() {
    let cfg = ModelConfig::base();
    assert_eq!(model::parameter_count(&cfg), 94_403_852);
    // And its parts, as §2.9 lists them.
    let shapes = model::shapes_of(&cfg);
    let sum = |prefix: &str| {
        shapes
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    };
    assert_eq!(sum("frontend.conv."), 4_206_592);
    assert_eq!(sum("frontend.ln.") + sum("frontend.proj."), 395_008);
    assert_eq!(sum("encoder.pos_conv."), 3_505_920);
    assert_eq!(sum("encoder.blocks.0."), 7_087_872);
    assert_eq!(sum("decoder."), 619_776);
    assert_eq!(sum("loss_predictor."), 620_544);
    // 20 s of audio gives 999 frames, 1 s gives 49 (§2.1).
    assert_eq!(cfg.frames_for(320_000), 999);
    assert_eq!(cfg.frames_for(16_000), 49);
    assert_eq!(cfg.stride(), 320);
}

#[test]
fn alibi_slopes_follow_the_usual_rule() {
    let s12 = model::alibi_slopes(12);
    let want12: Vec<f64> = [
        -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -0.5, -1.5, -2.5, -3.5,
    ]
    .iter()
    .map(|e| 2f64.powf(*e))
    .collect();
    for (a, b) in s12.iter().zip(&want12) {
        assert!((a - b).abs() < 1e-12, "{s12:?}");
    }
    assert_eq!(
        model::alibi_slopes(4),
        vec![0.25, 1.0 / 16.0, 1.0 / 64.0, 1.0 / 256.0]
    );
}

#[test]
fn model_block_parses_presets_and_reports_bad_fields() {
    let v: serde_yaml::Value =
        serde_yaml::from_str("{preset: tiny, encoder: {dim: 64, heads: 4}}").unwrap();
    let cfg = ModelConfig::from_spec(Some(&v)).unwrap();
    assert_eq!(cfg.encoder.dim, 64);
    assert_eq!(
        cfg.encoder.layers, 4,
        "unspecified fields keep the preset's values"
    );
    let v: serde_yaml::Value =
        serde_yaml::from_str("{encoder: {dim: 130, heads: 4, top_k: 9}, decoder: {kernel: 4}}")
            .unwrap();
    let errs = ModelConfig::from_spec(Some(&v)).unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert!(paths.contains(&"model.encoder.heads"), "{errs:?}");
    assert!(paths.contains(&"model.encoder.top_k"), "{errs:?}");
    assert!(paths.contains(&"model.decoder.kernel"), "{errs:?}");
    let v: serde_yaml::Value = serde_yaml::from_str("{encoder: {dimm: 3}}").unwrap();
    let errs = ModelConfig::from_spec(Some(&v)).unwrap_err();
    assert!(errs[0].0.starts_with("model.encoder"), "{errs:?}");
    assert!(errs[0].1.contains("dimm"), "{errs:?}");
}

/// §1.7 by hand: ℓ = Σ_c (ŷ − y)² / √D.
#[test]
fn reconstruction_loss_by_hand() {
    let yhat = Tensor::new(&[[[1.0f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[[0.0f32, 2.0, 5.0, 4.5]]], &Device::Cpu).unwrap();
    let l = losses::recon_per_frame(&yhat, &y)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // (1 + 0 + 4 + 0.25) / 2 = 2.625
    assert!((l[0] - 2.625).abs() < 1e-6, "{l:?}");
}

/// §1.8 by hand: p = (0, 1, 0.5), ℓ = (1, 3, 2). Every unordered pair is counted twice, each
/// time as −ln σ(p_high − p_low): gaps 1 (frames 1 over 0), 0.5 (2 over 0), 0.5 (1 over 2).
/// −ln σ(1) = ln(1 + e⁻¹) = 0.313261687518; −ln σ(0.5) = ln(1 + e^−0.5) = 0.474076984180.
#[test]
fn ranking_loss_by_hand() {
    let p = Tensor::new(&[[0.0f64, 1.0, 0.5]], &Device::Cpu).unwrap();
    let l = [1.0f32, 3.0, 2.0];
    let want = 2.0 * (0.313261687518 + 2.0 * 0.474076984180);
    for form in [RankForm::Eps, RankForm::Softplus] {
        let (s, pairs) = losses::ranking_loss(&p, &l, form).unwrap();
        let s = s.to_scalar::<f64>().unwrap();
        assert_eq!(pairs, 6);
        // The ε form differs by about ε/σ per term.
        assert!((s - want).abs() < 2e-5, "{form:?}: {s} vs {want}");
    }
    // Ties and the diagonal add nothing; a second row is summed, not averaged.
    let p = Tensor::new(&[[0.0f64, 1.0], [0.3, 0.3]], &Device::Cpu).unwrap();
    let (s, pairs) = losses::ranking_loss(&p, &[2.0, 2.0, 1.0, 5.0], RankForm::Softplus).unwrap();
    assert_eq!(pairs, 2);
    // Row 2: gap 0 → 2·ln 2.
    assert!((s.to_scalar::<f64>().unwrap() - 2.0 * std::f64::consts::LN_2).abs() < 1e-12);
    // Rank agreement: row 1 ordered right, row 2 wrong.
    let a = losses::rank_agreement(&[0.0, 1.0, 1.0, 0.0], &[1.0, 2.0, 1.0, 2.0], 2);
    assert!((a - 0.5).abs() < 1e-12);
}

#[test]
fn schedules_by_hand() {
    // Warm-up 10 of 110: linear from 0; then cosine to 0.
    assert_eq!(lr_at(0, 1.0, 10, 110), 0.0);
    assert!((lr_at(5, 1.0, 10, 110) - 0.5).abs() < 1e-12);
    assert!((lr_at(10, 1.0, 10, 110) - 1.0).abs() < 1e-12);
    assert!((lr_at(60, 1.0, 10, 110) - 0.5).abs() < 1e-12);
    assert!(lr_at(110, 1.0, 10, 110).abs() < 1e-12);
    // τ: linear from τ0 to τe over τn updates (§3).
    assert!((tau_at(0, 0.999, 0.99999, 75_000) - 0.999).abs() < 1e-12);
    assert!((tau_at(37_500, 0.999, 0.99999, 75_000) - 0.999495).abs() < 1e-12);
    assert_eq!(tau_at(80_000, 0.999, 0.99999, 75_000), 0.99999);
}

fn tiny_cfg() -> ModelConfig {
    let v: serde_yaml::Value = serde_yaml::from_str(
        "{frontend: {input_dim: 6}, encoder: {dim: 8, heads: 2, ffn: 12, layers: 2, top_k: 2, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}, decoder: {dim: 4, layers: 2, kernel: 3, groups: 2}, loss_predictor: {dim: 4, layers: 2, kernel: 3, groups: 2}}",
    )
    .unwrap();
    ModelConfig::from_spec(Some(&v)).unwrap()
}

fn synthetic(cfg: &ModelConfig, rows: usize, t: usize, masked: usize, seed: u64) -> Masked {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let f = cfg.input_dim();
    let d = cfg.encoder.dim;
    let data: Vec<f32> = (0..rows * t * f)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let targets: Vec<f32> = (0..rows * t * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut mask = vec![false; rows * t];
    for r in 0..rows {
        // A different set per row, same count.
        for k in 0..masked {
            mask[r * t + (k * 7 + r) % t] = true; // 7 is prime to every t used here
        }
    }
    assert!((0..rows).all(|r| mask[r * t..(r + 1) * t].iter().filter(|m| **m).count() == masked));
    let batch = Batch {
        step: 0,
        position: DataPosition::default(),
        epoch: 0,
        utt_ids: (0..rows).map(|r| format!("u{r}")).collect(),
        offsets: vec![0; rows],
        lengths: vec![t; rows],
        longest: t,
        frames: t,
        dim: f,
        frame_rate: 50.0,
        data,
        padding_mask: None,
        transcripts: Vec::new(),
        whole: Vec::new(),
    };
    let taught = Taught {
        batch,
        targets: Tensor::from_vec(targets, (rows, t, d), &Device::Cpu).unwrap(),
        target_dim: d,
        frames: t,
        pred_loss: vec![0.0; rows * t],
        teacher_version: 0,
    };
    Masked {
        taught,
        hard: vec![false; rows * t],
        mask,
        masked_per_row: masked,
        hard_ratio: 0.0,
        spans: vec![1; rows],
        hard_spans: vec![0; rows],
        strategy: "test".into(),
        clones: 1,
    }
}

/// Gradients of the joint loss (§1.9, with the ranking loss of §1.8) against central finite
/// differences, in f64, for entries of every kind of parameter. Dropout, layerdrop and noise
/// tokens are drawn from a seeded stream, so both evaluations see the same draws.
#[test]
fn joint_loss_gradients_match_finite_differences() {
    let cfg = tiny_cfg();
    // The two normalisations of §1.9, and the smooth-L1 regression loss of §8.
    for (aux_norm, loss_beta) in [
        (AuxNorm::Joint, 0.0),
        (AuxNorm::Pairs, 0.0),
        (AuxNorm::Joint, 0.25),
    ] {
        let p = StudentParams {
            alpha: 0.5,
            aux_norm,
            loss_beta,
            ..StudentParams::default()
        };
        let student = Student::new(p, cfg.clone(), Device::Cpu, 3, DType::F64).unwrap();
        let m = synthetic(&cfg, 2, 12, 5, 11);
        let eval = |s: &Student| -> (f64, candle_core::backprop::GradStore) {
            let parts = s.loss(&m, &mut Noise::new(99)).unwrap();
            let g = parts.loss.backward().unwrap();
            (parts.loss.to_scalar::<f64>().unwrap(), g)
        };
        let (_, grads) = eval(&student);
        let names = [
            "frontend.ln.weight",
            "frontend.proj.weight",
            "encoder.pos_conv.0.weight",
            "encoder.ln_in.bias",
            "encoder.alibi_scale",
            "encoder.blocks.0.attn.qkv.weight",
            "encoder.blocks.1.fc1.bias",
            "encoder.blocks.1.ln2.weight",
            "decoder.blocks.0.conv.weight",
            "decoder.proj.bias",
            "loss_predictor.blocks.1.conv.weight",
            "loss_predictor.ln.weight",
            "loss_predictor.proj.weight",
        ];
        let mut checked = 0;
        for name in names {
            let var = &student.vars[name];
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for &i in &[0usize, base.len() / 2, base.len() - 1] {
                let h = 1e-6;
                let set = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                };
                set(h);
                let (lp, _) = eval(&student);
                set(-h);
                let (lm, _) = eval(&student);
                set(0.0);
                let fd = (lp - lm) / (2.0 * h);
                let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-4));
                assert!(
                    err < 1e-4,
                    "{aux_norm:?} {name}[{i}]: analytic {} vs finite difference {fd}",
                    g[i]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, names.len() * 3);
    }
}

/// The teacher's targets are averages of instance-normalised layers: zero mean over time for
/// every utterance and channel (§1.3); the predicted loss is one value per frame.
#[test]
fn teacher_targets_are_instance_normalised() {
    let cfg = tiny_cfg();
    let w = model::init_weights(&cfg, 5, &Device::Cpu, DType::F32).unwrap();
    let m = synthetic(&cfg, 3, 16, 4, 2);
    let b = &m.taught.batch;
    let x = Tensor::from_slice(&b.data, (3, 16, 6), &Device::Cpu).unwrap();
    let model = Model::new(&cfg, &w);
    let z = model.frontend(&x).unwrap();
    let out = model.teacher(&z).unwrap();
    assert_eq!(out.targets.dims(), &[3, 16, 8]);
    assert_eq!(out.pred_loss.dims(), &[3, 16]);
    let mean = out
        .targets
        .mean(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(mean.iter().all(|v| v.abs() < 1e-5), "{mean:?}");
    // With top_k = 1 the targets are unit-variance per channel, up to the eps of 1e-5: at
    // initialisation (N(0, 0.02) weights, width 8) the FFN output's variance is about 1e-6, so
    // scale the last block's FC2 up until eps is negligible.
    let mut one = cfg.clone();
    one.encoder.top_k = 1;
    let mut w = w.clone();
    let fc2 = w["encoder.blocks.1.fc2.weight"].clone();
    w.insert(
        "encoder.blocks.1.fc2.weight".into(),
        (fc2 * 1000.0).unwrap(),
    );
    let out = Model::new(&one, &w).teacher(&z).unwrap();
    let var = out
        .targets
        .sqr()
        .unwrap()
        .mean(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
}

/// The student encoder sees only visible frames; noise tokens fill the hidden ones.
#[test]
fn student_encoder_drops_masked_frames() {
    let cfg = tiny_cfg();
    let w = model::init_weights(&cfg, 5, &Device::Cpu, DType::F32).unwrap();
    let m = synthetic(&cfg, 2, 10, 3, 4);
    let x = Tensor::from_slice(&m.taught.batch.data, (2, 10, 6), &Device::Cpu).unwrap();
    let model = Model::new(&cfg, &w);
    let z = model.frontend(&x).unwrap();
    let (h, pos) = model.student_encoder(&z, &m.mask, &mut None).unwrap();
    assert_eq!(h.dims(), &[2, 7, 8]);
    for (r, p) in pos.iter().enumerate() {
        assert!(p.iter().all(|&i| !m.mask[r * 10 + i]));
        assert!(p.windows(2).all(|w| w[0] < w[1]));
    }
    // Changing a masked frame's input changes nothing the encoder outputs: it is dropped, and
    // the positional conv sees zeros there.
    let mut data2 = m.taught.batch.data.clone();
    let hidden = (0..10).find(|&i| m.mask[i]).unwrap();
    for v in &mut data2[hidden * 6..hidden * 6 + 6] {
        *v += 5.0;
    }
    let z2 = model
        .frontend(&Tensor::from_slice(&data2, (2, 10, 6), &Device::Cpu).unwrap())
        .unwrap();
    let (h2, _) = model.student_encoder(&z2, &m.mask, &mut None).unwrap();
    let diff = (h - h2)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
}

/// One update moves the student, the EMA moves the teacher by (1 − τ) of the gap, and a
/// checkpoint round trip restores everything.
#[test]
fn update_ema_and_checkpoint_round_trip() {
    let cfg = tiny_cfg();
    let p = StudentParams {
        max_steps: 10,
        tau0: 0.9,
        tau_end: 0.9,
        tau_steps: Some(1),
        lr: 1e-2,
        warmup_steps: Some(0),
        ..StudentParams::default()
    };
    let mut s = Student::new(p.clone(), cfg.clone(), Device::Cpu, 1, DType::F32).unwrap();
    let before = s.vars["encoder.blocks.0.fc1.weight"]
        .as_tensor()
        .copy()
        .unwrap();
    let m = synthetic(&cfg, 2, 12, 5, 1);
    let out = s.train_step(&m).unwrap();
    assert!(out.record.loss.is_finite());
    assert_eq!(s.step, 1);
    let after = s.vars["encoder.blocks.0.fc1.weight"]
        .as_tensor()
        .copy()
        .unwrap();
    let teacher = &s.teacher["encoder.blocks.0.fc1.weight"];
    // θ_T = 0.9·θ_before + 0.1·θ_after
    let want = ((&before * 0.9).unwrap() + (&after * 0.1).unwrap()).unwrap();
    let d = (teacher - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6, "{d}");
    let moved = (&after - &before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 0.0);
    // The decoder is not in the teacher (§3).
    assert!(!s.teacher.contains_key("decoder.proj.weight"));
    assert!(s.teacher.contains_key("loss_predictor.proj.weight"));
    // Round trip.
    let dir = tempfile::tempdir().unwrap();
    stages::train::save_checkpoint(dir.path(), &s.checkpoint_meta(), &s.checkpoint_tensors(), 2)
        .unwrap();
    let (meta, path) = stages::train::latest_checkpoint(dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(meta.step, 1);
    let mut r = Student::new(p, cfg, Device::Cpu, 1, DType::F32).unwrap();
    r.restore(
        &meta,
        &stages::train::load_tensors(&path, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let a = s.train_step(&m).unwrap().record;
    let b = r.train_step(&m).unwrap().record;
    assert_eq!(a.loss, b.loss);
    for (k, v) in &s.vars {
        let d = (v.as_tensor() - r.vars[k].as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
}

/// `conv1d_time` (channels last, im2col) gives candle's conv1d forward values for grouped,
/// padded and strided kernels, and its gradients match finite differences (candle's own
/// grouped conv1d backward does not, which is why the model does not use it).
#[test]
fn conv_over_time_matches_candle_forward_and_finite_differences() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for &(c, o, k, pad, stride, groups, l) in &[
        (4usize, 6usize, 3usize, 1usize, 1usize, 2usize, 9usize),
        (8, 8, 5, 2, 1, 4, 7),
        (1, 3, 4, 0, 2, 1, 11),
        (6, 4, 2, 0, 2, 1, 8),
        (4, 4, 7, 3, 1, 4, 5),
    ] {
        let x: Vec<f64> = (0..2 * l * c)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let w: Vec<f64> = (0..o * (c / groups) * k)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let xt = Tensor::from_vec(x.clone(), (2, l, c), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (o, c / groups, k), &Device::Cpu).unwrap();
        let ours = model::conv1d_time(&xt, &wt, pad, stride, groups).unwrap();
        let theirs = xt
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .conv1d(&wt, pad, stride, 1, groups)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let d = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "forward differs by {d}");
        // d/dw of Σ y² by central differences.
        let wv = candle_core::Var::from_tensor(&wt).unwrap();
        let loss = |w: &Tensor| {
            model::conv1d_time(&xt, w, pad, stride, groups)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let g = loss(wv.as_tensor())
            .backward()
            .unwrap()
            .get(wv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in [0, w.len() / 3, w.len() - 1] {
            let at = |delta: f64| {
                let mut v = w.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, (o, c / groups, k), &Device::Cpu).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!(
                (fd - g[i]).abs() < 1e-6 * fd.abs().max(1.0),
                "w[{i}]: analytic {} vs {fd}",
                g[i]
            );
        }
    }
}

/// The CNN front-end (method §2.1) differentiates correctly too (tiny widths, strides 2).
#[test]
fn cnn_frontend_gradients_match_finite_differences() {
    let v: serde_yaml::Value = serde_yaml::from_str(
        "{frontend: {kind: cnn, input_dim: 1, conv_layers: [[4, 4, 2], [4, 3, 2]]}, encoder: {dim: 8, heads: 2, ffn: 12, layers: 1, top_k: 1, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}, decoder: {dim: 4, layers: 1, kernel: 3, groups: 2}, loss_predictor: {dim: 4, layers: 1, kernel: 3, groups: 2}}",
    )
    .unwrap();
    let cfg = ModelConfig::from_spec(Some(&v)).unwrap();
    // 50 samples → 24 → 11 frames.
    assert_eq!(cfg.frames_for(50), 11);
    let student = Student::new(
        StudentParams {
            alpha: 0.5,
            ..StudentParams::default()
        },
        cfg.clone(),
        Device::Cpu,
        3,
        DType::F64,
    )
    .unwrap();
    let mut m = synthetic(&cfg, 2, 11, 4, 5);
    {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let b = &mut m.taught.batch;
        b.frames = 50;
        b.lengths = vec![50; 2];
        b.data = (0..100).map(|_| rng.random_range(-1.0..1.0)).collect();
    }
    let eval = |s: &Student| s.loss(&m, &mut Noise::new(7)).unwrap().loss;
    let grads = eval(&student).backward().unwrap();
    for name in [
        "frontend.conv.0.weight",
        "frontend.conv.1.weight",
        "frontend.conv.0.ln.weight",
        "frontend.proj.weight",
    ] {
        let var = &student.vars[name];
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in [0, base.len() / 2, base.len() - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = eval(&student).to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                l
            };
            let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
            let err = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-4);
            assert!(
                err < 1e-4,
                "{name}[{i}]: analytic {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

/// §8 "regression loss": smooth L1 with threshold β, and an explicit scale, by hand.
#[test]
fn smooth_l1_reconstruction_loss_by_hand() {
    let yhat = Tensor::new(&[[[0.0f64, 0.5, 3.0, -2.0]]], &Device::Cpu).unwrap();
    let y = Tensor::zeros((1, 1, 4), DType::F64, &Device::Cpu).unwrap();
    let l = |beta: f64, scale: Option<f64>| {
        losses::recon_per_frame_with(&yhat, &y, beta, scale)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    };
    // β = 1: 0 + 0.5·0.25 + (3 − 0.5) + (2 − 0.5) = 4.125; default scale 1/√4.
    assert!((l(1.0, Some(1.0)) - 4.125).abs() < 1e-12);
    assert!((l(1.0, None) - 4.125 / 2.0).abs() < 1e-12);
    // β = 0 is the MSE: 0 + 0.25 + 9 + 4 = 13.25.
    assert!((l(0.0, Some(1.0)) - 13.25).abs() < 1e-12);
    // A large β keeps every element quadratic: 13.25 / (2β).
    assert!((l(10.0, Some(1.0)) - 13.25 / 20.0).abs() < 1e-12);
}

/// §1.8 written out independently in f64 (ε form) for one row of predictions and losses.
fn ranking_by_hand(p: &[f64], l: &[f32]) -> (f64, usize) {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (mut s, mut pairs) = (0.0, 0);
    for i in 0..p.len() {
        for j in 0..p.len() {
            if l[j] > l[i] {
                s += -(sig(p[j] - p[i]) + 1e-6).ln();
                pairs += 1;
            } else if l[j] < l[i] {
                s += -(1.0 - sig(p[j] - p[i]) + 1e-6).ln();
                pairs += 1;
            }
        }
    }
    (s, pairs)
}

/// §1.9: the joint loss is (Σℓ + α·L_aux_raw)/N by default and L_rec + α·L_aux_raw/pairs with
/// `aux_norm: pairs`, with L_aux_raw the plain sum over rows; checked against the parts the
/// student computed and a ranking loss written out here.
#[test]
fn joint_loss_normalisations_by_hand() {
    let cfg = tiny_cfg();
    let m = synthetic(&cfg, 3, 13, 6, 21);
    for aux_norm in [AuxNorm::Joint, AuxNorm::Pairs] {
        let alpha = 0.3;
        let p = StudentParams {
            alpha,
            aux_norm,
            ..StudentParams::default()
        };
        let student = Student::new(p, cfg.clone(), Device::Cpu, 8, DType::F64).unwrap();
        let parts = student.loss(&m, &mut Noise::new(5)).unwrap();
        let (n, mm) = (3usize, parts.mm);
        let ell: Vec<f32> = parts
            .ell
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ell.len(), n * mm);
        let sum_ell: f64 = ell.iter().map(|&x| x as f64).sum();
        let p_m = parts.pred.as_ref().unwrap().1.to_vec2::<f64>().unwrap();
        let (mut raw, mut pairs) = (0.0, 0);
        for (r, row) in p_m.iter().enumerate() {
            let (s, k) = ranking_by_hand(row, &ell[r * mm..(r + 1) * mm]);
            raw += s;
            pairs += k;
        }
        let want = match aux_norm {
            AuxNorm::Joint => (sum_ell + alpha * raw) / (n * mm) as f64,
            AuxNorm::Pairs => sum_ell / (n * mm) as f64 + alpha * raw / pairs as f64,
        };
        let got = parts.loss.to_scalar::<f64>().unwrap();
        // ℓ passes through f32 on the host side: relative 1e-6.
        assert!(
            (got - want).abs() < 1e-6 * want.abs(),
            "{aux_norm:?}: {got} vs {want}"
        );
        assert!((parts.rec.to_scalar::<f64>().unwrap() - sum_ell / (n * mm) as f64).abs() < 1e-6);
    }
}

/// §1.5.4: the student's ALiBi bias over the visible frames uses their original distances:
/// bias[h, i, j] = −s_h·m_h·|pos_i − pos_j|, with the learned scale clamped at ≥ 0.
#[test]
fn alibi_keeps_original_distances_of_visible_frames() {
    let cfg = tiny_cfg();
    let mut w = model::init_weights(&cfg, 5, &Device::Cpu, DType::F64).unwrap();
    w.insert(
        "encoder.alibi_scale".into(),
        Tensor::new(&[2.0f64, -1.0], &Device::Cpu).unwrap(),
    );
    let model = Model::new(&cfg, &w);
    let positions = vec![vec![0usize, 3, 4, 9], vec![1, 2, 7, 8]];
    let bias = model.alibi(&positions, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(bias.dims(), &[2, 2, 4, 4]);
    let b = bias.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let slopes = model::alibi_slopes(2);
    let scale = [2.0, 0.0]; // the negative scale is clamped to 0
    for (r, pos) in positions.iter().enumerate() {
        for h in 0..2 {
            for i in 0..4 {
                for j in 0..4 {
                    let want = -scale[h] * slopes[h] * (pos[i] as f64 - pos[j] as f64).abs();
                    let got = b[((r * 2 + h) * 4 + i) * 4 + j];
                    assert!(
                        (got - want).abs() < 1e-12,
                        "row {r} head {h} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// §1.3 / §8 "target layer" and §10 #5: targets from the FFN outputs (default) or from the block
/// outputs (`end_of_block_targets`), and the teacher's predictor on the targets (default) or on
/// the last block's output (`teacher_pred_input: last_layer`), each against the encoder's own
/// block outputs.
#[test]
fn target_layer_and_teacher_predictor_input_options() {
    let cfg = tiny_cfg();
    let mut w = model::init_weights(&cfg, 6, &Device::Cpu, DType::F64).unwrap();
    // Scale the FFNs up so FFN and block outputs differ clearly.
    for l in 0..2 {
        let k = format!("encoder.blocks.{l}.fc2.weight");
        let v = (w[&k].clone() * 300.0).unwrap();
        w.insert(k, v);
    }
    let m = synthetic(&cfg, 2, 12, 3, 9);
    let x = Tensor::from_slice(&m.taught.batch.data, (2, 12, 6), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let model = Model::new(&cfg, &w);
    let z = model.frontend(&x).unwrap();
    let outs = model.encode(&z).unwrap();
    // Block-output targets: mean of the instance-normalised outputs of the top-2 (= both) blocks.
    let mut block_cfg = cfg.clone();
    block_cfg.end_of_block_targets = true;
    let want = ((model::instance_norm_time(&outs[0].to_dtype(DType::F32).unwrap()).unwrap()
        + model::instance_norm_time(&outs[1].to_dtype(DType::F32).unwrap()).unwrap())
    .unwrap()
        / 2.0)
        .unwrap();
    let got = Model::new(&block_cfg, &w).teacher(&z).unwrap().targets;
    let diff = (got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "block-output targets differ by {diff}");
    let ffn = model.teacher(&z).unwrap();
    let gap = (ffn.targets.clone() - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gap > 1e-2, "FFN-output targets are another layer ({gap})");
    // The predictor on the last block's output.
    let mut last_cfg = cfg.clone();
    last_cfg.teacher_pred_input = model::TeacherPredInput::LastLayer;
    let got = Model::new(&last_cfg, &w).teacher(&z).unwrap().pred_loss;
    let want = model
        .head("loss_predictor", &outs[1], &cfg.loss_predictor, true)
        .unwrap()
        .mean(candle_core::D::Minus1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
    // Default: on the targets.
    let want = model
        .head(
            "loss_predictor",
            &ffn.targets.to_dtype(DType::F64).unwrap(),
            &cfg.loss_predictor,
            true,
        )
        .unwrap()
        .mean(candle_core::D::Minus1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff = (ffn.pred_loss - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
}

/// fairseq's Adam (method §5), two updates worked by hand: lr 0.1, betas (0.9, 0.98), eps 1e-6,
/// weight decay 0.01, `exempt_1d`. Loss per parameter pair x: 3·x₀ + ½·x₁², so g = (3, x₁).
/// Update 1, w = (1, −2) (2-D, decayed): m = (0.3, −0.2), v = (0.18, 0.08), step size
/// 0.1·√0.02/0.1 = 0.14142; decay gives (0.999, −1.998), m/√v = (0.70711, −0.70711), so
/// w = (0.899, −1.898). b (1-D, exempt): (0.9, −1.9). c (no gradient, never had one): only
/// decay, 2 → 1.998.
/// Update 2, only b in the loss: w gets a zero gradient (fairseq's fp16 trainer zero-fills
/// missing gradients): m = (0.27, −0.18), v = (0.1764, 0.0784), step size 0.1·√0.0396/0.19 =
/// 0.104735, m/√v = ±0.642857: w = 0.999·(0.899, −1.898) ∓ 0.067330 = (0.830771, −1.828773).
/// b: g = (3, −1.9), m = (0.57, −0.37), v = (0.3564, 0.1506): b = (0.8, −1.800143). c = 1.996002.
#[test]
fn adamw_matches_fairseq_by_hand() {
    let dev = Device::Cpu;
    let mut vars = BTreeMap::new();
    vars.insert(
        "w".to_string(),
        candle_core::Var::from_vec(vec![1.0f64, -2.0], (1, 2), &dev).unwrap(),
    );
    vars.insert(
        "b".to_string(),
        candle_core::Var::from_vec(vec![1.0f64, -2.0], 2, &dev).unwrap(),
    );
    vars.insert(
        "c".to_string(),
        candle_core::Var::from_vec(vec![2.0f64], (1, 1), &dev).unwrap(),
    );
    let f = |x: &Tensor| -> Tensor {
        let x = x.flatten_all().unwrap();
        let a = (x.narrow(0, 0, 1).unwrap() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap();
        let q = (x.narrow(0, 1, 1).unwrap().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        (a + q).unwrap()
    };
    let get = |vars: &BTreeMap<String, candle_core::Var>, k: &str| {
        vars[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let close = |got: Vec<f64>, want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 2e-6, "{what}: got {got:?}, want {want:?}");
        }
    };
    let mut adam = AdamW::new(0.9, 0.98, 1e-6, 0.01, true);
    let loss = (f(vars["w"].as_tensor()) + f(vars["b"].as_tensor())).unwrap();
    adam.step(&vars, &loss.backward().unwrap(), 0.1).unwrap();
    close(get(&vars, "w"), &[0.899, -1.898], "w after 1");
    close(
        get(&vars, "b"),
        &[0.9, -1.9],
        "b after 1 (exempt from decay)",
    );
    close(get(&vars, "c"), &[1.998], "c after 1 (decay only)");
    let loss = f(vars["b"].as_tensor());
    adam.step(&vars, &loss.backward().unwrap(), 0.1).unwrap();
    close(
        get(&vars, "w"),
        &[0.830771, -1.828773],
        "w after 2 (zero gradient)",
    );
    close(get(&vars, "b"), &[0.8, -1.800143], "b after 2");
    close(get(&vars, "c"), &[1.996002], "c after 2");
    assert_eq!(adam.t, 2);
}

/// The logged gradient norm against an independent reading of the same gradients: after the
/// first update AdamW's first moment is m = (1 − β1)·g exactly (m starts at 0), so
/// ‖m‖ / (1 − β1) must equal `grad_norm`.
#[test]
fn logged_gradient_norm_equals_the_first_moment_over_one_minus_beta1() {
    let cfg = tiny_cfg();
    let p = StudentParams {
        warmup_steps: Some(0),
        ..StudentParams::default()
    };
    let mut s = Student::new(p, cfg.clone(), Device::Cpu, 3, DType::F32).unwrap();
    let m = synthetic(&cfg, 2, 12, 5, 2);
    let out = s.train_step(&m).unwrap();
    let g = out.record.grad_norm;
    assert!(g.is_finite() && g > 0.0, "{g}");
    let mut sq = 0f64;
    for (k, t) in s.checkpoint_tensors() {
        if k.starts_with("adam.m.") {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            sq += v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
    }
    let beta1 = s.adam.beta1;
    let from_moments = sq.sqrt() / (1.0 - beta1);
    assert!(
        (from_moments - g).abs() <= 1e-5 * g,
        "moments give {from_moments}, logged {g}"
    );
}

/// The fused f32 CPU kernels (issue 12) inside the whole student: the joint loss and the
/// gradients of every kind of parameter in f32 (fused LayerNorm, GELU, softmax, dropout) agree
/// with the same student in f64 (the composed ops, checked against finite differences above),
/// with the same weights, dropout masks and noise tokens.
#[test]
fn fused_f32_student_matches_the_composed_f64_one() {
    let cfg = tiny_cfg();
    let p = StudentParams {
        alpha: 0.5,
        ..StudentParams::default()
    };
    let s64 = Student::new(p.clone(), cfg.clone(), Device::Cpu, 3, DType::F64).unwrap();
    let s32 = Student::new(p, cfg.clone(), Device::Cpu, 3, DType::F32).unwrap();
    for (name, v) in &s64.vars {
        s32.vars[name]
            .set(&v.as_tensor().to_dtype(DType::F32).unwrap())
            .unwrap();
    }
    let m = synthetic(&cfg, 3, 16, 6, 12);
    let p64 = s64.loss(&m, &mut Noise::new(99)).unwrap();
    let p32 = s32.loss(&m, &mut Noise::new(99)).unwrap();
    let l64 = p64.loss.to_scalar::<f64>().unwrap();
    let l32 = p32
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (l64 - l32).abs() < 1e-5 * l64.abs().max(1.0),
        "loss {l32} (f32) vs {l64} (f64)"
    );
    let g64 = p64.loss.backward().unwrap();
    let g32 = p32.loss.backward().unwrap();
    let mut checked = 0;
    for (name, v64) in &s64.vars {
        let a = g64
            .get(v64.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = g32
            .get(s32.vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no f32 gradient for {name}"))
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() < 2e-4 * scale,
                "{name}[{i}]: f32 {y} vs f64 {x}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 30, "{checked} parameters compared");
}

/// A padded batch through `hidden_states_padded` gives each row what it gives alone (issue 18:
/// ehmam's side of "padding is exact"), on the fused path (f32) and the composed one (f64).
#[test]
fn padded_batch_gives_each_row_what_it_gives_alone() {
    let cfg = tiny_cfg();
    let max_abs = |t: &Tensor| -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for dtype in [DType::F32, DType::F64] {
        let w = model::init_weights(&cfg, 5, &Device::Cpu, dtype).unwrap();
        let m = Model::new(&cfg, &w);
        let lengths = [20usize, 13, 7];
        let t = 20;
        let d = cfg.encoder.dim;
        let z = Tensor::randn(0f32, 1f32, (3, t, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let padded = m.hidden_states_padded(&z, Some(&lengths)).unwrap();
        assert_eq!(padded.len(), cfg.encoder.layers + 1);
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        for (r, &n) in lengths.iter().enumerate() {
            let alone = m
                .hidden_states(&z.narrow(0, r, 1).unwrap().narrow(1, 0, n).unwrap())
                .unwrap();
            for (k, (p, a)) in padded.iter().zip(&alone).enumerate() {
                let p = p.narrow(0, r, 1).unwrap();
                let gap = max_abs(&(p.narrow(1, 0, n).unwrap() - a).unwrap());
                assert!(gap < tol, "{dtype:?} row {r} state {k}: {gap}");
                if n < t {
                    let pad = max_abs(&p.narrow(1, n, t - n).unwrap());
                    assert_eq!(pad, 0.0, "padded frames come back as zeros");
                }
            }
            // Without the lengths, padding leaks into the real frames: the test can fail.
            if n < t {
                let unmasked = m.hidden_states(&z).unwrap();
                let row = unmasked[1]
                    .narrow(0, r, 1)
                    .unwrap()
                    .narrow(1, 0, n)
                    .unwrap();
                let leak = max_abs(&(row - &alone[1]).unwrap());
                assert!(leak > 1e-3, "{leak}");
            }
        }
    }
}
