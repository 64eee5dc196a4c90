//! Items that flow between the speech stages.

/// One utterance: mono audio at `sample_rate` with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    /// Unique id (LibriSpeech: the file stem; otherwise the path relative to the input root,
    /// without extension).
    pub utt_id: String,
    pub speaker: Option<String>,
    /// Path relative to the input root, with `/` separators.
    pub source: String,
    pub transcript: Option<String>,
    pub sample_rate: u32,
    /// Samples in [-1, 1].
    pub samples: Vec<f32>,
    /// Epoch this copy belongs to (0 for freshly decoded audio).
    pub epoch: u32,
}

impl Utterance {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// An input file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Path relative to the input root, as `source` in `utterances`.
    pub source: String,
    pub reason: String,
}

/// What `audio.decode` emits for each input file, in input order.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Utterance(Utterance),
    Rejected(Reject),
}
