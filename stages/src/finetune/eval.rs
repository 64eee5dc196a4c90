//! `eval.ctc`: scores the fine-tuner's model on one held-out set every time `finetune.ctc` hands
//! one over (every `eval_every` updates and at the end). Greedy CTC decoding; word and character
//! error rates into the `wer` table (one row per evaluation and set) and every hypothesis into
//! the `hypotheses` table, both queryable with `ehmam query`.
//!
//! The set is read once, whole, into memory (its input must end: a reader with `epochs: 1`, its
//! batches of whole utterances, `crop: pad`). Several `eval.ctc` stages (dev-clean, dev-other,
//! …) write the same two tables, each its own parts (`part-SET-NNNNNNNNN.arrow`); a resumed run
//! replaces a set's rows from the first step it scores again, as the other logs do.
//!
//! `wer` and `cer` are fractions (errors / reference words or characters); `ehmam report` shows
//! them in percent, as the paper's tables.

use super::stage::{rows_of, usable, EvalMsg, Unusable, EVAL_HUB};
use super::trainer::CtcModel;
use super::wer::{char_edits, word_edits, Edits};
use crate::items::Batch;
use crate::logs::table::{claim_tables, LogCompression, Rows, TableWriter};
use arrow::array::{ArrayRef, Float64Builder, Int64Builder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use crossbeam_channel::Receiver;
use pipeline::{
    Linker, ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Parameters of `eval.ctc`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EvalParams {
    /// The set's name in the tables (`dev_clean`, `heldout`); default: the stage's name.
    pub set: Option<String>,
    /// Write every hypothesis into the `hypotheses` table.
    pub hypotheses: bool,
    /// Buffer compression of the table parts: zstd, lz4 or none.
    pub compression: LogCompression,
}

impl Default for EvalParams {
    fn default() -> Self {
        EvalParams {
            set: None,
            hypotheses: true,
            compression: LogCompression::Zstd,
        }
    }
}

fn set_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Params for EvalParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if let Some(s) = &self.set {
            if !set_name_ok(s) {
                e.push(ParamError::new(
                    "set",
                    format!("`{s}`: letters, digits, `_` and `-` only (at most 64)"),
                ));
            }
        }
        e
    }
}

/// Columns of the `wer` table.
pub fn wer_schema() -> SchemaRef {
    let mut f = vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("step", DataType::Int64, false),
        Field::new("set", DataType::Utf8, false),
    ];
    for n in ["utterances", "words", "errors"] {
        f.push(Field::new(n, DataType::Int64, false));
    }
    // NaN-free: a set always has words (an empty one is refused).
    f.push(Field::new("wer", DataType::Float64, false));
    f.push(Field::new("cer", DataType::Float64, false));
    for n in [
        "chars",
        "char_errors",
        "substitutions",
        "deletions",
        "insertions",
    ] {
        f.push(Field::new(n, DataType::Int64, false));
    }
    Arc::new(Schema::new(f))
}

/// Columns of the `hypotheses` table.
pub fn hypotheses_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("step", DataType::Int64, false),
        Field::new("set", DataType::Utf8, false),
        Field::new("utt_id", DataType::Utf8, false),
        Field::new("reference", DataType::Utf8, false),
        Field::new("hypothesis", DataType::Utf8, false),
        Field::new("words", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
    ]))
}

/// One evaluation of one set.
#[derive(Debug, Clone, PartialEq)]
pub struct SetScore {
    pub step: u64,
    pub utterances: u64,
    pub words: Edits,
    pub chars: Edits,
    /// (utt_id, reference, hypothesis, word edits) of every utterance.
    pub hypotheses: Vec<(String, String, String, Edits)>,
}

#[derive(Default)]
struct WerRows {
    run: StringBuilder,
    step: Int64Builder,
    set: StringBuilder,
    ints: [Int64Builder; 3],
    rates: [Float64Builder; 2],
    more: [Int64Builder; 5],
    n: usize,
}

