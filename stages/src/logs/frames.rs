//! `log.frames`: frame-level rows of sampled utterances and, apart, their input features.

use crate::items::FrameRecord;
use crate::logs::table::*;
use arrow::array::{
    ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int64Builder,
    ListBuilder, StringBuilder,
};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// log.frames

/// Parameters of `log.frames`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FramesLogParams {
    /// Log the frames of every `every`-th step (steps divisible by it); 1 logs every step.
    pub every: u64,
    /// Fraction of each logged batch's utterances whose frames are kept, in (0, 1]; chosen by a
    /// hash of the stage seed, the step and the utt_id (reproducible).
    pub utterances: f64,
    /// Start a new part file every this many steps (parts are named by their first step).
    pub rotate_every: u64,
    /// Table (sub-directory of the run directory) of the frame rows.
    pub table: String,
    /// Table of the student's input features at the logged frames (one `features` list per
    /// frame, for the fbank image of `ehmam plot`); null to store none.
    pub inputs_table: Option<String>,
    /// Log the input features only at steps divisible by this (they are ~40× the bytes of a
    /// frame row); 0 logs them whenever frames are logged.
    pub inputs_every: u64,
    /// Buffer compression inside the parts: zstd, lz4 or none.
    pub compression: LogCompression,
}

impl Default for FramesLogParams {
    fn default() -> Self {
        FramesLogParams {
            every: 10,
            utterances: 0.25,
            rotate_every: 100,
            table: "frames".into(),
            inputs_table: Some("inputs".into()),
            inputs_every: 100,
            compression: LogCompression::Zstd,
        }
    }
}

impl Params for FramesLogParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.every == 0 {
            e.push(ParamError::new("every", "must be at least 1"));
        }
        if !(self.utterances > 0.0 && self.utterances <= 1.0) {
            e.push(ParamError::new(
                "utterances",
                format!("must be in (0, 1], got {}", self.utterances),
            ));
        }
        if self.rotate_every == 0 {
            e.push(ParamError::new("rotate_every", "must be at least 1"));
        }
        e.extend(check_table_name("table", &self.table));
        if let Some(t) = &self.inputs_table {
            e.extend(check_table_name("inputs_table", t));
            if t == &self.table {
                e.push(ParamError::new(
                    "inputs_table",
                    format!("must differ from `table` ({t})"),
                ));
            }
        }
        e
    }
}

/// Buffered rows of the `frames` table.
#[derive(Default)]
pub struct FrameRows {
    run: StringBuilder,
    step: Int64Builder,
    epoch: Int32Builder,
    utt_id: StringBuilder,
    member: Int32Builder,
    frame: Int32Builder,
    time_s: Float64Builder,
    masked: BooleanBuilder,
    hard: BooleanBuilder,
    teacher_pred: Float32Builder,
    student_pred: Float32Builder,
    recon_loss: Float32Builder,
    hard_ratio: Float32Builder,
    n: usize,
}

impl Rows for FrameRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.run.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.epoch.finish()),
            Arc::new(self.utt_id.finish()),
            Arc::new(self.member.finish()),
            Arc::new(self.frame.finish()),
            Arc::new(self.time_s.finish()),
            Arc::new(self.masked.finish()),
            Arc::new(self.hard.finish()),
            Arc::new(self.teacher_pred.finish()),
            Arc::new(self.student_pred.finish()),
            Arc::new(self.recon_loss.finish()),
            Arc::new(self.hard_ratio.finish()),
        ];
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// Buffered rows of the `inputs` table.
pub struct InputRows {
    run: StringBuilder,
    step: Int64Builder,
    utt_id: StringBuilder,
    frame: Int32Builder,
    feature_dim: Int32Builder,
    features: ListBuilder<Float32Builder>,
    n: usize,
}

impl Default for InputRows {
    fn default() -> Self {
        InputRows {
            run: StringBuilder::new(),
            step: Int64Builder::new(),
            utt_id: StringBuilder::new(),
            frame: Int32Builder::new(),
            feature_dim: Int32Builder::new(),
            features: ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
                "item",
                DataType::Float32,
                false,
            ))),
            n: 0,
        }
    }
}

