//! Fine-tuning with CTC and scoring by WER (issue 19): the CTC loss with its own backward pass,
//! word and character error rates, the letter vocabulary in fairseq's convention, and fairseq's
//! tri-stage learning-rate schedule.

pub mod ctc;
pub mod schedule;
pub mod trainer;
pub mod vocab;
pub mod wer;
