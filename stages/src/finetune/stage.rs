//! `finetune.ctc`: CTC fine-tuning of a pre-trained encoder as a pipeline stage. It takes padded
//! batches of whole utterances with their transcripts (`batch.by_duration` with `crop: pad`),
//! trains [`Finetuner`], sends a step record per update (for `log.steps` and
//! `log.tensorboard`), checkpoints and resumes exactly, and hands a copy of the model to every
//! `eval.ctc` stage of the spec every `eval_every` updates and at the end ([`EvalHub`]).

use super::init::{self, InitSource};
use super::trainer::{CtcModel, FinetuneParams, Finetuner};
use super::vocab::{Unknown, Vocab};
use crate::items::{Batch, DataPosition, StepRecord};
use crate::train::{self, FinetuneMeta};
use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};
use pipeline::{
    Link, Linker, ParamError, Port, Stage, StageContext, StageDef, StageError, StageIo,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the fine-tuner hands the evaluators.
#[derive(Clone)]
pub enum EvalMsg {
    /// The model after `step` updates.
    Model(Arc<CtcModel>),
}

/// The fine-tuner's models, handed to each `eval.ctc` stage of the plan on its own bounded
/// channel: an evaluator that falls behind holds training back (a model is a copy of every
/// weight) instead of piling copies up.
#[derive(Default)]
pub struct EvalHub {
    subscribers: Mutex<BTreeMap<String, (Option<Sender<EvalMsg>>, Option<Receiver<EvalMsg>>)>>,
}

impl EvalHub {
    /// An evaluator registers (the link check, before any stage is built).
    pub fn subscribe(&self, stage: &str) {
        let mut s = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        s.entry(stage.to_string()).or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::bounded(1);
            (Some(tx), Some(rx))
        });
    }
    /// The evaluator's end of its channel (once).
    pub fn take(&self, stage: &str) -> Option<Receiver<EvalMsg>> {
        let mut s = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        s.get_mut(stage).and_then(|(_, rx)| rx.take())
    }
    fn senders(&self) -> Vec<Sender<EvalMsg>> {
        let s = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        s.values().filter_map(|(tx, _)| tx.clone()).collect()
    }
    /// Hands `msg` to every evaluator, waiting while one is busy; gives up on a stop.
    pub fn publish(&self, msg: EvalMsg, io: &StageIo) -> Result<(), StageError> {
        for tx in self.senders() {
            let mut m = msg.clone();
            loop {
                match tx.send_timeout(m, Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => break,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                        m = back;
                        io.starved_while(|| ());
                        io.check_cancelled()?;
                    }
                }
            }
        }
        Ok(())
    }
    /// No more models: the evaluators finish what they hold and end.
    pub fn close(&self) {
        let mut s = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for (tx, _) in s.values_mut() {
            *tx = None;
        }
    }
    pub fn count(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// The fine-tuner's hub: `finetune.ctc` provides it, `eval.ctc` reads it.
pub const EVAL_HUB: Link<Arc<EvalHub>> = Link::new("finetune.eval_hub");

/// Closes the hub however the stage ends.
struct CloseOnDrop(Arc<EvalHub>);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The vocabulary the parameters ask for.
pub fn vocab_of(p: &FinetuneParams) -> Result<(Vocab, String), String> {
    if let Some(path) = &p.vocab {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let v = Vocab::parse_dict(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok((v, format!("{}", path.display())));
    }
    if let Some(dir) = &p.vocab_from {
        let rows = crate::data::shards::store_transcripts(dir).map_err(|e| e.to_string())?;
        let texts: Vec<&str> = rows.iter().filter_map(|(_, t)| t.as_deref()).collect();
        if texts.is_empty() {
            return Err(format!(
                "{}: no utterance of the store has a transcript",
                dir.display()
            ));
        }
        let v = Vocab::from_transcripts(texts.iter().copied());
        return Ok((
            v,
            format!("{} transcripts of {}", texts.len(), dir.display()),
        ));
    }
    Err("no vocabulary: give vocab or vocab_from".into())
}

/// The run's newest complete fine-tuning checkpoint, when resuming.
fn resume_checkpoint(
    p: &FinetuneParams,
    ctx: &StageContext,
) -> Result<Option<train::FoundCheckpoint>, String> {
    if !p.resume {
        return Ok(None);
    }
    match train::find_checkpoint(&ctx.run_dir).map_err(|e| e.to_string())? {
        Some(f) if f.meta.finetune.is_none() => Err(format!(
            "{}: a pre-training checkpoint in the fine-tuning run's directory; give the fine-tuning run its own run directory",
            f.json.display()
        )),
        other => Ok(other),
    }
}

/// A padded batch's usable rows as a tensor with their frame counts and label sequences.
pub struct Rows {
    pub x: Tensor,
    pub frames: Vec<usize>,
    /// Indices into the batch of the rows taken.
    pub members: Vec<usize>,
}

/// Why a batch member is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// Cropped by the batcher (`max_utt_seconds`, or `crop: shortest`): its transcript is not
    /// its own.
    Cropped,
    NoTranscript,
}

/// Whether member `i` of `b` can be learned from or scored.
pub fn usable(b: &Batch, i: usize) -> Result<&str, Unusable> {
    if !b.whole.get(i).copied().unwrap_or(false) {
        return Err(Unusable::Cropped);
    }
    match b.transcripts.get(i).and_then(|t| t.as_deref()) {
        Some(t) if !t.trim().is_empty() => Ok(t),
        _ => Err(Unusable::NoTranscript),
    }
}

/// The rows `members` of a batch, padded to the longest of them, on `device`.
pub fn rows_of(
    b: &Batch,
    members: Vec<usize>,
    device: &candle_core::Device,
) -> candle_core::Result<Rows> {
    let frames: Vec<usize> = members.iter().map(|&i| b.lengths[i]).collect();
    let n = frames.iter().copied().max().unwrap_or(0);
    let d = b.dim;
    let mut x = vec![0f32; members.len() * n * d];
    for (r, &i) in members.iter().enumerate() {
        let len = b.lengths[i].min(b.frames);
        let src = &b.data[i * b.frames * d..(i * b.frames + len) * d];
        x[r * n * d..r * n * d + len * d].copy_from_slice(src);
    }
    let x = Tensor::from_vec(x, (members.len(), n, d), device)?;
    Ok(Rows { x, frames, members })
}

/// The batches' features are what the pre-trained front-end reads.
pub fn check_dim(b: &Batch, cfg: &crate::model::ModelConfig) -> Result<(), StageError> {
    let want = cfg.input_dim();
    if b.dim != want {
        let front = match cfg.frontend.kind {
            crate::model::FrontendKind::Fbank => "an fbank front-end",
            crate::model::FrontendKind::Cnn => "a CNN front-end over waveforms (features.waveform)",
        };
        return Err(StageError::failed(format!(
            "the batches hold {}-dim features; the pre-trained model has {front} reading {want}-dim input: compute the features as its pre-training did",
            b.dim
        )));
    }
    Ok(())
}

/// The `finetune.ctc` stage.
pub struct FinetuneStage {
    ft: Finetuner,
    hub: Arc<EvalHub>,
    run_dir: PathBuf,
    init: String,
    position: Option<DataPosition>,
    epoch: u32,
    notes: Vec<String>,
}

impl StageDef for FinetuneStage {
    type Params = FinetuneParams;
    const KIND: &'static str = "finetune.ctc";
    const DOC: &'static str = "Fine-tunes a pre-trained encoder with a CTC head on padded batches of whole transcribed utterances\n(tri-stage lr, frozen front-end, encoder frozen for freeze_finetune_updates, time and channel masking);\ncheckpoints, resumes, and hands the model to the eval.ctc stages every eval_every updates.";
    const CONTINUABLE: &'static [&'static str] = &["max_steps", "eval_every"];

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Batch>(
            "in",
            "padded batches of whole utterances with transcripts (batch.by_duration, crop: pad)",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<StepRecord>(
            "steps",
            "one record per update (loss: mean CTC loss per utterance), for log.steps",
        )]
    }
    fn paths(p: &FinetuneParams, _ctx: &StageContext) -> pipeline::StagePaths {
        let mut reads = vec![p.init.clone()];
        reads.extend(p.vocab.clone());
        reads.extend(p.vocab_from.clone());
        pipeline::StagePaths {
            reads,
            writes: vec![],
            stores: p.vocab_from.iter().cloned().collect(),
        }
    }
    fn validate(p: &FinetuneParams, ctx: &StageContext) -> Vec<ParamError> {
        let mut e = Vec::new();
        if let Err(why) = init::locate(&p.init) {
            e.push(ParamError::new("init", why));
        }
        if p.vocab.is_some() || p.vocab_from.is_some() {
            let field = if p.vocab.is_some() {
                "vocab"
            } else {
                "vocab_from"
            };
            if let Err(why) = vocab_of(p) {
                e.push(ParamError::new(field, why));
            }
        }
        if let Err(why) = resume_checkpoint(p, ctx) {
            e.push(ParamError::new(
                "resume",
                format!("{why} (or set resume: false)"),
            ));
        }
        if ctx.model.is_some() {
            e.push(ParamError::new(
                "/model",
                "a fine-tuning spec takes its model from `init` (the pre-trained run or export); remove the model: block",
            ));
        }
        e
    }
    fn link(p: &FinetuneParams, ctx: &StageContext, linker: &mut Linker) -> Vec<ParamError> {
        let mut e = Vec::new();
        if linker
            .provide(&EVAL_HUB, Arc::new(EvalHub::default()))
            .is_err()
        {
            e.push(ParamError::new(
                "",
                "one finetune.ctc stage per spec (another already trains in this one)",
            ));
        }
        if let Ok(Some(f)) = resume_checkpoint(p, ctx) {
            if let Some(pos) = f.meta.position {
                if crate::stream::provide_resume(linker, pos.after()).is_err() {
                    e.push(ParamError::new(
                        "",
                        "another learner of the spec resumes the data stream",
                    ));
                }
            }
        }
        e
    }
    fn create(p: &FinetuneParams, ctx: &StageContext, _worker: usize) -> Result<Self, StageError> {
        if let Some(d) = crate::dist::current() {
            return Err(StageError::failed(format!(
                "fine-tuning runs as one process (this is rank {} of {}): data-parallel training covers the student (pre-training) only; use update_freq for a larger batch",
                d.rank, d.world
            )));
        }
        let device = train::device(&ctx.device)?;
        let pre = init::load(&p.init, &device)?;
        let (mut vocab, vocab_source) = vocab_of(p).map_err(StageError::failed)?;
        let mut notes = Vec::new();
        let found = resume_checkpoint(p, ctx).map_err(StageError::failed)?;
        if let Some(f) = &found {
            if let Some(fm) = &f.meta.finetune {
                if fm.vocab != vocab.symbols {
                    return Err(StageError::failed(format!(
                        "{}: its vocabulary ({} symbols) is not the one {vocab_source} gives ({} symbols); resume with the same vocabulary, or set resume: false",
                        f.json.display(),
                        fm.vocab.len(),
                        vocab.symbols.len()
                    )));
                }
                vocab = Vocab {
                    symbols: fm.vocab.clone(),
                };
            }
        }
        let init_desc = pre.source.to_string();
        if matches!(pre.source, InitSource::Run { .. }) || found.is_none() {
            notes.push(format!(
                "pre-trained model from {init_desc}; vocabulary of {} symbols from {vocab_source}",
                vocab.len() - 1
            ));
        }
        let mut ft = Finetuner::on(pre.cfg, &pre.weights, vocab, p.clone(), ctx.seed, &device)
            .map_err(train::stage_err("finetune: building the model"))?;
        let (mut position, mut epoch) = (None, 0);
        if let Some(f) = found {
            let tensors = train::load_tensors(&f.path, &device)?;
            ft.restore(f.meta.step, f.meta.adam_t, &tensors)
                .map_err(|e| StageError::failed(format!("{}: {e}", f.path.display())))?;
            notes.extend(f.fallback_notes());
            notes.push(format!(
                "resuming from {} (step {})",
                f.path.display(),
                f.meta.step
            ));
            position = f.meta.position;
            epoch = f.meta.epoch;
        }
        let hub = ctx
            .links
            .get(&EVAL_HUB)
            .ok_or_else(|| StageError::failed("internal: the evaluation hub was not linked"))?;
        Ok(FinetuneStage {
            ft,
            hub: (*hub).clone(),
            run_dir: ctx.run_dir.clone(),
            init: init_desc,
            position,
            epoch,
            notes,
        })
    }
}

