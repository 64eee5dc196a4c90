//! Fine-tuning with CTC and scoring by WER (issue 19): the CTC loss with its own backward pass,
//! word and character error rates, the letter vocabulary in fairseq's convention, and fairseq's
//! tri-stage learning-rate schedule; the `finetune.ctc` and `eval.ctc` stages.

pub mod bench;
pub mod ctc;
pub mod eval;
pub mod init;
pub mod schedule;
pub mod stage;
pub mod trainer;
pub mod vocab;
pub mod wer;
