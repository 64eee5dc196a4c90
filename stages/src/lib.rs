//! ehmam's speech stages. Each stage kind is one module; [`registry`] is the table of them.

pub mod audio;
pub mod batch;
pub mod decode;
pub mod fbank;
pub mod features_io;
pub mod shards;
pub mod sql;
pub mod types;

use pipeline::Registry;

/// Every stage kind this build offers: one line per kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.with::<decode::AudioDecode>();
    r.with::<shards::ShardsWrite>();
    r.with::<shards::ShardsRead>();
    r.with::<fbank::FeaturesFbank>();
    r.with::<features_io::FeaturesWaveform>();
    r.with::<features_io::FeaturesWrite>();
    r.with::<features_io::FeaturesRead>();
    r.with::<features_io::FeaturesStats>();
    r.with::<batch::BatchByDuration>();
    r.cuda = cfg!(feature = "cuda");
    r
}