impl FinetuneStage {
    fn checkpoint(&self) -> Result<(), StageError> {
        let ft = &self.ft;
        let meta = train::CheckpointMeta {
            format: 1,
            step: ft.step,
            epoch: self.epoch,
            position: self.position,
            seed: ft.seed,
            rng: "chacha8 streams derived from (seed, step): masks, dropout and layerdrop of update t".into(),
            adam_t: ft.adam.t,
            model: ft.cfg.clone(),
            tensors: format!("step-{:08}.safetensors", ft.step),
            frame_rate: None,
            fp16_scale: None,
            finetune: Some(FinetuneMeta {
                vocab: ft.vocab.symbols.clone(),
                init: self.init.clone(),
            }),
            ranks: None,
        };
        train::save_checkpoint(
            &self.run_dir,
            &meta,
            &ft.checkpoint_tensors(),
            ft.p.keep_checkpoints,
        )?;
        write_dict(&self.run_dir, &ft.vocab)?;
        Ok(())
    }

    fn publish(&self, io: &StageIo) -> Result<(), StageError> {
        if self.hub.count() == 0 {
            return Ok(());
        }
        let m = self
            .ft
            .snapshot()
            .map_err(train::stage_err("finetune: copying the model"))?;
        self.hub.publish(EvalMsg::Model(Arc::new(m)), io)
    }

