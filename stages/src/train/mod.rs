//! Training: the weight cell through which the student publishes EMA teacher weights, checkpoints
//! and export, the teacher, the masking strategies (pure) and the mask stage, the student.

pub mod bench;
pub mod checkpoint;
pub mod export_hf;
pub mod mask;
pub mod masking;
pub mod student;
pub mod teacher;
pub mod weights;

pub use checkpoint::*;
pub use weights::*;

use crate::model::ModelConfig;
use candle_core::Device;
use pipeline::{Link, ParamError, StageContext, StageError};

/// The length of the student's schedule (its `schedule_steps`, else `max_steps`): the default
/// ramp of the easy-to-hard curriculum.
pub const TOTAL_UPDATES: Link<u64> = Link::new("train.total_updates");

pub use crate::stream::UPDATE_FREQ;

/// The student's weight cell: the student provides it, the teacher reads it.
pub const TEACHER_WEIGHTS: Link<std::sync::Arc<WeightCell>> = Link::new("train.teacher_weights");

/// candle device of a spec's `device` string. One device per GPU for the whole process: the
/// teacher and the student hand tensors to each other, and candle refuses to combine tensors
/// of two device handles even when they name the same GPU.
pub fn device(name: &str) -> crate::Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = name.strip_prefix("cuda:") {
        let n: usize = n
            .parse()
            .map_err(|_| format!("`{name}`: expected cuda:N with N a GPU index"))?;
        static OPEN: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, d)) = open.iter().find(|(i, _)| *i == n) {
            return Ok(d.clone());
        }
        let d = Device::new_cuda(n)
            // candle appends a captured backtrace to its errors: keep the message line.
            .map_err(|e| {
                let e = e.to_string();
                let first = e.lines().next().unwrap_or("").trim().to_string();
                format!("cannot open {name}: {first}")
            })
            .map_err(crate::Error::from)?;
        open.push((n, d.clone()));
        return Ok(d);
    }
    Err(crate::Error::from(format!(
        "unknown device `{name}` (cpu or cuda:N)"
    )))
}

/// The model block and device, checked at validation; errors carry spec-top paths.
pub fn validate_model(ctx: &StageContext) -> Vec<ParamError> {
    let mut e = Vec::new();
    if let Err(errs) = ModelConfig::from_spec(ctx.model.as_ref()) {
        e.extend(
            errs.into_iter()
                .map(|(p, m)| ParamError::new(format!("/{p}"), m)),
        );
    }
    // Unknown device names are the spec's own check (`device`); not repeated here.
    e
}

pub fn model_config(ctx: &StageContext) -> Result<ModelConfig, StageError> {
    ModelConfig::from_spec(ctx.model.as_ref()).map_err(|e| {
        StageError::failed(
            e.into_iter()
                .map(|(p, m)| format!("{p}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    })
}

pub fn stage_err(what: &str) -> impl Fn(candle_core::Error) -> StageError + '_ {
    move |e| StageError::failed(format!("{what}: {e}"))
}
