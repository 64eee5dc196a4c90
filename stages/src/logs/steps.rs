//! `log.steps`: one row per update.

use crate::items::StepRecord;
use crate::logs::table::*;
use arrow::array::{ArrayRef, Float64Builder, Int32Builder, Int64Builder, StringBuilder};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// log.steps

/// Parameters of `log.steps`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StepsLogParams {
    /// Start a new part file every this many steps (parts are named by their first step).
    pub rotate_every: u64,
    /// Table (sub-directory of the run directory) of the step rows.
    pub table: String,
    /// Buffer compression inside the parts: zstd, lz4 or none.
    pub compression: LogCompression,
}

impl Default for StepsLogParams {
    fn default() -> Self {
        StepsLogParams {
            rotate_every: 100,
            table: "steps".into(),
            compression: LogCompression::Zstd,
        }
    }
}

impl Params for StepsLogParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.rotate_every == 0 {
            e.push(ParamError::new("rotate_every", "must be at least 1"));
        }
        e.extend(check_table_name("table", &self.table));
        e
    }
}

/// Buffered rows of the `steps` table.
#[derive(Default)]
pub struct StepRows {
    run: StringBuilder,
    step: Int64Builder,
    epoch: Int32Builder,
    f64s: [Float64Builder; 7],
    frames: Int64Builder,
    utterances: Int64Builder,
    more: [Float64Builder; 7],
    teacher_version: Int64Builder,
    n: usize,
}