    fn eval_due(&self) -> bool {
        let (s, every) = (self.ft.step, self.ft.p.eval_every);
        (every > 0 && s % every == 0) || s >= self.ft.p.max_steps
    }
}

/// What the fine-tuning loop counts across updates.
#[derive(Default)]
struct RunState {
    unknown: Unknown,
    cropped: usize,
    untranscribed: usize,
    infeasible: usize,
    empty_batches: usize,
    used_any: bool,
    seen: u64,
    last_saved: u64,
    last_eval: u64,
}

impl FinetuneStage {
    /// One update from the batches `bs`; true once `max_steps` is reached.
    fn update(
        &mut self,
        io: &mut StageIo,
        bs: &[Batch],
        st: &mut RunState,
    ) -> Result<bool, StageError> {
        let t0 = Instant::now();
        let step_no = self.ft.step;
        let mut parts: Vec<(Rows, Vec<Vec<u32>>)> = Vec::new();
        for b in bs {
            st.seen += 1;
            let mut members = Vec::new();
            let mut labels = Vec::new();
            for i in 0..b.size() {
                match usable(b, i) {
                    Ok(t) => {
                        let l = self.ft.vocab.encode(t, &mut st.unknown);
                        if l.is_empty() {
                            st.untranscribed += 1;
                            continue;
                        }
                        members.push(i);
                        labels.push(l);
                    }
                    Err(Unusable::Cropped) => st.cropped += 1,
                    Err(Unusable::NoTranscript) => st.untranscribed += 1,
                }
            }
            if members.is_empty() {
                st.empty_batches += 1;
                if !st.used_any && st.seen >= 8 {
                    return Err(StageError::failed(format!(
                        "the first {} batches hold no usable utterance ({} cropped, {} without a transcript): fine-tuning needs whole utterances with transcripts (batch.by_duration with crop: pad and max_utt_seconds above the longest utterance; transcripts from audio.decode)",
                        st.seen, st.cropped, st.untranscribed
                    )));
                }
                continue;
            }
            st.used_any = true;
            let rows = rows_of(b, members, &self.ft.device)
                .map_err(train::stage_err("finetune: batch"))?;
            parts.push((rows, labels));
        }
        let last = bs
            .last()
            .ok_or_else(|| StageError::failed("internal: an update without batches"))?;
        let out = if parts.is_empty() {
            // No usable utterance: the update is still counted, so the stream and the schedule
            // stay in step.
            self.ft.step += 1;
            None
        } else {
            let batches: Vec<super::trainer::TrainBatch> = parts
                .iter()
                .map(|(r, l)| (&r.x, r.frames.as_slice(), l.as_slice()))
                .collect();
            let s = self
                .ft
                .train_update(&batches)
                .map_err(|e| StageError::failed(format!("update {step_no}: {e}")))?;
            st.infeasible += s.infeasible;
            let members: usize = parts.iter().map(|(r, _)| r.members.len()).sum();
            if !s.loss.is_finite() && s.infeasible < members {
                return Err(StageError::failed(format!(
                    "update {step_no}: the loss is not finite ({})",
                    s.loss
                )));
            }
            Some((s, members))
        };
        self.position = Some(last.position);
        self.epoch = last.epoch;
        io.progress().inc(1);
        if let Some((s, members)) = out {
            if io.is_connected(0) && s.loss.is_finite() {
                let frames: usize = parts
                    .iter()
                    .map(|(r, _)| r.frames.iter().sum::<usize>())
                    .sum();
                ok_or_closed(io.send(
                    0,
                    StepRecord {
                        step: step_no,
                        epoch: last.epoch,
                        lr: s.lr,
                        loss: s.loss,
                        loss_rec: s.loss,
                        loss_aux: 0.0,
                        tau: 0.0,
                        hard_ratio: 0.0,
                        masked_frac: s.masked_frac,
                        frames: frames as u64,
                        utterances: (members - s.infeasible) as u64,
                        audio_s: frames as f64 / last.frame_rate,
                        step_ms: t0.elapsed().as_secs_f64() * 1e3,
                        target_std: f64::NAN,
                        pred_std: f64::NAN,
                        rank_agreement: f64::NAN,
                        teacher_rank_agreement: f64::NAN,
                        grad_norm: s.grad_norm,
                        teacher_version: 0,
                        // `self.ft.step` counts this update already (as the checkpoint below).
                        checkpoint_follows: self.ft.p.checkpoint_every > 0
                            && self.ft.step % self.ft.p.checkpoint_every == 0,
                    },
                ))?;
            }
        }
        let every = self.ft.p.checkpoint_every;
        if every > 0 && self.ft.step % every == 0 {
            self.checkpoint()?;
            st.last_saved = self.ft.step;
        }
        if self.eval_due() {
            self.publish(io)?;
            st.last_eval = self.ft.step;
        }
        Ok(self.ft.step >= self.ft.p.max_steps)
    }
}

