//! Property tests of `batch.by_duration`: the budget is never exceeded, every utterance of an
//! epoch is used exactly once unless dropped for length, the same seed gives the same batches,
//! and every member is the frames of its utterance at its recorded offset.

use proptest::prelude::*;
use stages::data::batch::{BatchParams, Batcher, CropMode};
use stages::items::Features;

/// Utterance `u` of `n` frames, dim 2: frame t holds [u, t] so a crop can be checked.
fn utt(u: usize, n: usize, epoch: u32) -> Features {
    Features {
        utt_id: format!("u{u:04}"),
        speaker: None,
        source: String::new(),
        transcript: None,
        epoch,
        frame_rate: 50.0,
        num_frames: n,
        dim: 2,
        data: (0..n).flat_map(|t| [u as f32, t as f32]).collect(),
    }
}

fn run(
    lens: &[usize],
    epochs: u32,
    p: &BatchParams,
    seed: u64,
) -> (Vec<stages::items::Batch>, u64) {
    let mut b = Batcher::new(p, seed);
    let mut out = Vec::new();
    for e in 0..epochs {
        for (u, &n) in lens.iter().enumerate() {
            out.extend(b.push(utt(u, n, e)));
        }
    }
    out.extend(b.flush());
    (out, b.dropped)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn batching_invariants(
        lens in prop::collection::vec(1usize..600, 1..120),
        epochs in 1u32..3,
        max_seconds in 8.0f64..40.0,
        max_utt in 2.0f64..8.0,
        min_utt in 0.0f64..1.5,
        buffer in 1usize..64,
        pad in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let p = BatchParams { max_seconds, max_frames: None, min_utt_seconds: min_utt, max_utt_seconds: max_utt, crop: if pad { CropMode::Pad } else { CropMode::Shortest }, buffer, shuffle: true, resume_from: None };
        let (batches, dropped) = run(&lens, epochs, &p, seed);
        let budget = (max_seconds * 50.0).floor() as usize;
        let min = (min_utt * 50.0).ceil() as usize;
        let max = (max_utt * 50.0).floor() as usize;
        for b in &batches {
            // Padded cost: the longest member (before the crop to the shortest) × members.
            let longest = b.utt_ids.iter().map(|id| lens[id[1..].parse::<usize>().unwrap()].min(max.min(budget))).max().unwrap();
            prop_assert_eq!(b.cost_frames(), longest * b.size());
            prop_assert!(longest * b.size() <= budget, "cost {} > budget {budget}", longest * b.size());
            prop_assert!(b.frames * b.size() <= budget);
            prop_assert_eq!(b.data.len(), b.size() * b.frames * 2);
            for (i, id) in b.utt_ids.iter().enumerate() {
                let u: usize = id[1..].parse().unwrap();
                let len = lens[u];
                prop_assert!(b.offsets[i] + b.lengths[i] <= len, "crop outside the utterance");
                prop_assert!(b.lengths[i] <= max);
                for t in 0..b.lengths[i] {
                    let row = &b.data[(i * b.frames + t) * 2..(i * b.frames + t) * 2 + 2];
                    prop_assert_eq!(row, &[u as f32, (b.offsets[i] + t) as f32][..]);
                }
                if let Some(m) = &b.padding_mask {
                    for t in 0..b.frames {
                        prop_assert_eq!(m[i * b.frames + t], t >= b.lengths[i]);
                    }
                }
            }
        }
        // Each epoch: every long-enough utterance exactly once; the rest dropped.
        let kept: Vec<usize> = (0..lens.len()).filter(|&u| lens[u] >= min.max(1)).collect();
        prop_assert_eq!(dropped as usize, (lens.len() - kept.len()) * epochs as usize);
        for e in 0..epochs {
            let mut seen: Vec<usize> = batches.iter().filter(|b| b.epoch == e).flat_map(|b| b.utt_ids.iter().map(|id| id[1..].parse::<usize>().unwrap())).collect();
            seen.sort();
            prop_assert_eq!(&seen, &kept);
        }
        // Steps count up; the same seed gives the same batches.
        prop_assert!(batches.iter().enumerate().all(|(i, b)| b.step == i as u64));
        let (again, _) = run(&lens, epochs, &p, seed);
        prop_assert_eq!(&batches, &again);
        // Resuming after any batch, feeding only the utterances from its buffer's start on,
        // continues with exactly the batches an uninterrupted run makes.
        if !batches.is_empty() {
            let k = (seed as usize) % batches.len();
            let pos = batches[k].position.after();
            let mut resumed = Vec::new();
            let mut b = Batcher::resume(&p, seed, pos);
            for e in pos.epoch..epochs {
                let from = if e == pos.epoch { pos.start as usize } else { 0 };
                for (u, &n) in lens.iter().enumerate().skip(from) {
                    resumed.extend(b.push(utt(u, n, e)));
                }
            }
            resumed.extend(b.flush());
            prop_assert_eq!(&resumed[..], &batches[k + 1..]);
        }
    }
}

#[test]
fn another_seed_gives_other_batches_and_crops() {
    let lens: Vec<usize> = (0..80).map(|i| 60 + (i * 37) % 500).collect();
    let p = BatchParams::default();
    let (a, _) = run(&lens, 1, &p, 1);
    let (b, _) = run(&lens, 1, &p, 2);
    assert_ne!(a, b);
}