impl Rows for InputRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.run.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.utt_id.finish()),
            Arc::new(self.frame.finish()),
            Arc::new(self.feature_dim.finish()),
            Arc::new(self.features.finish()),
        ];
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// What a frame log wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrameLogSummary {
    pub frames: TableSummary,
    pub inputs: Option<TableSummary>,
    /// Records received (every step, logged or not).
    pub records: u64,
}

/// The `log.frames` logic without the engine (tests and benchmarks drive it directly).
pub struct FrameLog {
    p: FramesLogParams,
    run: String,
    seed: u64,
    frames: TableWriter<FrameRows>,
    inputs: Option<TableWriter<InputRows>>,
    records: u64,
    warned_features: bool,
    notes: Vec<String>,
}

impl FrameLog {
    /// A frame log into `run_dir` for run `run`; `seed` drives the utterance sampling.
    pub fn new(p: &FramesLogParams, run: &str, run_dir: &Path, seed: u64) -> FrameLog {
        let mut frames = TableWriter::new(
            run_dir.join(&p.table),
            frames_schema(),
            p.rotate_every,
            FrameRows::default(),
        );
        frames.compression = p.compression;
        let inputs = p.inputs_table.as_ref().map(|t| {
            let mut w = TableWriter::new(
                run_dir.join(t),
                inputs_schema(),
                p.rotate_every,
                InputRows::default(),
            );
            w.compression = p.compression;
            w
        });
        FrameLog {
            p: p.clone(),
            run: run.to_string(),
            seed,
            frames,
            inputs,
            records: 0,
            warned_features: false,
            notes: Vec::new(),
        }
    }

    /// Logs one update's frames (if its step and utterances are sampled); closes the open parts
    /// when a checkpoint follows the update (a kill after it loses no row).
    pub fn write(&mut self, r: &FrameRecord) -> Result<(), StageError> {
        self.write_rows(r)?;
        if r.checkpoint_follows {
            self.frames.close()?;
            if let Some(w) = self.inputs.as_mut() {
                w.close()?;
            }
        }
        Ok(())
    }

    fn write_rows(&mut self, r: &FrameRecord) -> Result<(), StageError> {
        let n = r.utt_ids.len();
        let t = r.frames;
        let cells = n * t;
        let bad = |what: &str, got: usize, want: usize| {
            StageError::failed(format!("frame record of step {}: `{what}` has {got} values, expected {want} ({n} utterances × {t} frames)", r.step,))
        };
        for (what, got) in [
            ("mask", r.mask.len()),
            ("hard", r.hard.len()),
            ("teacher_pred", r.teacher_pred.len()),
            ("student_pred", r.student_pred.len()),
            ("recon_loss", r.recon_loss.len()),
        ] {
            if got != cells {
                return Err(bad(what, got, cells));
            }
        }
        if r.offsets_s.len() != n {
            return Err(StageError::failed(format!(
                "frame record of step {}: {} offsets for {n} utterances",
                r.step,
                r.offsets_s.len()
            )));
        }
        if !(r.frame_rate > 0.0 && r.frame_rate.is_finite()) {
            return Err(StageError::failed(format!(
                "frame record of step {}: frame rate {} Hz",
                r.step, r.frame_rate
            )));
        }
        self.records += 1;
        self.frames.start_step(r.step)?;
        if let Some(w) = self.inputs.as_mut() {
            w.start_step(r.step)?;
        }
        if r.step % self.p.every != 0 {
            return Ok(());
        }
        // Features per frame: `feature_dim` values for fbank; a frame's share of the samples
        // (its stride) for waveform input.
        let per_member = if n > 0 && r.features.len() % n == 0 {
            r.features.len() / n
        } else {
            0
        };
        let per_frame = if t > 0 { per_member / t } else { 0 };
        if self.inputs.is_some() && per_frame == 0 && cells > 0 && !self.warned_features {
            self.notes.push(format!("warning: step {}: {} feature values do not cover {n} utterances × {t} frames; no inputs logged", r.step, r.features.len()));
            self.warned_features = true;
        }
        let step = r.step as i64;
        for (i, utt) in r.utt_ids.iter().enumerate() {
            if !crate::seed::frame_log_sampled(self.seed, r.step, utt, self.p.utterances) {
                continue;
            }
            let rows = &mut self.frames.rows;
            let base = i * t;
            for f in 0..t {
                let c = base + f;
                rows.run.append_value(&self.run);
                rows.step.append_value(step);
                rows.epoch.append_value(r.epoch as i32);
                rows.utt_id.append_value(utt);
                rows.member.append_value(i as i32);
                rows.frame.append_value(f as i32);
                rows.time_s
                    .append_value(r.offsets_s[i] + f as f64 / r.frame_rate);
                rows.masked.append_value(r.mask[c]);
                rows.hard.append_value(r.hard[c]);
                rows.teacher_pred.append_value(r.teacher_pred[c]);
                let sp = r.student_pred[c];
                rows.student_pred
                    .append_option(sp.is_finite().then_some(sp));
                rows.recon_loss
                    .append_option(r.mask[c].then_some(r.recon_loss[c]));
                rows.hard_ratio.append_value(r.hard_ratio);
            }
            rows.n += t;
            let inputs_due = self.p.inputs_every == 0 || r.step % self.p.inputs_every == 0;
            if let (Some(w), true) = (self.inputs.as_mut(), per_frame > 0 && inputs_due) {
                let rows = &mut w.rows;
                for f in 0..t {
                    let at = i * per_member + f * per_frame;
                    rows.run.append_value(&self.run);
                    rows.step.append_value(step);
                    rows.utt_id.append_value(utt);
                    rows.frame.append_value(f as i32);
                    rows.feature_dim.append_value(r.feature_dim as i32);
                    rows.features
                        .values()
                        .append_slice(&r.features[at..at + per_frame]);
                    rows.features.append(true);
                }
                rows.n += t;
            }
        }
        self.frames.end_step(r.step)?;
        if let Some(w) = self.inputs.as_mut() {
            w.end_step(r.step)?;
        }
        Ok(())
    }

