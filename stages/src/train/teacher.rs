//! `teacher`: the EMA encoder on the whole, unmasked batch (method §1.3–1.4). For each batch it
//! waits for the student's weights of the previous step (`staleness: 0`, the paper's algorithm)
//! or of the step before (`staleness: 1`, one step ahead), runs the front-end with the student's
//! current front-end weights (detached), the teacher blocks, the targets (instance-normalised
//! FFN outputs of the top-K blocks, averaged) and the teacher's loss predictor on the targets.

use crate::items::Batch;
use crate::items::Taught;
use crate::model::{Model, ModelConfig};
use crate::train::{self, stage_err, Wait, WeightCell};
use candle_core::{DType, Device, Tensor};
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Parameters of `teacher`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherParams {
    /// 0: each batch uses the weights of the previous update (exactly the paper's algorithm);
    /// 1: the teacher may run one step ahead of the student, on weights one update older.
    pub staleness: u64,
}

impl Params for TeacherParams {
    fn check(&self) -> Vec<ParamError> {
        if self.staleness > 1 {
            vec![ParamError::new(
                "staleness",
                format!("must be 0 or 1, got {}", self.staleness),
            )]
        } else {
            Vec::new()
        }
    }
}

pub struct TeacherStage {
    p: TeacherParams,
    cfg: ModelConfig,
    device: Device,
    cell: Arc<WeightCell>,
    /// Batches per update (the student's `update_freq`): a batch's update is its step over it.
    update_freq: u64,
}

impl StageDef for TeacherStage {
    type Params = TeacherParams;
    const KIND: &'static str = "teacher";
    const DOC: &'static str = "The EMA teacher (model: block): targets and predicted per-frame losses for each batch, on the\nweights the student publishes after every update.";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Batch>(
            "in",
            "batches of features (fbank or waveform, per model.frontend)",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Taught>(
            "out",
            "batches with targets and the teacher's predicted losses",
        )]
    }
    fn validate(_p: &TeacherParams, ctx: &StageContext) -> Vec<ParamError> {
        train::validate_model(ctx)
    }
    fn link(_: &TeacherParams, _: &StageContext, linker: &mut pipeline::Linker) -> Vec<ParamError> {
        linker.read(&train::TEACHER_WEIGHTS);
        linker.read(&train::UPDATE_FREQ);
        Vec::new()
    }
    fn create(p: &TeacherParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        let cfg = train::model_config(ctx)?;
        let device = train::device(&ctx.device)?;
        let cell = ctx.links.get(&train::TEACHER_WEIGHTS).ok_or_else(|| {
            StageError::failed(
                "the teacher needs a `student` stage in the same spec (it publishes the weights)",
            )
        })?;
        Ok(TeacherStage {
            p: p.clone(),
            cfg,
            device,
            cell: (*cell).clone(),
            update_freq: ctx
                .links
                .get(&train::UPDATE_FREQ)
                .map_or(1, |k| (*k).max(1)),
        })
    }
}

/// Runs the teacher on one batch with the given weights (f32; cast to `model.dtype` here).
/// Returns the targets `[B, T, D]` (f32, on `device`), D, the predicted losses (host, for the
/// masking stage) and T.
pub fn teach(
    cfg: &ModelConfig,
    w: &crate::model::Weights,
    batch: &Batch,
    device: &Device,
) -> Result<(Tensor, usize, Vec<f32>, usize), StageError> {
    // On a worker of rayon's pool, as the student's update (student.rs `on_pool`).
    crate::train::student::on_pool(|| teach_inner(cfg, w, batch, device))
}

fn teach_inner(
    cfg: &ModelConfig,
    w: &crate::model::Weights,
    batch: &Batch,
    device: &Device,
) -> Result<(Tensor, usize, Vec<f32>, usize), StageError> {
    if batch.padding_mask.is_some() {
        return Err(StageError::failed(format!("batch {}: padded batches (batch.by_duration crop: pad) cannot be trained on; use crop: shortest (the data2vec 2.0 recipe)", batch.step)));
    }
    if batch.dim != cfg.input_dim() {
        return Err(StageError::failed(format!(
            "batch {}: features have {} dimensions, the model's front-end ({:?}) expects {} (model.frontend.input_dim)",
            batch.step,
            batch.dim,
            cfg.frontend.kind,
            cfg.input_dim()
        )));
    }
    let t = cfg.frames_for(batch.frames);
    if t < 2 {
        return Err(StageError::failed(format!(
            "batch {}: {} input frames give {t} model frames; raise min_utt_seconds",
            batch.step, batch.frames
        )));
    }
    let e = stage_err("teacher");
    let x = Tensor::from_slice(
        &batch.data,
        (batch.size(), batch.frames, batch.dim),
        &Device::Cpu,
    )
    .map_err(&e)?
    .to_device(device)
    .map_err(&e)?;
    let dtype = cfg.dtype.dtype();
    let cast;
    let w = if dtype == DType::F32 {
        w
    } else {
        cast = w
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
            .collect::<candle_core::Result<crate::model::Weights>>()
            .map_err(&e)?;
        &cast
    };
    let x = x.to_dtype(dtype).map_err(&e)?;
    let m = Model::new(cfg, w);
    let z = m.frontend(&x).map_err(&e)?.detach();
    let out = m.teacher(&z).map_err(&e)?;
    let targets = out.targets.to_dtype(DType::F32).map_err(&e)?;
    // The predicted losses go to the (CPU) masking stage; reading them also waits for the
    // device's queue, so the targets are complete before another thread uses them.
    let pred = out
        .pred_loss
        .flatten_all()
        .map_err(&e)?
        .to_vec1::<f32>()
        .map_err(&e)?;
    device.synchronize().map_err(&e)?;
    Ok((targets, cfg.encoder.dim, pred, t))
}

impl Stage for TeacherStage {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let mut first: Option<u64> = None;
        while let Some(batch) = io.recv::<Batch>(0)? {
            let f = match first {
                Some(f) => f,
                None => match io.starved_while(|| self.cell.first(&|| io.is_cancelled()))? {
                    Some(f) => *first.insert(f),
                    None => return Ok(()),
                },
            };
            // Batches the student already learned from (a resumed run) are skipped. Versions count
            // updates: every batch of update u is taught with the weights after u − staleness.
            let update = batch.step / self.update_freq;
            if update < f {
                continue;
            }
            let version = update.saturating_sub(self.p.staleness).max(f);
            // Waiting for the student's weights is waiting for input (telemetry: starved).
            let w = match io.starved_while(|| self.cell.wait_for(version, &|| io.is_cancelled()))? {
                Wait::Weights(w) => w,
                Wait::Closed => return Ok(()),
            };
            let (targets, dim, pred, t) = teach(&self.cfg, &w.weights, &batch, &self.device)?;
            let taught = Taught {
                batch,
                targets,
                target_dim: dim,
                frames: t,
                pred_loss: pred,
                teacher_version: w.version,
            };
            match io.send(0, taught) {
                Ok(()) => {}
                Err(StageError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
