//! Every random stream of the speech stages, one named function each. A stage's own seed comes
//! from the spec's seed and the stage's name (`pipeline::plan::stage_seed`); the functions here
//! derive the streams inside a stage from it. The constants are those runs have always used:
//! changing one changes every run that draws from that stream.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser.
fn finalise(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string (utterance ids).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// `batch.by_duration`: the crop offset of utterance `index` (in its epoch's order) of `epoch`.
pub fn batch_crop(seed: u64, epoch: u32, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(batch_mix(seed, epoch as u64, index, 0))
}

/// `batch.by_duration`: the order of the batches of flush `flush` of `epoch`.
pub fn batch_order(seed: u64, epoch: u32, flush: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(batch_mix(seed, epoch as u64, flush, 1))
}

fn batch_mix(seed: u64, a: u64, b: u64, c: u64) -> u64 {
    finalise(
        seed ^ a.wrapping_mul(GOLDEN)
            ^ b.wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ c.wrapping_mul(0x94D0_49BB_1331_11EB),
    )
}

/// `shards.read` / `features.read`: the order of the parts of `epoch` (`part = None`) and of the
/// rows inside part `part`.
pub fn epoch_order(seed: u64, epoch: u32, part: Option<u64>) -> ChaCha8Rng {
    let (a, b) = (epoch as u64 + 1, part.unwrap_or(u64::MAX));
    ChaCha8Rng::seed_from_u64(seed ^ a.wrapping_mul(GOLDEN) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// `features.fbank`: the dither of one utterance in one epoch.
pub fn fbank_dither(seed: u64, utt_id: &str, epoch: u32) -> u64 {
    seed ^ fnv1a(utt_id) ^ (epoch as u64).wrapping_mul(GOLDEN)
}

/// Domain tag of the mask streams ("mask").
const MASK_STREAM: u64 = 0x6d61_736b;

/// `mask.*`: the masks of the batch of update `step`.
pub fn mask_batch(seed: u64, step: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(finalise(
        seed ^ step.wrapping_mul(GOLDEN) ^ MASK_STREAM.wrapping_mul(0xBF58_476D_1CE4_E5B9),
    ))
}

fn train_mix(seed: u64, a: u64, b: u64) -> u64 {
    finalise(seed ^ a.wrapping_mul(GOLDEN) ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// `student`: the initial weights of the model.
pub fn model_init(seed: u64) -> u64 {
    train_mix(seed, 0x5EED, 0)
}

/// `student`: dropout, layerdrop and noise tokens of update `step`.
pub fn update_noise(seed: u64, step: u64) -> u64 {
    train_mix(seed, step, 1)
}

/// `student` with `update_freq` > 1: the noise of the `part`-th batch of update `step` (part 0
/// is [`update_noise`], so one batch per update draws as before).
pub fn update_noise_part(seed: u64, step: u64, part: u64) -> u64 {
    if part == 0 {
        update_noise(seed, step)
    } else {
        train_mix(seed ^ part.wrapping_mul(0xA24B_AED4_963E_E407), step, 5)
    }
}

/// The same for the device generator (part 0 is [`update_device_noise`]).
pub fn update_device_noise_part(seed: u64, step: u64, part: u64) -> u64 {
    if part == 0 {
        update_device_noise(seed, step)
    } else {
        train_mix(seed ^ part.wrapping_mul(0xA24B_AED4_963E_E407), step, 6)
    }
}

/// `student` on a GPU: the seed of the device generator (cuRAND) for update `step`'s dropout
/// masks and noise tokens.
pub fn update_device_noise(seed: u64, step: u64) -> u64 {
    train_mix(seed, step, 2)
}

/// `log.frames`: whether utterance `utt_id` of update `step` is logged: BLAKE3 of (seed, step,
/// utt_id) as a uniform number in [0, 1), below `fraction`.
pub fn frame_log_sampled(seed: u64, step: u64, utt_id: &str, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&step.to_le_bytes());
    h.update(utt_id.as_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    let x = (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    x < fraction
}