    /// Closes the open parts.
    pub fn finish(&mut self) -> Result<FrameLogSummary, StageError> {
        let frames = self.frames.finish()?;
        let inputs = match self.inputs.as_mut() {
            Some(w) => Some(w.finish()?),
            None => None,
        };
        Ok(FrameLogSummary {
            frames,
            inputs,
            records: self.records,
        })
    }
}

/// The `log.frames` stage.
pub struct LogFrames {
    log: FrameLog,
}

impl StageDef for LogFrames {
    type Params = FramesLogParams;
    const KIND: &'static str = "log.frames";
    const DOC: &'static str = "Logs the student's per-frame view (masked, hard, predicted and actual losses, time in the\naudio) of sampled steps and utterances as Arrow IPC parts in <run_dir>/frames/, and their input\nfeatures in <run_dir>/inputs/ (atomic parts, rotated by step; a resume replaces rows from its step on).";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<FrameRecord>(
            "in",
            "frame records (student.frames)",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn link(
        p: &FramesLogParams,
        _: &StageContext,
        linker: &mut pipeline::Linker,
    ) -> Vec<ParamError> {
        let mut tables = vec![("table", p.table.as_str())];
        if let Some(t) = &p.inputs_table {
            tables.push(("inputs_table", t.as_str()));
        }
        claim_tables(linker, &tables)
    }
    fn create(p: &FramesLogParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        Ok(LogFrames {
            log: FrameLog::new(p, &ctx.run, &ctx.run_dir, ctx.seed),
        })
    }
}

impl RecordSink<FrameRecord> for FrameLog {
    fn write(&mut self, r: &FrameRecord) -> Result<(), StageError> {
        FrameLog::write(self, r)
    }
    fn take_notes(&mut self) -> Vec<String> {
        let mut n = std::mem::take(&mut self.notes);
        n.extend(self.frames.take_notes());
        if let Some(i) = &self.inputs {
            n.extend(i.take_notes());
        }
        n
    }
}

impl Stage for LogFrames {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let result = drain::<FrameRecord>(io, &mut self.log);
        if matches!(result, Ok(()) | Err(StageError::Cancelled)) {
            let s = self.log.finish()?;
            let per_row = if s.frames.rows > 0 {
                s.frames.bytes as f64 / s.frames.rows as f64
            } else {
                0.0
            };
            io.count("frames_logged", s.frames.rows);
            io.note(format!(
                "{} frames of {} steps logged in {} parts ({per_row:.0} bytes/frame)",
                s.frames.rows, s.records, s.frames.parts
            ));
        }
        result
    }
}
