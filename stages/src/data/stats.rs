//! `features.stats`: corpus mean and variance per feature dimension, for global normalisation.

use crate::items::Features;
use pipeline::{Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the corpus statistics `features.stats` writes into its run directory.
pub const STATS_FILE: &str = "feature_stats.json";

/// Mean and (population) variance per feature dimension over every frame seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    pub dim: usize,
    pub frames: u64,
    pub utterances: u64,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl FeatureStats {
    pub fn load(path: &Path) -> crate::Result<FeatureStats> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let st: FeatureStats = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not feature statistics: {e}", path.display()))?;
        if st.mean.len() != st.dim || st.var.len() != st.dim {
            return Err(crate::Error::from(format!(
                "{}: mean/var lengths differ from dim {}",
                path.display(),
                st.dim
            )));
        }
        Ok(st)
    }
}

/// Parameters of `features.stats`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StatsParams {
    /// Also write the statistics here (besides `feature_stats.json` in the run directory).
    pub out: Option<PathBuf>,
}
impl Params for StatsParams {}

/// The `features.stats` stage.
pub struct FeaturesStats {
    p: StatsParams,
    run_dir: PathBuf,
}

impl StageDef for FeaturesStats {
    type Params = StatsParams;
    const KIND: &'static str = "features.stats";
    const DOC: &'static str = "Corpus mean and variance per feature dimension (feed it `normalize: none` features, one epoch);
writes feature_stats.json into the run directory for `features.fbank` with `normalize: global`.";
    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>("in", "features")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn create(p: &StatsParams, ctx: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(FeaturesStats {
            p: p.clone(),
            run_dir: ctx.run_dir.clone(),
        })
    }
}

impl Stage for FeaturesStats {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let (mut sum, mut sq): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        let (mut frames, mut utts) = (0u64, 0u64);
        while let Some(f) = io.recv::<Features>(0)? {
            if f.dim == 0 || f.data.len() != f.num_frames * f.dim {
                return Err(StageError::failed(format!(
                    "{}: {} values for {} frames × {} dims",
                    f.utt_id,
                    f.data.len(),
                    f.num_frames,
                    f.dim
                )));
            }
            if sum.is_empty() {
                sum = vec![0.0; f.dim];
                sq = vec![0.0; f.dim];
            } else if f.dim != sum.len() {
                return Err(StageError::failed(format!(
                    "{}: dim {} differs from the first utterance's {}",
                    f.utt_id,
                    f.dim,
                    sum.len()
                )));
            }
            for row in f.data.chunks_exact(f.dim) {
                for ((s, q), &x) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
                    *s += x as f64;
                    *q += (x as f64) * (x as f64);
                }
            }
            frames += f.num_frames as u64;
            utts += 1;
        }
        if frames == 0 {
            return Err(StageError::failed(
                "no frames: nothing to compute statistics from",
            ));
        }
        let n = frames as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let var: Vec<f64> = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / n - m * m).max(0.0))
            .collect();
        let st = FeatureStats {
            dim: mean.len(),
            frames,
            utterances: utts,
            mean,
            var,
        };
        let text = serde_json::to_string_pretty(&st)
            .map_err(|e| StageError::failed(e.to_string()))?
            + "\n";
        let mut targets = vec![self.run_dir.join(STATS_FILE)];
        targets.extend(self.p.out.clone());
        for t in targets {
            if let Some(parent) = t.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StageError::io(format!("cannot create {}", parent.display()), e)
                })?;
            }
            pipeline::atomic::write_atomic(&t, text.as_bytes())
                .map_err(|e| StageError::io(format!("cannot write {}", t.display()), e))?;
        }
        io.note(format!(
            "statistics of {utts} utterances, {frames} frames, {} dims",
            st.dim
        ));
        Ok(())
    }
}
