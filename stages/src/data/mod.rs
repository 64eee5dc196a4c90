//! Data stages: audio decoding, shards, Kaldi fbank, the waveform input, feature statistics, the
//! feature store, batching.

pub mod audio;
pub mod batch;
pub mod decode;
pub mod fbank;
pub mod shards;
pub mod stats;
pub mod store;
pub mod waveform;