impl Rows for StepRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.run.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.epoch.finish()),
        ];
        cols.extend(
            self.f64s
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        cols.push(Arc::new(self.frames.finish()));
        cols.push(Arc::new(self.utterances.finish()));
        cols.extend(
            self.more
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        cols.push(Arc::new(self.teacher_version.finish()));
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// The `log.steps` logic without the engine.
pub struct StepLog {
    run: String,
    steps: TableWriter<StepRows>,
}

impl StepLog {
    pub fn new(p: &StepsLogParams, run: &str, run_dir: &Path) -> StepLog {
        let mut steps = TableWriter::new(
            run_dir.join(&p.table),
            steps_schema(),
            p.rotate_every,
            StepRows::default(),
        );
        steps.compression = p.compression;
        steps.every_step = true;
        StepLog {
            run: run.to_string(),
            steps,
        }
    }

    pub fn write(&mut self, r: &StepRecord) -> Result<(), StageError> {
        self.steps.start_step(r.step)?;
        let rows = &mut self.steps.rows;
        rows.run.append_value(&self.run);
        rows.step.append_value(r.step as i64);
        rows.epoch.append_value(r.epoch as i32);
        for (b, v) in rows.f64s.iter_mut().zip([
            r.lr,
            r.loss,
            r.loss_rec,
            r.loss_aux,
            r.tau,
            r.hard_ratio,
            r.masked_frac,
        ]) {
            b.append_value(v);
        }
        rows.frames.append_value(r.frames as i64);
        rows.utterances.append_value(r.utterances as i64);
        for (i, (b, v)) in rows
            .more
            .iter_mut()
            .zip([
                r.audio_s,
                r.step_ms,
                r.target_std,
                r.pred_std,
                r.rank_agreement,
                r.teacher_rank_agreement,
                r.grad_norm,
            ])
            .enumerate()
        {
            // pred_std and the agreements are NULL where undefined.
            if (3..6).contains(&i) && !v.is_finite() {
                b.append_null();
            } else {
                b.append_value(v);
            }
        }
        rows.teacher_version.append_value(r.teacher_version as i64);
        rows.n += 1;
        self.steps.end_step(r.step)?;
        if r.checkpoint_follows {
            // A part is never left open across a checkpoint (a kill after it loses no row).
            self.steps.close()?;
        }
        Ok(())
    }

    pub fn finish(&mut self) -> Result<TableSummary, StageError> {
        self.steps.finish()
    }
}

/// The `log.steps` stage.
pub struct LogSteps {
    log: StepLog,
}

impl StageDef for LogSteps {
    type Params = StepsLogParams;
    const KIND: &'static str = "log.steps";
    const DOC: &'static str = "Logs one row per student update (losses, lr, EMA decay, masking, health metrics) as Arrow IPC\nparts in <run_dir>/steps/ (atomic parts, rotated by step; a resume replaces rows from its step on).";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<StepRecord>(
            "in",
            "step records (student.steps)",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn link(
        p: &StepsLogParams,
        _: &StageContext,
        linker: &mut pipeline::Linker,
    ) -> Vec<ParamError> {
        claim_tables(linker, &[("table", p.table.as_str())])
    }
    fn create(p: &StepsLogParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        Ok(LogSteps {
            log: StepLog::new(p, &ctx.run, &ctx.run_dir),
        })
    }
}

impl RecordSink<StepRecord> for StepLog {
    fn write(&mut self, r: &StepRecord) -> Result<(), StageError> {
        StepLog::write(self, r)
    }
    fn take_notes(&mut self) -> Vec<String> {
        self.steps.take_notes()
    }
}

impl Stage for LogSteps {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let result = drain::<StepRecord>(io, &mut self.log);
        if matches!(result, Ok(()) | Err(StageError::Cancelled)) {
            self.log.finish()?;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};
    use std::fs::File;

    fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            epoch: 0,
            lr: 1e-3,
            loss: step as f64,
            loss_rec: 1.0,
            loss_aux: 0.0,
            tau: 0.99,
            hard_ratio: 0.0,
            masked_frac: 0.4,
            frames: 100,
            utterances: 2,
            audio_s: 2.0,
            step_ms: 10.0,
            target_std: 1.0,
            pred_std: f64::NAN,
            rank_agreement: f64::NAN,
            teacher_rank_agreement: 0.5,
            grad_norm: 0.5,
            teacher_version: step,
            checkpoint_follows: false,
        }
    }

    /// (step, loss) of every row in the table's complete parts, by part order.
    fn rows(dir: &Path) -> Vec<(i64, f64)> {
        let mut out = Vec::new();
        for (_, p) in list_parts(dir).unwrap() {
            for b in arrow::ipc::reader::FileReader::try_new(File::open(&p).unwrap(), None).unwrap()
            {
                let b = b.unwrap();
                let s = b
                    .column_by_name("step")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .clone();
                let l = b
                    .column_by_name("loss")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<arrow::array::Float64Array>()
                    .unwrap()
                    .clone();
                // The predictor's metrics are NULL where they are not defined, never NaN.
                assert_eq!(
                    b.column_by_name("rank_agreement").unwrap().null_count(),
                    b.num_rows()
                );
                out.extend((0..b.num_rows()).map(|i| (s.value(i), l.value(i))));
            }
        }
        out
    }

    /// A resumed run replaces the rows of the steps it repeats: parts from the resume step on are
    /// deleted, the part that straddles it is cut, unfinished parts are removed, and each step
    /// ends up in the table once.
    #[test]
    fn resume_replaces_repeated_steps_and_removes_unfinished_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let p = StepsLogParams {
            rotate_every: 10,
            ..StepsLogParams::default()
        };
        let mut log = StepLog::new(&p, "run", tmp.path());
        for s in 0..27 {
            log.write(&record(s)).unwrap();
        }
        log.finish().unwrap();
        let dir = tmp.path().join("steps");
        assert_eq!(list_parts(&dir).unwrap().len(), 3);
        // A part an earlier attempt never finished.
        std::fs::write(dir.join("part-000000030.arrow.tmp"), b"half").unwrap();
        // Resume at 14 (as from a checkpoint at step 14): steps 14.. are written again, with
        // other values.
        let mut log = StepLog::new(&p, "run", tmp.path());
        for s in 14..22 {
            let mut r = record(s);
            r.loss = 1000.0 + s as f64;
            log.write(&r).unwrap();
        }
        log.finish().unwrap();
        assert!(!dir.join("part-000000030.arrow.tmp").exists());
        let got = rows(&dir);
        let steps: Vec<i64> = got.iter().map(|r| r.0).collect();
        assert_eq!(
            steps,
            (0..22).collect::<Vec<i64>>(),
            "each step once, in order"
        );
        for (s, l) in got {
            let want = if s >= 14 { 1000.0 + s as f64 } else { s as f64 };
            assert_eq!(l, want, "step {s}");
        }
        // The cut part says where it ends now.
        assert_eq!(part_last_step(&dir.join(part_name(10))), Some(13));
    }

    /// A run killed (nothing finished, the open part's file left as it was) after a checkpoint
    /// at 8 and resumed there loses no row: the part open at the checkpoint was closed after
    /// the update the checkpoint followed. Without the flag, the same kill loses steps 0–7.
    #[test]
    fn a_part_closes_where_a_checkpoint_follows_so_a_kill_after_it_loses_no_row() {
        for flagged in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let p = StepsLogParams {
                rotate_every: 100,
                ..StepsLogParams::default()
            };
            let mut log = StepLog::new(&p, "run", tmp.path());
            for s in 0..11 {
                let mut r = record(s);
                // Checkpoints after updates 3 and 7 (`checkpoint_every: 4`).
                r.checkpoint_follows = flagged && (s + 1) % 4 == 0;
                log.write(&r).unwrap();
            }
            // Killed: the writer is dropped without finishing (its open part stays `.tmp`).
            drop(log);
            let dir = tmp.path().join("steps");
            let parts: Vec<u64> = list_parts(&dir).unwrap().iter().map(|(f, _)| *f).collect();
            // Resumed from the checkpoint at 8.
            let mut log = StepLog::new(&p, "run", tmp.path());
            for s in 8..12 {
                log.write(&record(s)).unwrap();
            }
            log.finish().unwrap();
            let steps: Vec<i64> = rows(&dir).iter().map(|r| r.0).collect();
            if flagged {
                assert_eq!(parts, vec![0, 4], "closed after steps 3 and 7");
                assert_eq!(part_last_step(&dir.join(part_name(0))), Some(3));
                assert_eq!(steps, (0..12).collect::<Vec<i64>>(), "no step lost");
            } else {
                assert!(parts.is_empty(), "{parts:?}");
                assert_eq!(steps, (8..12).collect::<Vec<i64>>(), "steps 0–7 lost");
            }
        }
    }
}