impl Rows for WerRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.run.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.set.finish()),
        ];
        cols.extend(
            self.ints
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        cols.extend(
            self.rates
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        cols.extend(
            self.more
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        RecordBatch::try_new(schema.clone(), cols)
    }
}

#[derive(Default)]
struct HypRows {
    strings: [StringBuilder; 6],
    step: Int64Builder,
    ints: [Int64Builder; 2],
    n: usize,
}

impl Rows for HypRows {
    fn len(&self) -> usize {
        self.n
    }
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        self.n = 0;
        let [run, set, utt, r, h, _] = &mut self.strings;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(run.finish()),
            Arc::new(self.step.finish()),
            Arc::new(set.finish()),
            Arc::new(utt.finish()),
            Arc::new(r.finish()),
            Arc::new(h.finish()),
            Arc::new(self.ints[0].finish()),
            Arc::new(self.ints[1].finish()),
        ];
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// Scores `model` on the batches of a set (greedy decoding; only whole transcribed members).
pub fn score(
    model: &CtcModel,
    set: &[Batch],
    device: &candle_core::Device,
) -> candle_core::Result<SetScore> {
    let mut s = SetScore {
        step: model.step,
        utterances: 0,
        words: Edits::default(),
        chars: Edits::default(),
        hypotheses: Vec::new(),
    };
    for b in set {
        let members: Vec<usize> = (0..b.size()).filter(|&i| usable(b, i).is_ok()).collect();
        if members.is_empty() {
            continue;
        }
        let rows = rows_of(b, members, device)?;
        let hyps = model.transcribe(&rows.x, &rows.frames)?;
        for (&i, h) in rows.members.iter().zip(hyps) {
            let r = usable(b, i).unwrap_or_default();
            let we = word_edits(r, &h);
            s.words.add(we);
            s.chars.add(char_edits(r, &h));
            s.utterances += 1;
            s.hypotheses
                .push((b.utt_ids[i].clone(), r.to_string(), h, we));
        }
    }
    Ok(s)
}

/// The `eval.ctc` stage.
pub struct EvalStage {
    set: String,
    run: String,
    inbox: Receiver<EvalMsg>,
    wer: TableWriter<WerRows>,
    hyp: Option<TableWriter<HypRows>>,
    device: candle_core::Device,
}

impl StageDef for EvalStage {
    type Params = EvalParams;
    const KIND: &'static str = "eval.ctc";
    const DOC: &'static str = "Scores the finetune.ctc model on a held-out set (read once, whole) every time it is handed one:\ngreedy CTC decoding, WER and CER into the `wer` table, every hypothesis into `hypotheses`.";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Batch>(
            "in",
            "the held-out set: padded batches of whole transcribed utterances (one epoch)",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn link(p: &EvalParams, ctx: &StageContext, linker: &mut Linker) -> Vec<ParamError> {
        linker.read(&EVAL_HUB);
        let set = p.set.clone().unwrap_or_else(|| ctx.stage.clone());
        let mut e = Vec::new();
        if p.set.is_none() && !set_name_ok(&set) {
            e.push(ParamError::new(
                "set",
                format!("the stage name `{set}` is not a set name; give `set`"),
            ));
        }
        // One stage per set: two of them would write the same parts.
        let claim = format!("wer.{set}");
        e.extend(claim_tables(linker, &[("set", claim.as_str())]));
        e
    }
    fn check_links(_p: &EvalParams, ctx: &StageContext) -> Vec<ParamError> {
        match ctx.links.get(&EVAL_HUB) {
            Some(hub) => {
                hub.subscribe(&ctx.stage);
                Vec::new()
            }
            None => vec![ParamError::new(
                "",
                "eval.ctc scores what a finetune.ctc stage trains; the spec has none",
            )],
        }
    }
    fn create(p: &EvalParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        let hub = ctx
            .links
            .get(&EVAL_HUB)
            .ok_or_else(|| StageError::failed("internal: no evaluation hub"))?;
        let inbox = hub
            .take(&ctx.stage)
            .ok_or_else(|| StageError::failed("internal: not subscribed to the evaluation hub"))?;
        let set = p.set.clone().unwrap_or_else(|| ctx.stage.clone());
        let mut wer = TableWriter::new(
            ctx.run_dir.join("wer"),
            wer_schema(),
            u64::MAX,
            WerRows::default(),
        );
        wer.compression = p.compression;
        wer.tag = Some(set.clone());
        let hyp = p.hypotheses.then(|| {
            let mut h = TableWriter::new(
                ctx.run_dir.join("hypotheses"),
                hypotheses_schema(),
                u64::MAX,
                HypRows::default(),
            );
            h.compression = p.compression;
            h.tag = Some(set.clone());
            h
        });
        Ok(EvalStage {
            set,
            run: ctx.run.clone(),
            inbox,
            wer,
            hyp,
            device: crate::train::device(&ctx.device)?,
        })
    }
}

impl EvalStage {
    fn write(&mut self, s: &SetScore) -> Result<(), StageError> {
        self.wer.start_step(s.step)?;
        let r = &mut self.wer.rows;
        r.run.append_value(&self.run);
        r.step.append_value(s.step as i64);
        r.set.append_value(&self.set);
        for (b, v) in r.ints.iter_mut().zip([
            s.utterances,
            s.words.reference as u64,
            s.words.errors() as u64,
        ]) {
            b.append_value(v as i64);
        }
        r.rates[0].append_value(s.words.rate());
        r.rates[1].append_value(s.chars.rate());
        for (b, v) in r.more.iter_mut().zip([
            s.chars.reference,
            s.chars.errors(),
            s.words.substitutions,
            s.words.deletions,
            s.words.insertions,
        ]) {
            b.append_value(v as i64);
        }
        r.n += 1;
        self.wer.end_step(s.step)?;
        // Each evaluation is its own part: a crash later loses none of it.
        self.wer.close()?;
        if let Some(h) = self.hyp.as_mut() {
            h.start_step(s.step)?;
            let rows = &mut h.rows;
            for (utt, reference, hypothesis, e) in &s.hypotheses {
                let [run, set, u, rf, hy, _] = &mut rows.strings;
                run.append_value(&self.run);
                set.append_value(&self.set);
                u.append_value(utt);
                rf.append_value(reference);
                hy.append_value(hypothesis);
                rows.step.append_value(s.step as i64);
                rows.ints[0].append_value(e.reference as i64);
                rows.ints[1].append_value(e.errors() as i64);
                rows.n += 1;
            }
            h.end_step(s.step)?;
            h.close()?;
        }
        Ok(())
    }
}

impl Stage for EvalStage {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let mut set: Vec<Batch> = Vec::new();
        let (mut cropped, mut untranscribed, mut usable_n) = (0u64, 0u64, 0u64);
        while let Some(b) = io.recv::<Batch>(0)? {
            if b.epoch > 0 {
                // One pass is the set; later epochs (a reader with epochs > 1) add nothing.
                break;
            }
            for i in 0..b.size() {
                match usable(&b, i) {
                    Ok(_) => usable_n += 1,
                    Err(Unusable::Cropped) => cropped += 1,
                    Err(Unusable::NoTranscript) => untranscribed += 1,
                }
            }
            set.push(b);
        }
        if cropped + untranscribed > 0 {
            io.count("cropped", cropped);
            io.count("no_transcript", untranscribed);
            io.note(format!(
                "{}: {cropped} cropped utterances and {untranscribed} without a transcript are not scored",
                self.set
            ));
        }
        if usable_n == 0 {
            return Err(StageError::failed(format!(
                "the set `{}` has no whole utterance with a transcript to score ({cropped} cropped, {untranscribed} without a transcript)",
                self.set
            )));
        }
        let mut first = true;
        let mut evals = 0u64;
        loop {
            let inbox = &self.inbox;
            let got = io.starved_while(|| inbox.recv_timeout(Duration::from_millis(100)));
            let msg = match got {
                Ok(m) => m,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    io.check_cancelled()?;
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let EvalMsg::Model(model) = msg;
            if let Some(b) = set.first() {
                super::stage::check_dim(b, &model.cfg)?;
            }
            let s = score(&model, &set, &self.device)
                .map_err(|e| StageError::failed(format!("scoring step {}: {e}", model.step)))?;
            if first {
                for n in self.wer.take_notes() {
                    io.note(n);
                }
                first = false;
            }
            self.write(&s)?;
            for n in self.wer.take_notes() {
                io.note(n);
            }
            if let Some(h) = &self.hyp {
                for n in h.take_notes() {
                    io.note(n);
                }
            }
            evals += 1;
            io.progress().inc(1);
            io.note(format!(
                "step {}: {} WER {:.2}% CER {:.2}% ({} utterances, {} words)",
                s.step,
                self.set,
                100.0 * s.words.rate(),
                100.0 * s.chars.rate(),
                s.utterances,
                s.words.reference
            ));
        }
        if evals == 0 {
            io.note(format!(
                "{}: no model was handed over; nothing scored",
                self.set
            ));
        }
        Ok(())
    }
}