/// The vocabulary as `dict.ltr.txt` in the run directory (what a decoder or a later fine-tuning
/// reads).
fn write_dict(run_dir: &Path, v: &Vocab) -> Result<(), StageError> {
    let p = run_dir.join("dict.ltr.txt");
    let text = v.to_dict(std::iter::empty());
    crate::train::write_atomic(&p, text.as_bytes())
        .map_err(|e| StageError::io(format!("cannot write {}", p.display()), e))
}

/// A log sink that stopped early does not stop training.
fn ok_or_closed(r: Result<(), StageError>) -> Result<(), StageError> {
    match r {
        Err(StageError::Closed) => Ok(()),
        other => other,
    }
}

impl Stage for FinetuneStage {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let _close = CloseOnDrop(self.hub.clone());
        for line in std::mem::take(&mut self.notes) {
            io.note(line);
        }
        let max = self.ft.p.max_steps;
        // A resumed run re-evaluates its checkpoint's step when it is an evaluation step (an
        // earlier attempt may have stopped before its rows were written).
        if self.ft.step > 0 && self.eval_due() {
            self.publish(io)?;
        }
        if self.ft.step >= max {
            io.note(format!(
                "already at step {} of max_steps {max}; nothing to train",
                self.ft.step
            ));
            return Ok(());
        }
        io.progress().set_length(max, "steps");
        io.progress().inc(self.ft.step);
        let mut st = RunState {
            last_saved: self.ft.step,
            last_eval: self.ft.step,
            ..RunState::default()
        };
        let k = self.ft.p.update_freq.max(1);
        let mut group: Vec<Batch> = Vec::new();
        let mut ended = false;
        loop {
            // The batches of one update (`update_freq` consecutive ones); a stream that ends
            // inside an update trains on what it has.
            let next = if ended { None } else { io.recv::<Batch>(0)? };
            match next {
                Some(b) => {
                    let u = b.step / k;
                    if u < self.ft.step {
                        continue;
                    }
                    check_dim(&b, &self.ft.cfg)?;
                    if group.first().is_some_and(|g| g.step / k != u) {
                        let bs = std::mem::replace(&mut group, vec![b]);
                        if self.update(io, &bs, &mut st)? {
                            break;
                        }
                        continue;
                    }
                    group.push(b);
                    if (group.len() as u64) < k {
                        continue;
                    }
                }
                None => {
                    ended = true;
                    if group.is_empty() {
                        break;
                    }
                }
            }
            let bs = std::mem::take(&mut group);
            if self.update(io, &bs, &mut st)? || ended {
                break;
            }
        }
        let RunState {
            unknown,
            cropped,
            untranscribed,
            infeasible,
            empty_batches,
            last_saved,
            last_eval,
            ..
        } = st;
        if self.ft.step != last_saved {
            self.checkpoint()?;
        }
        if self.ft.step != last_eval {
            // The stream ended before max_steps: the model as it ends is still scored.
            self.publish(io)?;
        }
        if self.ft.step < max {
            io.note(format!(
                "the data ended after {} of max_steps {max} updates (raise the reader's epochs to train longer)",
                self.ft.step
            ));
        }
        for (name, n) in [
            ("cropped", cropped),
            ("no_transcript", untranscribed),
            ("infeasible", infeasible),
            ("empty_batches", empty_batches),
        ] {
            if n > 0 {
                io.count(name, n as u64);
            }
        }
        if cropped + untranscribed > 0 {
            io.note(format!(
                "left out {cropped} cropped utterances and {untranscribed} without a transcript"
            ));
        }
        if infeasible > 0 {
            io.note(format!(
                "{infeasible} utterances had more labels than frames (no loss, no gradient; counted as `infeasible`)"
            ));
        }
        if !unknown.chars.is_empty() {
            let total: u64 = unknown.chars.values().sum();
            io.count("unknown_chars", total);
            let list: Vec<String> = unknown
                .chars
                .iter()
                .map(|(c, n)| format!("{c:?} ×{n}"))
                .collect();
            io.note(format!(
                "{total} characters of the transcripts are outside the vocabulary and were left out of the labels: {}",
                list.join(", ")
            ));
        }
        Ok(())
    }
}
