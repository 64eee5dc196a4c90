//! ehmam's speech stages. [`registry`] is the table of stage kinds.
//!
//! Modules depend one way: `items`, `seed` and `error` at the bottom; `stream` (positions, epoch
//! order, the part directory) over them; `data` and `model` over those; `train` over `model`
//! and `stream`; `logs` over `items` and `stream`. `data` never imports `train`; nothing here
//! imports the `lab` crate.

pub mod data;
pub mod dist;
pub mod error;
pub mod finetune;
pub mod items;
pub mod logs;
pub mod model;
pub mod seed;
pub mod stream;
pub mod train;

pub use error::{Error, Result};

/// The tensor library the model runs on, for callers that read checkpoints and exports.
pub use candle_core;

use pipeline::Registry;

/// Every stage kind this build offers: one line per kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.with::<data::decode::AudioDecode>();
    r.with::<data::shards::ShardsWrite>();
    r.with::<data::shards::ShardsRead>();
    r.with::<data::fbank::FeaturesFbank>();
    r.with::<data::waveform::FeaturesWaveform>();
    r.with::<data::store::FeaturesWrite>();
    r.with::<data::store::FeaturesRead>();
    r.with::<data::stats::FeaturesStats>();
    r.with::<data::batch::BatchByDuration>();
    r.with::<train::teacher::TeacherStage>();
    r.with::<train::student::StudentStage>();
    r.with::<train::mask::MaskStage<train::mask::EasyToHard>>();
    r.with::<train::mask::MaskStage<train::mask::Random>>();
    r.with::<train::mask::MaskStage<train::mask::Hard>>();
    r.with::<logs::frames::LogFrames>();
    r.with::<logs::steps::LogSteps>();
    r.with::<logs::tensorboard::LogTensorBoard>();
    r.with::<finetune::stage::FinetuneStage>();
    r.with::<finetune::eval::EvalStage>();
    r.cuda = cfg!(feature = "cuda");
    r
}
