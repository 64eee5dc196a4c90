//! Training fidelity (issue 11): the decoder and loss predictor add the residual whenever a
//! block keeps the width (block 0 included, as data2vec 2.0's `Decoder1d` and EH-MAM's
//! `PredDecoder1d` do); the hard/random split of `mask.easy_to_hard` can truncate as the code;
//! checkpoints that are cut short are passed over.

use candle_core::{DType, Device, Tensor};
use stages::model::{self, layer_norm, linear, Model, ModelConfig};
use stages::train::masking::*;

fn cfg(yaml: &str) -> ModelConfig {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    ModelConfig::from_spec(Some(&v)).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The reference rule, written out from the ops: `fairseq: examples/data2vec/models/modalities/
/// modules.py` `DecoderBase.add_residual` adds the block input when `residual.size(1) ==
/// x.size(1)` (channels), at every block including the first; `PredDecoder1d` (ehmam) uses the
/// same `add_residual`, then LayerNorm → Linear.
fn reference_head(
    w: &model::Weights,
    p: &str,
    u: &Tensor,
    h: &model::HeadConfig,
    predictor: bool,
) -> Tensor {
    let t = u.dim(1).unwrap();
    let mut x = u.clone();
    for l in 0..h.layers {
        let cw = &w[&format!("{p}.blocks.{l}.conv.weight")];
        let cb = &w[&format!("{p}.blocks.{l}.conv.bias")];
        let k = cw.dim(2).unwrap();
        let y = model::conv1d_time(&x, cw, k / 2, 1, h.groups).unwrap();
        let y = y.narrow(1, 0, t).unwrap().broadcast_add(cb).unwrap();
        let y = layer_norm(&y, None, 1e-5).unwrap().gelu_erf().unwrap();
        x = if x.dim(2).unwrap() == y.dim(2).unwrap() {
            (x + y).unwrap()
        } else {
            y
        };
    }
    if predictor {
        x = layer_norm(
            &x,
            Some((&w[&format!("{p}.ln.weight")], &w[&format!("{p}.ln.bias")])),
            1e-5,
        )
        .unwrap();
    }
    linear(
        &x,
        &w[&format!("{p}.proj.weight")],
        Some(&w[&format!("{p}.proj.bias")]),
    )
    .unwrap()
}

fn input(b: usize, t: usize, d: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..b * t * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(v, (b, t, d), &Device::Cpu).unwrap()
}

/// A head whose width equals the encoder's gets the residual at block 0 too. With every conv of
/// the head zeroed, each block's branch is GELU(LN(0)) = 0, so the head is exactly `proj(u)`
/// (decoder) or `proj(LN(u))` (predictor): without the block-0 residual it would be `proj(0)`.
#[test]
fn equal_width_heads_add_the_residual_at_block_0() {
    let c = cfg("{frontend: {input_dim: 6}, encoder: {dim: 8, heads: 2, ffn: 12, layers: 2, top_k: 2, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}, decoder: {dim: 8, layers: 2, kernel: 3, groups: 2}, loss_predictor: {dim: 8, layers: 1, kernel: 3, groups: 2}}");
    let mut w = model::init_weights(&c, 5, &Device::Cpu, DType::F64).unwrap();
    let u = input(2, 7, 8, 1);
    // Against the reference rule with the initial (non-zero) weights.
    for (p, h, pred) in [
        ("decoder", &c.decoder, false),
        ("loss_predictor", &c.loss_predictor, true),
    ] {
        let got = Model::new(&c, &w).head(p, &u, h, pred).unwrap();
        let want = reference_head(&w, p, &u, h, pred);
        assert!(max_diff(&got, &want) < 1e-12, "{p}");
    }
    // By hand: zero convolutions make every block the identity.
    for (k, v) in w.iter_mut() {
        if k.contains(".blocks.") && k.contains(".conv.") {
            *v = v.zeros_like().unwrap();
        }
    }
    let m = Model::new(&c, &w);
    let dec = m.head("decoder", &u, &c.decoder, false).unwrap();
    let want = linear(&u, &w["decoder.proj.weight"], Some(&w["decoder.proj.bias"])).unwrap();
    assert!(max_diff(&dec, &want) < 1e-12, "decoder = proj(u)");
    let pred = m
        .head("loss_predictor", &u, &c.loss_predictor, true)
        .unwrap();
    let ln = layer_norm(
        &u,
        Some((&w["loss_predictor.ln.weight"], &w["loss_predictor.ln.bias"])),
        1e-5,
    )
    .unwrap();
    let want = linear(
        &ln,
        &w["loss_predictor.proj.weight"],
        Some(&w["loss_predictor.proj.bias"]),
    )
    .unwrap();
    assert!(max_diff(&pred, &want) < 1e-12, "predictor = proj(LN(u))");
}

/// The presets' heads change width at block 0 (tiny 128 → 64, base 768 → 384), so they skip the
/// residual there and keep it at every later block: the same values as the reference rule.
#[test]
fn preset_heads_follow_the_reference_rule() {
    let tiny = ModelConfig::tiny();
    let w = model::init_weights(&tiny, 3, &Device::Cpu, DType::F64).unwrap();
    let u = input(1, 11, tiny.encoder.dim, 2);
    for (p, h, pred) in [
        ("decoder", &tiny.decoder, false),
        ("loss_predictor", &tiny.loss_predictor, true),
    ] {
        assert_ne!(h.dim, tiny.encoder.dim);
        let got = Model::new(&tiny, &w).head(p, &u, h, pred).unwrap();
        let want = reference_head(&w, p, &u, h, pred);
        assert!(max_diff(&got, &want) < 1e-12, "{p}");
    }
    let base = ModelConfig::base();
    assert_ne!(base.decoder.dim, base.encoder.dim);
    assert_ne!(base.loss_predictor.dim, base.encoder.dim);
}

/// `mask.easy_to_hard`'s split of S spans into random and hard ones. The code computes
/// `int(num_mask * (1 - keep_ratio))`: at r = 0.8, 1 − 0.8 is 0.19999999999999996 in binary, so
/// for S a multiple of 5 the product falls just below S/5 and truncates to S/5 − 1 (one more hard
/// span). The epsilon form (the default) reads the method's floor(S·(1 − r)) as exact arithmetic.
#[test]
fn truncating_split_matches_the_code_at_r_0_8() {
    // S: (epsilon S_hard, truncate S_hard) — truncate's values are Python's
    // `S - int(S * (1 - 0.8))`.
    for (s, eps, trunc) in [
        (5, 4, 5),
        (10, 8, 9),
        (15, 12, 13),
        (25, 20, 21),
        (50, 40, 41),
        (7, 6, 6),
    ] {
        assert_eq!(num_hard(s, 0.8), eps, "S = {s}");
        assert_eq!(
            num_hard_with(s, 0.8, SplitRounding::Epsilon),
            eps,
            "S = {s}"
        );
        assert_eq!(
            num_hard_with(s, 0.8, SplitRounding::Truncate),
            trunc,
            "S = {s}"
        );
    }
    // Through a whole mask: T = 500, P = 0.5, L = 5 gives S = 50 spans per row.
    use rand::SeedableRng;
    let lp: Vec<f32> = (0..500).map(|t| ((t * 37) % 101) as f32).collect();
    for (rounding, want) in [(SplitRounding::Epsilon, 40), (SplitRounding::Truncate, 41)] {
        let spec = MaskSpec {
            split_rounding: rounding,
            ..MaskSpec::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let out = eh_mask(&lp, 1, 500, &[500], &spec, 0.8, &mut rng).unwrap();
        assert_eq!(out.spans, vec![50]);
        assert_eq!(out.hard_spans, vec![want], "{rounding:?}");
        assert_eq!(out.rand_starts[0].len(), 50 - want, "{rounding:?}");
    }
}

/// The parameter: `rounding: epsilon` (default, today's masks) or `truncate`; anything else is
/// refused by name.
#[test]
fn rounding_parameter_reads_and_defaults() {
    use stages::train::mask::EasyToHardParams;
    let p: EasyToHardParams = serde_yaml::from_str("{}").unwrap();
    assert_eq!(p.spec().split_rounding, SplitRounding::Epsilon);
    let p: EasyToHardParams = serde_yaml::from_str("{rounding: truncate}").unwrap();
    assert_eq!(p.spec().split_rounding, SplitRounding::Truncate);
    let e = serde_yaml::from_str::<EasyToHardParams>("{rounding: round}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("epsilon") && e.contains("truncate"), "{e}");
}

fn tiny_student() -> stages::train::student::Student {
    use stages::train::student::{Student, StudentParams};
    let c = cfg("{frontend: {input_dim: 6}, encoder: {dim: 8, heads: 2, ffn: 12, layers: 2, top_k: 2, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}, decoder: {dim: 4, layers: 2, kernel: 3, groups: 2}, loss_predictor: {dim: 4, layers: 2, kernel: 3, groups: 2}}");
    Student::new(StudentParams::default(), c, Device::Cpu, 1, DType::F32).unwrap()
}

/// Checkpoints at steps 1 and 2 of `run`; returns the tensors file of step 2.
fn two_checkpoints(run: &std::path::Path) -> std::path::PathBuf {
    let mut s = tiny_student();
    for step in [1, 2] {
        s.step = step;
        stages::train::save_checkpoint(run, &s.checkpoint_meta(), &s.checkpoint_tensors(), 0)
            .unwrap();
    }
    stages::train::checkpoint_dir(run).join("step-00000002.safetensors")
}

fn cut(path: &std::path::Path, keep: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(keep.min(len - 1)).unwrap();
}

/// A newest checkpoint cut short (in its data, in its header, or its JSON) is passed over for
/// the newest complete one, with a note naming the bad file; with no complete one left, the
/// error names every file to remove.
#[test]
fn truncated_newest_checkpoint_falls_back_to_the_previous_one() {
    for damage in ["data", "header", "json"] {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let newest = two_checkpoints(run);
        let bad = match damage {
            "data" => {
                let len = std::fs::metadata(&newest).unwrap().len();
                cut(&newest, len - 100);
                newest.clone()
            }
            "header" => {
                cut(&newest, 20);
                newest.clone()
            }
            _ => {
                let j = newest.with_extension("json");
                cut(&j, 30);
                j
            }
        };
        let found = stages::train::find_checkpoint(run).unwrap().unwrap();
        assert_eq!(found.meta.step, 1, "{damage}");
        assert_eq!(found.skipped.len(), 1, "{damage}");
        assert_eq!(found.skipped[0].file, bad, "{damage}");
        let notes = found.fallback_notes();
        assert!(
            notes[0].contains(&bad.display().to_string()) && notes[0].contains("step 1"),
            "{notes:?}"
        );
        // The tuple form that lab and the tests read agrees.
        let (meta, path) = stages::train::latest_checkpoint(run).unwrap().unwrap();
        assert_eq!(meta.step, 1);
        assert!(stages::train::load_tensors(&path, &Device::Cpu).is_ok());
        // Nothing complete left: refused, naming the files.
        let oldest = stages::train::checkpoint_dir(run).join("step-00000001.safetensors");
        cut(&oldest, 10);
        let e = stages::train::find_checkpoint(run).unwrap_err().to_string();
        assert!(
            e.contains(&bad.display().to_string())
                && e.contains(&oldest.display().to_string())
                && e.contains("Remove"),
            "{e}"
        );
    }
}

/// `export` refuses a non-empty output directory unless forced, and exports from the newest
/// complete checkpoint, saying which one it passed over.
#[test]
fn export_refuses_a_non_empty_directory_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let newest = two_checkpoints(&run);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = stages::train::export(&run, &out, false, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    assert!(!out.join("config.json").exists());
    let x = stages::train::export(&run, &out, false, true).unwrap();
    assert_eq!(x.config.step, 2);
    assert!(x.notes.is_empty());
    assert!(out.join("config.json").exists() && out.join("notes.txt").exists());
    // A new directory and an empty one need no --force.
    stages::train::export(&run, &tmp.path().join("new"), false, false).unwrap();
    std::fs::create_dir_all(tmp.path().join("empty")).unwrap();
    stages::train::export(&run, &tmp.path().join("empty"), true, false).unwrap();
    // A cut newest checkpoint: the export takes step 1 and says why.
    let len = std::fs::metadata(&newest).unwrap().len();
    cut(&newest, len / 2);
    let x = stages::train::export(&run, &tmp.path().join("fallback"), false, false).unwrap();
    assert_eq!(x.config.step, 1);
    assert!(
        x.notes[0].contains("step-00000002.safetensors"),
        "{:?}",
        x.notes
    );
}

/// The shortest utterance in model frames: fbank at 50 Hz, the CNN's frame count for 16 kHz.
#[test]
fn shortest_utterance_in_model_frames() {
    use stages::train::mask::shortest_model_frames;
    assert_eq!(shortest_model_frames(&ModelConfig::tiny(), 2.0), 100);
    assert_eq!(shortest_model_frames(&ModelConfig::tiny(), 0.09), 5);
    assert_eq!(shortest_model_frames(&ModelConfig::tiny(), 0.0), 0);
    // Method §2.1: 1 s of 16 kHz audio gives 49 frames.
    assert_eq!(shortest_model_frames(&ModelConfig::base(), 1.0), 49);
}
