//! ehmam's speech stages. Each stage kind is one module; [`registry`] is the table of them.

pub mod audio;
pub mod batch;
pub mod decode;
pub mod fbank;
pub mod features_io;
pub mod logs;
pub mod losses;
pub mod mask;
pub mod model;
pub mod optim;
pub mod plot;
pub mod report;
pub mod shards;
pub mod sql;
pub mod student;
pub mod sweep;
pub mod teacher;
pub mod train;
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
    r.with::<teacher::TeacherStage>();
    r.with::<student::StudentStage>();
    r.with::<mask::MaskEasyToHard>();
    r.with::<mask::MaskRandom>();
    r.with::<mask::MaskHard>();
    r.with::<logs::LogFrames>();
    r.with::<logs::LogSteps>();
    r.cuda = cfg!(feature = "cuda");
    r
}
