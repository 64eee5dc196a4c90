//! Fine-tuning's building blocks (issue 19): the CTC loss and its gradient against PyTorch's
//! (`fixtures/ctc/ctc_torch.json`, made by `fixtures/ctc/make_ctc_fixtures.py`) and against
//! finite differences; infeasible utterances; WER/CER on hand-worked examples; the tri-stage
//! schedule at fairseq's phase boundaries; the letter vocabulary and greedy decoding.

use candle_core::{DType, Device, Tensor, Var};
use stages::finetune::ctc::{ctc_loss, min_frames};
use stages::finetune::schedule::TriStage;
use stages::finetune::vocab::{Unknown, Vocab, BLANK};
use stages::finetune::wer::{align, char_edits, word_edits, Edits};

#[derive(serde::Deserialize)]
struct Fixture {
    #[serde(rename = "B")]
    b: usize,
    #[serde(rename = "T")]
    t: usize,
    #[serde(rename = "V")]
    v: usize,
    logits: Vec<f64>,
    input_lengths: Vec<usize>,
    targets: Vec<Vec<u32>>,
    losses: Vec<f64>,
    grads: Vec<f64>,
}

fn fixture() -> Fixture {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ctc/ctc_torch.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn ctc_loss_and_gradient_match_pytorch() {
    let f = fixture();
    for dtype in [DType::F64, DType::F32] {
        let x = Var::from_tensor(
            &Tensor::from_vec(f.logits.clone(), (f.b, f.t, f.v), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let out = ctc_loss(x.as_tensor(), &f.input_lengths, &f.targets, 0).unwrap();
        assert!(out.feasible.iter().all(|&x| x));
        let got: Vec<f64> = out.loss.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
        for (a, b) in got.iter().zip(&f.losses) {
            assert!(
                (a - b).abs() < tol * b.abs().max(1.0),
                "{dtype:?}: loss {a} vs torch {b}"
            );
        }
        let g = out.loss.sum_all().unwrap().backward().unwrap();
        let g: Vec<f64> = g
            .get(x.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = g
            .iter()
            .zip(&f.grads)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let tol = if dtype == DType::F64 { 1e-9 } else { 1e-5 };
        assert!(
            worst < tol,
            "{dtype:?}: gradient differs from torch's by {worst}"
        );
        // Frames past an utterance's length get no gradient.
        let (t, v) = (f.t, f.v);
        for (i, &n) in f.input_lengths.iter().enumerate() {
            assert!(g[i * t * v + n * v..(i + 1) * t * v]
                .iter()
                .all(|&x| x == 0.0));
        }
    }
}

#[test]
fn ctc_gradient_matches_finite_differences() {
    let (b, t, v) = (2, 6, 4);
    let vals: Vec<f64> = (0..b * t * v)
        .map(|i| ((i * 37 % 17) as f64 - 8.0) / 5.0)
        .collect();
    let targets = vec![vec![1u32, 1, 2], vec![3]];
    let lens = [6usize, 4];
    let loss_of = |vals: &[f64]| -> f64 {
        let x = Tensor::from_slice(vals, (b, t, v), &Device::Cpu).unwrap();
        let o = ctc_loss(&x, &lens, &targets, 0).unwrap();
        // A weighted sum, so each utterance's gradient is scaled by its own weight.
        let w = Tensor::new(&[1.0f64, 0.5], &Device::Cpu).unwrap();
        (o.loss * w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let x = Var::from_tensor(&Tensor::from_slice(&vals, (b, t, v), &Device::Cpu).unwrap()).unwrap();
    let o = ctc_loss(x.as_tensor(), &lens, &targets, 0).unwrap();
    let w = Tensor::new(&[1.0f64, 0.5], &Device::Cpu).unwrap();
    let g = (o.loss * w).unwrap().sum_all().unwrap().backward().unwrap();
    let g: Vec<f64> = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h = 1e-6;
    for i in 0..vals.len() {
        let mut p = vals.clone();
        p[i] += h;
        let mut m = vals.clone();
        m[i] -= h;
        let fd = (loss_of(&p) - loss_of(&m)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() < 1e-6,
            "element {i}: analytic {} vs numeric {fd}",
            g[i]
        );
    }
}

/// Labels that cannot fit their frames (repeats need a blank between them): no loss, no
/// gradient, flagged; the others in the batch are unaffected.
#[test]
fn infeasible_utterances_are_flagged_not_nan() {
    assert_eq!(min_frames(&[1, 1, 2, 2]), 6);
    assert_eq!(min_frames(&[1, 2, 3]), 3);
    let x = Var::from_tensor(&Tensor::zeros((2, 5, 3), DType::F64, &Device::Cpu).unwrap()).unwrap();
    let o = ctc_loss(
        x.as_tensor(),
        &[5, 5],
        &[vec![1, 1, 1], vec![1, 2, 1, 2, 1, 2]],
        0,
    )
    .unwrap();
    assert_eq!(o.feasible, vec![true, false]);
    let l: Vec<f64> = o.loss.to_vec1().unwrap();
    assert!(l[0].is_finite() && l[0] > 0.0 && l[1] == 0.0, "{l:?}");
    let g = o.loss.sum_all().unwrap().backward().unwrap();
    let g: Vec<f64> = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g.iter().all(|x| x.is_finite()));
    assert!(g[15..].iter().all(|&x| x == 0.0));
    // Hand-worked: uniform scores over 3 symbols, labels [1] in 1 frame: p = 1/3.
    let one = Tensor::zeros((1, 1, 3), DType::F64, &Device::Cpu).unwrap();
    let o = ctc_loss(&one, &[1], &[vec![1]], 0).unwrap();
    let l = o.loss.to_vec1::<f64>().unwrap()[0];
    assert!((l - 3f64.ln()).abs() < 1e-12, "{l}");
    // A label equal to the blank, or outside the vocabulary, is an error.
    assert!(ctc_loss(&one, &[1], &[vec![0]], 0).is_err());
    assert!(ctc_loss(&one, &[1], &[vec![3]], 0).is_err());
}

#[test]
fn wer_and_cer_by_hand() {
    // sat → sit, the → mat, mat → down (or sit, a deletion and an insertion): 3 of 6 words.
    let e = word_edits("the cat sat on the mat", "the cat sit on mat down");
    assert_eq!((e.errors(), e.reference), (3, 6));
    assert!((e.rate() - 0.5).abs() < 1e-12);
    // One deletion (b) and one insertion (e) beat three substitutions.
    assert_eq!(
        word_edits("a b c d", "a c d e"),
        Edits {
            substitutions: 0,
            insertions: 1,
            deletions: 1,
            reference: 4
        }
    );
    assert_eq!(word_edits("a b", "a x").substitutions, 1);
    // Empty hypothesis: every reference word deleted; empty reference: rate undefined.
    let e = word_edits("a b c", "");
    assert_eq!((e.deletions, e.errors(), e.reference), (3, 3, 3));
    assert!(word_edits("", "a").rate().is_nan());
    assert_eq!(word_edits("", "a").insertions, 1);
    // Whitespace does not count as words.
    assert_eq!(word_edits("  a   b ", "a b").errors(), 0);
    // Characters, spaces included: "ab cd" → "abd": c deleted, space deleted.
    let e = char_edits("ab cd", "abd");
    assert_eq!((e.errors(), e.reference), (2, 5));
    // Identical: no edits.
    assert_eq!(align(&[1, 2, 3], &[1, 2, 3]).errors(), 0);
    let mut total = Edits::default();
    total.add(word_edits("a b", "a c"));
    total.add(word_edits("d", "d"));
    assert_eq!((total.errors(), total.reference), (1, 3));
}

/// fairseq's tri_stage at its boundaries: peak 1, 1000 updates as [0.1, 0.4, 0.5], init scale
/// 0.01, final scale 0.05.
#[test]
fn tri_stage_schedule_at_fairseqs_boundaries() {
    let s = TriStage::from_ratios(1.0, 1000, [0.1, 0.4, 0.5], 0.01, 0.05);
    assert_eq!((s.warmup, s.hold, s.decay), (100, 400, 500));
    assert!((s.lr(0) - 0.01).abs() < 1e-15);
    assert!((s.lr(50) - (0.01 + 0.99 * 0.5)).abs() < 1e-12);
    assert_eq!(s.lr(100), 1.0);
    assert_eq!(s.lr(499), 1.0);
    assert_eq!(s.lr(500), 1.0); // decay stage, step 0: exp(0)
    let factor = -(0.05f64).ln() / 500.0;
    assert!((s.lr(750) - (-factor * 250.0).exp()).abs() < 1e-12);
    assert!((s.lr(1000) - 0.05).abs() < 1e-12); // the last decay step (`<=`)
    assert!((s.lr(5000) - 0.05).abs() < 1e-15);
}

#[test]
fn letter_vocabulary_and_greedy_decoding() {
    let texts = ["HELLO WORLD", "HE SAID"];
    let v = Vocab::from_transcripts(texts);
    // Most frequent first: | (4 words), L (3), then D, E, H, O (2 each, by character).
    assert_eq!(v.symbols[..7], ["<blank>", "|", "L", "D", "E", "H", "O"]);
    let dict = v.to_dict(texts);
    let back = Vocab::parse_dict(&dict).unwrap();
    assert_eq!(back, v);
    let mut unk = Unknown::default();
    let l = v.encode("HELLO, WORLD", &mut unk);
    assert_eq!(unk.chars.get(&','), Some(&1));
    let idx = |c: &str| v.symbols.iter().position(|s| s == c).unwrap() as u32;
    assert_eq!(l.len(), "HELLOWORLD".len() + 2);
    assert_eq!(l[5], idx("|"));
    // Greedy CTC: repeats merged unless a blank separates them, blanks dropped.
    let frames = [
        idx("H"),
        idx("E"),
        idx("L"),
        BLANK,
        idx("L"),
        idx("L"),
        idx("O"),
        idx("|"),
        idx("|"),
        BLANK,
        idx("H"),
        idx("E"),
    ];
    assert_eq!(v.greedy_decode(&frames), "HELLO HE");
    assert!(Vocab::parse_dict("AB 3\n").is_err());
    assert!(Vocab::parse_dict("A 3\nA 2\n").is_err());
    assert!(Vocab::parse_dict("A x\n").is_err());
}

/// The fine-tuner learns a small transcription task from scratch: utterances whose frames encode
/// their letters (3 noisy frames per letter or word boundary), a 2-block encoder with a CTC head,
/// tri-stage schedule, time masking and dropout on. Held-out CER must fall from chance-level
/// transcripts to under 25% and to under half of where it started.
#[test]
fn finetuner_learns_a_synthetic_transcription_task() {
    use rand::{Rng, SeedableRng};
    use stages::finetune::trainer::{FinetuneParams, Finetuner};
    use stages::finetune::wer::char_edits;
    let v: serde_yaml::Value = serde_yaml::from_str(
        "{frontend: {input_dim: 8}, encoder: {dim: 32, heads: 2, ffn: 64, layers: 2, top_k: 1, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}}",
    )
    .unwrap();
    let cfg = stages::model::ModelConfig::from_spec(Some(&v)).unwrap();
    let letters = ['A', 'B', 'C', 'D'];
    let make = |seed: u64, n: usize| -> Vec<String> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..rng.random_range(2..4))
                    .map(|_| {
                        (0..rng.random_range(1..4))
                            .map(|_| letters[rng.random_range(0..4)])
                            .collect::<String>()
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    };
    let train_texts = make(1, 64);
    let test_texts = make(2, 16);
    let vocab = Vocab::from_transcripts(train_texts.iter().map(String::as_str));
    // Frames: symbol k lights channel k (plus noise), 3 frames each.
    let batch = |texts: &[String], seed: u64| -> (Tensor, Vec<usize>, Vec<Vec<u32>>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut unk = Unknown::default();
        let labels: Vec<Vec<u32>> = texts.iter().map(|t| vocab.encode(t, &mut unk)).collect();
        let lens: Vec<usize> = labels.iter().map(|l| 3 * l.len()).collect();
        let n = *lens.iter().max().unwrap();
        let mut x = vec![0f32; texts.len() * n * 8];
        for (r, l) in labels.iter().enumerate() {
            for (i, &k) in l.iter().enumerate() {
                for f in 0..3 {
                    let row = &mut x[(r * n + 3 * i + f) * 8..(r * n + 3 * i + f + 1) * 8];
                    for c in row.iter_mut() {
                        *c = rng.random_range(-0.3..0.3);
                    }
                    row[k as usize % 8] += 1.0;
                }
            }
        }
        (
            Tensor::from_vec(x, (texts.len(), n, 8), &Device::Cpu).unwrap(),
            lens,
            labels,
        )
    };
    let w = stages::model::init_weights(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let p = FinetuneParams {
        lr: 3e-3,
        max_steps: 240,
        freeze_finetune_updates: 20,
        mask_prob: 0.1,
        mask_length: 2,
        mask_channel_prob: 0.0,
        ..FinetuneParams::default()
    };
    let mut ft = Finetuner::new(cfg, &w, vocab.clone(), p, 5).unwrap();
    let (tx, tl, _) = batch(&test_texts, 99);
    let cer = |ft: &Finetuner| -> f64 {
        let hyp = ft.transcribe(&tx, &tl).unwrap();
        let mut e = stages::finetune::wer::Edits::default();
        for (r, h) in test_texts.iter().zip(&hyp) {
            e.add(char_edits(r, h));
        }
        e.rate()
    };
    let before = cer(&ft);
    let enc = |ft: &Finetuner| -> Vec<f32> {
        ft.vars["encoder.blocks.0.fc1.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let enc0 = enc(&ft);
    let mut losses = Vec::new();
    for step in 0..240u64 {
        let i = (step as usize * 8) % 64;
        let (x, l, y) = batch(&train_texts[i..i + 8], step);
        let s = ft.train_step(&x, &l, &y).unwrap();
        assert_eq!(s.infeasible, 0);
        assert!(s.loss.is_finite());
        losses.push(s.loss);
        // freeze_finetune_updates: the encoder does not move for the first 20 updates.
        if step == 19 {
            assert!(enc(&ft) == enc0, "the encoder moved while frozen");
        }
        if step == 20 {
            assert!(
                enc(&ft) != enc0,
                "the encoder did not move after the freeze"
            );
        }
    }
    let after = cer(&ft);
    eprintln!(
        "CER {before:.3} → {after:.3}; loss {:.3} → {:.3}",
        losses[0],
        losses[losses.len() - 1]
    );
    assert!(
        after < 0.25 && after < 0.5 * before,
        "CER {before} → {after}"
    );
}

/// A 2-block model of width 16 over 6-dim input, its weights, and a 4-symbol vocabulary.
fn small_model() -> (
    stages::model::ModelConfig,
    Vocab,
    std::collections::BTreeMap<String, Tensor>,
) {
    let v: serde_yaml::Value = serde_yaml::from_str(
        "{frontend: {input_dim: 6}, encoder: {dim: 16, heads: 2, ffn: 32, layers: 2, top_k: 1, pos_conv_depth: 1, pos_conv_kernel: 3, pos_conv_groups: 2}}",
    )
    .unwrap();
    let cfg = stages::model::ModelConfig::from_spec(Some(&v)).unwrap();
    let vocab = Vocab::from_transcripts(["AB BA", "CAB"]);
    let w = stages::model::init_weights(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
    (cfg, vocab, w)
}

/// Exact resume: 3 updates, a checkpoint's tensors into a fresh fine-tuner, 3 more updates end
/// with the same weights, moments and losses as 6 updates in one go (every draw of update t comes
/// from (seed, t)).
#[test]
fn finetuner_resumes_exactly_from_its_checkpoint_tensors() {
    use rand::{Rng, SeedableRng};
    use stages::finetune::trainer::{FinetuneParams, Finetuner};
    let (cfg, vocab, w) = small_model();
    // Dropout, activation dropout, layerdrop and both maskings on, so every stream is drawn.
    let p = FinetuneParams {
        lr: 1e-3,
        max_steps: 6,
        freeze_finetune_updates: 2,
        mask_prob: 0.3,
        mask_length: 2,
        mask_channel_prob: 0.3,
        mask_channel_length: 4,
        dropout: 0.1,
        attention_dropout: 0.1,
        activation_dropout: 0.1,
        layerdrop: 0.3,
        ..FinetuneParams::default()
    };
    let data = |step: u64| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(step);
        let x: Vec<f32> = (0..2 * 20 * 6)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x = Tensor::from_vec(x, (2, 20, 6), &Device::Cpu).unwrap();
        let mut unk = Unknown::default();
        let y = vec![
            vocab.encode("AB BA", &mut unk),
            vocab.encode("CAB", &mut unk),
        ];
        (x, vec![20, 15], y)
    };
    let state = |ft: &Finetuner| -> Vec<(String, Vec<f32>)> {
        ft.checkpoint_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    };
    let mut whole = Finetuner::new(cfg.clone(), &w, vocab.clone(), p.clone(), 9).unwrap();
    let mut losses = Vec::new();
    for s in 0..6 {
        let (x, l, y) = data(s);
        losses.push(whole.train_step(&x, &l, &y).unwrap().loss);
    }
    let mut first = Finetuner::new(cfg.clone(), &w, vocab.clone(), p.clone(), 9).unwrap();
    for s in 0..3 {
        let (x, l, y) = data(s);
        assert_eq!(
            first.train_step(&x, &l, &y).unwrap().loss,
            losses[s as usize]
        );
    }
    let saved = first.checkpoint_tensors();
    let mut second = Finetuner::new(cfg, &w, vocab.clone(), p, 9).unwrap();
    second.restore(first.step, first.adam.t, &saved).unwrap();
    for s in 3..6 {
        let (x, l, y) = data(s);
        assert_eq!(
            second.train_step(&x, &l, &y).unwrap().loss,
            losses[s as usize]
        );
    }
    assert_eq!(state(&second), state(&whole));
    assert_ne!(
        state(&whole),
        state(&first),
        "the last updates changed the weights"
    );
}

/// `update_freq`: one fine-tuning update from two padded batches (2 and 3 utterances) equals one
/// from a single batch holding all 5 (the mean CTC loss over every utterance of the update),
/// with masking, dropout and layerdrop off (their draws are per batch).
#[test]
fn finetuner_update_from_two_batches_equals_their_concatenation() {
    use rand::{Rng, SeedableRng};
    use stages::finetune::trainer::{FinetuneParams, Finetuner};
    let (cfg, vocab, w) = small_model();
    let p = FinetuneParams {
        lr: 1e-3,
        max_steps: 4,
        freeze_finetune_updates: 1,
        mask_prob: 0.0,
        mask_channel_prob: 0.0,
        dropout: 0.0,
        attention_dropout: 0.0,
        activation_dropout: 0.0,
        layerdrop: 0.0,
        update_freq: 2,
        ..FinetuneParams::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut unk = Unknown::default();
    let texts = ["AB BA", "CAB", "BA", "A CAB", "BAB"];
    let lens = [20usize, 14, 20, 17, 9];
    let x: Vec<f32> = (0..5 * 20 * 6)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let all = Tensor::from_vec(x, (5, 20, 6), &Device::Cpu).unwrap();
    let y: Vec<Vec<u32>> = texts.iter().map(|t| vocab.encode(t, &mut unk)).collect();
    let (xa, xb) = (all.narrow(0, 0, 2).unwrap(), all.narrow(0, 2, 3).unwrap());
    let mut acc = Finetuner::new(cfg.clone(), &w, vocab.clone(), p.clone(), 9).unwrap();
    let mut one = Finetuner::new(cfg, &w, vocab, p, 9).unwrap();
    for _ in 0..3 {
        let a = acc
            .train_update(&[(&xa, &lens[..2], &y[..2]), (&xb, &lens[2..], &y[2..])])
            .unwrap();
        let b = one.train_step(&all, &lens, &y).unwrap();
        assert!(
            (a.loss - b.loss).abs() <= 1e-5 * b.loss.abs(),
            "{} {}",
            a.loss,
            b.loss
        );
    }
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, v) in &acc.vars {
        let (x, y) = (flat(v.as_tensor()), flat(one.vars[k].as_tensor()));
        // Relative to the tensor's scale (at least 1e-2: Adam divides tiny gradients of
        // near-zero parameters by tiny moments, where the summation order shows).
        let top = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-2);
        let gap = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(gap <= 1e-5 * top, "{k}: {gap} of {top}");
    }
    assert_eq!(acc.step, 3);
}
